"""Explicit training and inference loops for segmentation students.

Generic over any ``nn.Module`` that maps normalised images (B, 3, H, W) to logits (B, K+1, H, W) in
training mode. A model may expose ``backbone`` (trained at a tenth of the learning rate and frozen for
the first epochs), ``config.image_size`` (the tile size at inference) and ``segment(x)`` (logits in any
mode, used at inference instead of the eval-mode output).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from models.backbone.efficientnet_lite import normalize
from models.progress import progress
from models.student.fpn.loss import IGNORE_INDEX, SegmentationLoss
from models.student.fpn.torch_model import image_score
from models.tiling import pad_to_min_size, predict_tiled_stream

logger = logging.getLogger(__name__)

#: (image (H, W, 3) uint8 RGB, mask (H, W) uint8 class indices, weight of the label source), optionally
#: followed by the teacher's anomaly probability map (H, W) float32 in [0, 1] (or None) for distillation.
Sample = tuple[np.ndarray, np.ndarray, float] | tuple[np.ndarray, np.ndarray, float, np.ndarray | None]
#: Share of draws that go to images with defects when they are rarer than that.
DEFECT_DRAW_SHARE = 0.5
#: Chance that a crop of a defect image is placed over one of its defect pixels.
DEFECT_CROP_PROB = 0.7
BACKBONE_LR_FACTOR = 0.1
#: Batches used to re-estimate batch-norm statistics after training.
BN_RECALIBRATION_BATCHES = 32


@dataclass
class LoopConfig:
    """Optimisation settings every student's training loop shares (AdamW, cosine decay to 0)."""

    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 256
    seed: int = 0
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig(LoopConfig):
    """Settings of :func:`train_segmenter`: the shared ones plus epochs and backbone warm-up."""

    epochs: int = 6
    freeze_backbone_epochs: int = 1


def has_defect(mask: np.ndarray) -> bool:
    """True when the mask labels any defect pixel (values other than background and ignore)."""
    return bool(((mask > 0) & (mask != IGNORE_INDEX)).any())


