"""Explicit training loops of the two denoisers, each on its own timestep range.

The large model learns t in [s, T) on whole crops around the labeled defects, the small one t in [0, s) on
random patches of the same crops. Both: epsilon (or v) prediction, MSE over all joint channels (RGB and mask),
AdamW with a linear warm-up then cosine decay, bf16 autocast and TF32 on CUDA, channels-last.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from models.defect_gen.config import DefectGenConfig
from models.defect_gen.data import DefectCrops, random_patches
from models.defect_gen.pipeline import DefectGenPipeline, autocast
from models.defect_gen.schedule import LARGE, SMALL, timestep_range
from models.progress import progress

logger = logging.getLogger(__name__)

#: Loss entries kept in the history: one per this many steps (and the last).
LOG_EVERY = 10


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a half cosine down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def denoising_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """MSE between the network's output from x_t and its target (mean over every value).

    The target is the noise (``epsilon``) or the velocity sqrt(a) eps - sqrt(1 - a) x0 (``v_prediction``),
    as the scheduler's ``prediction_type`` says.
    """
    noisy = scheduler.add_noise(x0, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = noise
    with autocast(x0.device):
        predicted = unet(
            noisy.contiguous(memory_format=torch.channels_last), timesteps, class_labels=labels
        ).sample
    return F.mse_loss(predicted.float(), target)


def train_denoiser(
    unet: UNet2DModel,
    which: str,
    crops: DefectCrops,
    scheduler: DDPMScheduler,
    config: DefectGenConfig,
    seed: int = 0,
    steps: int | None = None,
    max_seconds: float | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train one denoiser in place on its timestep range; returns the loss history.

    Args:
        unet: the large (whole crops) or small (patches) model.
        which: ``"large"`` or ``"small"``: picks the timestep range and whether to cut patches.
        crops: the class-balanced crop sampler (on the training device).
        scheduler: the training scheduler (noise levels).
        config: steps, batch size, learning rate, warm-up.
        seed: seeds the crops, patches, timesteps and noise (a CPU generator: same draws on any device).
        steps: overrides ``config.large_steps`` / ``config.small_steps`` (warm starts train fewer).
        max_seconds: stop after this many seconds of training (None: no cap).
        on_log: called with each history entry.

    Returns:
        Entries ``{"step", "loss", "seconds"}`` every :data:`LOG_EVERY` steps (the loss averaged since the
        previous entry); the last entry also carries ``"stopped_early": 1.0`` when ``max_seconds`` cut
        the training short.
    """
    if which not in (LARGE, SMALL):
        raise ValueError(f"which must be {LARGE!r} or {SMALL!r}, got {which!r}")
    total = steps if steps is not None else (config.large_steps if which == LARGE else config.small_steps)
    device = crops.device
    unet.to(device).train()
    unet.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed * 2 + (which == SMALL))
    low, high = timestep_range(which, config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-4)
    lr_schedule = warmup_cosine(optimizer, config.warmup_steps, total)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    running: list[float] = []
    shown = progress(f"train defect-gen {which}", total, "steps")
    with shown:
        for step in range(total):
            x0, labels = crops.batch(config.batch_size, generator)
            if which == SMALL:
                x0 = random_patches(x0, config.patch_size, generator)
            timesteps = torch.randint(low, high, (len(x0),), generator=generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            loss = denoising_loss(unet, scheduler, x0, labels, timesteps, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            running.append(loss.item())
            shown.advance(note=f"loss {running[-1]:.4f}")
            seconds = time.perf_counter() - started
            over_time = max_seconds is not None and seconds > max_seconds
            if (step + 1) % LOG_EVERY == 0 or step + 1 == total or over_time:
                entry = {"step": float(step + 1), "loss": float(np.mean(running)), "seconds": seconds}
                if over_time and step + 1 < total:
                    entry["stopped_early"] = 1.0
                history.append(entry)
                running = []
                if on_log is not None:
                    on_log(entry)
                logger.info("defect-gen %s step %d/%d loss %.4f", which, step + 1, total, entry["loss"])
            if over_time:
                logger.warning(
                    "defect-gen %s stopped at step %d/%d: its %.0f s of training time reached",
                    which,
                    step + 1,
                    total,
                    max_seconds,
                )
                break
    unet.eval()
    return history


@torch.no_grad()
def evaluation_loss(
    unet: UNet2DModel,
    which: str,
    crops: DefectCrops,
    scheduler: DDPMScheduler,
    config: DefectGenConfig,
    batches: int = 4,
    seed: int = 1234,
) -> float:
    """Mean denoising loss on fixed crops, timesteps and noise (seeded): comparable across trainings."""
    generator = torch.Generator().manual_seed(seed)
    low, high = timestep_range(which, config)
    losses = []
    unet.eval()
    for _ in range(batches):
        x0, labels = crops.batch(config.batch_size, generator)
        if which == SMALL:
            x0 = random_patches(x0, config.patch_size, generator)
        timesteps = torch.randint(low, high, (len(x0),), generator=generator).to(crops.device)
        noise = torch.randn(x0.shape, generator=generator).to(crops.device)
        losses.append(denoising_loss(unet, scheduler, x0, labels, timesteps, noise).item())
    return float(np.mean(losses))


def time_cap(config: DefectGenConfig, which: str, spent: float) -> float | None:
    """Seconds of ``max_train_seconds`` that ``which`` may train, ``spent`` seconds into the pipeline.

    The small model trains first (cheap per step) within its share in proportion to the steps; the large
    one gets what is left, so an early finish of the small one is not lost.
    """
    if config.max_train_seconds is None:
        return None
    if which == SMALL:
        return config.max_train_seconds * config.small_steps / max(1, config.large_steps + config.small_steps)
    return max(0.0, config.max_train_seconds - spent)


def defect_statistics(crops: DefectCrops, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per class: instances, median size and pixels, and the most components one instance has."""
    stats: dict[str, dict[str, float]] = {}
    for class_id in crops.classes:
        own = [i for i in crops.instances if i.class_id == class_id]
        stats[class_names[class_id - 1]] = {
            "instances": float(len(own)),
            "median_height": float(np.median([i.size[0] for i in own])),
            "median_width": float(np.median([i.size[1] for i in own])),
            "median_pixels": float(np.median([i.pixels for i in own])),
            "max_components": float(max(i.components for i in own)),
        }
    return stats


def train_pipeline(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    class_names: Sequence[str],
    config: DefectGenConfig,
    seed: int = 0,
    device: str | torch.device | None = None,
    warm_start: str | Path | None = None,
    warm_steps_fraction: float = 1.0,
    on_log: Callable[[str, dict[str, float]], None] | None = None,
) -> tuple[DefectGenPipeline, dict[str, object]]:
    """Train both denoisers of a Defect-Gen pipeline from a few labeled defect images.

    Args:
        images, masks: labeled images (H, W, 3) uint8 and class masks (0 = background, k = class k);
            images without a defect pixel are skipped.
        class_names: the project's K classes.
        config: networks, schedule and training settings.
        seed: seeds initialisation and every draw of training.
        device: default CUDA when present.
        warm_start: a saved pipeline of the same config to start both networks from.
        warm_steps_fraction: share of the configured steps a warm start trains.
        on_log: called with (model name, history entry).

    Returns:
        The trained pipeline (eval mode) and a report: ``history`` per model, ``seconds`` per model,
        ``peak_memory_mb`` (CUDA only), ``instances``, ``eval_loss`` per model after training.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    keep = [i for i, m in enumerate(masks) if ((m > 0) & (m <= len(class_names))).any()]
    crops = DefectCrops(
        [images[i] for i in keep],
        [masks[i] for i in keep],
        len(class_names),
        config.crop_size,
        config.jitter,
        device,
    )
    torch.manual_seed(seed)
    if warm_start is not None:
        pipeline = DefectGenPipeline.from_pretrained(warm_start, device=device)
        if pipeline.config.to_dict() != config.to_dict() or pipeline.class_names != list(class_names):
            raise ValueError(f"warm start {warm_start} was trained with another config or class list")
    else:
        pipeline = DefectGenPipeline.build(config, list(class_names)).to(device)
    pipeline.stats = defect_statistics(crops, class_names)
    report: dict[str, object] = {
        "history": {},
        "seconds": {},
        "eval_loss": {},
        "instances": len(crops.instances),
    }
    started_both = time.perf_counter()
    for which, unet in ((SMALL, pipeline.small), (LARGE, pipeline.large)):
        configured = config.large_steps if which == LARGE else config.small_steps
        steps = max(1, round(configured * warm_steps_fraction)) if warm_start is not None else configured
        cap = time_cap(config, which, spent=time.perf_counter() - started_both)
        started = time.perf_counter()
        history = train_denoiser(
            unet,
            which,
            crops,
            pipeline.scheduler,
            config,
            seed=seed,
            steps=steps,
            max_seconds=cap,
            on_log=(lambda entry, w=which: on_log(w, entry)) if on_log else None,
        )
        report["history"][which] = history  # type: ignore[index]
        report["seconds"][which] = time.perf_counter() - started  # type: ignore[index]
        report["eval_loss"][which] = evaluation_loss(unet, which, crops, pipeline.scheduler, config)  # type: ignore[index]
    if device.type == "cuda":
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return pipeline, report
