"""Evaluation metrics against cases computed by hand and against independent reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from loom.evaluation import metrics


def _toy_split(seed: int = 0, n: int = 6, size: int = 32) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks with a few square defects (classes 1..3) on some images, and every other image normal."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n):
        mask = np.zeros((size, size), dtype=np.uint8)
        if i % 2 == 0:
            for _ in range(2):
                y, x = rng.integers(0, size - 6, size=2)
                mask[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = rng.integers(1, 4)
        masks.append(mask)
    maps = [rng.random(m.shape) for m in masks]
    return maps, masks


# ---- AUROC ---------------------------------------------------------------------------------------


def test_perfect_maps_score_one_and_inverted_maps_zero() -> None:
    _, masks = _toy_split()
    perfect = [(m > 0).astype(np.float32) for m in masks]
    assert metrics.pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    inverted = [-p for p in perfect]
    assert metrics.pixel_auroc(inverted, masks) == pytest.approx(0.0)
    assert metrics.aupro(inverted, masks) == pytest.approx(0.0)


def test_random_maps_score_about_one_half() -> None:
    maps, masks = _toy_split(seed=1, n=20, size=64)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(0.5, abs=0.05)
    scores = np.random.default_rng(2).random(4000)
    labels = np.random.default_rng(3).integers(0, 2, 4000)
    assert metrics.image_auroc(scores, labels) == pytest.approx(0.5, abs=0.05)


def test_pixel_auroc_matches_sklearn_with_ties() -> None:
    from sklearn import metrics as sklearn_metrics  # installed with mlflow

    rng = np.random.default_rng(4)
    masks = [(rng.random((24, 24)) < 0.2).astype(np.uint8) for _ in range(5)]
    # Rounded, shifted scores: many ties between classes, and a real signal.
    maps = [np.round(rng.random(m.shape) + 0.3 * m, 1) for m in masks]
    expected = sklearn_metrics.roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([s.ravel() for s in maps])
    )
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_auroc_is_nan_with_a_single_class() -> None:
    normal_only = [np.zeros((4, 4), dtype=np.uint8)]
    assert math.isnan(metrics.pixel_auroc([np.random.default_rng(0).random((4, 4))], normal_only))
    assert math.isnan(metrics.image_auroc([0.1, 0.2], [1, 1]))


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        metrics.pixel_auroc([np.zeros((4, 4))], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="one mask per image"):
        metrics.aupro([np.zeros((4, 4))], [])
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_auroc([np.full((2, 2), np.nan)], [np.eye(2, dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        metrics.iou_per_class([np.full((2, 2), 3)], [np.zeros((2, 2), dtype=np.uint8)], n_classes=2)


# ---- AUPRO ---------------------------------------------------------------------------------------


def _hand_made_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Image 1: region A (2 px, scores 0.9 and 0.5), ten normal pixels (one at 0.8). Image 2: region B (0.7).

    Curve by hand, thresholds falling: (0, 0) -> t=0.9: (0, 0.25) -> t=0.8: (0.1, 0.25) -> t=0.7: (0.1, 0.75)
    -> t=0.5: (0.1, 1) -> t=0: (1, 1).
    """
    mask_a = np.zeros((3, 4), dtype=np.uint8)
    mask_a[0, :2] = 1
    map_a = np.zeros((3, 4))
    map_a[0, 0], map_a[0, 1], map_a[2, 3] = 0.9, 0.5, 0.8
    return [map_a, np.array([[0.7]])], [mask_a, np.array([[2]], dtype=np.uint8)]


def test_aupro_hand_made_case() -> None:
    maps, masks = _hand_made_case()
    # Up to 0.3: 0.1 * 0.25 + 0.2 * 1 = 0.225, normalised by 0.3.
    assert metrics.aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.75)
    # Whole curve: 0.1 * 0.25 + 0.9 * 1.
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.925)
    # Cut inside the first segment (FPR 0 .. 0.1 at PRO 0.25).
    assert metrics.aupro(maps, masks, fpr_limit=0.05) == pytest.approx(0.25)


def test_aupro_weighs_regions_not_pixels() -> None:
    """A large region found perfectly and a 1-pixel region never found: PRO is 1/2 wherever FPR < 1."""
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:12, 2:12] = 1  # 100 px
    mask[18, 18] = 1  # 1 px, not 8-connected to the first region
    score = np.random.default_rng(0).uniform(0.1, 0.5, size=(20, 20))  # normal pixels
    score[2:12, 2:12] = 1.0
    score[18, 18] = 0.0  # below every normal pixel
    assert metrics.aupro([score], [mask]) == pytest.approx(0.5)
    # Pixel AUROC sees 100 of 101 defect pixels ranked above all normal pixels.
    assert metrics.pixel_auroc([score], [mask]) > 0.99


def _regions_of(mask: np.ndarray) -> list[np.ndarray]:
    labeled, count = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    return [labeled == r + 1 for r in range(count)]


