"""Samples (fabric + defects + mask + caption) and the Loom dataset folder."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from loom.config import DEFAULT_CLASSES
from loom.data import manifest
from loom.datasets.fabric.render import _render
from loom.datasets.fabric.scene import (
    DEFECT_KINDS,
    KIND_ALIASES,
    LINE_SCAN_SHAPE,
    SOURCE,
    DefectSpec,
    FabricSpec,
    Sample,
    sample_spec,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Samples: fabric + defects + mask + caption
# ---------------------------------------------------------------------------------------------------------
def kind_to_class(classes: Sequence[str]) -> dict[str, str]:
    """Which class name each renderable defect kind is labelled with; kinds with no class are left out."""
    names = {c.lower(): c for c in classes}
    mapping = {}
    for kind in DEFECT_KINDS:
        match = next((names[a] for a in KIND_ALIASES[kind] if a in names), names.get("defect"))
        if match is not None:
            mapping[kind] = match
    return mapping


def _reach(kind: str, size: float, pitch: float) -> float:
    """Radius around a defect's centre that its pixels (outline, loose ends, shadows) stay within."""
    return {
        "hole": 1.7 * size + 4,
        "stain": 1.7 * size + 2,
        "knot": 2.2 * size + 4,
        "broken_yarn": size + 5 * pitch,
        "misweave": size + 4 * pitch,
    }[kind] + 2


def _defect_size(kind: str, side: float, pitch: float, rng: np.random.Generator) -> float:
    scale = side / 256.0
    low, high = {
        "hole": (4.5 * scale, 0.12 * side),
        "stain": (0.035 * side, 0.13 * side),
        "knot": (max(1.6, 0.45 * pitch), max(2.0, 1.3 * pitch)),  # a lump is thicker than its yarn
        "broken_yarn": (0.07 * side, 0.3 * side),
        "misweave": (0.05 * side, 0.2 * side),
    }[kind]
    return float(np.exp(rng.uniform(np.log(low), np.log(max(high, low * 1.01)))))


