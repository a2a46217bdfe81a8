"""Defect-Gen pipeline: two UNets, one scheduler, and the denoising loop written out.

``DefectGenPipeline`` holds the large model (t >= s), the small model (t < s), the training scheduler
(``DDPMScheduler``, whose betas the DDIM/DDPM sampler shares) and the config. It saves as a folder:

```
large/      config.json + diffusion_pytorch_model.safetensors   (UNet2DModel.save_pretrained)
small/      config.json + diffusion_pytorch_model.safetensors
scheduler/  scheduler_config.json
defect_gen.json   the DefectGenConfig, class names, per-class statistics of the training defects
```

:meth:`DefectGenPipeline.inpaint` is RePaint-style conditioning on a real normal crop: at every step the
pixels outside the inpainting region are replaced by the normal crop noised to the step's target t (its
mask channels saying "background"), so the model only generates inside the region, image and mask
together, and the ring of real fabric around it steers its colour and weave. The last step replaces them
by the clean crop itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from models.defect_gen.config import DefectGenConfig
from models.defect_gen.data import background_channels
from models.defect_gen.schedule import (
    LARGE,
    Step,
    descent,
    noise_to,
    renoise,
    sampling_scheduler,
    training_scheduler,
)
from models.defect_gen.unets import IMAGE_CHANNELS, build_large_unet, build_small_unet

META_NAME = "defect_gen.json"


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing on CPU (CPU bf16 convolutions are slower than float32 here)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def region_mask(config: DefectGenConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, S, S) float: 1 inside the centred inpainting square, 0 on the known ring around it."""
    size, side = config.crop_size, config.region_size
    start = (size - side) // 2
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., start : start + side, start : start + side] = 1.0
    return mask


def region_box(config: DefectGenConfig) -> tuple[int, int]:
    """(start, stop) of the inpainting square along both axes of a crop."""
    start = (config.crop_size - config.region_size) // 2
    return start, start + config.region_size


