"""Behaviour of every registered student: after a short training on synthetic fabric, a defect scores
above normal fabric.

The fabric is a periodic weave with noise; the defect a dark blob. The segmenters (fpn, bafpn) learn from
masks of the blob; the anomaly scorers (cfa, rd4ad, uninet) from defect-free fabric only, then calibrate
on it. Each student is built through the registry and trained by its real training loop; the checks run
on held-out images through ``predict_images``, the path evaluation and the line use. Left untrained, or
shown the same images without the blob, every student fails these checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.registry import STUDENTS, build_loss, build_student, is_anomaly_scorer
from models.student.training import TrainConfig, predict_images, train_segmenter

pytestmark = pytest.mark.usefixtures("single_thread")

#: Side of the images and training crops. At 64 px the scorers' coarse maps (stride-16 features, a 4 px
#: blur) spread a blob over most of the image.
SIZE = 80
#: Brightness left inside the blob.
DARKEN = 0.35
#: p(defect) inside the blob must exceed its mean over the rest of the image by at least this much.
MAP_MARGIN = 0.3

#: Per student: config overrides for ``build_student`` and the training settings.
#: The anomaly scorers use the real ImageNet encoder (frozen, cheap at this size): a random tiny pyramid's
#: features say little about texture. The segmenters train their tiny pyramid from scratch.
SETUPS: dict[str, dict[str, Any]] = {
    "fpn": {
        "model": {"tiny": True, "fpn_channels": 32},
        "train": TrainConfig(epochs=16, batch_size=8, lr=1e-2, image_size=SIZE, freeze_backbone_epochs=0),
    },
    "bafpn": {
        "model": {"tiny": True, "channels": 32},
        "train": TrainConfig(epochs=16, batch_size=8, lr=1e-2, image_size=SIZE, freeze_backbone_epochs=0),
    },
    "cfa": {
        "model": {"tiny": False, "descriptor_dim": 64},
        "train": AnomalyTrainConfig(epochs=3, batch_size=4, lr=1e-2, image_size=SIZE, reference_crops=12),
    },
    "rd4ad": {
        "model": {"tiny": False},
        "train": AnomalyTrainConfig(epochs=16, batch_size=4, lr=4e-2, image_size=SIZE, reference_crops=12),
    },
    "uninet": {
        "model": {"tiny": False, "bottleneck_channels": 32, "contrast_positions": 32},
        "train": AnomalyTrainConfig(epochs=8, batch_size=4, lr=5e-3, image_size=SIZE, reference_crops=12),
    },
}


def weave(rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 plain weave: warp and weft with a 6-pixel period, random phase, sensor noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, 2)
    over_under = np.sin(2 * np.pi * xx / 6 + phase_x) * np.sin(2 * np.pi * yy / 6 + phase_y)
    gray = 130 + 25 * over_under + rng.normal(0, 5, (SIZE, SIZE))
    tint = np.array([1.0, 0.95, 0.85])
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def blob_mask(rng: np.random.Generator, radius: int = 7) -> np.ndarray:
    """(SIZE, SIZE) bool disc at a random place, clear of the border."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(radius + 2, SIZE - radius - 2, size=2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def with_blob(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image darkened inside the mask (a stain, or a hole seen against a dark backing)."""
    image = image.copy()
    image[mask] = (image[mask] * DARKEN).astype(np.uint8)
    return image


def training_samples(supervised: bool, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """12 normal weaves; the segmenters also get 16 with a blob and its mask (class 1)."""
    rng = np.random.default_rng(seed)
    samples = [(weave(rng), np.zeros((SIZE, SIZE), np.uint8), 1.0) for _ in range(12)]
    if supervised:
        for _ in range(16):
            mask = blob_mask(rng)
            samples.append((with_blob(weave(rng), mask), mask.astype(np.uint8), 1.0))
    return samples


def trained(name: str) -> Any:
    """Student ``name`` built from the registry and trained by its own loop (scorers calibrate at the end)."""
    setup = SETUPS[name]
    torch.manual_seed(0)  # the initial weights
    model = build_student(name, num_classes=1, image_size=SIZE, **setup["model"])
    loss_fn = build_loss(name, model)
    if is_anomaly_scorer(model):
        train_anomaly_model(model, loss_fn, training_samples(supervised=False), setup["train"])
    else:
        train_segmenter(model, training_samples(supervised=True), setup["train"], loss_fn=loss_fn)
    return model


def test_every_registered_student_has_a_behaviour_setup() -> None:
    assert set(SETUPS) == set(STUDENTS)


@pytest.mark.parametrize("name", list(SETUPS))
def test_a_dark_blob_scores_above_normal_fabric(name: str) -> None:
    model = trained(name)

    held_out = np.random.default_rng(1234)  # images unseen in training
    masks = [blob_mask(held_out) for _ in range(3)]
    defective = [with_blob(weave(held_out), mask) for mask in masks]
    normal = [weave(held_out) for _ in range(3)]
    results = predict_images(model, defective + normal)

    for (anomaly_map, _, _), mask in zip(results[:3], masks, strict=True):
        inside, outside = float(anomaly_map[mask].mean()), float(anomaly_map[~mask].mean())
        assert inside > outside + MAP_MARGIN, (
            f"{name}: p(defect) {inside:.3f} inside vs {outside:.3f} outside"
        )
    defect_scores = [score for _, _, score in results[:3]]
    normal_scores = [score for _, _, score in results[3:]]
    assert min(defect_scores) > max(normal_scores), f"{name}: {defect_scores} vs normal {normal_scores}"
