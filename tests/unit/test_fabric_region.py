"""The fabric in a line-scan frame: background beyond the cloth found without labels and left out."""

from __future__ import annotations

import numpy as np
import pytest

from models.teacher.backbone import BackboneTeacher, TeacherConfig
from models.teacher.backbone.features import PATCH_STRIDE
from models.teacher.backbone.region import RegionConfig, fabric_columns


def woven(height: int, width: int, seed: int) -> np.ndarray:
    """A plain weave with a little sensor noise: (H, W, 3) uint8."""
    rows, cols = np.mgrid[0:height, 0:width]
    pattern = 120.0 + 45.0 * np.sin(2 * np.pi * rows / 6) * np.sin(2 * np.pi * cols / 6)
    pattern += np.random.default_rng(seed).normal(0.0, 4.0, pattern.shape)
    return np.repeat(np.clip(pattern, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def with_background(frame: np.ndarray, columns: int, side: str, value: int) -> np.ndarray:
    frame = frame.copy()
    if side == "left":
        frame[:, :columns] = value
    else:
        frame[:, -columns:] = value
    return frame


@pytest.fixture(scope="module")
def teacher() -> BackboneTeacher:
    return BackboneTeacher(TeacherConfig(image_size=128, crop_size=512, crop_margin=64))


def _fabric(teacher: BackboneTeacher, frame: np.ndarray) -> tuple[int, int]:
    layout = teacher._layout(frame)
    ((_, patches),) = list(teacher._extract([frame]))
    return fabric_columns(patches, layout.grid, teacher.config.region)


@pytest.mark.parametrize(("side", "value"), [("left", 4), ("right", 255), ("left", 255)])
def test_blank_or_blown_out_background_at_either_end_is_cut_off(
    teacher: BackboneTeacher, side: str, value: int
) -> None:
    frame = with_background(woven(64, 1536, seed=1), 320, side, value)
    first, last = _fabric(teacher, frame)
    band = int(np.ceil(192 * teacher.config.region.selvedge))
    if side == "left":
        assert 320 // PATCH_STRIDE <= first <= 320 // PATCH_STRIDE + band + 2 and last == 192
    else:
        assert first == 0 and 192 - 320 // PATCH_STRIDE - band - 2 <= last <= 192 - 320 // PATCH_STRIDE


def test_cloth_to_both_ends_and_a_broken_end_near_one_are_left_whole(teacher: BackboneTeacher) -> None:
    assert _fabric(teacher, woven(64, 1536, seed=2)) == (0, 192)
    frame = woven(64, 1536, seed=3)
    frame[:, 200:206] = 30  # a broken end: a dark line along the whole frame, ordinary cloth beyond it
    assert _fabric(teacher, frame) == (0, 192)


def test_small_images_are_never_cut() -> None:
    patches = np.random.default_rng(0).normal(size=(32 * 32, 8)).astype(np.float32)
    import torch

    assert fabric_columns(torch.from_numpy(patches), (32, 32), RegionConfig()) == (0, 32)


def test_background_is_never_a_defect_nor_a_reference(teacher: BackboneTeacher) -> None:
    """A pool where half the frames end in dark background: no mask reaches it, a real defect is found."""
    frames = [woven(64, 1536, seed) for seed in range(8)]
    for index in range(0, 8, 2):
        frames[index] = with_background(frames[index], 256 + 32 * index, "right", 5)
    frames[3][20:36, 700:716] = 250
    fabric_teacher = teacher
    predictions = fabric_teacher.fit_predict_pool(frames)
    for index in range(0, 8, 2):
        background = slice(1536 - 256 - 32 * index, 1536)
        assert not predictions[index].mask[:, background].any()
        assert (predictions[index].anomaly_map[:, background] == 0).all()
    assert int(np.argmax([prediction.score for prediction in predictions])) == 3
    assert predictions[3].mask[24:32, 704:712].all()
    # Without the fabric found, the background's edge is what stands out in those frames.
    blind = BackboneTeacher(
        TeacherConfig(image_size=128, crop_size=512, crop_margin=64, region=RegionConfig(enabled=False))
    )
    blind_predictions = blind.fit_predict_pool(frames)
    assert any(blind_predictions[index].mask[:, 1536 - 512 :].any() for index in range(0, 8, 2))
