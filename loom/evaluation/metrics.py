"""Evaluation metrics for defect segmentation (numpy + scipy only, no torch).

Conventions shared by every function:
- an anomaly map is a float array ``(H, W)``: higher means more likely defective;
- a mask is an integer array ``(H, W)``: 0 is background, ``k`` is class ``k`` of the project's class list;
- a prediction is a class-index mask like the ground truth;
- dataset-level metrics pool all pixels (or all regions) of all images before computing the score,
  as MVTec AD and Defect Spectrum report them, rather than averaging per-image scores.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: 8-connectivity for ground-truth regions, as the MVTec AD evaluation code labels them.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


# ---- input checks ------------------------------------------------------------------------------------


def _check_pairs(first: Sequence[np.ndarray], masks: Sequence[np.ndarray], what: str) -> None:
    if len(first) != len(masks):
        raise ValueError(f"{what}: got {len(first)} arrays but {len(masks)} masks; pass one mask per image")
    if len(first) == 0:
        raise ValueError(f"{what}: no images given")
    for i, (a, m) in enumerate(zip(first, masks, strict=True)):
        if np.shape(a) != np.shape(m):
            raise ValueError(
                f"{what}: image {i} has shape {np.shape(a)} but its mask has shape {np.shape(m)}; "
                "resize the prediction to the mask's resolution first"
            )


def _check_class_ids(arrays: Sequence[np.ndarray], n_classes: int, what: str) -> None:
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.size and (a.min() < 0 or a.max() > n_classes):
            raise ValueError(
                f"{what}: image {i} holds class ids {int(a.min())}..{int(a.max())}, outside 0..{n_classes}; "
                "masks must use 0 for background and 1..n_classes for the project's classes"
            )


def _check_finite(scores: np.ndarray, what: str) -> None:
    if not np.isfinite(scores).all():
        raise ValueError(
            f"{what}: scores contain NaN or infinity; check the model's output before evaluating"
        )


# ---- ranking metrics -----------------------------------------------------------------------------------


def _as_scores(array: np.ndarray) -> np.ndarray:
    """Flattened float scores; float32 stays float32 (sorting it is twice as fast, and exact as given)."""
    array = np.asarray(array)
    return array.ravel() if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64).ravel()


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic: exact, a tie counts one half.

    Sorting the negatives once and locating each positive among them costs O(N log N) without
    ranking all N scores.

    Args:
        scores: ``(N,)`` float scores.
        positive: ``(N,)`` bool, True for the positive class.
    """
    _check_finite(scores, "AUROC")
    negatives = np.sort(scores[~positive])
    positives = scores[positive]
    if positives.size == 0 or negatives.size == 0:
        return math.nan
    below = np.searchsorted(negatives, positives, side="left")
    below_or_equal = np.searchsorted(negatives, positives, side="right")
    u_statistic = below.sum(dtype=np.float64) + 0.5 * (below_or_equal - below).sum(dtype=np.float64)
    return float(u_statistic / (float(positives.size) * float(negatives.size)))


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Pixel-level AUROC over all pixels of all images (defect pixels are ``mask > 0``).

    Args:
        maps: N anomaly maps, each ``(H_i, W_i)`` float.
        masks: N ground-truth masks, each ``(H_i, W_i)`` int.

    Returns:
        AUROC in [0, 1]; NaN when the pixels hold only one class (no defects, or no normal pixels).
    """
    _check_pairs(maps, masks, "pixel_auroc")
    scores = np.concatenate([_as_scores(m) for m in maps])
    positive = np.concatenate([(np.asarray(m) > 0).ravel() for m in masks])
    return _auroc(scores, positive)


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Image-level AUROC. ``labels`` are 1 (defective) / 0 (normal); NaN when only one label occurs."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0
    if s.shape != y.shape:
        raise ValueError(f"image_auroc: {s.size} scores but {y.size} labels")
    return _auroc(s, y)


def f1_max(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and that threshold (an image is defective when ``score >= threshold``).

    Returns:
        ``(f1, threshold)``; ``(nan, nan)`` when there is no defective image.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0
    if s.shape != y.shape:
        raise ValueError(f"f1_max: {s.size} scores but {y.size} labels")
    _check_finite(s, "f1_max")
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan, math.nan
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    true_pos = np.cumsum(y_sorted)
    false_pos = np.cumsum(~y_sorted)
    # Only the last position of each run of equal scores is a reachable threshold.
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp, fp = true_pos[last_of_tie], false_pos[last_of_tie]
    f1 = 2.0 * tp / (2.0 * tp + fp + (n_pos - tp))
    best = int(np.argmax(f1))
    return float(f1[best]), float(s_sorted[last_of_tie][best])


# ---- AUPRO ------------------------------------------------------------------------------------------


def _thresholds_for_fpr(normal_sorted: np.ndarray, fpr_limit: float, num_thresholds: int) -> np.ndarray:
    """Thresholds (descending) that sample the FPR axis evenly on [0, fpr_limit].

    Linear thresholds over the score range waste most points where FPR is ~0 or ~1 when scores are
    skewed; normal-pixel quantiles put them where the curve is integrated. Each quantile q comes with
    the next float above it: between the two, FPR jumps while PRO may already have risen, and taking
    both points keeps those vertical steps of the curve exact.
    """
    targets = np.linspace(0.0, fpr_limit, num_thresholds)
    last = normal_sorted.size - 1
    quantiles = normal_sorted[np.clip(np.round((1.0 - targets) * last).astype(np.int64), 0, last)]
    just_above = np.nextafter(quantiles, np.inf)  # in the scores' own dtype
    # +inf gives the curve's origin (0, 0), -inf its end (1, 1).
    candidates = np.concatenate([[np.inf, -np.inf], quantiles, just_above])
    return np.unique(candidates)[::-1]


def aupro(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by ``fpr_limit``.

    As defined for MVTec AD: each connected ground-truth region (8-connectivity, over all defect classes)
    counts equally however large it is. At a threshold t, PRO(t) is the mean over all regions of the
    fraction of the region's pixels with score >= t, and FPR(t) the fraction of normal pixels with
    score >= t. The curve runs from (0, 0), is sampled at ``num_thresholds`` FPR-spaced thresholds and
    integrated with the trapezoidal rule up to ``fpr_limit`` (interpolated there).

    Vectorised as histograms: each defect pixel falls in a threshold bin once, so the cost is
    O(pixels log thresholds + regions x thresholds), not O(pixels x thresholds).

    Args:
        maps: N anomaly maps, each ``(H_i, W_i)`` float.
        masks: N ground-truth masks, each ``(H_i, W_i)`` int, defect where ``> 0``.
        fpr_limit: upper end of the FPR integration range, in (0, 1].
        num_thresholds: how many points sample the FPR axis on [0, fpr_limit].

    Returns:
        Normalised AUPRO in [0, 1]; NaN without any defect region or without any normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must lie in (0, 1], got {fpr_limit}")
    _check_pairs(maps, masks, "aupro")
    normal_parts: list[np.ndarray] = []
    defect_scores: list[np.ndarray] = []
    defect_regions: list[np.ndarray] = []
    n_regions = 0
    for score_map, mask in zip(maps, masks, strict=True):
        score_map = _as_scores(score_map).reshape(np.shape(mask))
        defect = np.asarray(mask) > 0
        normal_parts.append(score_map[~defect])
        if defect.any():
            regions, count = ndimage.label(defect, structure=_REGION_STRUCTURE)
            defect_scores.append(score_map[defect])
            defect_regions.append(regions[defect] - 1 + n_regions)  # global 0-based region ids
            n_regions += count
    normal = np.sort(np.concatenate(normal_parts))
    _check_finite(normal, "aupro")
    if n_regions == 0 or normal.size == 0:
        return math.nan

    thresholds = _thresholds_for_fpr(normal, fpr_limit, num_thresholds)  # descending
    ascending = thresholds[::-1]
    # Normal pixels with score >= t: everything right of the left insertion point.
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size

    # How many ascending thresholds each defect pixel reaches: it counts at threshold j iff j < reach.
    scores = np.concatenate(defect_scores)
    _check_finite(scores, "aupro")
    region_of = np.concatenate(defect_regions)
    reach = np.searchsorted(ascending, scores, side="right")
    n_bins = ascending.size + 1
    hist = np.bincount(region_of * n_bins + reach, minlength=n_regions * n_bins).reshape(n_regions, n_bins)
    # Pixels reaching ascending threshold j = pixels with reach > j (a reverse cumulative sum).
    hits_ascending = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    region_size = hist.sum(axis=1, keepdims=True)
    pro = (hits_ascending / region_size).mean(axis=0)[::-1]  # back to descending thresholds

    return _trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``x``, cut (by interpolation) at ``x_max``."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max:
        nxt = int(np.argmax(~inside))  # first point beyond x_max
        y_cut = np.interp(x_max, [x[nxt - 1], x[nxt]], [y[nxt - 1], y[nxt]])
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_cut]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


# ---- overlap metrics ---------------------------------------------------------------------------------


def intersection_union(
    preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dataset-wide per-class intersection, union and ground-truth pixel counts, classes 1..n_classes.

    These counts add up over images: the counts of a set of images are the sums of each image's counts,
    which is what lets :mod:`loom.evaluation.promotion` resample test images without predicting again.

    Returns:
        Three ``(n_classes,)`` int64 arrays.
    """
    _check_pairs(preds, masks, "segmentation metrics")
    _check_class_ids(preds, n_classes, "predictions")
    _check_class_ids(masks, n_classes, "ground-truth masks")
    k = n_classes + 1
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: ground truth, columns: prediction
    for pred, mask in zip(preds, masks, strict=True):
        pairs = np.asarray(mask, dtype=np.int64).ravel() * k + np.asarray(pred, dtype=np.int64).ravel()
        confusion += np.bincount(pairs, minlength=k * k).reshape(k, k)
    intersection = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    gt_pixels = confusion.sum(axis=1)
    return intersection[1:], union[1:], gt_pixels[1:]


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-class IoU from summed counts (any shape); NaN where the union is empty."""
    return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def _dice(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    total = intersection + union  # |pred| + |gt| = I + U
    return np.where(total > 0, 2.0 * intersection / np.maximum(total, 1), np.nan)


def miou_from_counts(intersection: np.ndarray, union: np.ndarray, gt_pixels: np.ndarray) -> float:
    """Mean IoU from ``(n_classes,)`` summed counts, over the classes present in the ground truth."""
    present = gt_pixels > 0
    return float(np.mean(intersection[present] / union[present])) if present.any() else math.nan


# The names used before these helpers became public.
_intersection_union = intersection_union
_iou = iou_from_counts
_miou = miou_from_counts


def iou_per_class(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """IoU per class 1..n_classes, intersection and union accumulated over the whole dataset.

    Returns:
        ``(n_classes,)`` float; NaN for a class absent from both predictions and ground truth.
    """
    intersection, union, _ = intersection_union(preds, masks, n_classes)
    return iou_from_counts(intersection, union)


def dice_per_class(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Dice (F1 of pixels) per class 1..n_classes over the dataset: 2I / (|pred| + |gt|).

    Returns:
        ``(n_classes,)`` float; NaN for a class absent from both predictions and ground truth.
    """
    intersection, union, _ = intersection_union(preds, masks, n_classes)
    return _dice(intersection, union)


