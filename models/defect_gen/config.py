"""Settings of Defect-Gen: the two networks, the shared noise schedule, training and sampling.

Three presets: ``tiny`` (unit tests, seconds), ``cpu`` (a round on 2 CPU cores in minutes: 64 px crops,
small networks, 500 + 1,200 steps, at most 360 s) and ``full`` (a GPU: 96 px crops, wider and deeper
networks, thousands of steps, bf16 autocast). :func:`preset` with no name picks ``full`` when CUDA is
present, else ``cpu``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch


@dataclass(frozen=True)
class DefectGenConfig:
    """Everything that decides what Defect-Gen trains and samples (stored beside the weights).

    Geometry:
        crop_size: side of the square crops at full resolution the large model learns and samples.
        region_size: side of the centred inpainting square in a crop where the defect is generated; the ring
            outside it is the real normal fabric (RePaint-style known pixels).
        patch_size: side of the patches the small (late-step) model is trained on.
    Networks (diffusers ``UNet2DModel``):
        large_channels / large_attention / large_layers: widths per level, attention per level, ResNet
            blocks per level of the large-receptive-field model (noisy steps).
        small_channels / small_layers: the same for the shallow patch-level model (late steps); it has no
            attention.
        norm_groups: GroupNorm groups of both networks.
    Schedule:
        num_train_timesteps: T; beta_schedule: diffusers name of the betas (one set for both models);
            prediction_type: what both networks predict, ``v_prediction`` or ``epsilon`` (as published).
        switch_fraction: s = round(switch_fraction * T); the large model handles t >= s, the small one t < s.
    Training:
        large_steps / small_steps: optimiser steps of each model; batch_size; lr (AdamW, warm-up then cosine);
        jitter: colour jitter amplitude (gain and offset, in [-1, 1] units); max_train_seconds: a wall-clock
        cap on both models together (None: none): the small model, cheap per step, trains first within its
        share in proportion to the steps, and the large one gets the rest; a model that reaches its cap
        stops early and says so in its history.
    Sampling:
        sampler: ``ddim`` or ``ddpm`` (same betas as training); sampling_steps: steps of the one descent;
        resample_jumps: RePaint resampling, each step redone that many more times after re-noising its
        result back to t (0 = none); batch_size_sample: crops per forward pass; paste_margin: the rim in
        pixels around the generated mask over which the generated pixels blend into the real fabric
        (models/defect_gen/placement.py); None writes the whole generated square back (plain RePaint).
    """

    crop_size: int = 64
    region_size: int = 44
    patch_size: int = 32
    large_channels: tuple[int, ...] = (32, 32, 64, 64)
    large_attention: tuple[bool, ...] = (False, False, False, True)
    large_layers: int = 1
    small_channels: tuple[int, ...] = (32, 64)
    small_layers: int = 1
    norm_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # v, not the published epsilon: the safer target for the +-1 mask channels when a round trains little
    # (models/defect_gen/README.md).
    prediction_type: str = "v_prediction"
    switch_fraction: float = 0.4
    large_steps: int = 500
    small_steps: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    jitter: float = 0.05
    max_train_seconds: float | None = None
    sampler: str = "ddim"
    sampling_steps: int = 25
    resample_jumps: int = 0
    batch_size_sample: int = 16
    paste_margin: int | None = 3
    name: str = "cpu"

    def __post_init__(self) -> None:
        levels = len(self.large_channels)
        if len(self.large_attention) != levels:
            raise ValueError(
                f"large_attention needs one flag per level ({levels}), got {self.large_attention}"
            )
        for what, size, depth in (
            ("crop_size", self.crop_size, levels),
            ("patch_size", self.patch_size, len(self.small_channels)),
        ):
            if size % 2 ** (depth - 1):
                raise ValueError(f"{what} {size} must be divisible by 2**(levels - 1) = {2 ** (depth - 1)}")
        if self.crop_size % 2 ** (len(self.small_channels) - 1):
            raise ValueError("crop_size must also be divisible by the small model's downsampling")
        if not 0 < self.region_size < self.crop_size:
            raise ValueError(f"region_size {self.region_size} must lie in (0, crop_size={self.crop_size})")
        if not 0.0 < self.switch_fraction < 1.0:
            raise ValueError(f"switch_fraction must be in (0, 1), got {self.switch_fraction}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if self.num_train_timesteps % self.sampling_steps:
            raise ValueError(
                f"sampling_steps {self.sampling_steps} must divide num_train_timesteps "
                f"{self.num_train_timesteps} (each step then lands exactly on the next one's timestep)"
            )
        if any(c % self.norm_groups for c in (*self.large_channels, *self.small_channels)):
            raise ValueError(f"every channel width must be divisible by norm_groups={self.norm_groups}")

    @property
    def switch_timestep(self) -> int:
        """s: the first timestep (from the top) that the small model handles is s - 1."""
        return round(self.switch_fraction * self.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefectGenConfig:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            if key not in known:
                continue
            values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def replace(self, **changes: Any) -> DefectGenConfig:
        return replace(self, **changes)


PRESETS: dict[str, DefectGenConfig] = {
    "tiny": DefectGenConfig(
        crop_size=16,
        region_size=10,
        patch_size=8,
        large_channels=(8, 16),
        large_attention=(False, True),
        small_channels=(8, 8),
        norm_groups=4,
        large_steps=30,
        small_steps=30,
        batch_size=8,
        lr=2e-3,
        warmup_steps=2,
        sampling_steps=5,
        batch_size_sample=8,
        name="tiny",
    ),
    # ~3.5 min on 2 idle cores (BENCHMARKS.md): the 1,200 small-model steps are what clean the image channels.
    # Stochastic DDPM over 100 steps: on the same CPU-trained model it drew smoother, more coherent defects
    # than DDIM over 25 (BENCHMARKS.md), at 4x the sampling time (seconds for a round's pairs).
    "cpu": DefectGenConfig(max_train_seconds=360.0, sampler="ddpm", sampling_steps=100, name="cpu"),
    "full": DefectGenConfig(
        crop_size=96,
        region_size=64,
        patch_size=48,
        large_channels=(64, 128, 128, 256),
        large_attention=(False, False, True, True),
        large_layers=2,
        small_channels=(64, 128),
        small_layers=1,
        norm_groups=32,
        large_steps=4000,
        small_steps=2000,
        batch_size=64,
        lr=4e-4,
        warmup_steps=100,
        max_train_seconds=75.0,
        sampling_steps=50,
        batch_size_sample=128,
        name="full",
    ),
}


def preset(name: str | None = None, **overrides: Any) -> DefectGenConfig:
    """A preset by name (``tiny``, ``cpu``, ``full``); None or ``auto``: ``full`` with CUDA, else ``cpu``."""
    if name in (None, "auto"):
        name = "full" if torch.cuda.is_available() else "cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown Defect-Gen preset {name!r}; known: {', '.join(PRESETS)} (or auto)")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