class DefectGenPipeline:
    """The two denoisers and their shared scheduler; see the module docstring.

    Args:
        large: the large-receptive-field UNet (t >= s).
        small: the patch-level UNet (t < s).
        scheduler: the training ``DDPMScheduler`` (the sampler is built from its config).
        config: the :class:`DefectGenConfig` both were built and trained with.
        class_names: the project's K classes (mask value k is ``class_names[k - 1]``).
        stats: per-class statistics of the training defects (``max_components``, ``instances``, ...).
    """

    def __init__(
        self,
        large: UNet2DModel,
        small: UNet2DModel,
        scheduler: DDPMScheduler,
        config: DefectGenConfig,
        class_names: list[str],
        stats: dict[str, Any] | None = None,
    ) -> None:
        self.large, self.small, self.scheduler = large, small, scheduler
        self.config = config
        self.class_names = list(class_names)
        self.stats = stats or {}

    @classmethod
    def build(cls, config: DefectGenConfig, class_names: list[str]) -> DefectGenPipeline:
        """Fresh, untrained networks for ``class_names``."""
        k = len(class_names)
        return cls(
            build_large_unet(config, k),
            build_small_unet(config, k),
            training_scheduler(config),
            config,
            class_names,
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.large.parameters()).device

    def to(self, device: str | torch.device) -> DefectGenPipeline:
        self.large.to(device)
        self.small.to(device)
        return self

    # ---- save / load ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the folder layout of the module docstring (safetensors weights, JSON configs)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.large.save_pretrained(directory / "large", safe_serialization=True)
        self.small.save_pretrained(directory / "small", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        meta = {
            **(metadata or {}),
            "config": self.config.to_dict(),
            "classes": self.class_names,
            "stats": self.stats,
        }
        (directory / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> DefectGenPipeline:
        """Load a saved pipeline (eval mode) onto ``device`` (default: CUDA when present)."""
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: a Defect-Gen model folder holds {META_NAME}, large/, small/ and "
                "scheduler/ (written by `loom augment train`)"
            )
        meta = json.loads(meta_path.read_text())
        config = DefectGenConfig.from_dict(meta["config"])
        large = UNet2DModel.from_pretrained(directory / "large", low_cpu_mem_usage=False)
        small = UNet2DModel.from_pretrained(directory / "small", low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        pipeline = cls(large.eval(), small.eval(), scheduler, config, meta["classes"], meta.get("stats"))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return pipeline.to(device)

    # ---- sampling ------------------------------------------------------------------------------------
    def class_id(self, name: str) -> int:
        if name not in self.class_names:
            raise ValueError(f"unknown class {name!r}; this model knows {self.class_names}")
        return self.class_names.index(name) + 1

    def known_sample(self, crops: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 normal crops -> (B, C, S, S) joint samples with background mask channels."""
        rgb = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = crops.shape[1]
        mask = background_channels(self.num_classes, size, size).expand(len(crops), -1, -1, -1)
        return torch.cat([rgb, mask], dim=1).to(self.device)

    @torch.no_grad()
    def denoise(
        self,
        known: torch.Tensor,
        class_ids: torch.Tensor,
        region: torch.Tensor,
        generator: torch.Generator,
        on_step: Callable[[Step, str], None] | None = None,
    ) -> torch.Tensor:
        """The one descent, with known pixels outside ``region``.

        Args:
            known: (B, C, S, S) clean joint sample whose pixels where ``region`` is 0 are kept.
            class_ids: (B,) classes to generate (1..K).
            region: (1 or B, 1, S, S), 1 where the model generates.
            generator: a torch generator on the pipeline's device (noise of the start, of the DDPM steps, of
                the known pixels and of the resampling jumps).
            on_step: called before each network call with the step and the network's name.

        Returns:
            (B, C, S, S) the clean sample x_0 (known pixels exactly ``known`` outside the region).
        """
        config = self.config
        device = self.device
        scheduler = sampling_scheduler(config, self.scheduler)
        nets = {LARGE: self.large, "small": self.small}
        for net in nets.values():
            net.eval()
        known = known.to(device)
        region = region.to(device)
        labels = class_ids.to(device)

        def randn() -> torch.Tensor:
            return torch.randn(known.shape, generator=generator, device=device)

        x = randn()  # x_T: pure noise
        for step in descent(config, scheduler):
            net = nets[step.model]
            timestep = torch.full((len(x),), step.t, device=device, dtype=torch.long)
            for jump in range(config.resample_jumps + 1):
                if on_step is not None:
                    on_step(step, step.model)
                with autocast(device):
                    eps = net(x, timestep, class_labels=labels).sample
                x_prev = scheduler.step(eps.float(), step.t, x, generator=generator).prev_sample
                known_prev = noise_to(scheduler, known, randn(), step.t_prev)
                x_prev = region * x_prev + (1 - region) * known_prev
                if jump < config.resample_jumps:
                    x = renoise(scheduler, x_prev, step.t_prev, step.t, randn())
            x = x_prev
        return x

    def inpaint(
        self, crops: np.ndarray, class_ids: list[int] | torch.Tensor, generator: torch.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Generate a defect of each asked class inside the inpainting square of each normal crop.

        Args:
            crops: (B, S, S, 3) uint8 crops of real normal fabric.
            class_ids: B classes (1..K).
            generator: torch generator on the pipeline's device.

        Returns:
            (B, S, S, 3) uint8 harmonised crops and (B, S, S) uint8 class masks (argmax of the mask channels
            inside the region, 0 outside).
        """
        size = self.config.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (size, size, 3) or crops.dtype != np.uint8:
            raise ValueError(
                f"inpaint expects (B, {size}, {size}, 3) uint8 crops, got {crops.shape} {crops.dtype}"
            )
        labels = torch.as_tensor(class_ids, dtype=torch.long)
        region = region_mask(self.config, self.device)
        x0 = self.denoise(self.known_sample(crops), labels, region, generator).float()
        rgb = ((x0[:, :IMAGE_CHANNELS].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        masks = x0[:, IMAGE_CHANNELS:].argmax(dim=1).to(torch.uint8) * region[:, 0].to(torch.uint8)
        return rgb.permute(0, 2, 3, 1).cpu().numpy(), masks.cpu().numpy()