class SegmentationSamples(Dataset):
    """Random crops with flips, 90-degree rotations and light colour jitter.

    Fabric texture looks alike under those transforms, so they multiply the few labelled defects cheaply.
    ``turns_and_jitter=False`` keeps the crops and drops the rest (an option of the anomaly scorers,
    see anomaly_training.py).
    Images smaller than ``image_size`` are padded by mirroring (masks too, so labels stay aligned).
    Randomness comes from torch's generator, so ``torch.manual_seed`` makes the crops reproducible.

    Each item: image (3, S, S) float32 normalised, mask (S, S) int64, weight () float32; and, when any
    sample carries a teacher map, that map (S, S) float32 cropped and turned with the mask (NaN for samples
    without one), which the loss uses for distillation.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int = 256,
        augment: bool = True,
        turns_and_jitter: bool = True,
    ) -> None:
        for i, (image, mask, *_rest) in enumerate(samples):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"sample {i}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
                )
            if mask.shape != image.shape[:2]:
                raise ValueError(f"sample {i}: mask {mask.shape} does not match image {image.shape[:2]}")
            teacher_map = _teacher_map_of(samples[i])
            if teacher_map is not None and teacher_map.shape != mask.shape:
                raise ValueError(
                    f"sample {i}: teacher map {teacher_map.shape} does not match mask {mask.shape}"
                )
        self.samples = list(samples)
        self.with_teacher_maps = any(_teacher_map_of(sample) is not None for sample in self.samples)
        self.image_size = image_size
        self.augment = augment
        self.turns_and_jitter = turns_and_jitter

    def __len__(self) -> int:
        return len(self.samples)

    def defect_flags(self) -> list[bool]:
        return [has_defect(sample[1]) for sample in self.samples]

    def _crop(
        self, image: np.ndarray, mask: np.ndarray, teacher_map: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.image_size
        image, mask, teacher_map = (pad_to_min_size(a, size, size) for a in (image, mask, teacher_map))
        height, width = mask.shape
        if has_defect(mask) and torch.rand(()) < DEFECT_CROP_PROB:
            # Centre the crop near a defect pixel: on long line-scan frames a random crop mostly misses it.
            ys, xs = np.nonzero((mask > 0) & (mask != IGNORE_INDEX))
            pick = int(torch.randint(len(ys), ()))
            jitter = torch.randint(-size // 4, size // 4 + 1, (2,)).tolist()
            top, left = ys[pick] - size // 2 + jitter[0], xs[pick] - size // 2 + jitter[1]
        else:
            top = int(torch.randint(height - size + 1, ()))
            left = int(torch.randint(width - size + 1, ()))
        top, left = int(np.clip(top, 0, height - size)), int(np.clip(left, 0, width - size))
        rows, cols = slice(top, top + size), slice(left, left + size)
        return image[rows, cols], mask[rows, cols], teacher_map[rows, cols]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image, mask, weight = self.samples[index][:3]
        teacher_map = _teacher_map_of(self.samples[index])
        if teacher_map is None:
            teacher_map = np.full(mask.shape, np.nan, dtype=np.float32)
        if self.augment:
            image, mask, teacher_map = self._crop(image, mask, teacher_map)
        image_t = torch.from_numpy(np.array(image, copy=True))  # (H, W, 3) uint8
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).long()  # (H, W)
        map_t = torch.from_numpy(np.ascontiguousarray(teacher_map, dtype=np.float32))  # (H, W)
        x = normalize(image_t.unsqueeze(0))[0]  # (3, H, W)
        if self.augment and self.turns_and_jitter:
            x, mask_t, map_t = self._geometric(x, mask_t, map_t)
            x = self._jitter(x)
        if self.with_teacher_maps:
            return x, mask_t, torch.tensor(float(weight)), map_t
        return x, mask_t, torch.tensor(float(weight))

    @staticmethod
    def _geometric(
        x: torch.Tensor, mask: torch.Tensor, teacher_map: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quarter_turns = int(torch.randint(4, ()))
        x = torch.rot90(x, quarter_turns, (1, 2))
        mask, teacher_map = (torch.rot90(t, quarter_turns, (0, 1)) for t in (mask, teacher_map))
        if torch.rand(()) < 0.5:
            x, mask, teacher_map = x.flip(2), mask.flip(1), teacher_map.flip(1)
        return x, mask, teacher_map

    @staticmethod
    def _jitter(x: torch.Tensor) -> torch.Tensor:
        """Brightness/contrast +-10% in normalised space (cameras drift a little, the weave does not)."""
        gain = 1.0 + (torch.rand(()) - 0.5) * 0.2
        shift = (torch.rand(()) - 0.5) * 0.2
        return x * gain + shift


def _teacher_map_of(sample: Sample) -> np.ndarray | None:
    return sample[3] if len(sample) > 3 else None


def defect_oversampler(dataset: SegmentationSamples, generator: torch.Generator) -> WeightedRandomSampler:
    """Draw images with defects about half of the time when they are rarer, with replacement."""
    flags = dataset.defect_flags()
    n_defect = sum(flags)
    n_normal = len(flags) - n_defect
    if n_defect == 0 or n_normal == 0 or n_defect / len(flags) >= DEFECT_DRAW_SHARE:
        weights = [1.0] * len(flags)
    else:
        weights = [DEFECT_DRAW_SHARE / n_defect if f else (1 - DEFECT_DRAW_SHARE) / n_normal for f in flags]
    return WeightedRandomSampler(weights, num_samples=len(flags), replacement=True, generator=generator)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store conv weights channels-last (NHWC): depthwise-heavy nets run ~1.5x faster on CPU this way."""
    return model.to(memory_format=torch.channels_last)


def _set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return
    for param in backbone.parameters():
        param.requires_grad_(not frozen)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    head = [p for p in model.parameters() if id(p) not in backbone_ids]
    groups = [{"params": head, "lr": config.lr}]
    if backbone_ids:
        groups.append({"params": list(backbone.parameters()), "lr": config.lr * BACKBONE_LR_FACTOR})
    return groups


