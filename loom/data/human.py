"""People's labels in the workspace: the one place that reads human-labeled images and their masks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from loom.config import Settings
from loom.data import manifest
from loom.data.imageio import read_image, read_mask


def image_of(settings: Settings, row: pd.Series) -> np.ndarray:
    """(H, W, 3) uint8 image of a manifest row."""
    return read_image(settings.data_dir / row["path"])


def human_mask_of(settings: Settings, image_id: str, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 class mask people gave ``image_id`` (checked against the image's size ``hw``)."""
    return read_mask(settings.masks_dir / f"{image_id}.png", len(settings.classes), expected_hw=hw)


def human_labeled(
    settings: Settings, split: str, rows: pd.DataFrame | None = None
) -> Iterator[tuple[pd.Series, np.ndarray]]:
    """Usable human-labeled rows of ``split`` with their class masks, in the order of ``rows`` (the
    manifest by default). Callers read the image (:func:`image_of`) only where they need it."""
    df = manifest.usable(manifest.load(settings.manifest_path)) if rows is None else rows
    for _, row in df[(df["split"] == split) & (df["label_source"] == "human")].iterrows():
        yield row, human_mask_of(settings, row["image_id"], (int(row["height"]), int(row["width"])))


def human_references(settings: Settings, rows: pd.DataFrame) -> tuple[list, list, list]:
    """People's labels of earlier rounds in ``rows`` (by image id): up to ``teacher_shots`` normal images
    (few-shot references), and the images + masks with named defects (prototypes for naming regions)."""
    human = rows[(rows["split"] == "train") & (rows["label_source"] == "human")].sort_values("image_id")
    named = human["classes"].fillna("") != ""
    shots = settings.round.teacher_shots
    normals = [image_of(settings, row) for _, row in human[~named].head(shots).iterrows()]
    images, masks = [], []
    for row, mask in human_labeled(settings, "train", human[named]):  # masks of named defects only
        images.append(image_of(settings, row))
        masks.append(mask)
    return normals, images, masks