def _reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float) -> float:
    """Slow, exact reference: one curve point per distinct score, plain loops over regions."""
    regions = [(s, region) for s, m in zip(maps, masks, strict=True) for region in _regions_of(m)]
    normal = np.concatenate([s[m == 0] for s, m in zip(maps, masks, strict=True)])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([s.ravel() for s in maps]))[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(s[region] >= t) for s, region in regions])))
    x, y = np.array(fprs), np.array(pros)
    keep = x <= fpr_limit
    last = int(np.argmax(~keep))  # first point beyond the limit
    y_cut = np.interp(fpr_limit, [x[last - 1], x[last]], [y[last - 1], y[last]])
    xs, ys = np.r_[x[keep], fpr_limit], np.r_[y[keep], y_cut]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / fpr_limit)


def test_aupro_matches_an_exact_reference_on_random_maps() -> None:
    maps, masks = _toy_split(seed=5, n=4, size=16)
    maps = [m + 0.4 * (k > 0) for m, k in zip(maps, masks, strict=True)]  # some signal
    expected = _reference_aupro(maps, masks, 0.3)
    assert 0.05 < expected < 0.95
    assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-3)


# ---- overlap metrics -------------------------------------------------------------------------------


def test_iou_dice_miou_on_a_tiny_known_example() -> None:
    pred = np.array([[1, 1], [0, 2]])
    gt = np.array([[1, 0], [0, 2]])
    # class 1: I=1, U=2; class 2: I=1, U=1; class 3: absent everywhere.
    iou = metrics.iou_per_class([pred], [gt], n_classes=3)
    np.testing.assert_allclose(iou[:2], [0.5, 1.0])
    assert math.isnan(iou[2])
    dice = metrics.dice_per_class([pred], [gt], n_classes=3)
    np.testing.assert_allclose(dice[:2], [2 / 3, 1.0])
    assert metrics.miou([pred], [gt], n_classes=3) == pytest.approx(0.75)
    # Defect vs background: predicted 3 px, true 2 px, overlap 2.
    assert metrics.binary_iou([pred], [gt]) == pytest.approx(2 / 3)


def test_iou_accumulates_over_the_dataset_and_miou_skips_classes_absent_from_ground_truth() -> None:
    preds = [np.array([[1, 0]]), np.array([[1, 3]])]
    gts = [np.array([[1, 1]]), np.array([[0, 0]])]
    # class 1 over both images: I=1, U=3 (not the mean of per-image IoUs 0.5 and 0.0).
    assert metrics.iou_per_class(preds, gts, n_classes=3)[0] == pytest.approx(1 / 3)
    # class 3 is only a false alarm: IoU 0, but left out of mIoU.
    assert metrics.iou_per_class(preds, gts, n_classes=3)[2] == 0.0
    assert metrics.miou(preds, gts, n_classes=3) == pytest.approx(1 / 3)
    assert math.isnan(metrics.miou([np.zeros((2, 2), int)], [np.zeros((2, 2), int)], n_classes=3))


# ---- image-level --------------------------------------------------------------------------------------


def test_f1_max_and_threshold() -> None:
    # thresholds 0.9: F1 2/3; 0.8: 1/2; 0.3: 4/5; 0.1: 2/3
    f1, threshold = metrics.f1_max([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.3)
    assert metrics.f1_max([0.2, 0.7], [0, 1]) == (1.0, 0.7)
    assert all(math.isnan(v) for v in metrics.f1_max([0.1, 0.2], [0, 0]))


def test_evaluate_segmentation_names_and_finite_values() -> None:
    classes = ("hole", "stain", "misweave/float", "defect")
    maps, masks = _toy_split(seed=6)
    preds = [m.copy() for m in masks]  # perfect segmentation
    scores = [float(m.max()) for m in masks]
    result = metrics.evaluate_segmentation(maps, preds, masks, scores, classes)
    for key in ("pixel_auroc", "aupro_0.3", "miou", "binary_iou", "image_auroc", "f1_max"):
        assert key in result
    assert result["miou"] == result["binary_iou"] == result["image_auroc"] == result["f1_max"] == 1.0
    assert all(math.isfinite(v) for v in result.values())
    # "defect" (class 4) never occurs: its IoU/Dice are undefined and left out; "/" is a legal MLflow name.
    assert "iou_defect" not in result and "dice_defect" not in result
    present = {int(v) for m in masks for v in np.unique(m) if v}
    for k in present:
        assert result[f"iou_{classes[k - 1]}"] == 1.0


def test_large_split_is_fast_enough() -> None:
    """100 images of 256x256: both pixel metrics in a few seconds on a small CPU."""
    import time

    rng = np.random.default_rng(7)
    masks = [np.zeros((256, 256), dtype=np.uint8) for _ in range(100)]
    for mask in masks[::2]:
        y, x = rng.integers(0, 200, size=2)
        mask[y : y + 40, x : x + 30] = 1
    maps = [rng.random(m.shape, dtype=np.float32) + 0.5 * m for m in masks]
    start = time.perf_counter()
    value = metrics.aupro(maps, masks)
    auroc = metrics.pixel_auroc(maps, masks)
    assert time.perf_counter() - start < 10.0
    assert 0.5 < value < 1.0 and 0.5 < auroc < 1.0


def test_per_class_bars_render_only_scored_classes():
    from loom.evaluation.plots import per_class_bars

    assert per_class_bars({"miou": 0.5}, ("hole", "stain")) is None
    image = per_class_bars({"iou_hole": 0.5, "dice_hole": 0.66, "miou": 0.5}, ("hole", "stain"))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.std() > 0  # something was drawn
