"""Importers: public dataset layouts -> a Loom dataset folder (layout in ``loom.datasets``).

Image files are placed under ``images/<stem>.png``: PNG files byte for byte, other formats re-encoded as 8-bit
RGB PNG. A file that cannot be read is **not dropped**: it is copied unchanged (keeping its suffix) and listed
in the manifest, so that ``loom.data.ingest.ingest_folder`` quarantines it with a reason the user can see,
instead of it silently disappearing from the data. The same holds for unreadable ground-truth masks.

Importing never writes into a non-empty destination, so an earlier import is never mixed with a new one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from loom.config import DEFAULT_CLASSES
from loom.data import manifest
from loom.data.imageio import ImageReadError, image_size, read_image, write_mask, write_png

logger = logging.getLogger(__name__)

#: Words in defect-type folder names -> Loom class (used when the name is not itself a class name).
DEFECT_SYNONYMS: dict[str, str] = {
    "cut": "hole",
    "poke": "hole",
    "tear": "hole",
    "color": "stain",
    "colour": "stain",
    "contamination": "stain",
    "oil": "stain",
    "glue": "stain",
    "liquid": "stain",
    "thread": "broken_yarn",
    "broken": "broken_yarn",
    "yarn": "broken_yarn",
    "nep": "knot",
    "fold": "misweave",
    "float": "misweave",
    "weave": "misweave",
}
GOOD = "good"


def defect_class(defect_type: str, classes: Sequence[str]) -> str:
    """The Loom class for a defect-type folder name (``metal_contamination`` -> ``stain``), else ``defect``.

    The whole name is tried first, then each word: as a class name, then through ``DEFECT_SYNONYMS``.
    """
    name = re.sub(r"[^a-z0-9]+", "_", defect_type.lower()).strip("_")
    if name in classes:
        return name
    for word in name.split("_"):
        for candidate in (word, DEFECT_SYNONYMS.get(word)):
            if candidate in classes:
                return candidate
    if "defect" not in classes:
        raise ValueError(
            f"defect type {defect_type!r} matches none of the classes {list(classes)} and there is no "
            "'defect' class to fall back to; add 'defect' to the classes"
        )
    return "defect"


# ---- shared helpers -----------------------------------------------------------------------------------


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden regular files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def prepare_folder(dst: Path, classes: Sequence[str]) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; import into a new folder (or remove this one first)")
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "classes.json").write_text(json.dumps(list(classes), indent=1) + "\n")


def _unique_stem(stem: str, used: set[str]) -> str:
    candidate, n = stem, 2
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return candidate


def _place_image(src_file: Path, dst: Path, stem: str) -> Path:
    """Put one image into ``dst/images``; returns the written file (see the module doc for the rules)."""
    if src_file.suffix.lower() == ".png":
        target = dst / "images" / f"{stem}.png"
        shutil.copyfile(src_file, target)
        return target
    try:
        rgb = read_image(src_file)
    except ImageReadError as err:
        target = dst / "images" / f"{stem}{src_file.suffix.lower()}"
        shutil.copyfile(src_file, target)
        logger.warning("%s; copied unchanged so that ingest quarantines it", err)
        return target
    target = dst / "images" / f"{stem}.png"
    write_png(target, rgb)
    return target


def manifest_row(
    image: Path, dst: Path, split: str, source: str, classes: str = "", human: bool = False
) -> dict:
    """A manifest row for a placed image; width/height stay empty when the header cannot be read."""
    try:
        width, height = image_size(image)
    except ImageReadError:
        width = height = pd.NA
    return {
        "image_id": manifest.sha256_file(image),
        "path": image.relative_to(dst).as_posix(),
        "width": width,
        "height": height,
        "source": source,
        "split": split,
        "score": np.nan,
        "uncertainty": np.nan,
        "label_source": "human" if human else "none",
        "classes": classes,
        "review_state": "reviewed" if human else "none",
        "quarantine_reason": "",
    }


def save_folder(rows: list[dict], dst: Path) -> Path:
    manifest.save(pd.DataFrame(rows), dst / "manifest.parquet")
    return dst


# ---- MVTec AD -----------------------------------------------------------------------------------------


def _is_mvtec_category(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def find_mvtec_category(src: Path, category: str | None = None) -> Path:
    """The category folder: ``src`` itself, or the one named ``category`` (or the only one) below it."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"MVTec AD folder {src} does not exist")
    available = sorted(p.name for p in src.iterdir() if p.is_dir() and _is_mvtec_category(p))
    if category is not None:
        for candidate in (src / category, src):
            if candidate.name == category and _is_mvtec_category(candidate):
                return candidate
        raise ValueError(f"no MVTec AD category {category!r} in {src}; available: {available or 'none'}")
    if _is_mvtec_category(src):
        return src
    if len(available) == 1:
        return src / available[0]
    if not available:
        raise ValueError(
            f"{src} is not an MVTec AD folder: expected <category>/train/good/ and <category>/test/<type>/"
        )
    raise ValueError(f"{src} holds several MVTec AD categories; pick one with category=: {available}")