def recalibrate_batch_norm(
    model: nn.Module, loader: DataLoader, max_batches: int = BN_RECALIBRATION_BATCHES
) -> None:
    """Re-estimate batch-norm statistics of the trained layers with the final weights.

    Running statistics are moving averages over weights that kept changing; after a short training (or
    the backbone's slow TensorFlow momentum of 0.01) they lag behind the final weights and eval-mode
    outputs drift from train-mode ones. One no-grad pass with a cumulative average fixes that. Layers
    in eval mode (a backbone that stayed frozen) keep their statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    device = next(model.parameters()).device
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index >= max_batches:
                break
            model(batch[0].to(device).contiguous(memory_format=torch.channels_last))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from its initial value down to 0 along a half cosine over `total_steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def finish_epoch(
    history: list[dict[str, float]],
    epoch: int,
    epochs: int,
    losses: list[float],
    seen: int,
    started: float,
    optimizer: torch.optim.Optimizer,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> None:
    """Record an epoch (mean loss, seconds, images/s, learning rate) in `history`, log it, tell `on_epoch`."""
    seconds = time.perf_counter() - started
    entry = {
        "epoch": float(epoch),
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
    }
    history.append(entry)
    logger.info(
        "epoch %d/%d loss %.4f (%.1f images/s)", epoch + 1, epochs, entry["loss"], entry["images_per_s"]
    )
    if on_epoch is not None:
        on_epoch(epoch, entry)


def epoch_note(epoch: int, epochs: int, losses: list[float]) -> str:
    """The extra of a training step's progress: the epoch and the latest loss (already on the host)."""
    return f"epoch {epoch + 1}/{epochs}, loss {losses[-1]:.4f}"


