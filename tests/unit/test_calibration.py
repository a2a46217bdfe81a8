"""Calibrated auto-accept (loom/stages/calibration.py): wrong labels, p-values, BH, the guarantee itself."""

from __future__ import annotations

import numpy as np

from loom.stages import calibration

DEFECT = 6


def _square(value: int, lo: int, hi: int, size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = value
    return mask


def test_pseudo_label_wrong_counts_misses_poor_masks_and_wrong_classes():
    empty = np.zeros((16, 16), np.uint8)
    assert not calibration.pseudo_label_wrong(empty, empty, DEFECT)  # normal, predicted normal
    assert calibration.pseudo_label_wrong(empty, _square(1, 4, 8), DEFECT)  # a missed defect
    assert calibration.pseudo_label_wrong(_square(1, 4, 8), empty, DEFECT)  # a false alarm
    assert not calibration.pseudo_label_wrong(_square(1, 4, 8), _square(1, 4, 8), DEFECT)
    assert calibration.pseudo_label_wrong(_square(2, 4, 8), _square(1, 4, 8), DEFECT)  # wrong class
    assert not calibration.pseudo_label_wrong(_square(DEFECT, 4, 8), _square(1, 4, 8), DEFECT)  # unnamed
    assert calibration.pseudo_label_wrong(_square(1, 2, 10), _square(1, 4, 8), DEFECT)  # IoU 16/64


def test_p_values_fall_with_confidence_and_count_ties_against_the_candidate():
    p = calibration.conformal_p_values(
        np.array([0.2, 0.5, 0.9, 0.95]), np.array([True, True, False, False]), np.array([0.1, 0.5, 0.99])
    )
    assert np.allclose(p, [3 / 5, 2 / 5, 1 / 5])


def test_benjamini_hochberg_matches_a_hand_worked_case():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # Sorted 0.01, 0.03, 0.04, 0.5 against 0.1 * k / 4 = 0.025, 0.05, 0.075, 0.1: the first three pass.
    assert calibration.benjamini_hochberg(p, 0.1).tolist() == [True, True, True, False]
    assert calibration.benjamini_hochberg(p, 0.01).tolist() == [False] * 4


def test_nothing_passes_until_enough_audits_could_show_the_risk():
    confidence = np.array([0.99, 0.5])
    none = calibration.accept(np.array([]), np.array([]), confidence, 0.05)
    assert not none.accepted.any() and none.threshold == float("inf")
    right = np.zeros(18, dtype=bool)
    assert not calibration.accept(np.full(18, 0.9), right, confidence, 0.05).accepted.any()  # 1/19 > 0.05
    enough = calibration.accept(np.full(19, 0.9), np.zeros(19, dtype=bool), confidence, 0.05)
    assert enough.accepted.all() and enough.n_audits == 19 and enough.audit_error == 0.0


def test_the_share_of_wrong_accepted_labels_stays_under_the_target_on_exchangeable_data():
    """The guarantee: averaged over many rounds of exchangeable audits and candidates, the share of wrong
    labels among the accepted stays under the target, while a good share of correct labels passes."""
    rng = np.random.default_rng(0)
    risk, shares, passed = 0.1, [], []
    for _ in range(400):
        confidence = rng.uniform(size=140)
        wrong = rng.uniform(size=140) < 0.6 * (1.0 - confidence) ** 2  # confident labels are mostly right
        audit, candidates = slice(0, 40), slice(40, None)
        decision = calibration.accept(confidence[audit], wrong[audit], confidence[candidates], risk)
        accepted = wrong[candidates][decision.accepted]
        shares.append(accepted.mean() if len(accepted) else 0.0)
        passed.append(decision.accepted.mean())
    assert np.mean(shares) <= risk
    assert np.mean(passed) > 0.3
    # Audits that were all wrong let nothing through.
    assert calibration.accept(confidence[:40], np.ones(40, bool), confidence[40:], risk).accepted.sum() == 0


def test_only_confident_images_without_a_predicted_defect_are_candidates():
    uncertainty = np.array([0.1, 0.1, 0.6, 0.4])
    flagged = np.array([False, True, False, False])
    assert calibration.acceptable(uncertainty, flagged).tolist() == [True, False, False, True]
    passed = calibration.passed_labels(np.full(20, 0.95), np.zeros(20, bool), uncertainty, flagged, 0.1)
    assert passed.tolist() == [True, False, False, True]  # a flagged image waits for people however sure
