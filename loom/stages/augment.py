"""Synthetic defect pairs for the rare classes: the copy-paste baseline and Defect-Gen.

Both return ``(image, class mask)`` pairs at the normal images' full resolution: a real normal image with one
added defect, and its mask (0 = background, k = ``classes[k - 1]``).

- :func:`copy_paste_pairs`: cut a labeled defect with a small margin, turn/flip it, paste it at a random
  place of another normal image with a feathered alpha (or Poisson blending through ``cv2.seamlessClone``).
- :func:`train_defect_gen` / :func:`generate_pairs`: few-shot Defect-Gen (models/defect_gen), cached by the
  content hash of its training set, its config and its code; generated on real normal crops.
- :func:`synthesise`: N pairs over the classes, most for the rarest (:func:`plan_counts`), either way.
- :func:`sample_grid`: a uint8 grid of pairs (image beside its coloured mask) for MLflow.

Folder datasets for the CLI (``loom augment``): :func:`load_labeled` and :func:`load_normals` read either a
Loom dataset folder (``manifest.parquet``, ``classes.json``; its test split is never used) or a plain
``images/`` folder with class masks of the same stems.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from loom.config import PROJECT_ROOT
from loom.data.imageio import IMAGE_SUFFIXES, read_image, read_mask, write_mask, write_png
from loom.data.predict import class_color
from models.defect_gen.config import DefectGenConfig, preset
from models.defect_gen.data import instance_labels
from models.defect_gen.placement import feather_alpha

logger = logging.getLogger(__name__)

Pair = tuple[np.ndarray, np.ndarray]
Scorer = Callable[[np.ndarray], np.ndarray]
MODES = ("defect_gen", "copy_paste")
#: Where a cached Defect-Gen model's training report lives (its presence marks a finished model).
TRAINING_REPORT = "training.json"
_CODE_DIR = PROJECT_ROOT / "models" / "defect_gen"


# ---------------------------------------------------------------------------------------------------------
# Planning: how many pairs per class
# ---------------------------------------------------------------------------------------------------------
def plan_counts(class_counts: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` synthetic pairs over the classes, inversely to how often each was labeled.

    Classes with no labeled example get none (nothing to learn from or copy). Shares are proportional to
    ``1 / count``, rounded by largest remainder so they add up to ``total``; ties keep the given order.

    >>> plan_counts({"hole": 10, "knot": 2, "stain": 0}, 12)
    {'hole': 2, 'knot': 10}
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    present = {name: count for name, count in class_counts.items() if count > 0}
    if not present or total == 0:
        return dict.fromkeys(present, 0)
    weights = np.array([1.0 / count for count in present.values()])
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(int)
    order = np.argsort(-(shares - counts), kind="stable")
    for index in order[: total - counts.sum()]:
        counts[index] += 1
    return {name: int(n) for name, n in zip(present, counts, strict=True)}


def instance_counts(masks: Sequence[np.ndarray], classes: Sequence[str]) -> dict[str, int]:
    """Labeled defect instances per class (connected regions, close fragments merged)."""
    counts = dict.fromkeys(classes, 0)
    for mask in masks:
        for class_id, name in enumerate(classes, start=1):
            counts[name] += instance_labels(mask, class_id)[1]
    return counts


# ---------------------------------------------------------------------------------------------------------
# Copy-paste baseline
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cut:
    image: int
    label: int
    box: tuple[slice, slice]


def _cuts(masks: Sequence[np.ndarray], class_id: int) -> list[tuple[_Cut, np.ndarray]]:
    found = []
    for index, mask in enumerate(masks):
        labels, count = instance_labels(mask, class_id)
        for label, box in enumerate(ndimage.find_objects(labels, count), start=1):
            if box is not None:
                found.append((_Cut(index, label, box), labels))
    return found


def copy_paste_pairs(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    class_id: int,
    n: int,
    normals: Sequence[np.ndarray],
    seed: int = 0,
    margin: int = 4,
    blend: str = "feather",
) -> tuple[list[Pair], dict[str, int]]:
    """``n`` normal images with a labeled defect of class ``class_id`` pasted in, and their masks.

    Each pair: a random instance of the class (its pixels plus ``margin`` pixels around them), one of the
    eight flips/quarter turns, pasted at a random place of a random normal image. ``blend="feather"``: alpha
    1 on the defect's pixels (they are copied exactly), falling to 0 over the margin; ``"poisson"``:
    ``cv2.seamlessClone`` over the defect plus margin (colours adapt to the new fabric).

    Returns:
        The pairs and counts: ``accepted``, ``too_large`` (instances larger than a normal image, skipped).
    """
    if blend not in ("feather", "poisson"):
        raise ValueError(f"blend must be 'feather' or 'poisson', got {blend!r}")
    if not normals:
        raise ValueError("copy-paste: no normal images to paste onto")
    cuts = _cuts(masks, class_id)
    counts = {"accepted": 0, "too_large": 0}
    if not cuts:
        return [], counts
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    attempts = 0
    while len(pairs) < n and attempts < 4 * n:
        attempts += 1
        cut, labels = cuts[int(rng.integers(len(cuts)))]
        source = images[cut.image]
        height, width = labels.shape
        rows, cols = cut.box
        top, bottom = max(0, rows.start - margin), min(height, rows.stop + margin)
        left, right = max(0, cols.start - margin), min(width, cols.stop + margin)
        patch = source[top:bottom, left:right]
        own = labels[top:bottom, left:right] == cut.label
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        patch, own = np.rot90(patch, turns), np.rot90(own, turns)
        if flip:
            patch, own = patch[:, ::-1], own[:, ::-1]
        patch, own = np.ascontiguousarray(patch), np.ascontiguousarray(own)
        target = normals[int(rng.integers(len(normals)))]
        ph, pw = own.shape
        th, tw = target.shape[:2]
        if ph > th or pw > tw:
            counts["too_large"] += 1
            continue
        y, x = int(rng.integers(th - ph + 1)), int(rng.integers(tw - pw + 1))
        image = target.copy()
        if blend == "poisson":
            image = _poisson_paste(image, patch, own, y, x, margin)
        else:
            alpha = feather_alpha(own, margin)[..., None]
            region = image[y : y + ph, x : x + pw].astype(np.float32)
            image[y : y + ph, x : x + pw] = (alpha * patch + (1 - alpha) * region).round().astype(np.uint8)
        mask = np.zeros((th, tw), dtype=np.uint8)
        mask[y : y + ph, x : x + pw][own] = class_id
        pairs.append((image, mask))
        counts["accepted"] += 1
    return pairs, counts


def _poisson_paste(
    image: np.ndarray, patch: np.ndarray, own: np.ndarray, y: int, x: int, margin: int
) -> np.ndarray:
    import cv2

    ph, pw = own.shape
    support = ndimage.binary_dilation(own, np.ones((3, 3), bool), iterations=max(1, margin // 2))
    # seamlessClone needs the support strictly inside the destination: paste on a padded copy.
    pad = 2
    canvas = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    source = np.zeros_like(canvas)
    mask255 = np.zeros(canvas.shape[:2], dtype=np.uint8)
    source[y + pad : y + pad + ph, x + pad : x + pad + pw] = patch
    mask255[y + pad : y + pad + ph, x + pad : x + pad + pw][support] = 255
    ys, xs = np.nonzero(mask255)
    box_x, box_y, box_w, box_h = cv2.boundingRect(np.stack([xs, ys], axis=1).astype(np.int32))
    center = (box_x + box_w // 2, box_y + box_h // 2)
    blended = cv2.seamlessClone(
        np.ascontiguousarray(source[..., ::-1]),
        np.ascontiguousarray(canvas[..., ::-1]),
        mask255,
        center,
        cv2.NORMAL_CLONE,
    )[..., ::-1]
    return np.ascontiguousarray(blended[pad:-pad, pad:-pad])


# ---------------------------------------------------------------------------------------------------------
# Defect-Gen: cached training and generation
# ---------------------------------------------------------------------------------------------------------
def code_version() -> str:
    """sha256 of the Defect-Gen sources (models/defect_gen/*.py): a code change invalidates cached models."""
    digest = hashlib.sha256()
    for path in sorted(_CODE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _array_hash(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()


def training_key(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], classes: Sequence[str], config: DefectGenConfig
) -> str:
    """Content hash of a training set (order-free) + class list + config + code version."""
    pairs = sorted(_array_hash(i) + _array_hash(m) for i, m in zip(images, masks, strict=True))
    payload = json.dumps(
        {"pairs": pairs, "classes": list(classes), "config": config.to_dict(), "code": code_version()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def config_folder(config: DefectGenConfig) -> str:
    """The cache sub-folder of one config: its name and a hash of its values."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"{config.name}-{digest[:10]}"


def newest_model(folder: Path) -> Path | None:
    """The most recently finished model in a cache folder (of one config, or the whole cache root)."""
    reports = [p for p in Path(folder).glob(f"**/{TRAINING_REPORT}") if not p.parent.name.startswith(".")]
    if not reports:
        return None
    return max(reports, key=lambda p: p.stat().st_mtime).parent


def _defect_images(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], num_classes: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    keep = [i for i, m in enumerate(masks) if ((m > 0) & (m <= num_classes)).any()]
    return [images[i] for i in keep], [masks[i] for i in keep]


def train_defect_gen(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    cache_root: str | Path,
    config: DefectGenConfig | str | None = None,
    seed: int = 0,
    device: str | None = None,
    warm_start: bool = True,
    warm_steps_fraction: float = 1.0,
    on_log: Callable[[str, dict[str, float]], None] | None = None,
) -> Path:
    """Train Defect-Gen on labeled defect images, or return the cached model of the same training set.

    Args:
        images, masks: labeled images (H, W, 3) uint8 and their class masks; images without defects are
            ignored (they teach the generator nothing).
        classes: the project's classes (mask value k = ``classes[k - 1]``).
        cache_root: folder of cached models: ``<config name>-<config hash>/<training key>/``.
        config: a :class:`DefectGenConfig`, a preset name, or None (``full`` with CUDA, else ``cpu``).
        seed: training seed (part of the cache key).
        device: default CUDA when present.
        warm_start: when the data changed, start from the newest cached model of the same config.
        warm_steps_fraction: share of the configured steps a warm start trains.
        on_log: called with (model name, loss history entry).

    Returns:
        The model folder (``save_pretrained`` layout + ``training.json``). It is written to a hidden temp
        folder and renamed into place, so a killed run leaves no half-written model.
    """
    from models.defect_gen.training import train_pipeline

    config = config if isinstance(config, DefectGenConfig) else preset(config)
    images, masks = _defect_images(images, masks, len(classes))
    if not images:
        raise ValueError("train_defect_gen: none of the masks holds a defect of the project's classes")
    key = training_key(images, masks, classes, config)
    key = hashlib.sha256(f"{key}-{seed}".encode()).hexdigest()
    folder = Path(cache_root) / config_folder(config)
    final = folder / key[:16]
    if (final / TRAINING_REPORT).is_file():
        logger.info("defect-gen: cached model %s (training set unchanged)", final)
        return final
    previous = newest_model(folder) if warm_start else None
    started = time.perf_counter()
    pipeline, report = train_pipeline(
        images,
        masks,
        classes,
        config,
        seed=seed,
        device=device,
        warm_start=previous,
        warm_steps_fraction=warm_steps_fraction,
        on_log=on_log,
    )
    seconds = time.perf_counter() - started
    temp = folder / f".tmp-{key[:16]}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    pipeline.save_pretrained(temp, metadata={"training_key": key, "seed": seed})
    record = {
        "key": key,
        "seed": seed,
        "images": len(images),
        "warm_start": str(previous.name) if previous is not None else None,
        **report,
        "model_seconds": report.get("seconds"),  # per model; the total is the wall time of this call
        "seconds": seconds,
    }
    (temp / TRAINING_REPORT).write_text(json.dumps(record, indent=2, default=float))
    try:
        temp.rename(final)
    except OSError:  # another process finished the same model first: keep theirs
        shutil.rmtree(temp, ignore_errors=True)
    logger.info("defect-gen: trained in %.1f s -> %s", seconds, final)
    return final


_PIPELINES: dict[tuple[str, str], Any] = {}


def load_pipeline(model_dir: str | Path, device: str | None = None) -> Any:
    """A saved Defect-Gen pipeline, loaded once per folder and device."""
    import torch

    from models.defect_gen.pipeline import DefectGenPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (str(Path(model_dir).resolve()), device)
    if key not in _PIPELINES:
        _PIPELINES[key] = DefectGenPipeline.from_pretrained(model_dir, device=device)
    return _PIPELINES[key]


def generate_pairs(
    model_dir: str | Path,
    class_name: str,
    n: int,
    normals: Sequence[np.ndarray],
    seed: int = 0,
    scorer: Scorer | None = None,
    device: str | None = None,
    max_attempts: int | None = None,
) -> tuple[list[Pair], dict[str, int]]:
    """``n`` Defect-Gen pairs of ``class_name`` on random places of random normal images.

    Args:
        model_dir: a folder from :func:`train_defect_gen`.
        class_name: one of the classes the model was trained with.
        n: pairs wanted.
        normals: full-resolution normal images (H, W, 3) uint8, at least the model's crop size.
        seed: seeds the places and the sampling noise.
        scorer: ``anomaly_map(image) -> (H, W)``; when given, samples it does not see are rejected.
        max_attempts: samples made at most (default 4 n).

    Returns:
        Up to ``n`` accepted pairs, and counts: ``accepted`` and one per rejection reason
        (``empty``, ``wrong_class``, ``shattered``, ``leaked``, ``unseen``).
    """
    from models.defect_gen.placement import generate_on_normals

    pipeline = load_pipeline(model_dir, device)
    pairs, report = generate_on_normals(
        pipeline, pipeline.class_id(class_name), n, list(normals), seed, scorer, max_attempts=max_attempts
    )
    logger.info(
        "defect-gen %s: %s in %.1f s (%.2f images/s)",
        class_name,
        report.counts,
        report.seconds,
        report.images_per_s,
    )
    return pairs, dict(report.counts)


def generator_fits(model_dir: str | Path) -> dict[str, bool]:
    """Per class the generator learned: does its median training instance fit the inpainting square?

    A defect is generated inside the square and must end there (the ``leaked`` check), so a class whose
    defects are typically longer (a misweave or a broken end across the cloth) comes out as a blob that
    teaches the student the wrong shape: BENCHMARKS.md measured it at IoU 0 for misweave in every seed.
    """
    pipeline = load_pipeline(model_dir)
    side = pipeline.config.region_size
    return {
        name: max(stats["median_height"], stats["median_width"]) <= side
        for name, stats in pipeline.stats.items()
    }


@dataclass
class Synthesis:
    """What :func:`synthesise` made: pairs, the class and method of each, the plan, per-class counts, timing.

    In ``defect_gen`` mode, classes the generator cannot hold (:func:`generator_fits`) are copy-pasted.
    """

    pairs: list[Pair]
    pair_classes: list[str]
    plan: dict[str, int]
    counts: dict[str, dict[str, int]]
    model_dir: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)  # class -> defect_gen | copy_paste

    @property
    def pair_methods(self) -> list[str]:
        return [self.methods[name] for name in self.pair_classes]


