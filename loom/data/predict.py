"""Prediction outputs: the folder layout ``loom predict`` and ``loom pseudo-label`` both write.

```
OUT/scores.csv            image, score, label, classes, error  (one row per input image)
OUT/maps/<stem>.npy       float32 anomaly map at the input resolution
OUT/masks/<stem>.png      class-index mask (0 = background, k = class k)
OUT/overlays/<stem>.png   the image with each class in its colour and outlined (optional)
```
``label`` is ``defect`` or ``normal`` (score against the image threshold), or ``error`` for an input that
could not be read; ``error`` then says why (it is empty for every other row).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from loom.data.imageio import ImageReadError, read_image, write_mask, write_png
from models.progress import progress

logger = logging.getLogger(__name__)

SCORES_NAME = "scores.csv"
SCORE_COLUMNS = ("image", "score", "label", "classes", "error")
DEFAULT_IMAGE_THRESHOLD = 0.5
OVERLAY_ALPHA = 0.45

#: One colour per class index (index 0, background, is never drawn); repeats past the end.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),  # red
    (255, 225, 25),  # yellow
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
)

#: (stem, anomaly map (H, W), class mask (H, W), image score, image (H, W, 3) uint8 or None)
PredictionResult = tuple[str, np.ndarray, np.ndarray, float, np.ndarray | None]


def class_color(index: int) -> tuple[int, int, int]:
    """The fixed RGB colour of class ``index`` (>= 1)."""
    return PALETTE[1 + (index - 1) % (len(PALETTE) - 1)]


def classes_in_mask(mask: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Names of the classes present in a class-index mask, in class order (unknown ids as ``class_<k>``)."""
    names = []
    for index in np.unique(mask):
        if index == 0:
            continue
        names.append(classes[index - 1] if index <= len(classes) else f"class_{int(index)}")
    return names


def _boundary(region: np.ndarray) -> np.ndarray:
    """Pixels of a boolean region that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(region, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & region
    return region & ~inner


def overlay(image: np.ndarray, mask: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """The image with each predicted class tinted in its colour and outlined.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) integer class indices (0 = background).
        classes: the project's class names (index k in the mask is ``classes[k - 1]``).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and mask {mask.shape} differ in size")
    out = image.astype(np.float32)
    max_index = max(len(classes), int(mask.max(initial=0)))
    for index in range(1, max_index + 1):
        region = mask == index
        if not region.any():
            continue
        color = np.asarray(class_color(index), dtype=np.float32)
        out[region] = (1 - OVERLAY_ALPHA) * out[region] + OVERLAY_ALPHA * color
        out[_boundary(region)] = color
    return out.round().clip(0, 255).astype(np.uint8)


