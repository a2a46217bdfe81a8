"""Explicit training loop for the anomaly-scoring students (CFA, RD4AD, UniNet).

The same (image, mask, weight) samples as :func:`models.student.training.train_segmenter` go in, with the
same random crops and augmentation (:class:`SegmentationSamples`). What differs:

- Unsupervised models (``model.supervised`` False) train on the samples whose mask has no defect pixel;
  pixels marked IGNORE_INDEX are unknown, not defects, so such a sample still counts as normal (the
  losses skip those pixels). A supervised model (UniNet with ``supervised=True``) trains on every sample,
  images with defects drawn about half of the time when they are rarer.
- ``turns_and_jitter=False`` trains on the crops as they are (no flips, quarter turns or colour jitter).
  Kept as an option, not the default: neither wins on every dataset (BENCHMARKS.md, "Students on
  conformal-clip-data").
- The loss takes the model's training-mode output, not logits: ``loss_fn(model(images), masks, weights)``.
- Before the first step, a model that has ``initialize_from_normals`` (CFA's k-means memory bank) gets a
  batch of normal training crops; after the last, batch-norm statistics are re-estimated and
  ``model.calibrate`` sets the pseudo-logit threshold and scale on another batch of normal crops.

AdamW with a cosine learning-rate decay per step over the trainable parameters (the frozen encoders have
none), as in training.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.progress import progress
from models.student.training import (
    LoopConfig,
    Sample,
    SegmentationSamples,
    cosine_schedule,
    defect_oversampler,
    epoch_note,
    finish_epoch,
    has_defect,
    recalibrate_batch_norm,
)

logger = logging.getLogger(__name__)


@dataclass
class AnomalyTrainConfig(LoopConfig):
    """Optimisation settings of :func:`train_anomaly_model`.

    Args:
        epochs: passes over the training samples (one random crop of each per pass).
        batch_size: crops per step.
        lr: peak learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        image_size: side of the square crops.
        seed: seeds crops, shuffling and initialisation.
        num_workers: DataLoader workers.
        reference_crops: normal crops used to initialise the model (CFA's memory bank) and, drawn again,
            to calibrate it.
        turns_and_jitter: flip, turn and colour-jitter the crops as for the segmenters (see above).
    """

    epochs: int = 10
    reference_crops: int = 64
    turns_and_jitter: bool = True


def normal_samples(samples: Sequence[Sample]) -> list[Sample]:
    """The samples whose mask has no defect pixel (IGNORE_INDEX pixels are unknown, not defects)."""
    return [sample for sample in samples if not has_defect(sample[1])]


def reference_crops(normals: Sequence[Sample], config: AnomalyTrainConfig, seed: int) -> torch.Tensor:
    """(config.reference_crops, 3, S, S) normalised random crops of the normals, cycling through all of them.

    Drawn under their own seed, so the training crops that follow do not depend on how many are drawn.
    """
    dataset = SegmentationSamples(
        normals, image_size=config.image_size, turns_and_jitter=config.turns_and_jitter
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([dataset[index % len(dataset)][0] for index in range(config.reference_crops)])


def _loader(
    samples: Sequence[Sample], supervised: bool, config: AnomalyTrainConfig, generator: torch.Generator
) -> DataLoader:
    dataset = SegmentationSamples(
        samples, image_size=config.image_size, turns_and_jitter=config.turns_and_jitter
    )
    sampler = defect_oversampler(dataset, generator) if supervised else None
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.num_workers,
        generator=generator,
        drop_last=len(dataset) > config.batch_size,  # a tiny last batch gives noisy batch-norm statistics
    )


def train_anomaly_model(
    model: nn.Module,
    loss_fn: nn.Module,
    samples: Sequence[Sample],
    config: AnomalyTrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    description: str | None = None,
) -> list[dict[str, float]]:
    """Train an anomaly-scoring student in place, then calibrate it (see the module docstring).

    Args:
        model: a CFA, RD4AD or UniNet model (anything with ``calibrate`` and a ``supervised`` flag).
        loss_fn: called as ``loss_fn(model(images), masks, weights)`` in training mode.
        samples: (image (H, W, 3) uint8, mask (H, W) uint8, weight) triples; a teacher map following
            them (for distilling segmenters) is ignored.
        config: optimisation settings.
        on_epoch: called after each epoch with (epoch index, that epoch's history entry).
        description: what the progress of the steps is called (default ``train <model class>``).

    Returns:
        One dict per epoch: ``epoch``, ``loss`` (mean over batches), ``seconds``, ``images_per_s``, ``lr``.
    """
    supervised = bool(getattr(model, "supervised", False))
    # Teacher maps that may follow (image, mask, weight) are for distilling segmenters; scorers skip them.
    triples: list[Sample] = [(sample[0], sample[1], sample[2]) for sample in samples]
    normals = normal_samples(triples)
    if not normals:
        raise ValueError(
            f"train_anomaly_model: none of the {len(samples)} samples is free of defects; "
            f"{type(model).__name__} needs normal images to learn from and to calibrate on"
        )
    training_set = triples if supervised else normals
    logger.info(
        "%s: training on %d of %d samples (%s)",
        type(model).__name__,
        len(training_set),
        len(samples),
        "all, supervised" if supervised else "normal only",
    )
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    initialize = getattr(model, "initialize_from_normals", None)
    if callable(initialize):
        initialize(reference_crops(normals, config, config.seed + 1))

    loader = _loader(training_set, supervised, config, generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * len(loader))
    scheduler = cosine_schedule(optimizer, total_steps)
    history: list[dict[str, float]] = []
    model.train()
    steps = progress(description or f"train {type(model).__name__}", config.epochs * len(loader), "steps")
    with steps:
        for epoch in range(config.epochs):
            started, losses, seen = time.perf_counter(), [], 0
            for images, masks, weights in loader:
                images, masks, weights = images.to(device), masks.to(device), weights.to(device)
                loss = loss_fn(model(images), masks, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                seen += images.shape[0]
                steps.advance(note=epoch_note(epoch, config.epochs, losses))
            finish_epoch(history, epoch, config.epochs, losses, seen, started, optimizer, on_epoch)
    if config.epochs > 0:
        recalibrate_batch_norm(model, loader)
    model.eval()
    model.calibrate(reference_crops(normals, config, config.seed + 2))
    return history