def _ground_truth(category_dir: Path, defect_type: str, stem: str) -> Path | None:
    folder = category_dir / "ground_truth" / defect_type
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def _convert_mask(gt: Path, target: Path, class_index: int) -> bool:
    """Binary GT mask (any value >= 128 is defect) -> class-index mask; returns True when the mask shows one.

    An unreadable GT file is copied unchanged so that ingest quarantines its image with the reason.
    """
    try:
        binary = read_image(gt).max(axis=2) >= 128
    except ImageReadError as err:
        shutil.copyfile(gt, target)
        logger.warning("%s; copied unchanged so that ingest quarantines its image", err)
        return False
    write_mask(target, binary.astype(np.uint8) * class_index)
    return bool(binary.any())


def import_mvtec(
    src: Path, dst: Path, category: str | None = None, classes: Sequence[str] = DEFAULT_CLASSES
) -> Path:
    """MVTec AD category -> Loom dataset folder at ``dst``.

    ``train/good`` becomes split train (no masks); ``test/<type>`` split test with class-index masks: the
    defect type maps to a class by ``defect_class``; good test images get all-zero masks.

    Args:
        src: a category folder (``train/``, ``test/``, ``ground_truth/``) or a root holding categories.
        dst: new (or empty) output folder.
        category: which category when ``src`` is a root with several.
        classes: the class list written to ``classes.json``; mask value k is ``classes[k - 1]``.
    Returns:
        ``dst``.
    """
    category_dir = find_mvtec_category(Path(src), category)
    dst = Path(dst)
    classes = list(classes)
    prepare_folder(dst, classes)
    source = f"mvtec-{category_dir.name}"
    used: set[str] = set()
    rows = [
        manifest_row(_place_image(f, dst, _unique_stem(f"train_good_{f.stem}", used)), dst, "train", source)
        for f in _visible_files(category_dir / "train" / GOOD)
    ]
    for type_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        defect_type = type_dir.name
        name = "" if defect_type == GOOD else defect_class(defect_type, classes)
        for f in _visible_files(type_dir):
            image = _place_image(f, dst, _unique_stem(f"test_{defect_type}_{f.stem}", used))
            mask_path = dst / "masks" / f"{image.stem}.png"
            shown = _test_mask(
                category_dir, defect_type, f, image, mask_path, classes.index(name) + 1 if name else 0
            )
            rows.append(
                manifest_row(image, dst, "test", source, name if shown else "", human=mask_path.exists())
            )
    logger.info("imported MVTec AD %s: %d images into %s", category_dir.name, len(rows), dst)
    return save_folder(rows, dst)


def _test_mask(
    category_dir: Path, defect_type: str, src_file: Path, image: Path, target: Path, index: int
) -> bool:
    """Write the class-index mask of one test image; returns True when it shows a defect."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if index == 0:  # a good test image: all background, at the image's size
        try:
            width, height = image_size(image)
        except ImageReadError:
            return False  # the image itself is unreadable; ingest quarantines it
        write_mask(target, np.zeros((height, width), np.uint8))
        return False
    gt = _ground_truth(category_dir, defect_type, src_file.stem)
    if gt is None:
        logger.warning("no ground-truth mask for %s; it is imported without a label", src_file)
        return False
    return _convert_mask(gt, target, index)


# ---- plain folders ------------------------------------------------------------------------------------


def import_plain(src: Path, dst: Path, classes: Sequence[str] = DEFAULT_CLASSES) -> Path:
    """A folder of images (recursive, hidden files skipped) -> Loom dataset folder, all split train, no masks.

    Every file is kept, readable or not (see the module doc); stems encode the sub-folder
    (``day/cam1/a.png`` -> ``images/day__cam1__a.png``).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    files = sorted(
        p
        for p in src.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(src).parts)
    )
    prepare_folder(dst, classes)
    used: set[str] = set()
    rows = []
    for f in files:
        stem = "__".join((*f.relative_to(src).parent.parts, f.stem))
        rows.append(
            manifest_row(_place_image(f, dst, _unique_stem(stem, used)), dst, "train", src.resolve().name)
        )
    logger.info("imported %d files from %s into %s", len(rows), src, dst)
    return save_folder(rows, dst)
