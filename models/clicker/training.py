"""Iterative training with simulated clicks (RITM), on zoom-in crops (FocalClick), in an explicit loop.

Per sample: an object (its image, its exact mask, optionally a previous mask such as the teacher's
pre-annotation). A share of samples starts from a degraded previous mask, the given one when the object
has one, else a synthetic one (dilated, eroded, shifted, blurred into a teacher-like blob, cut, with a
spurious blob, or a blob beside the object), so the model learns to correct masks; the others start
from nothing. The first click goes inside the object (away from its border) when there is no previous
mask, else at the larger error region. The crop follows the inference zoom for those clicks (with scale
jitter) or is placed around the whole object (jittered), as a crop looks after a few follow-up clicks.

Per batch: the backbone runs once; then 0..``max_extra_clicks`` rounds of the light decoder without
gradient add one click per sample at the error region of the model's own answer and feed that answer
back as the previous mask; the last decode is trained. Flips, 90-degree turns and light colour jitter
augment the crops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from models.backbone.efficientnet_lite import normalize
from models.clicker.clicks import Click, disk_maps, error_click, interior_click
from models.clicker.loss import ClickLoss
from models.clicker.torch_model import ClickSegmenter
from models.clicker.zoom import (
    Crop,
    ZoomConfig,
    crop_image,
    crop_mask,
    roi_bounds,
    roi_crop,
    square_crop,
    valid_map,
)
from models.student.training import cosine_schedule, finish_epoch

logger = logging.getLogger(__name__)

#: Pixels around an object's bounding box within which synthetic previous masks are drawn.
DEGRADE_MARGIN = 32


@dataclass
class ClickObject:
    """One training or evaluation object.

    image: (H, W, 3) uint8 RGB. mask: (H, W) bool, the object. prev_mask: (H, W) bool or None, a previous
    mask to correct (e.g. the teacher's pre-annotation near the object).
    """

    image: np.ndarray
    mask: np.ndarray
    prev_mask: np.ndarray | None = None


@dataclass
class ClickTrainConfig:
    """Settings of :func:`train_clicker` (pre-training and per-round fine-tuning use the same loop).

    Args:
        epochs: history entries; each is ``steps_per_epoch`` optimiser steps.
        steps_per_epoch: optimiser steps per epoch.
        batch_size: samples per step.
        lr: AdamW learning rate of the decoder (cosine decay to 0 over all steps).
        backbone_lr_factor: the backbone learns at ``lr`` times this.
        freeze_backbone_steps: the backbone (and its batch-norm statistics) stays frozen this many steps,
            so a fresh decoder does not wreck the pretrained features in its first steps.
        weight_decay: AdamW weight decay.
        max_extra_clicks: follow-up clicks simulated per batch are drawn from 0..this.
        prev_mask_prob: share of samples that start from a previous mask.
        given_prev_prob: of those, the share that uses the object's own previous mask when it has one.
        inference_crop_prob: share of crops placed by the inference zoom (the rest: around the object).
        scale_jitter: crop sides are multiplied by exp(U(-j, j)).
        dice_weight: weight of the soft Dice term beside the normalized focal loss.
        recalibrate_batches: batches of a final no-gradient pass that re-estimates batch-norm statistics.
        seed: seeds the sampling and the initial torch state.
    """

    epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    backbone_lr_factor: float = 0.1
    freeze_backbone_steps: int = 0
    weight_decay: float = 1e-4
    max_extra_clicks: int = 3
    prev_mask_prob: float = 0.5
    given_prev_prob: float = 0.7
    inference_crop_prob: float = 0.5
    scale_jitter: float = 0.3
    dice_weight: float = 0.0
    recalibrate_batches: int = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- synthetic previous masks ----------------------------------------------------------------------


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def _blob(shape: tuple[int, int], centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A random ellipse, roughened by blurring and re-thresholding."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ry, rx = rng.uniform(2, 14, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    blob = ((u / ry) ** 2 + (v / rx) ** 2 <= 1.0).astype(np.float32)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2.0)
    return ndimage.gaussian_filter(blob, 1.5) + 0.3 * noise > 0.5


def degrade_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong previous mask for a (non-empty) object, drawn near it.

    One or two of: dilation, erosion, shift, a teacher-like blob (blurred and re-thresholded, as a
    patch-feature teacher's smoothed map looks), a cut-away part, an added spurious blob; or, rarely, an
    almost exact copy (good pre-annotations must be kept) or only a blob beside the object (the teacher
    fired next to it).

    Args:
        mask: (H, W) bool object.
        rng: random generator.

    Returns:
        (H, W) bool.
    """
    height, width = mask.shape
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    top, bottom = max(rows[0] - DEGRADE_MARGIN, 0), min(rows[-1] + 1 + DEGRADE_MARGIN, height)
    left, right = max(cols[0] - DEGRADE_MARGIN, 0), min(cols[-1] + 1 + DEGRADE_MARGIN, width)
    local = mask[top:bottom, left:right]
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    out = local.copy()
    draw = rng.random()
    if draw < 0.1:  # nearly right
        if rng.random() < 0.5:
            out = ndimage.binary_dilation(out, _disk(1))
    elif draw < 0.2:  # only a blob beside the object
        ys, xs = np.nonzero(local)
        pick = int(rng.integers(len(ys)))
        centre = (
            ys[pick] + rng.uniform(-1, 1) * (extent / 2 + 10),
            xs[pick] + rng.uniform(-1, 1) * (extent / 2 + 10),
        )
        out = _blob(local.shape, centre, rng) & ~local
    else:
        for op in rng.choice(6, size=int(rng.integers(1, 3)), replace=False):
            if op == 0:
                out = ndimage.binary_dilation(out, _disk(int(rng.integers(1, 7))))
            elif op == 1:
                eroded = ndimage.binary_erosion(out, _disk(int(rng.integers(1, 4))))
                out = eroded if eroded.any() else out
            elif op == 2:
                limit = max(2, int(0.3 * extent))
                dy, dx = (int(v) for v in rng.integers(-limit, limit + 1, 2))
                out = ndimage.shift(out.astype(np.uint8), (dy, dx), order=0, mode="constant").astype(bool)
            elif op == 3:
                blurred = ndimage.gaussian_filter(out.astype(np.float32), rng.uniform(2.0, 6.0))
                if blurred.max() > 0:
                    out = blurred >= rng.uniform(0.15, 0.5) * blurred.max()
            elif op == 4:
                ys, xs = np.nonzero(out) if out.any() else np.nonzero(local)
                cy, cx = ys.mean(), xs.mean()
                angle = rng.uniform(0, 2 * np.pi)
                yy, xx = np.mgrid[: local.shape[0], : local.shape[1]]
                offset = rng.uniform(-0.3, 0.3) * extent
                out = out & ((yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle) > offset)
            else:
                ys, xs = np.nonzero(local)
                pick = int(rng.integers(len(ys)))
                centre = (
                    ys[pick] + rng.uniform(-1, 1) * (extent / 2 + 8),
                    xs[pick] + rng.uniform(-1, 1) * (extent / 2 + 8),
                )
                out = out | _blob(local.shape, centre, rng)
    full = np.zeros_like(mask, dtype=bool)
    full[top:bottom, left:right] = out
    return full


# ---- samples ---------------------------------------------------------------------------------------


@dataclass
class _Sample:
    image: np.ndarray  # (S, S, 3) uint8
    target: np.ndarray  # (S, S) float32 in {0, 1}
    prev: np.ndarray  # (S, S) float32 in [0, 1]
    valid: np.ndarray  # (S, S) float32 in [0, 1]
    clicks: list[Click]  # model-input coordinates


def _jittered(zoom: ZoomConfig, rng: np.random.Generator, jitter: float) -> ZoomConfig:
    factor = float(np.exp(rng.uniform(-jitter, jitter)))
    return ZoomConfig(zoom.size, max(8, round(zoom.min_crop * factor)), zoom.expand * factor, zoom.near)


def _object_crop(
    obj: np.ndarray, prev: np.ndarray, click: Click, zoom: ZoomConfig, rng: np.random.Generator, jitter: float
) -> Crop:
    """A crop around the whole object and the previous mask's components near it, shifted and scaled."""
    rows, cols = np.nonzero(obj.any(axis=1))[0], np.nonzero(obj.any(axis=0))[0]
    top, left, bottom, right = roi_bounds([click], prev, zoom)
    top, bottom = min(top, rows[0]), max(bottom, rows[-1] + 1)
    left, right = min(left, cols[0]), max(right, cols[-1] + 1)
    shift = rng.uniform(-0.15, 0.15, 2) * max(bottom - top, right - left)
    return square_crop(
        top + shift[0],
        left + shift[1],
        bottom + shift[0],
        right + shift[1],
        *obj.shape,
        _jittered(zoom, rng, jitter),
    )


def _turn(sample: _Sample, quarter_turns: int, flip: bool) -> _Sample:
    """Rotate by 90-degree steps (counter-clockwise, as np.rot90) and optionally mirror left-right."""
    size = sample.image.shape[0]
    arrays = [sample.image, sample.target, sample.prev, sample.valid]
    clicks = sample.clicks
    for _ in range(quarter_turns):
        arrays = [np.rot90(a) for a in arrays]
        # np.rot90 moves (y, x) to (size - 1 - x, y).
        clicks = [Click(size - 1 - c.x, c.y, c.is_positive) for c in clicks]
    if flip:
        arrays = [a[:, ::-1] for a in arrays]
        clicks = [Click(c.y, size - 1 - c.x, c.is_positive) for c in clicks]
    image, target, prev, valid = (np.ascontiguousarray(a) for a in arrays)
    return _Sample(image, target, prev, valid, clicks)


def make_sample(
    obj: ClickObject, zoom: ZoomConfig, config: ClickTrainConfig, rng: np.random.Generator
) -> _Sample:
    """One augmented training crop of an object with its first click and its previous mask."""
    mask = obj.mask.astype(bool)
    prev = np.zeros_like(mask)
    if rng.random() < config.prev_mask_prob:
        given = obj.prev_mask is not None and obj.prev_mask.any()
        prev = (
            obj.prev_mask.astype(bool)
            if given and rng.random() < config.given_prev_prob
            else degrade_mask(mask, rng)
        )
    click = error_click(mask, prev, rng) if prev.any() else None
    if click is None:  # no previous mask, or an exact one: the annotator clicks inside the object
        click = interior_click(mask, rng)
    crop = None
    if rng.random() >= config.inference_crop_prob:
        crop = _object_crop(mask, prev, click, zoom, rng, config.scale_jitter)
        if not crop.contains(click.y, click.x, margin=2):
            crop = None
    if crop is None:
        crop = roi_crop([click], prev, mask.shape, _jittered(zoom, rng, config.scale_jitter))
    size = zoom.size
    sample = _Sample(
        crop_image(obj.image, crop, size),
        (crop_mask(mask, crop, size) >= 0.5).astype(np.float32),
        crop_mask(prev, crop, size),
        valid_map(crop, size),
        [crop.to_crop(click, size)],
    )
    return _turn(sample, int(rng.integers(4)), bool(rng.random() < 0.5))


def aux_maps(clicks: Sequence[Sequence[Click]], prev: torch.Tensor, radius: float) -> torch.Tensor:
    """Model aux input from per-sample clicks (model-input coordinates) and previous masks.

    Args:
        clicks: B lists of clicks.
        prev: (B, 1, S, S) previous masks in [0, 1].
        radius: disk radius in pixels.

    Returns:
        (B, 3, S, S) float32: positive disks, negative disks, previous mask.
    """
    size = prev.shape[-2:]
    disks = torch.from_numpy(np.stack([disk_maps(c, (size[0], size[1]), radius) for c in clicks]))
    return torch.cat([disks.to(prev.device), prev], dim=1)


def _batch(samples: Sequence[_Sample], rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Stack samples: images (B, 3, S, S) normalised + colour jitter, target, prev, valid (B, 1, S, S)."""
    x = normalize(np.stack([s.image for s in samples]))
    # Brightness/contrast +-10% in normalised space (cameras drift a little, the weave does not).
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (len(samples), 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, (len(samples), 1, 1, 1)).astype(np.float32))
    x = x * gain + shift
    target, prev, valid = (
        torch.from_numpy(np.stack([getattr(s, name) for s in samples]))[:, None]
        for name in ("target", "prev", "valid")
    )
    return x, target, prev, valid


class _Batch(NamedTuple):
    """Model-ready crops: x (B, 3, S, S) normalised; target, prev, valid (B, 1, S, S); clicks per sample."""

    x: torch.Tensor
    target: torch.Tensor
    prev: torch.Tensor
    valid: torch.Tensor
    clicks: list[list[Click]]


def _simulate_clicks(
    model: ClickSegmenter,
    features: Any,
    clicks: list[list[Click]],
    prev: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    rounds: int,
    rng: np.random.Generator,
) -> torch.Tensor:
    """``rounds`` follow-up clicks per sample at the errors of the model's own answers (no gradient).

    Appends to ``clicks`` in place and returns the last answers (B, 1, S, S) as the new previous masks.
    """
    radius, threshold = model.config.click_radius, model.config.threshold
    with torch.no_grad():
        detached = features.detach()
        for _ in range(rounds):
            prob = torch.sigmoid(model.decode(detached, aux_maps(clicks, prev, radius)))
            answer = (prob >= threshold).float() * (valid > 0.5).float()
            truth = (target > 0.5).cpu().numpy()[:, 0]
            predicted = answer.cpu().numpy()[:, 0] > 0.5
            for index in range(len(clicks)):
                click = error_click(truth[index], predicted[index], rng)
                if click is not None:
                    clicks[index].append(click)
            prev = answer
    return prev


def _set_backbone_trainable(model: ClickSegmenter, trainable: bool) -> None:
    for param in model.backbone.parameters():
        param.requires_grad_(trainable)


def _recalibrate(model: ClickSegmenter, draw: Callable[[], _Batch], batches: int) -> None:
    """Re-estimate batch-norm statistics of the trained layers with the final weights (cumulative mean).

    Running statistics are moving averages over weights that kept changing (Lite0's TensorFlow momentum
    of 0.01 lags far behind after a few hundred steps); eval-mode answers then drift from train-mode ones.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not norms or batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        for _ in range(batches):
            batch = draw()
            model(batch.x, aux_maps(batch.clicks, batch.prev, model.config.click_radius))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def train_clicker(
    model: ClickSegmenter,
    objects: Sequence[ClickObject],
    config: ClickTrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on objects with simulated clicks (pre-training and fine-tuning alike).

    Fine-tuning is the same call from pre-trained weights with fewer steps and a lower ``lr``.

    Args:
        model: a :class:`ClickSegmenter` (its config sets the crop side, zoom, click radius, threshold).
        objects: images with one object mask each and optional previous masks.
        config: loop settings.
        on_epoch: called after each epoch with (epoch index, that epoch's history entry).

    Returns:
        One dict per epoch: ``epoch``, ``loss`` (mean over its steps), ``seconds``, ``images_per_s``
        (training crops per second), ``lr``.
    """
    objects = [o for o in objects if o.mask.any()]
    if not objects:
        raise ValueError("train_clicker needs at least one object with a non-empty mask")
    for index, obj in enumerate(objects):
        if obj.image.ndim != 3 or obj.image.shape[2] != 3 or obj.image.dtype != np.uint8:
            raise ValueError(
                f"object {index}: image must be (H, W, 3) uint8, got {obj.image.shape} {obj.image.dtype}"
            )
        for name, mask in (("mask", obj.mask), ("prev_mask", obj.prev_mask)):
            if mask is not None and mask.shape != obj.image.shape[:2]:
                raise ValueError(
                    f"object {index}: {name} {mask.shape} does not match image {obj.image.shape[:2]}"
                )
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    zoom = model.config.zoom
    device = next(model.parameters()).device
    loss_fn = ClickLoss(dice_weight=config.dice_weight)

    def draw() -> _Batch:
        picks = rng.integers(len(objects), size=config.batch_size)
        samples = [make_sample(objects[int(i)], zoom, config, rng) for i in picks]
        x, target, prev, valid = _batch(samples, rng)
        return _Batch(
            x.to(device).contiguous(memory_format=torch.channels_last),
            target.to(device),
            prev.to(device),
            valid.to(device),
            [list(s.clicks) for s in samples],
        )

    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr": config.lr},
        {"params": list(model.backbone.parameters()), "lr": config.lr * config.backbone_lr_factor},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * config.steps_per_epoch)
    scheduler = cosine_schedule(optimizer, total_steps)
    model.to(memory_format=torch.channels_last)
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(config.epochs):
        started, losses, seen = time.perf_counter(), [], 0
        for _ in range(config.steps_per_epoch):
            frozen = step < config.freeze_backbone_steps or config.backbone_lr_factor == 0
            _set_backbone_trainable(model, not frozen)
            model.train()
            if frozen:
                model.backbone.eval()  # keep the pretrained batch-norm statistics while the decoder settles
            x, target, prev, valid, clicks = draw()
            if frozen:
                with torch.no_grad():
                    features = model.encode_image(x)
            else:
                features = model.encode_image(x)
            rounds = int(rng.integers(config.max_extra_clicks + 1))
            prev = _simulate_clicks(model, features, clicks, prev, target, valid, rounds, rng)
            logits = model.decode(features, aux_maps(clicks, prev, model.config.click_radius))
            loss = loss_fn(logits, target, valid)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.item()))
            seen += x.shape[0]
            step += 1
        finish_epoch(history, epoch, config.epochs, losses, seen, started, optimizer, on_epoch)
    frozen = config.backbone_lr_factor == 0 or config.freeze_backbone_steps >= total_steps
    model.train()
    if frozen:
        model.backbone.eval()
    _recalibrate(model, draw, config.recalibrate_batches)
    _set_backbone_trainable(model, True)
    model.eval()
    return history
