"""The promotion gate's core on hand-made predictions: statistics, paired bootstrap, decision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loom.evaluation import metrics, promotion
from loom.evaluation.promotion import MIOU, PIXEL_AUROC, GateDecision, ModelStats

CLASSES = ("hole", "stain", "knot")
SIZE = 32


def truth_masks(n_images: int, seed: int = 0, knot_image: int | None = None) -> list[np.ndarray]:
    """(SIZE, SIZE) masks: most images hold a hole (class 1) and a stain (class 2) rectangle; with
    ``knot_image``, that one image also holds a 4 x 5 knot (class 3, 20 pixels in the whole split)."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n_images):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for cls in (1, 2):
            if rng.random() < 0.8:
                top, left = rng.integers(0, SIZE - 10, size=2)
                mask[top : top + int(rng.integers(5, 10)), left : left + int(rng.integers(5, 10))] = cls
        if i == knot_image:
            mask[0:4, 27:32] = 3
        masks.append(mask)
    return masks


def predicted(
    masks: list[np.ndarray], keep: dict[int, float], seed: int = 1
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predictions that find each truth pixel of class c with probability ``keep[c]`` (else background),
    and anomaly maps that score found pixels high: (class masks, float maps)."""
    rng = np.random.default_rng(seed)
    preds, maps = [], []
    for mask in masks:
        found = rng.random(mask.shape) < np.vectorize(lambda c: keep.get(int(c), 1.0))(mask)
        pred = np.where(found, mask, 0).astype(np.uint8)
        preds.append(pred)
        maps.append((pred > 0) + rng.normal(0.0, 0.3, mask.shape))
    return preds, maps


def stats_of(
    masks: list[np.ndarray], keep: dict[int, float], seed: int = 1, scorer: bool = False
) -> ModelStats:
    preds, maps = predicted(masks, keep, seed)
    return promotion.image_stats(preds, maps, masks, CLASSES, anomaly_scorer=scorer)


# ---- statistics ------------------------------------------------------------------------------------------


def test_stats_based_miou_equals_loom_metrics_miou_on_random_masks() -> None:
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, 4, (20, 24)).astype(np.uint8) * (rng.random((20, 24)) < 0.3) for _ in range(9)]
    preds = [rng.integers(0, 4, (20, 24)).astype(np.uint8) for _ in range(9)]
    maps = [rng.random((20, 24)) for _ in range(9)]
    stats = promotion.image_stats(preds, maps, masks, CLASSES)

    assert stats.intersection.shape == stats.union.shape == stats.gt_pixels.shape == (9, 3)
    assert promotion.metric_value(stats, MIOU) == metrics.miou(preds, masks, 3)  # exactly
    np.testing.assert_array_equal(
        promotion.per_class_values(stats, MIOU), metrics.iou_per_class(preds, masks, 3)
    )
    # Any resample is the same computation on the drawn images.
    draw = [0, 0, 4, 7, 7, 7, 2, 8, 1]
    weights = np.bincount(draw, minlength=9)[None, :].astype(float)
    resampled = promotion._resampled(stats, MIOU, weights)[0]
    assert resampled == pytest.approx(metrics.miou([preds[i] for i in draw], [masks[i] for i in draw], 3))


def test_binned_pixel_auroc_is_within_one_bin_of_the_exact_one() -> None:
    masks = truth_masks(30)
    preds, maps = predicted(masks, {1: 0.7, 2: 0.5})
    stats = promotion.image_stats(preds, maps, masks, CLASSES)
    exact = metrics.pixel_auroc(maps, masks)
    assert promotion.metric_value(stats, PIXEL_AUROC) == pytest.approx(
        exact, abs=1.0 / promotion.DEFAULT_BINS
    )


def test_stats_refuse_mismatched_inputs() -> None:
    masks = truth_masks(3)
    preds, maps = predicted(masks, {})
    with pytest.raises(ValueError, match="2 predictions"):
        promotion.image_stats(preds[:2], maps, masks, CLASSES)
    with pytest.raises(ValueError, match="map 0 is"):
        promotion.image_stats(preds, [np.zeros((5, 5))] * 3, masks, CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        promotion.image_stats(preds, [np.full((SIZE, SIZE), np.nan)] * 3, masks, CLASSES)


# ---- paired bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_interval_covers_zero_for_identical_predictions() -> None:
    masks = truth_masks(24)
    same = promotion.paired_bootstrap(stats_of(masks, {1: 0.7, 2: 0.6}), stats_of(masks, {1: 0.7, 2: 0.6}))
    assert same.delta == 0.0 and same.ci_low <= 0.0 <= same.ci_high
    # Two models of equal quality that err on different pixels: the interval still straddles zero.
    twins = promotion.paired_bootstrap(
        stats_of(masks, {1: 0.7, 2: 0.6}, seed=1), stats_of(masks, {1: 0.7, 2: 0.6}, seed=2)
    )
    assert twins.ci_low < 0.0 < twins.ci_high
    assert twins.n_valid == 1000


def test_bootstrap_is_reproducible_and_refuses_unpaired_splits() -> None:
    masks = truth_masks(24)
    a, b = stats_of(masks, {1: 0.9}), stats_of(masks, {1: 0.6})
    assert promotion.paired_bootstrap(a, b, seed=5) == promotion.paired_bootstrap(a, b, seed=5)
    other = stats_of(truth_masks(24, seed=9), {1: 0.6})
    with pytest.raises(ValueError, match="same test images"):
        promotion.paired_bootstrap(a, other)


# ---- the decision --------------------------------------------------------------------------------------


def test_a_clearly_better_challenger_is_promoted() -> None:
    masks = truth_masks(24)
    decision = promotion.decide(stats_of(masks, {1: 0.9, 2: 0.9}), stats_of(masks, {1: 0.5, 2: 0.5}))
    assert decision.promoted, decision.reasons
    assert decision.metric == MIOU and decision.ci_low > 0.1
    assert decision.delta == pytest.approx(decision.challenger_value - decision.champion_value)
    assert set(decision.per_class_delta) == {"hole", "stain"}  # knot never occurs in the truth
    assert "clears the required gain" in decision.reason


def test_identical_predictions_are_not_promoted() -> None:
    masks = truth_masks(24)
    decision = promotion.decide(stats_of(masks, {1: 0.7}), stats_of(masks, {1: 0.7}))
    assert not decision.promoted
    assert "does not clear" in decision.reason


def test_better_on_average_but_one_class_regressing_is_refused_and_the_class_named() -> None:
    masks = truth_masks(24)
    challenger, champion = stats_of(masks, {1: 0.98, 2: 0.6}), stats_of(masks, {1: 0.5, 2: 0.8})
    decision = promotion.decide(challenger, champion)
    assert decision.ci_low > 0.0  # better on average, beyond resampling noise ...
    assert not decision.promoted  # ... but the stains got worse
    assert decision.regressed == ["stain"]
    assert decision.per_class_delta["stain"] < -0.05 < 0.0 < decision.per_class_delta["hole"]
    assert any("Class stain regresses" in r for r in decision.reasons)


def test_a_class_with_too_few_test_pixels_cannot_veto() -> None:
    masks = truth_masks(24, knot_image=3)
    assert sum(int((m == 3).sum()) for m in masks) == 20
    challenger = stats_of(masks, {1: 0.95, 2: 0.95, 3: 0.3})
    champion = stats_of(masks, {1: 0.5, 2: 0.5, 3: 0.9})
    decision = promotion.decide(challenger, champion)
    assert decision.per_class_delta["knot"] < -0.05
    assert decision.promoted and decision.regressed == []
    assert any("knot" in r and "too few to veto" in r for r in decision.reasons)
    # With a lower bar the same knots do veto.
    assert promotion.decide(challenger, champion, min_class_pixels=10).regressed == ["knot"]


def test_an_undefined_metric_is_refused_even_without_a_champion() -> None:
    masks = [np.zeros((SIZE, SIZE), np.uint8) for _ in range(4)]  # no defect: mIoU undefined
    stats = stats_of(masks, {})
    for champion in (None, stats):
        decision = promotion.decide(stats, champion)
        assert not decision.promoted and math.isnan(decision.challenger_value)
        assert "undefined" in decision.reason


def test_the_first_model_is_promoted() -> None:
    decision = promotion.decide(stats_of(truth_masks(6), {1: 0.2}), None)
    assert decision.promoted and decision.champion_value is None and decision.ci_low is None
    assert "no champion" in decision.reason


def test_min_gain_raises_the_bar() -> None:
    masks = truth_masks(24)
    challenger, champion = stats_of(masks, {1: 0.9, 2: 0.9}), stats_of(masks, {1: 0.8, 2: 0.8})
    assert promotion.decide(challenger, champion).promoted
    assert not promotion.decide(challenger, champion, min_gain=0.5).promoted


def test_an_anomaly_scorer_on_either_side_is_judged_on_pixel_auroc() -> None:
    masks = truth_masks(24)
    segmenter, scorer = stats_of(masks, {1: 0.6, 2: 0.6}), stats_of(masks, {1: 0.9, 2: 0.9}, scorer=True)
    assert promotion.gate_metric(segmenter, segmenter) == MIOU
    assert promotion.gate_metric(segmenter, None) == MIOU
    assert promotion.gate_metric(scorer, None) == PIXEL_AUROC
    assert promotion.gate_metric(scorer, segmenter) == promotion.gate_metric(segmenter, scorer) == PIXEL_AUROC
    decision = promotion.decide(scorer, segmenter)
    assert decision.metric == PIXEL_AUROC and decision.promoted, decision.reasons
    assert decision.challenger_value == pytest.approx(promotion.metric_value(scorer, PIXEL_AUROC))
    assert any("pixel AUROC because an anomaly scorer" in r for r in decision.reasons)


def test_a_decision_round_trips_through_tags_and_the_record() -> None:
    masks = truth_masks(24)
    decision = promotion.decide(stats_of(masks, {1: 0.98, 2: 0.6}), stats_of(masks, {1: 0.5, 2: 0.8}))
    tags = decision.to_tags()
    assert tags["loom.promotion.promoted"] == "false" and tags["loom.promotion.regressed"] == "stain"
    assert all(isinstance(v, str) for v in tags.values())
    again = GateDecision.from_tags({**tags, "unrelated": "x"})
    assert again.promoted == decision.promoted and again.reasons == decision.reasons
    assert again.delta == pytest.approx(decision.delta, abs=1e-6)
    assert again.per_class_delta == pytest.approx(decision.per_class_delta, abs=1e-6)
    nan_record = GateDecision(False, MIOU, math.nan, reasons=["x"]).to_record()
    assert nan_record["challenger_value"] is None