def miou(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_classes: int) -> float:
    """Mean IoU over the defect classes that occur in the ground truth (background excluded).

    A class predicted somewhere but absent from the ground truth is left out of the mean, so a test
    split without any "knot" does not score 0 for knots; such false alarms still lower ``binary_iou``.
    NaN when the ground truth holds no defect pixel at all.
    """
    return miou_from_counts(*intersection_union(preds, masks, n_classes))


def binary_iou(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """IoU of "any defect" vs background over the dataset; NaN when neither side has a defect pixel."""
    _check_pairs(preds, masks, "binary_iou")
    intersection = union = 0
    for pred, mask in zip(preds, masks, strict=True):
        p, g = np.asarray(pred) > 0, np.asarray(mask) > 0
        intersection += int(np.count_nonzero(p & g))
        union += int(np.count_nonzero(p | g))
    return intersection / union if union else math.nan


# ---- everything at once ---------------------------------------------------------------------------------


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . /``, spaces); other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def evaluate_segmentation(
    maps: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    scores: Sequence[float] | np.ndarray,
    classes: Sequence[str],
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All evaluation metrics of one model on one test split, as flat names ready for MLflow.

    Args:
        maps: N anomaly maps ``(H_i, W_i)`` float.
        preds: N predicted class-index masks ``(H_i, W_i)``.
        masks: N ground-truth class-index masks ``(H_i, W_i)``; an image is defective when its mask is.
        scores: ``(N,)`` image anomaly scores.
        classes: the project's class names; mask value k is ``classes[k - 1]``.

    Returns:
        ``pixel_auroc``, ``aupro_<limit>``, ``miou``, ``binary_iou``, ``image_auroc``, ``f1_max``,
        ``f1_threshold``, ``iou_<class>`` and ``dice_<class>``; only finite values are kept (a metric
        that is undefined on this split, such as the IoU of a class that never occurs, is left out).
    """
    intersection, union, gt_pixels = intersection_union(preds, masks, len(classes))
    labels = np.array([int(np.any(np.asarray(m) > 0)) for m in masks])
    best_f1, best_threshold = f1_max(scores, labels)
    results: dict[str, float] = {
        "pixel_auroc": pixel_auroc(maps, masks),
        f"aupro_{fpr_limit:g}": aupro(maps, masks, fpr_limit=fpr_limit),
        "miou": miou_from_counts(intersection, union, gt_pixels),
        "binary_iou": binary_iou(preds, masks),
        "image_auroc": image_auroc(scores, labels),
        "f1_max": best_f1,
        "f1_threshold": best_threshold,
    }
    ious, dices = iou_from_counts(intersection, union), _dice(intersection, union)
    for name, iou, dice in zip(classes, ious, dices, strict=True):
        results[metric_key(f"iou_{name}")] = float(iou)
        results[metric_key(f"dice_{name}")] = float(dice)
    dropped = sorted(k for k, v in results.items() if not math.isfinite(v))
    if dropped:
        logger.debug("metrics undefined on this split (left out): %s", ", ".join(dropped))
    return {k: float(v) for k, v in results.items() if math.isfinite(v)}