def synthesise(
    mode: str,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    normals: Sequence[np.ndarray],
    total: int,
    seed: int = 0,
    *,
    plan: Mapping[str, int] | None = None,
    model_dir: str | Path | None = None,
    cache_root: str | Path | None = None,
    config: DefectGenConfig | str | None = None,
    scorer: Scorer | None = None,
    blend: str = "feather",
    copy_paste_misfits: bool = True,
) -> Synthesis:
    """``total`` synthetic pairs from labeled images, most for the rarest class.

    Args:
        mode: ``"defect_gen"`` or ``"copy_paste"``.
        images, masks: the labeled (human) images and class masks to learn from / cut from.
        classes: the project's classes.
        normals: full-resolution normal images to place the defects on.
        total: pairs over all classes (split by :func:`plan_counts` on labeled instances, unless ``plan``).
        seed: seeds everything.
        plan: pairs per class name, instead of the inverse-frequency split.
        model_dir: a trained Defect-Gen folder; else one is trained (or found cached) under ``cache_root``.
        cache_root, config: for that training (see :func:`train_defect_gen`).
        scorer: the teacher's ``anomaly_map(image)``, for Defect-Gen's ``unseen`` rejection.
        blend: copy-paste blending, ``feather`` or ``poisson``.
        copy_paste_misfits: in ``defect_gen`` mode, copy-paste the classes the generator cannot hold
            (:func:`generator_fits`); False generates every class (an ablation).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    plan = dict(plan) if plan is not None else plan_counts(instance_counts(masks, classes), total)
    seconds: dict[str, float] = {}
    if mode == "defect_gen" and model_dir is None:
        if cache_root is None:
            raise ValueError("synthesise(defect_gen) needs model_dir or cache_root")
        started = time.perf_counter()
        model_dir = train_defect_gen(images, masks, classes, cache_root, config, seed=seed)
        seconds["train"] = time.perf_counter() - started
    fits = generator_fits(model_dir) if mode == "defect_gen" else {}
    if not copy_paste_misfits:
        fits = dict.fromkeys(fits, True)
    pairs: list[Pair] = []
    pair_classes: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    methods: dict[str, str] = {}
    started = time.perf_counter()
    for name, n in plan.items():
        if n <= 0:
            continue
        class_seed = seed * 1000 + list(classes).index(name)
        methods[name] = "defect_gen" if fits.get(name, False) else "copy_paste"
        if methods[name] == "defect_gen":
            made, counts[name] = generate_pairs(model_dir, name, n, normals, class_seed, scorer)
        else:
            made, counts[name] = copy_paste_pairs(
                images, masks, list(classes).index(name) + 1, n, normals, class_seed, blend=blend
            )
        pairs += made
        pair_classes += [name] * len(made)
    seconds["generate"] = time.perf_counter() - started
    model_dir = Path(model_dir) if model_dir else None
    return Synthesis(pairs, pair_classes, plan, counts, model_dir, seconds, methods)


# ---------------------------------------------------------------------------------------------------------
# A picture of the samples
# ---------------------------------------------------------------------------------------------------------
def colour_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) class mask -> (H, W, 3) uint8, each class in its fixed colour, background black."""
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    for index in np.unique(mask):
        if index:
            out[mask == index] = class_color(int(index))
    return out