def write_predictions(
    out_dir: Path,
    results: Iterable[PredictionResult],
    classes: Sequence[str],
    image_threshold: float,
    errors: Iterable[tuple[str, str]] = (),
) -> Path:
    """Write the prediction layout (see the module docstring) and return ``out_dir``.

    Results are written as they arrive, so a generator keeps memory flat over large folders.

    Args:
        out_dir: output folder (created).
        results: (stem, anomaly map (H, W), class mask (H, W), score, image (H, W, 3) uint8 or None);
            an overlay is written only when the image is given.
        classes: class names; mask value k is ``classes[k - 1]``.
        image_threshold: scores at or above it are labelled ``defect``.
        errors: (name, reason) of inputs that could not be predicted; read after ``results`` is
            exhausted, so a list that the results generator fills works.
    """
    out_dir = Path(out_dir)
    maps_dir, masks_dir, overlays_dir = out_dir / "maps", out_dir / "masks", out_dir / "overlays"
    maps_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for stem, anomaly_map, mask, score, image in results:
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"{stem}: anomaly map {anomaly_map.shape} and mask {mask.shape} differ in size")
        np.save(maps_dir / f"{stem}.npy", anomaly_map.astype(np.float32, copy=False))
        write_mask(masks_dir / f"{stem}.png", mask.astype(np.uint8, copy=False))
        if image is not None:
            overlays_dir.mkdir(exist_ok=True)
            write_png(overlays_dir / f"{stem}.png", overlay(image, mask, classes))
        rows.append(
            {
                "image": stem,
                "score": f"{score:.6f}",
                "label": "defect" if score >= image_threshold else "normal",
                "classes": ",".join(classes_in_mask(mask, classes)),
                "error": "",
            }
        )
    for name, reason in errors:
        rows.append({"image": name, "score": "", "label": "error", "classes": "", "error": reason})
    scores_path = out_dir / SCORES_NAME
    with scores_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SCORE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def image_threshold_of(model_dir: Path) -> float:
    """The image threshold stored with a model (``image_threshold`` in its config.json), else 0.5."""
    config_path = Path(model_dir) / "config.json"
    try:
        value = json.loads(config_path.read_text()).get("image_threshold")
    except (OSError, json.JSONDecodeError):
        value = None
    return float(value) if value is not None else DEFAULT_IMAGE_THRESHOLD


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per path: the file stem, with the suffix appended when two files share a stem."""
    stem_counts = Counter(Path(p).stem for p in paths)
    used: Counter[str] = Counter()
    names = []
    for path in map(Path, paths):
        name = path.stem if stem_counts[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
        used[name] += 1
        names.append(name if used[name] == 1 else f"{name}_{used[name]}")
    return names


def predict_paths(
    model_dir: Path,
    paths: Sequence[Path],
    out_dir: Path,
    classes: Sequence[str] | None = None,
    overlays: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Run a saved student over image files and write the prediction layout into ``out_dir``.

    Streams: each image is read when the predictor needs its tiles (tiles of consecutive images share
    batches, see :func:`models.student.training.iter_predictions`) and its files are written as soon as
    its result comes; only the scores.csv rows are kept, so memory stays flat over any number of frames.

    An unreadable image is logged with a warning naming it, listed in scores.csv with label ``error`` and
    the reason, and skipped; the other images go on.

    Args:
        model_dir: a student folder (config.json + model.safetensors) of any architecture.
        paths: image files.
        out_dir: output folder.
        classes: class names (mask value k is ``classes[k - 1]``); default: those stored with the model.
        overlays: also write overlay PNGs.
        on_progress: called with the number of images done (read or skipped) after each one, besides the
            progress shown as ``predict`` (models/progress.py).
    """
    # Imported here so that writing predictions (e.g. from the teacher) does not load the student code.
    from models.student.checkpoint import read_model_metadata
    from models.student.registry import load_student
    from models.student.training import iter_predictions

    model_dir = Path(model_dir)
    model = load_student(model_dir)
    metadata = read_model_metadata(model_dir)
    if classes is None:
        if "classes" not in metadata:
            raise ValueError(f"{model_dir / 'config.json'} stores no class names: pass the project's classes")
        classes = list(metadata["classes"])
    if len(classes) != model.config.num_classes:
        raise ValueError(
            f"the model in {model_dir} predicts {model.config.num_classes} defect classes but "
            f"{len(classes)} names were given ({', '.join(classes)}): use the classes it was trained with"
        )
    threshold = image_threshold_of(model_dir)
    errors: list[tuple[str, str]] = []
    shown = progress("predict", len(paths))
    done = 0
    # (stem, image for the overlay or None) of the images read but not yet written, oldest first: the
    # predictor pulls a frame or two ahead of its results, so this stays that short.
    in_flight: deque[tuple[str, np.ndarray | None]] = deque()

    def one_done() -> None:
        nonlocal done
        done += 1
        shown.advance()
        if on_progress is not None:
            on_progress(done)

    def readable_images() -> Iterator[np.ndarray]:
        # Read lazily: an image is decoded only when the predictor needs its tiles.
        for path, stem in zip(paths, unique_stems(list(paths)), strict=True):
            try:
                image = read_image(path)
            except ImageReadError as err:
                logger.warning("%s (skipped)", err)
                errors.append((stem, str(err)))
                one_done()
                continue
            in_flight.append((stem, image if overlays else None))
            yield image

    def results() -> Iterator[PredictionResult]:
        for anomaly_map, mask, score in iter_predictions(model, readable_images()):
            stem, image = in_flight.popleft()  # results come in input order
            yield stem, anomaly_map, mask, score, image
            one_done()  # the yield has returned: this image's files are written

    with shown:
        write_predictions(out_dir, results(), classes, threshold, errors=errors)
    logger.info(
        "predictions for %d images in %s (%d unreadable)", len(paths) - len(errors), out_dir, len(errors)
    )
    return Path(out_dir)