def train_segmenter(
    model: nn.Module,
    samples: Sequence[Sample] | SegmentationSamples,
    config: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    loss_fn: nn.Module | None = None,
    description: str | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``samples``.

    AdamW with a cosine learning-rate decay per step; the backbone (if the model has one) learns at a tenth
    of the rate and stays frozen, batch-norm statistics included, for ``freeze_backbone_epochs`` so the
    randomly initialised head does not wreck pretrained features in the first steps. Batch-norm statistics
    are re-estimated with the final weights at the end (:func:`recalibrate_batch_norm`).

    Args:
        model: maps (B, 3, S, S) normalised images to (B, K+1, S, S) logits in training mode.
        samples: (image, mask, weight) triples, or a :class:`SegmentationSamples` built from them.
        config: optimisation settings.
        on_epoch: called after each epoch with (epoch index, that epoch's history entry).
        loss_fn: defaults to :class:`SegmentationLoss` (CE + Dice).
        description: what the progress of the steps is called (default ``train <model class>``).

    Returns:
        One dict per epoch: ``epoch``, ``loss`` (mean over batches), ``seconds``, ``images_per_s``, ``lr``.
    """
    if len(samples) == 0:
        raise ValueError("train_segmenter needs at least one (image, mask, weight) sample")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dataset = (
        samples
        if isinstance(samples, SegmentationSamples)
        else SegmentationSamples(samples, image_size=config.image_size)
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=defect_oversampler(dataset, generator),
        num_workers=config.num_workers,
        generator=generator,
        drop_last=len(dataset) > config.batch_size,  # a tiny last batch gives noisy batch-norm statistics
    )
    loss_fn = loss_fn or SegmentationLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, config), weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * len(loader))
    scheduler = cosine_schedule(optimizer, total_steps)
    device = next(model.parameters()).device
    to_channels_last(model)
    history: list[dict[str, float]] = []
    steps = progress(description or f"train {type(model).__name__}", config.epochs * len(loader), "steps")
    with steps:
        for epoch in range(config.epochs):
            frozen = epoch < config.freeze_backbone_epochs
            _set_backbone_frozen(model, frozen)
            model.train()
            if frozen and getattr(model, "backbone", None) is not None:
                model.backbone.eval()  # keep pretrained batch-norm statistics while the head settles
            started, losses, seen = time.perf_counter(), [], 0
            for batch in loader:
                images = batch[0].to(device).contiguous(memory_format=torch.channels_last)
                masks, weights = batch[1].to(device), batch[2].to(device)
                # Teacher maps (NaN where a sample has none) go to a loss that distils from them.
                extra = {"teacher_map": batch[3].to(device)} if len(batch) > 3 else {}
                loss = loss_fn(model(images), masks, weights, **extra)
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
    _set_backbone_frozen(model, False)
    model.eval()
    return history


def _probabilities_fn(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """(B, h, w, 3) uint8 -> (B, K+1, h, w) float32 softmax probabilities, for the tiler.

    Inference mode is entered per batch, not around the whole prediction: :func:`iter_predictions` is a
    generator, and a mode entered there would stay on in the caller's code between two images.
    """
    device = next(model.parameters()).device

    def probabilities(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = normalize(torch.tensor(batch)).to(device)  # a copy: decoded images may be read-only
            x = x.contiguous(memory_format=torch.channels_last)
            # `segment` (logits only) skips the eval-mode post-processing whose masks and scores are unused.
            output = model.segment(x) if hasattr(model, "segment") else model(x)
            logits = output if isinstance(output, torch.Tensor) else output.logits
            return logits.softmax(dim=1).float().cpu().numpy()

    return probabilities


def _summarise(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(K+1, H, W) probabilities -> anomaly map (H, W) float32, class mask (H, W) uint8, image score."""
    anomaly_map = (1.0 - probs[0]).astype(np.float32)
    mask = probs.argmax(axis=0).astype(np.uint8)
    score = float(image_score(torch.from_numpy(anomaly_map)[None])[0])
    return anomaly_map, mask, score


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict_images expects (H, W, 3) uint8 images, got {image.shape} {image.dtype}")
    return image


def iter_predictions(
    model: nn.Module,
    images: Iterable[np.ndarray],
    tile_overlap: int = 32,
    tile_size: int | None = None,
    batch_size: int = 8,
    progress_as: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """Segment a stream of images of any size, yielding each result as soon as it is ready.

    Every image goes through one batched tiler (:func:`models.tiling.predict_tiled_stream`): an image that
    fits in one tile is mirror-padded to the tile (bottom and right) and is one tile; a larger one (a
    line-scan frame) is cut into overlapping tiles of the model's training size, whose softmax
    probabilities are stitched before the argmax, so seams do not flip classes. Tiles of consecutive
    images share batches, images are pulled from ``images`` only as their tiles are needed, and nothing is
    kept once an image's result is yielded: memory stays flat over any number of frames.

    The padding is what training crops of small images get and what the exported model needs; without
    it, a 250 x 250 image meets zero padding inside the network where training never did, and the anomaly
    scorers, calibrated on tile-sized crops, read its border as a defect (BENCHMARKS.md, "Students on
    conformal-clip-data").

    The model is in eval mode while the generator runs (also between two results) and gets its mode back
    when the generator ends or is closed.

    Args:
        model: a segmentation student (eval-mode output may be logits or a ``SegmentationOutput``).
        images: (H, W, 3) uint8 RGB arrays; any iterable, read lazily.
        tile_overlap: pixels shared by neighbouring tiles.
        tile_size: defaults to ``model.config.image_size`` (else 256).
        batch_size: tiles per forward pass.
        progress_as: show progress per image under this name (e.g. ``"evaluate"``), with an ETA when
            ``images`` has a length; None shows nothing, for callers that show their own (``predict_paths``)
            or predict a few images at a time (the ML backend).

    Yields:
        Per image, in input order: anomaly map (H, W) float32 = 1 - p(background), class mask (H, W) uint8,
        image score.
    """
    tile = tile_size or getattr(getattr(model, "config", None), "image_size", 256)
    total = len(images) if isinstance(images, Sized) else None
    probabilities = _probabilities_fn(to_channels_last(model))
    was_training = model.training
    model.eval()
    shown = progress(progress_as or "predict", total if progress_as else 0)
    try:
        with shown:
            checked = (_check_image(image) for image in images)
            for probs in predict_tiled_stream(probabilities, checked, tile, tile_overlap, batch_size):
                result = _summarise(probs)
                del probs  # (K+1, H, W) float32: not to be held while the caller has the result
                shown.advance()
                yield result
    finally:
        model.train(was_training)


def predict_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    tile_overlap: int = 32,
    tile_size: int | None = None,
    batch_size: int = 8,
    progress_as: str | None = None,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segment images of any size: all results of :func:`iter_predictions` at once (same arguments).

    Every image is checked before the first is predicted, so a wrong one fails fast.

    Returns:
        Per image, in input order: anomaly map (H, W) float32 = 1 - p(background), class mask (H, W)
        uint8, image score.
    """
    for image in images:
        _check_image(image)
    return list(iter_predictions(model, images, tile_overlap, tile_size, batch_size, progress_as))
