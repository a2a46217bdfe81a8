"""Review selection strategies (loom/stages/selection.py): each does what its name promises."""

from __future__ import annotations

import numpy as np
import pytest

from loom.stages import selection


def _candidates(n: int = 8, **kw) -> selection.Candidates:
    defaults = {
        "uncertainty": np.linspace(0.1, 0.8, n),
        "score": np.zeros(n),
        "classes": [()] * n,
        "embeddings": np.eye(n, dtype=np.float32),
    }
    return selection.Candidates(**{**defaults, **kw})


def test_unknown_strategy_and_missing_embeddings_are_refused():
    with pytest.raises(ValueError, match="unknown selection strategy 'smart'"):
        selection.select("smart", _candidates(), 2)
    with pytest.raises(ValueError, match="needs image embeddings"):
        selection.select("diversity", _candidates(embeddings=None), 2)


@pytest.mark.parametrize("strategy", selection.STRATEGIES)
def test_every_strategy_returns_distinct_candidates_within_budget(strategy):
    c = _candidates(6)
    picked = selection.select(strategy, c, 4, seed=3)
    assert len(picked) == 4 and len(set(picked)) == 4 and all(0 <= i < 6 for i in picked)
    assert len(selection.select(strategy, c, 50)) == 6  # a budget beyond the pool takes the pool
    assert selection.select(strategy, c, 0) == []


def test_random_depends_on_the_seed_only():
    c = _candidates(40)
    assert selection.select("random", c, 10, seed=1) == selection.select("random", c, 10, seed=1)
    assert selection.select("random", c, 10, seed=1) != selection.select("random", c, 10, seed=2)


def test_uncertainty_ties_go_to_the_most_anomalous():
    c = _candidates(3, uncertainty=np.array([1.0, 1.0, 0.2]), score=np.array([0.3, 0.9, 0.1]))
    assert selection.select("uncertainty", c, 2) == [1, 0]


def test_disagreement_ranks_by_teacher_student_disagreement_and_falls_back_to_uncertainty():
    c = _candidates(4, uncertainty=np.array([0.9, 0.1, 0.1, 0.1]))
    assert selection.select("disagreement", c, 1) == [0]  # no champion yet
    c.disagreement = np.array([0.0, 0.2, 0.9, 0.1])
    assert selection.select("disagreement", c, 2) == [2, 1]


def _two_clusters(n_per: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.01, (n_per, 4)) + np.array([1.0, 0, 0, 0])
    b = rng.normal(0.0, 0.01, (n_per, 4)) + np.array([0, 1.0, 0, 0])
    return np.concatenate([a, b]).astype(np.float32)


def test_diversity_covers_what_people_have_not_labeled_yet():
    embeddings = _two_clusters()
    labeled = embeddings[:1]  # people labeled a cluster-A image
    c = _candidates(10, embeddings=embeddings, labeled_embeddings=labeled)
    first, second = selection.select("diversity", c, 2)
    assert first >= 5  # the unseen cluster first
    assert second < 5 or np.linalg.norm(embeddings[first] - embeddings[second]) > 0.01


def test_rarity_prefers_classes_people_labeled_least_and_counts_unnamed_regions_as_average():
    c = _candidates(
        4,
        classes=[("hole",), ("knot",), (), ("defect",)],
        labeled_counts={"hole": 9, "knot": 0},
    )
    weights = selection.rarity(c)
    assert weights[1] == 1.0 and weights[2] == 0.0
    assert weights[0] < weights[3] < weights[1]
    assert selection.select("rarity", c, 2) == [1, 3]


def test_combined_spreads_equally_uncertain_picks_over_kinds_of_image():
    # Round 1: every flagged image is uncertainty 1.0 (unnamed class); five near-duplicates score highest.
    embeddings = _two_clusters()
    score = np.array([0.9, 0.95, 0.92, 0.91, 0.93, 0.5, 0.51, 0.52, 0.53, 0.54])
    c = _candidates(
        10, uncertainty=np.ones(10), score=score, embeddings=embeddings, classes=[("defect",)] * 10
    )
    assert all(i < 5 for i in selection.select("uncertainty", c, 2))  # collapses on the duplicates
    picked = selection.select("combined", c, 2)
    assert picked[0] == 1 and picked[1] >= 5  # the most anomalous, then the other kind


def test_plan_review_audits_acceptable_candidates_and_spends_no_review_on_what_passes():
    c = _candidates(20, uncertainty=np.linspace(0.0, 1.0, 20))
    auditable = c.uncertainty < 0.5
    accepted = np.zeros(20, dtype=bool)
    accepted[:5] = True
    plan = selection.plan_review("uncertainty", c, 6, 2, auditable, accepted, seed=0)
    assert len(plan.audit) == 2 and len(plan.picks) == 4 and not set(plan.audit) & set(plan.picks)
    assert all(auditable[i] for i in plan.audit)  # audits come from what auto-accept may take
    assert all(not accepted[i] for i in plan.picks)
    assert plan.review == plan.audit + plan.picks
    audits = [selection.plan_review("random", c, 6, 2, auditable, None, seed=s).audit for s in range(200)]
    assert {i for a in audits for i in a} == set(np.flatnonzero(auditable))  # uniform over them
    # Fewer open candidates than the budget: the round asks for less.
    accepted[:18] = True
    small = selection.plan_review("uncertainty", c, 6, 0, None, accepted, seed=0)
    assert sorted(small.picks) == [18, 19]