def sample_grid(
    pairs: Sequence[Pair], columns: int = 4, max_pairs: int = 16, zoom: int | None = None, gap: int = 2
) -> np.ndarray:
    """A uint8 RGB grid of pairs, each as the image beside its coloured class mask.

    Args:
        pairs: (image, mask) pairs (all images of one size, or ``zoom`` set).
        columns: pairs per row.
        max_pairs: pairs shown at most (the first ones).
        zoom: when set, each pair is cut to a ``zoom`` x ``zoom`` window centred on its defect.
        gap: white pixels between tiles.
    """
    chosen = list(pairs[:max_pairs])
    if not chosen:
        return np.full((8, 8, 3), 255, dtype=np.uint8)
    tiles = []
    for image, mask in chosen:
        if zoom:
            ys, xs = np.nonzero(mask)
            cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (mask.shape[0] // 2, mask.shape[1] // 2)
            top = int(np.clip(cy - zoom // 2, 0, max(0, mask.shape[0] - zoom)))
            left = int(np.clip(cx - zoom // 2, 0, max(0, mask.shape[1] - zoom)))
            image, mask = (
                image[top : top + zoom, left : left + zoom],
                mask[top : top + zoom, left : left + zoom],
            )
        white = np.full((image.shape[0], gap, 3), 255, dtype=np.uint8)
        tiles.append(np.concatenate([image, white, colour_mask(mask)], axis=1))
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    canvas_rows = []
    for first in range(0, len(tiles), columns):
        row = []
        for tile in tiles[first : first + columns]:
            padded = np.full((height, width, 3), 255, dtype=np.uint8)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            row += [padded, np.full((height, gap * 2, 3), 255, dtype=np.uint8)]
        while len(row) < 2 * columns:
            row += [
                np.full((height, width, 3), 255, dtype=np.uint8),
                np.full((height, gap * 2, 3), 255, np.uint8),
            ]
        canvas_rows += [
            np.concatenate(row, axis=1),
            np.full((gap * 2, (width + gap * 2) * columns, 3), 255, np.uint8),
        ]
    return np.concatenate(canvas_rows, axis=0)


# ---------------------------------------------------------------------------------------------------------
# Folder datasets (the CLI's input and output)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FolderData:
    """Images of a folder dataset with their class masks (all zeros where an image has no mask file)."""

    stems: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    classes: list[str]


def _is_dataset_folder(path: Path) -> bool:
    return (path / "manifest.parquet").is_file()


def load_folder(images_dir: str | Path, masks_dir: str | Path | None, classes: Sequence[str]) -> FolderData:
    """Read a Loom dataset folder (train split only, its classes.json) or images + masks folders.

    Args:
        images_dir: a Loom dataset folder (with ``manifest.parquet``), or a folder of images.
        masks_dir: class masks ``<stem>.png`` (default: ``masks/`` beside or inside ``images_dir``).
        classes: the project's classes for a plain folder (a dataset folder's classes.json wins).
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder of images or a Loom dataset folder")
    if _is_dataset_folder(images_dir):
        import pandas as pd

        table = pd.read_parquet(images_dir / "manifest.parquet")
        table = table[table["split"] != "test"]  # the frozen test split is never trained on
        classes_file = images_dir / "classes.json"
        classes = json.loads(classes_file.read_text()) if classes_file.is_file() else list(classes)
        paths = [images_dir / p for p in table["path"]]
        masks_dir = Path(masks_dir) if masks_dir else images_dir / "masks"
    else:
        paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if masks_dir is None:
            beside = images_dir.parent / "masks"
            masks_dir = beside if beside.is_dir() else images_dir / "masks"
        masks_dir = Path(masks_dir)
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    data = FolderData([], [], [], list(classes))
    for path in paths:
        image = read_image(path)
        mask_path = masks_dir / f"{path.stem}.png"
        mask = (
            read_mask(mask_path, len(data.classes), image.shape[:2])
            if mask_path.is_file()
            else np.zeros(image.shape[:2], dtype=np.uint8)
        )
        data.stems.append(path.stem)
        data.images.append(image)
        data.masks.append(mask)
    return data


def load_normals(folder: str | Path, classes: Sequence[str]) -> list[np.ndarray]:
    """Normal images: a dataset folder's train images with empty masks, or every image of a plain folder."""
    data = load_folder(folder, None, classes)
    return [image for image, mask in zip(data.images, data.masks, strict=True) if not mask.any()]


def write_pairs(out: str | Path, pairs: Sequence[Pair], names: Sequence[str], classes: Sequence[str]) -> Path:
    """Write pairs as ``out/images/<name>.png`` + ``out/masks/<name>.png`` (+ ``classes.json``)."""
    out = Path(out)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for (image, mask), name in zip(pairs, names, strict=True):
        write_png(out / "images" / f"{name}.png", image)
        write_mask(out / "masks" / f"{name}.png", mask)
    (out / "classes.json").write_text(json.dumps(list(classes)) + "\n")
    return out
