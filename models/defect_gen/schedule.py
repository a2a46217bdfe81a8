"""One noise schedule, one scheduler, one descent: which model handles which timestep.

Training noise comes from a ``DDPMScheduler``; sampling uses a ``DDIMScheduler`` or a ``DDPMScheduler``
built from the same config, so both models and both samplers share one set of betas. The large model is
trained on t in [s, T) and the small one on t in [0, s); at sampling the large model denoises from pure noise
while t >= s and the small model continues from the same x_t for t < s. The timesteps fall strictly from
T - 1 to the last step; the switch is only a change of network, never a restart (the published Defect
Spectrum sampler runs the large model over t = 599..0 and then restarts the small one at t = 399 on the
already clean output, without re-noising it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from models.defect_gen.config import DefectGenConfig

LARGE = "large"
SMALL = "small"


@dataclass(frozen=True)
class Step:
    """One denoising step: x_t -> x_{t_prev} by model ``model`` (``t_prev = -1``: the clean sample)."""

    t: int
    t_prev: int
    model: str


def training_scheduler(config: DefectGenConfig) -> DDPMScheduler:
    """The scheduler whose ``add_noise`` makes training inputs (and whose config is saved)."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=True,
        timestep_spacing="trailing",
    )


def sampling_scheduler(
    config: DefectGenConfig, base: DDPMScheduler | None = None
) -> DDIMScheduler | DDPMScheduler:
    """DDIM or DDPM (``config.sampler``) from the training scheduler's config: the same betas."""
    base = base or training_scheduler(config)
    cls = DDIMScheduler if config.sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(base.config)
    scheduler.set_timesteps(config.sampling_steps)
    return scheduler


def model_for(t: int, switch: int) -> str:
    """The model whose training range holds t: the large one for t >= s, the small one below."""
    return LARGE if t >= switch else SMALL


def timestep_range(model: str, config: DefectGenConfig) -> tuple[int, int]:
    """[low, high) of the timesteps ``model`` is trained on."""
    switch = config.switch_timestep
    return (switch, config.num_train_timesteps) if model == LARGE else (0, switch)


def descent(config: DefectGenConfig, scheduler: DDIMScheduler | DDPMScheduler | None = None) -> list[Step]:
    """The whole sampling trajectory: strictly falling t from T - 1, each t given to the model of its range.

    ``t_prev`` of each step is the next step's t (the last one's is -1, the clean sample), which is exactly
    where the scheduler's ``step`` lands (``sampling_steps`` divides T, trailing spacing).
    """
    scheduler = scheduler or sampling_scheduler(config)
    timesteps = [int(t) for t in scheduler.timesteps]
    switch = config.switch_timestep
    steps = []
    for index, t in enumerate(timesteps):
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        steps.append(Step(t, t_prev, model_for(t, switch)))
    return steps


def alpha_bar(scheduler: DDIMScheduler | DDPMScheduler, t: int) -> torch.Tensor:
    """Cumulative alpha at t (1 at t = -1, the clean sample)."""
    return scheduler.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)


def noise_to(
    scheduler: DDIMScheduler | DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: int
) -> torch.Tensor:
    """q(x_t | x_0): ``x0`` noised to timestep t (x0 itself for t = -1)."""
    a = alpha_bar(scheduler, t).to(x0.device, x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def renoise(
    scheduler: DDIMScheduler | DDPMScheduler, x_prev: torch.Tensor, t_prev: int, t: int, noise: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x_{t_prev}) for a RePaint resampling jump back up from t_prev to t."""
    ratio = (alpha_bar(scheduler, t) / alpha_bar(scheduler, t_prev)).to(x_prev.device, x_prev.dtype)
    return ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise
