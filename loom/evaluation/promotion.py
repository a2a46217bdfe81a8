"""The promotion gate: is the round's challenger better than the champion on today's test split?

Both models are scored on the same frozen test images. For every image this module keeps statistics that
add up over images (pixel counts), so the metric of any multiset of test images is a sum and a division:
a paired bootstrap draws test images with replacement (the same draws for both models), a thousand times,
in milliseconds and without predicting again.

The metric (:func:`gate_metric`):

- both models segmenters (FPN, BAFPN): mIoU over the classes present in the truth, exactly as
  :func:`loom.evaluation.metrics.miou` computes it;
- an anomaly scorer (CFA, RD4AD, UniNet) on either side: pixel AUROC of the anomaly maps, a metric both
  kinds have (a scorer marks every defect as the generic ``defect``, so its mIoU says little).

To keep a thousand resamples of the pixel AUROC fast, each image's scores are kept as a histogram over
B = 1024 bins whose edges are quantiles of every 4th pixel along each axis (all pixels are counted, only
the edges come from the subsample): a resample is then one matrix product, and the AUROC is within about
1/B of :func:`loom.evaluation.metrics.pixel_auroc` (pairs of pixels that share a bin count one half).

The rule (:func:`decide`): promote when there is no champion, or when the lower end of the confidence
interval of the difference is above ``min_gain`` and no class regresses by more than ``class_tolerance``
(only classes with at least ``min_class_pixels`` test pixels can veto). A challenger whose metric is
undefined is refused.

What the interval covers: resampling test images measures how much the verdict depends on which images
happen to be in the test split. It does not see training noise: the same data and another seed give
another model, which differs from the first on the same images, so with ``min_gain=0`` the gate can
promote a seed. Measured on tiny students (tests/integration/test_promotion_gate.py): under-trained
ones cleared zero in 4 of 12 seed pairs, converged ones in none. ``min_gain`` (metric units) is the
margin for training noise; the round sets it (``round.promote_min_gain``).

Everything here is numpy: no MLflow, no torch. Shapes: N test images, C classes (mask value k is class
``k``, 1..C; 0 is normal fabric), B score bins.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from loom.evaluation.metrics import intersection_union, iou_from_counts, miou_from_counts

logger = logging.getLogger(__name__)

MIOU = "miou"
PIXEL_AUROC = "pixel_auroc"
#: Tag keys of a recorded decision start with this (on the model version and on the run).
TAG_PREFIX = "loom.promotion."
#: Score bins of the pixel AUROC; the binned AUROC is within about 1 / DEFAULT_BINS of the exact one.
DEFAULT_BINS = 1024
#: Edges of the score bins are quantiles of every EDGE_STRIDE-th pixel along each axis (1/16 of them).
EDGE_STRIDE = 4

_LABELS = {MIOU: "mIoU", PIXEL_AUROC: "pixel AUROC"}
_CLASS_LABELS = {MIOU: "IoU", PIXEL_AUROC: "pixel AUROC"}


# ---- per-image statistics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """What one model did on each image of one test split: enough to recompute the gate's metrics for any
    resample of those images.

    Attributes:
        classes: the C class names; column ``c`` is mask value ``c + 1``.
        intersection: ``(N, C)`` int64, prediction-truth intersection in pixels, per image and class.
        union: ``(N, C)`` int64, their union.
        gt_pixels: ``(N, C)`` int64, truth pixels of each class.
        normal_hist: ``(N, B)`` int64, normal pixels (mask 0) per anomaly-score bin.
        defect_hist: ``(N, C, B)`` int64, each class's pixels per score bin. Bin edges are this model's
            own (AUROC only compares a model's scores with each other), so never mix two models' bins.
        anomaly_scorer: the model is an anomaly scorer rather than a segmenter.
        image_ids: N names, to check two models were scored on the same images in the same order.
    """

    classes: tuple[str, ...]
    intersection: np.ndarray
    union: np.ndarray
    gt_pixels: np.ndarray
    normal_hist: np.ndarray
    defect_hist: np.ndarray
    anomaly_scorer: bool = False
    image_ids: tuple[str, ...] = ()

    @property
    def n_images(self) -> int:
        return int(self.intersection.shape[0])


def image_stats(
    preds: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
    *,
    anomaly_scorer: bool = False,
    image_ids: Sequence[str] | None = None,
    n_bins: int = DEFAULT_BINS,
) -> ModelStats:
    """Per-image statistics of one model from its outputs on N test images.

    Args:
        preds: N predicted class masks ``(H_i, W_i)`` int, values 0..C.
        maps: N anomaly maps ``(H_i, W_i)`` float, higher = more likely defective.
        masks: N truth class masks ``(H_i, W_i)`` int, values 0..C.
        classes: the C class names.
        anomaly_scorer: whether the model is an anomaly scorer (decides the gate's metric).
        image_ids: N names (default: none, and only shapes are checked when pairing).
        n_bins: score bins for the pixel AUROC.
    """
    if not len(preds) == len(maps) == len(masks):
        raise ValueError(f"image_stats: {len(preds)} predictions, {len(maps)} maps, {len(masks)} masks")
    if image_ids is not None and len(image_ids) != len(masks):
        raise ValueError(f"image_stats: {len(image_ids)} image ids for {len(masks)} images")
    for i, (score_map, mask) in enumerate(zip(maps, masks, strict=True)):
        if np.shape(score_map) != np.shape(mask):
            raise ValueError(f"image_stats: map {i} is {np.shape(score_map)}, its mask {np.shape(mask)}")
    counts = [
        intersection_union([pred], [mask], len(classes)) for pred, mask in zip(preds, masks, strict=True)
    ]
    edges = _score_edges(maps, masks, n_bins)
    hists = np.stack([_score_hist(m, mask, edges, len(classes)) for m, mask in zip(maps, masks, strict=True)])
    return ModelStats(
        classes=tuple(classes),
        intersection=np.stack([c[0] for c in counts]),
        union=np.stack([c[1] for c in counts]),
        gt_pixels=np.stack([c[2] for c in counts]),
        normal_hist=hists[:, 0],
        defect_hist=hists[:, 1:],
        anomaly_scorer=anomaly_scorer,
        image_ids=tuple(image_ids or ()),
    )


def _score_edges(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], n_bins: int) -> np.ndarray:
    """Bin edges: quantiles of the normal scores and of the defect scores, half of the bins each.

    Cutting each population into equal shares bounds the AUROC's error: pairs that share a bin count
    one half, and no bin holds more than about 2 / n_bins of either population. The quantiles are read
    on every EDGE_STRIDE-th pixel (they only place the edges; every pixel is counted in the histograms).
    """
    normal, defect = [], []
    for score_map, mask in zip(maps, masks, strict=True):
        if not np.isfinite(score_map).all():
            raise ValueError("image_stats: an anomaly map holds NaN or infinity; check the model's output")
        scores = np.asarray(score_map)[::EDGE_STRIDE, ::EDGE_STRIDE]
        is_defect = np.asarray(mask)[::EDGE_STRIDE, ::EDGE_STRIDE] > 0
        normal.append(scores[~is_defect])
        defect.append(scores[is_defect])
    levels = np.linspace(0.0, 1.0, max(n_bins // 2, 2))
    edges = [np.quantile(np.concatenate(part), levels) for part in (normal, defect) if sum(map(len, part))]
    return np.unique(np.concatenate(edges)) if edges else np.zeros(0)


def _score_hist(score_map: np.ndarray, mask: np.ndarray, edges: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C + 1, len(edges) + 1)`` pixel counts per (truth class, score bin); row 0 is normal fabric."""
    width = edges.size + 1
    bins = np.searchsorted(edges, np.asarray(score_map).ravel(), side="right")  # equal scores share a bin
    cells = np.asarray(mask, dtype=np.int64).ravel() * width + bins
    return np.bincount(cells, minlength=(n_classes + 1) * width).reshape(n_classes + 1, width)


# ---- metrics from (weighted) statistics ---------------------------------------------------------------


def gate_metric(challenger: ModelStats, champion: ModelStats | None) -> str:
    """mIoU when both models are segmenters (or the challenger is one and there is no champion), else
    pixel AUROC."""
    scorers = challenger.anomaly_scorer or (champion is not None and champion.anomaly_scorer)
    return PIXEL_AUROC if scorers else MIOU


def metric_value(stats: ModelStats, metric: str) -> float:
    """The metric on the whole split; mIoU is exactly :func:`~loom.evaluation.metrics.miou` of the outputs."""
    if metric == MIOU:
        return miou_from_counts(stats.intersection.sum(0), stats.union.sum(0), stats.gt_pixels.sum(0))
    return float(_resampled(stats, metric, np.ones((1, stats.n_images)))[0])


def per_class_values(stats: ModelStats, metric: str) -> np.ndarray:
    """``(C,)`` per-class IoU (for mIoU) or pixel AUROC of each class's pixels against normal ones;
    NaN where undefined."""
    if metric == MIOU:
        return iou_from_counts(stats.intersection.sum(0), stats.union.sum(0))
    return _auroc_from_hist(stats.defect_hist.sum(0), stats.normal_hist.sum(0))


def _resampled(stats: ModelStats, metric: str, weights: np.ndarray) -> np.ndarray:
    """``(R,)`` metric values of R resamples, each given as ``(N,)`` image multiplicities (``(R, N)``)."""
    if metric == MIOU:
        intersection, union = weights @ stats.intersection, weights @ stats.union
        present = (weights @ stats.gt_pixels) > 0
        ratios = np.where(present, intersection / np.maximum(union, 1), 0.0)
        n_present = present.sum(axis=1)
        return np.where(n_present > 0, ratios.sum(axis=1) / np.maximum(n_present, 1), np.nan)
    if metric == PIXEL_AUROC:
        return _auroc_from_hist(weights @ stats.defect_hist.sum(axis=1), weights @ stats.normal_hist)
    raise ValueError(f"unknown gate metric {metric!r}; expected {MIOU!r} or {PIXEL_AUROC!r}")


def _auroc_from_hist(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC from score histograms ``(..., B)``; pairs within a bin count one half."""
    below = np.cumsum(negative, axis=-1) - negative  # negatives in lower bins
    wins = (positive * (below + 0.5 * negative)).sum(axis=-1)
    pairs = positive.sum(axis=-1) * negative.sum(axis=-1)
    return np.where(pairs > 0, wins / np.maximum(pairs, 1), np.nan)


# ---- paired bootstrap ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bootstrap:
    """The difference challenger - champion on the whole split and its percentile interval."""

    metric: str
    challenger: float
    champion: float
    delta: float
    ci_low: float
    ci_high: float
    n_valid: int  # resamples where both metrics are defined (a resample may draw no defect pixel)


def paired_bootstrap(
    challenger: ModelStats,
    champion: ModelStats,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    metric: str | None = None,
) -> Bootstrap:
    """Resample the test images with replacement, the same draws for both models, and take the
    ``confidence`` percentile interval of the metric's difference.

    Args:
        metric: default :func:`gate_metric` of the two models.
    """
    _check_paired(challenger, champion)
    metric = metric or gate_metric(challenger, champion)
    weights = _resample_weights(challenger.n_images, n_resamples, seed)
    diffs = _resampled(challenger, metric, weights) - _resampled(champion, metric, weights)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size < n_resamples:
        logger.info("%d of %d resamples leave %s undefined", n_resamples - diffs.size, n_resamples, metric)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail]) if diffs.size else (math.nan, math.nan)
    new, old = metric_value(challenger, metric), metric_value(champion, metric)
    return Bootstrap(metric, new, old, new - old, float(low), float(high), int(diffs.size))


def _resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(R, N)`` float: how often each image is drawn in each resample."""
    draws = np.random.default_rng(seed).integers(0, n_images, size=(n_resamples, n_images))
    cells = (np.arange(n_resamples)[:, None] * n_images + draws).ravel()
    return np.bincount(cells, minlength=n_resamples * n_images).reshape(n_resamples, n_images).astype(float)


def _check_paired(challenger: ModelStats, champion: ModelStats) -> None:
    same_ids = not (challenger.image_ids and champion.image_ids) or challenger.image_ids == champion.image_ids
    if (
        challenger.classes != champion.classes
        or challenger.gt_pixels.shape != champion.gt_pixels.shape
        or not np.array_equal(challenger.gt_pixels, champion.gt_pixels)
        or not same_ids
    ):
        raise ValueError(
            f"the two models were not scored on the same test images ({challenger.n_images} vs "
            f"{champion.n_images} images, classes {challenger.classes} vs {champion.classes}); "
            "a paired comparison needs the same images, in the same order, with the same masks"
        )


# ---- the decision -------------------------------------------------------------------------------------


@dataclass
class GateDecision:
    """The gate's verdict, with the numbers behind it (values in the metric's units; None without a
    champion) and one sentence per reason."""

    promoted: bool
    metric: str
    challenger_value: float
    champion_value: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    per_class_delta: dict[str, float] = field(default_factory=dict)
    regressed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return " ".join(self.reasons)

    def to_record(self) -> dict:
        """A JSON-ready dict (NaN becomes None)."""
        return {k: _none_if_nan(v) for k, v in asdict(self).items()}

    def to_tags(self) -> dict[str, str]:
        """String tags ``loom.promotion.<field>``, readable in the MLflow UI and by :meth:`from_tags`.

        ``promoted`` comes last: written in this order, its presence means the whole record is there.
        """
        values = {
            "metric": self.metric,
            **{k: _tag_float(getattr(self, k)) for k in ("challenger_value", "champion_value", "delta")},
            **{k: _tag_float(getattr(self, k)) for k in ("ci_low", "ci_high")},
            "per_class_delta": json.dumps({k: round(v, 6) for k, v in self.per_class_delta.items()}),
            "regressed": ",".join(self.regressed),
            "reason": self.reason,
            "reasons": json.dumps(self.reasons),
            "promoted": str(self.promoted).lower(),
        }
        return {TAG_PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> GateDecision:
        """The decision :meth:`to_tags` wrote (other tags are ignored)."""
        t = {k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        number = lambda key: float(t[key]) if t.get(key) else None  # noqa: E731
        return cls(
            promoted=t["promoted"] == "true",
            metric=t["metric"],
            challenger_value=number("challenger_value") if t.get("challenger_value") else math.nan,
            champion_value=number("champion_value"),
            delta=number("delta"),
            ci_low=number("ci_low"),
            ci_high=number("ci_high"),
            per_class_delta=json.loads(t.get("per_class_delta") or "{}"),
            regressed=[c for c in t.get("regressed", "").split(",") if c],
            reasons=json.loads(t.get("reasons") or "[]"),
        )


def decide(
    challenger: ModelStats,
    champion: ModelStats | None,
    *,
    min_gain: float = 0.0,
    class_tolerance: float = 0.05,
    min_class_pixels: int = 500,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> GateDecision:
    """Promote the challenger or keep the champion.

    Promoted iff the challenger's metric is defined and either there is no champion, or the lower end of
    the ``confidence`` interval of (challenger - champion) is above ``min_gain`` and no class regresses: a
    class regresses when its per-class value (IoU, or pixel AUROC for scorers) drops by more than
    ``class_tolerance`` and it has at least ``min_class_pixels`` truth pixels in the split, so a class
    seen on a few dozen pixels cannot veto.

    Args:
        challenger: the round's best model on the test split.
        champion: the current champion on the same images, None when there is none.
        min_gain: the margin the interval's lower end must clear, in the metric's units; it stands for
            what resampling test images cannot see (training noise, see the module doc).
    """
    metric = gate_metric(challenger, champion)
    value = metric_value(challenger, metric)
    label = _LABELS[metric]
    if not math.isfinite(value):
        reason = f"The challenger's {label} is undefined on this test split, so it cannot be promoted."
        return GateDecision(False, metric, value, reasons=[reason])
    if champion is None:
        reason = f"First model: there is no champion yet (challenger {label} {value:.4f})."
        return GateDecision(True, metric, value, reasons=[reason])

    boot = paired_bootstrap(challenger, champion, n_resamples, seed, confidence, metric)
    per_class, regressed, class_reasons = _class_changes(
        challenger, champion, metric, class_tolerance, min_class_pixels
    )
    clears = math.isfinite(boot.ci_low) and boot.ci_low > min_gain
    reasons = [_metric_sentence(boot, challenger.n_images, confidence, min_gain, clears), *class_reasons]
    if metric == PIXEL_AUROC:
        reasons.append("Compared on pixel AUROC because an anomaly scorer is involved.")
    promoted = clears and not regressed
    return GateDecision(
        promoted,
        metric,
        value,
        boot.champion,
        boot.delta,
        boot.ci_low,
        boot.ci_high,
        per_class,
        regressed,
        reasons,
    )


def _class_changes(
    challenger: ModelStats, champion: ModelStats, metric: str, tolerance: float, min_pixels: int
) -> tuple[dict[str, float], list[str], list[str]]:
    """Per-class deltas (classes present in the truth, both values defined), the classes that veto, and
    one sentence per class that dropped by more than ``tolerance``."""
    new, old = per_class_values(challenger, metric), per_class_values(champion, metric)
    pixels = challenger.gt_pixels.sum(axis=0)
    label = _CLASS_LABELS[metric]
    deltas, regressed, sentences = {}, [], []
    for name, a, b, n in zip(challenger.classes, new, old, pixels, strict=True):
        if n == 0 or not (math.isfinite(a) and math.isfinite(b)):
            continue
        deltas[name] = float(a - b)
        if a - b >= -tolerance:
            continue
        change = f"{label} {b:.3f} -> {a:.3f} ({a - b:+.3f}, tolerance {tolerance:.3f})"
        if n >= min_pixels:
            regressed.append(name)
            sentences.append(f"Class {name} regresses: {change} on {n} test pixels.")
        else:
            sentences.append(
                f"Class {name} drops, {change}, but has only {n} test pixels "
                f"(< {min_pixels}): too few to veto."
            )
    return deltas, regressed, sentences


def _metric_sentence(boot: Bootstrap, n_images: int, confidence: float, min_gain: float, clears: bool) -> str:
    label = _LABELS[boot.metric]
    verdict = "clears" if clears else "does not clear"
    return (
        f"{label} {boot.challenger:.4f} vs champion {boot.champion:.4f} on {n_images} test images: "
        f"{boot.delta:+.4f}, {confidence:.0%} CI [{boot.ci_low:+.4f}, {boot.ci_high:+.4f}] "
        f"{verdict} the required gain of {min_gain:+.4f}."
    )


def _tag_float(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _none_if_nan(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value