def sample_defects(
    rng: np.random.Generator,
    spec: FabricSpec,
    height: int,
    width: int,
    kinds: Sequence[str],
    first: str | None = None,
) -> list[DefectSpec]:
    """One to a few defects that do not overlap (so each mask pixel shows the defect it names)."""
    side = min(height, width)
    count = (
        1
        + int(rng.random() < 0.28)
        + int(rng.random() < 0.08)
        + int(rng.integers(0, 1 + width // (4 * side)))
    )
    wanted = [first] if first else []
    wanted += [str(rng.choice(list(kinds))) for _ in range(count - len(wanted))]
    placed: list[tuple[DefectSpec, float]] = []
    for kind in wanted:
        for _ in range(20):
            size = _defect_size(kind, side, spec.pitch, rng)
            reach = _reach(kind, size, spec.pitch)
            margin_y, margin_x = min(reach * 0.6, height / 2 - 1), min(reach * 0.6, width / 2 - 1)
            center = (
                float(rng.uniform(margin_y, height - margin_y)),
                float(rng.uniform(margin_x, width - margin_x)),
            )
            if all(np.hypot(center[0] - d.center[0], center[1] - d.center[1]) > reach + r for d, r in placed):
                placed.append((DefectSpec(kind, center, size, int(rng.integers(2**31))), reach))
                break
    return [d for d, _ in placed]


def _where(box: Sequence[int], height: int, width: int) -> str:
    x0, y0, x1, y1 = box
    cy, cx = (y0 + y1) / 2 / height, (x0 + x1) / 2 / width
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if not row and not col:
        return "in the centre"
    if row and col:
        return f"near the {row} {col}"
    return f"near the {row or col} edge" if col else f"near the {row}"


def caption_for(spec: FabricSpec, defects: Sequence[dict], height: int, width: int) -> str:
    """Free-text description, e.g. "twill fabric, navy, with a small knot near the top left"."""
    head = f"{spec.weave} fabric, {spec.colour_name}"
    if not defects:
        return f"{head}, no defect"
    side = min(height, width)
    phrases = []
    for d in defects:
        x0, y0, x1, y1 = d["bbox"]
        extent = max(x1 - x0, y1 - y0) / side
        size = (
            "tiny" if extent < 0.05 else "small" if extent < 0.12 else "medium" if extent < 0.25 else "large"
        )
        noun = d["class"].replace("_", " ")
        phrases.append(f"a {size} {noun} {_where(d['bbox'], height, width)}")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{head}, with {listed}"


def class_mask(masks: Sequence[np.ndarray], class_ids: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Paint H x W bool ``masks`` with their class ids into one uint8 mask; later ones win overlaps."""
    out = np.zeros(shape, np.uint8)
    for m, k in zip(masks, class_ids, strict=True):
        out[m] = k
    return out


def _build_sample(
    seed: int,
    height: int,
    width: int,
    defect_prob: float,
    classes: Sequence[str],
    force_defective: bool | None = None,
    first_kind: str | None = None,
) -> Sample:
    mapping = kind_to_class(classes)
    if not mapping:
        raise ValueError(
            f"none of the classes {list(classes)} names a fabric defect the generator can draw; "
            f"include one of {list(DEFECT_KINDS)} or 'defect'"
        )
    if len(classes) > 255:
        raise ValueError(f"{len(classes)} classes do not fit a uint8 mask (at most 255)")
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng)
    defective = bool(rng.random() < defect_prob) if force_defective is None else force_defective
    render_seed = int(rng.integers(2**63))
    first = first_kind if first_kind in mapping else None
    defects = sample_defects(rng, spec, height, width, list(mapping), first) if defective else []
    image, masks = _render(spec, height, width, np.random.default_rng(render_seed), defects)
    kept = [(d, m) for d, m in zip(defects, masks, strict=True) if m.any()]  # clipped away at the border
    ids = [list(classes).index(mapping[d.kind]) + 1 for d, _ in kept]
    mask = class_mask([m for _, m in kept], ids, (height, width))
    records = []
    for d, m in kept:
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        records.append({"class": mapping[d.kind], "bbox": bbox, "area": int(m.sum()), "kind": d.kind})
    return Sample(image, mask, caption_for(spec, records, height, width), records, spec)


def render_sample(
    seed: int,
    height: int = 256,
    width: int = 256,
    defect_prob: float = 0.3,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Sample:
    """One fabric image with its class-index mask and caption; the same seed gives the same bytes."""
    return _build_sample(seed, height, width, defect_prob, classes)


# ---------------------------------------------------------------------------------------------------------
# The dataset folder
# ---------------------------------------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    """Encode an H x W x 3 or H x W uint8 array as PNG; same array, same bytes (no metadata, fixed level)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _image_seed(seed: int, index: int, stream: int) -> int:
    """Independent per-image seed, stable for (dataset seed, image index, stream)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class _Job:
    stem: str
    seed: int
    height: int
    width: int
    defective: bool
    first_kind: str | None
    classes: tuple[str, ...]


def _render_job(job: _Job) -> tuple[str, bytes, bytes, str, list[str]]:
    sample = _build_sample(job.seed, job.height, job.width, 0.0, job.classes, job.defective, job.first_kind)
    present = sorted({d["class"] for d in sample.defects}, key=job.classes.index)
    return job.stem, png_bytes(sample.image), png_bytes(sample.mask), sample.caption, present


def _choose_test(
    rng: np.random.Generator, results: Sequence[tuple[str, list[str]]], test_fraction: float, cover_all: bool
) -> set[str]:
    """Stems of the frozen test split: the same fraction of normal and of defective images, and (when
    ``cover_all``) at least one image of every defect class present in the data."""
    if test_fraction <= 0:
        return set()
    normal = [stem for stem, present in results if not present]
    defective = [(stem, present) for stem, present in results if present]
    test: set[str] = set()
    if normal:
        order = rng.permutation(len(normal))
        test |= {normal[i] for i in order[: max(1, round(len(normal) * test_fraction))]}
    if defective:
        order = [defective[i] for i in rng.permutation(len(defective))]
        target = max(1, round(len(defective) * test_fraction))
        covered: set[str] = set()
        if cover_all:
            for stem, present in order:
                if set(present) - covered:
                    test.add(stem)
                    covered |= set(present)
        for stem, _ in order:
            if sum(1 for s, _ in defective if s in test) >= target:
                break
            test.add(stem)
    return test


def generate(
    out_dir: Path,
    n_images: int = 240,
    size: int = 256,
    defect_fraction: float = 0.3,
    test_fraction: float = 0.25,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    line_scan: int = 0,
    workers: int = 2,
) -> Path:
    """Write the embedded fabric dataset into ``out_dir`` (the Loom dataset folder layout) and return it.

    ``images/<stem>.png`` (RGB), ``masks/<stem>.png`` (class indices, zeros for normal images),
    ``captions/<stem>.txt``, ``classes.json`` and ``manifest.parquet``. The test split (human labels,
    reviewed) is chosen by ``seed`` and holds normal and defective images; ``line_scan`` extra 4096 x 256
    frames go to train. The same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    classes = tuple(classes)
    if n_images < 0 or line_scan < 0:
        raise ValueError(f"n_images ({n_images}) and line_scan ({line_scan}) must not be negative")
    if n_images + line_scan == 0:
        raise ValueError("nothing to generate: n_images and line_scan are both 0")
    if size < 32:
        raise ValueError(f"size {size} is too small for a fabric close-up; use at least 32 pixels")
    if not 0.0 <= defect_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            "defect_fraction must be in [0, 1] and test_fraction in [0, 1), "
            f"got {defect_fraction} and {test_fraction}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; choose another --out")
    kinds = list(kind_to_class(classes))
    if not kinds:
        raise ValueError(f"none of the classes {list(classes)} names a fabric defect the generator can draw")

    plan = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    n_defective = round(n_images * defect_fraction)
    defective = set(plan.permutation(n_images)[:n_defective].tolist())
    kind_cycle = [kinds[i] for i in plan.permutation(len(kinds))]  # balanced first defects
    jobs, order = [], 0
    for i in range(n_images):
        first = kind_cycle[order % len(kinds)] if i in defective else None
        order += i in defective
        jobs.append(
            _Job(f"fabric_{i:05d}", _image_seed(seed, i, 0), size, size, i in defective, first, classes)
        )
    for i in range(line_scan):
        jobs.append(
            _Job(
                f"linescan_{i:03d}",
                _image_seed(seed, i, 1),
                *LINE_SCAN_SHAPE,
                bool(plan.random() < defect_fraction),
                None,
                classes,
            )
        )

    for sub in ("images", "masks", "captions"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    results = _run_jobs(jobs, workers)
    rows = []
    for stem, image, mask, caption, present in results:
        (out_dir / "images" / f"{stem}.png").write_bytes(image)
        (out_dir / "masks" / f"{stem}.png").write_bytes(mask)
        (out_dir / "captions" / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        rows.append((stem, hashlib.sha256(image).hexdigest(), present))
    (out_dir / "classes.json").write_text(json.dumps(list(classes)) + "\n", encoding="utf-8")

    squares = [(stem, present) for stem, _, present in rows if stem.startswith("fabric_")]
    test = _choose_test(plan, squares, test_fraction, cover_all=n_images >= 100)
    shapes = {job.stem: (job.width, job.height) for job in jobs}
    write_manifest(out_dir, rows, shapes, test, SOURCE)
    logger.info(
        "fabric dataset: %d images (%d defective, %d test) and %d line-scan frames in %s",
        n_images,
        n_defective,
        len(test),
        line_scan,
        out_dir,
    )
    return out_dir


def _run_jobs(jobs: Sequence[_Job], workers: int) -> list[tuple[str, bytes, bytes, str, list[str]]]:
    """Render in a small process pool when it pays off; results keep the jobs' order."""
    if workers <= 1 or len(jobs) < 16:
        return [_render_job(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # spawn, not fork: the caller may hold threads (Prefect, servers) that a fork would copy mid-state
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_render_job, jobs, chunksize=8))


def write_manifest(
    out_dir: Path,
    rows: Sequence[tuple[str, str, Sequence[str]]],
    shapes: dict[str, tuple[int, int]],
    test: set[str] | Sequence[str],
    source: str,
) -> None:
    """``manifest.parquet`` of a generated set: rows are (stem, image_id, classes present), shapes stem ->
    (width, height); the ``test`` stems are human-verified test images, the rest unlabeled train images."""
    table = pd.DataFrame(
        {
            "image_id": [image_id for _, image_id, _ in rows],
            "path": [f"images/{stem}.png" for stem, _, _ in rows],
            "width": [shapes[stem][0] for stem, _, _ in rows],
            "height": [shapes[stem][1] for stem, _, _ in rows],
            "source": source,
            "split": ["test" if stem in test else "train" for stem, _, _ in rows],
            "round": 0,
            "label_source": ["human" if stem in test else "none" for stem, _, _ in rows],
            "classes": [",".join(present) for _, _, present in rows],
            "review_state": ["reviewed" if stem in test else "none" for stem, _, _ in rows],
        }
    )
    manifest.save(manifest.normalize(table), out_dir / "manifest.parquet")
