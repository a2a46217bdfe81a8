"""What every pseudo-labeling teacher returns and the interface the round and the CLI call.

A teacher turns images into anomaly maps, masks, an image score and an uncertainty. Two kinds exist: the
offline backbone teacher (models/teacher/backbone) and the vision-language teacher (models/teacher/openclip).
Both are fitted on the pool to label (zero-shot) and, when known-good images exist, on those normals
(few-shot); thresholds are chosen from the data in `fit`/`predict`, never hard-coded per fabric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class TeacherPrediction:
    """One image's pseudo-label.

    anomaly_map: (H, W) float32 at input resolution, higher = more anomalous.
    score: image anomaly score (same scale as `image_threshold` of the teacher that made it).
    mask: (H, W) bool, the defect pixels.
    uncertainty: in [0, 1], 1 at the image threshold (a person's look is worth most), ~0 far from it.
    class_probs: (C, H, W) float32 or None: per-pixel probabilities over the teacher's named defect classes
        (`Teacher.class_names`, the generic `defect` excluded), only from teachers that can tell defect types
        apart (per-class prompts). None means "cannot name the type".
    """

    anomaly_map: np.ndarray
    score: float
    mask: np.ndarray
    uncertainty: float
    class_probs: np.ndarray | None = None


def anomaly_probability(
    anomaly_map: np.ndarray, pixel_threshold: float, sharpness: float = 6.0
) -> np.ndarray:
    """A teacher's raw map as a probability that each pixel is a defect, for students that distil from it.

    Logistic in the map with 0.5 at the teacher's pixel threshold; the slope is set so that a pixel scoring
    0 (the typical part of an image for the median-centred backbone maps) gets sigmoid(-sharpness).

    Args:
        anomaly_map: (H, W) float raw teacher scores.
        pixel_threshold: the teacher's pixel threshold for that map.
        sharpness: steepness in units of the threshold's distance from 0.

    Returns:
        (H, W) float32 in (0, 1).
    """
    scale = max(abs(float(pixel_threshold)), 1e-6) / sharpness
    z = np.clip((anomaly_map.astype(np.float32) - pixel_threshold) / scale, -30.0, 30.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


@runtime_checkable
class Teacher(Protocol):
    """The interface of a pseudo-labeling teacher.

    Usage: `teacher.fit(pool, normals)` then `teacher.predict(images)`; `images` may be the pool itself
    (zero-shot labeling of an unlabeled pool) or new images.
    """

    #: "backbone" or "openclip": goes into the predictions' model_version.
    name: str
    #: Named defect classes the teacher's `class_probs` refer to (empty when it cannot name types).
    class_names: tuple[str, ...]
    #: Thresholds chosen from the data by the last fit/predict (None before).
    pixel_threshold: float | None
    image_threshold: float | None

    def fit(self, pool: Sequence[np.ndarray], normals: Sequence[np.ndarray] = ()) -> None:
        """Prepare to label `pool` ((H, W, 3) uint8 each); `normals` are known-good images (few-shot)."""
        ...

    def predict(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """One prediction per (H, W, 3) uint8 image, maps at each image's own resolution."""
        ...
