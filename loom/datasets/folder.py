"""A folder of images with class masks, read as (stem, image, mask) triples: a user's own labeled defects.

Two layouts are read:
- a Loom dataset folder (``images/``, ``masks/``, ``manifest.parquet`` with a ``split`` column), as
  ``loom datasets generate`` / ``import`` write it: ``split`` selects its train or test images;
- a plain folder: ``images/<stem>.<ext>`` and ``masks/<stem>.png`` (or two folders given separately).

Masks are single-channel PNGs, 0 = background and k = class k of the project's class list; a mask
holding only 0 and 255 (a binary defect mask) is read as the generic ``defect`` class. An image without
a mask is an error (the folder must say what is defect-free: an all-zero mask), as is a mask of the
wrong size; the message names the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loom.data.imageio import IMAGE_SUFFIXES, MaskError, read_image, read_mask


@dataclass
class FolderImage:
    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8 class ids


def read_class_mask(path: Path, classes: Sequence[str], hw: tuple[int, int]) -> np.ndarray:
    """A class-index mask; a binary 0/255 mask becomes the generic ``defect`` class."""
    try:
        return read_mask(path, len(classes), expected_hw=hw)
    except MaskError:
        binary = read_mask(path, 255, expected_hw=hw)
        if not set(np.unique(binary).tolist()) <= {0, 255} or "defect" not in classes:
            raise
        return np.where(binary > 0, list(classes).index("defect") + 1, 0).astype(np.uint8)


def load_labeled_folder(
    images: Path,
    classes: Sequence[str],
    masks: Path | None = None,
    split: str | None = None,
) -> list[FolderImage]:
    """Images and class masks of a folder dataset, sorted by stem.

    Args:
        images: a Loom dataset folder, a folder with ``images/`` and ``masks/``, or the images folder.
        classes: the project's classes (mask value k is ``classes[k - 1]``).
        masks: the masks folder when it is not ``<images>/masks`` or a sibling ``masks/``.
        split: with a Loom dataset folder, only that split (``train`` / ``test``); ignored otherwise.
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    image_dir = root / "images" if (root / "images").is_dir() else root
    mask_dir = Path(masks) if masks else (image_dir.parent / "masks")
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"no masks folder at {mask_dir}: pass --masks DIR (class masks, PNG)")
    _check_classes(image_dir.parent, classes)
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    manifest_path = image_dir.parent / "manifest.parquet"
    if split and manifest_path.exists():
        table = pd.read_parquet(manifest_path)
        wanted = {Path(p).stem for p in table.loc[table["split"] == split, "path"]}
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise FileNotFoundError(f"no images in {image_dir}" + (f" for split {split!r}" if split else ""))
    out = []
    for path in files:
        mask_path = mask_dir / f"{path.stem}.png"
        if not mask_path.exists():
            raise FileNotFoundError(
                f"{path.name} has no mask {mask_path}: give every image a mask (all zeros when defect-free)"
            )
        image = read_image(path)
        out.append(FolderImage(path.stem, image, read_class_mask(mask_path, classes, image.shape[:2])))
    return out


def _check_classes(folder: Path, classes: Sequence[str]) -> None:
    listed = folder / "classes.json"
    if listed.exists():
        theirs = json.loads(listed.read_text())
        if list(theirs) != list(classes):
            raise ValueError(
                f"{listed} lists classes {theirs}, but this project uses {list(classes)} (params.yaml)"
            )
