"""Calibrated auto-accept: which pseudo-labels may train the student without a person's look.

A pseudo-label is *wrong* when it misses a defect or its mask matches the truth with IoU under 0.5
(:func:`pseudo_label_wrong`). Only images the teacher finds normal, and is fairly sure of, are candidates
(:func:`acceptable`): what auto-accept adds to training is normal fabric, and its error is a missed
defect. People's reviews of audit images (drawn uniformly at random among the round's candidates,
loom/selection.plan_review) say how often candidates of each confidence are wrong. From them,
:func:`accept` chooses which of today's candidates to auto-accept so that the expected share of wrong
labels among the accepted stays under a target risk (``round.accept_risk``).

Method: conformal selection (Jin and Candes, "Selection by prediction with conformal p-values", 2023).
Each candidate i with confidence s_i gets the conformal p-value

    p_i = (1 + #{audits j that were wrong and have s_j >= s_i}) / (n + 1)

(the test of "this pseudo-label is wrong"), and the Benjamini-Hochberg procedure at level alpha over the
candidates' p-values picks the accepted set. Guarantee: E[wrong accepted / accepted] <= alpha, provided
the audits and the candidates are exchangeable, i.e. audited images are a uniform random sample of the
same candidates labeled by the same kind of teacher. What that asks of a round: audits are drawn at
random among the candidates (never by the selection strategy: people's selected reviews are the uncertain
images and say nothing about the confident ones); audits of earlier rounds are pooled with today's, which
assumes the teacher has not got worse since (it learns from more references each round, so old audits err
on the cautious side). With n audits and none wrong, nothing can pass until 1 / (n + 1) <= alpha, i.e. 19
audits at alpha = 0.05, 9 at 0.1: the first rounds accept nothing, by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Class-aware IoU under which a pseudo-label counts as wrong.
WRONG_IOU = 0.5
#: Only images the teacher finds normal and is at least this sure of (review uncertainty below it) may be
#: auto-accepted, and audits are drawn among them.
MAX_UNCERTAINTY = 0.5


def acceptable(uncertainty: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """(N,) bool: the candidates auto-accept may take (and audits are drawn from): images without a
    predicted defect (``flagged`` False) whose review uncertainty is under ``MAX_UNCERTAINTY``.

    Predicted defects always go to people. Their masks are the teacher's blobs, two to four times the
    object (BENCHMARKS.md, Defect-Click), so most would count as wrong; and they change kind from round to
    round as people's labels name more regions, so earlier audits would not describe today's (measured: a
    pooled calibration let 21 % wrong labels through at a 10 % target when named regions could pass).
    """
    return ~np.asarray(flagged, dtype=bool) & (np.asarray(uncertainty, dtype=np.float64) < MAX_UNCERTAINTY)


def pseudo_label_wrong(pseudo: np.ndarray, truth: np.ndarray, defect_index: int | None) -> bool:
    """Whether a pseudo-label would teach the student something false.

    Args:
        pseudo: (H, W) class-index mask of the teacher (0 = normal).
        truth: (H, W) class-index mask people drew.
        defect_index: the generic ``defect`` class: an unnamed region says where but not which, and matches
            a defect of any class (it is ignored in training, so it cannot teach a wrong class).

    Returns:
        True when a defect is missed or the masks' IoU (same class required) is under ``WRONG_IOU``; a
        normal image predicted normal is right.
    """
    pred_any, true_any = pseudo > 0, truth > 0
    union = np.logical_or(pred_any, true_any).sum()
    if union == 0:
        return False
    same = pred_any & true_any & ((pseudo == truth) | (pseudo == defect_index if defect_index else False))
    return bool(same.sum() / union < WRONG_IOU)


def conformal_p_values(
    audit_confidence: np.ndarray, audit_wrong: np.ndarray, confidence: np.ndarray
) -> np.ndarray:
    """(N,) conformal p-values of "this candidate's pseudo-label is wrong" from n audited outcomes."""
    audit_confidence = np.asarray(audit_confidence, dtype=np.float64)
    wrong_conf = np.sort(audit_confidence[np.asarray(audit_wrong, dtype=bool)])
    # Wrong audits at least as confident as the candidate (ties count against it: conservative).
    at_least = len(wrong_conf) - np.searchsorted(wrong_conf, np.asarray(confidence, float), side="left")
    return (1.0 + at_least) / (len(audit_confidence) + 1.0)


def benjamini_hochberg(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """(N,) bool: the discoveries of the BH procedure at level ``alpha``."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p, kind="stable")
    passed = np.nonzero(p[order] <= alpha * np.arange(1, m + 1) / m)[0]
    accepted = np.zeros(m, dtype=bool)
    if len(passed):
        accepted[order[: passed[-1] + 1]] = True
    return accepted


@dataclass
class AcceptDecision:
    accepted: np.ndarray  # (N,) bool over the candidates
    threshold: float  # lowest confidence accepted (inf when none)
    n_audits: int
    audit_error: float  # share of audits whose pseudo-label was wrong (NaN without audits)


def accept(
    audit_confidence: np.ndarray, audit_wrong: np.ndarray, confidence: np.ndarray, risk: float
) -> AcceptDecision:
    """Which candidates (by confidence, (N,)) to auto-accept at target risk ``risk`` (see the module)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(audit_confidence)
    if n == 0:
        accepted = np.zeros(len(confidence), dtype=bool)
    else:
        accepted = benjamini_hochberg(conformal_p_values(audit_confidence, audit_wrong, confidence), risk)
    threshold = float(confidence[accepted].min()) if accepted.any() else float("inf")
    error = float(np.mean(audit_wrong)) if n else float("nan")
    return AcceptDecision(accepted, threshold, n, error)


def passed_labels(
    audit_confidence: np.ndarray,
    audit_wrong: np.ndarray,
    uncertainty: np.ndarray,
    flagged: np.ndarray,
    risk: float,
) -> np.ndarray:
    """(N,) bool: the open pseudo-labels (by review uncertainty, and whether a defect is predicted) that
    auto-accept takes: among the :func:`acceptable` ones, those :func:`accept` passes at ``risk``."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    candidates = acceptable(uncertainty, flagged)
    decision = accept(audit_confidence, audit_wrong, 1.0 - uncertainty[candidates], risk)
    passed = np.zeros(len(uncertainty), dtype=bool)
    passed[np.flatnonzero(candidates)[decision.accepted]] = True
    return passed
