"""Which unreviewed images go to people: one interface, several strategies (``round.selection``).

Every strategy sees the same :class:`Candidates` (what the teacher, the champion student and the backbone
say about each unreviewed image, and what people have labeled so far) and returns indices into them, best
first. The strategies:

- ``random``: the baseline a practitioner tries first.
- ``uncertainty``: the teacher's review uncertainty (unnamed regions, closeness to the threshold), ties
  broken by the image score.
- ``disagreement``: 1 - IoU of the teacher's and the champion student's defect masks (uncertainty when
  there is no champion yet).
- ``diversity``: k-center greedy (coreset) on backbone image embeddings, starting from the images people
  already labeled, so each pick is the candidate farthest from everything labeled or picked.
- ``rarity``: images whose predicted classes people have labeled least.
- ``combined`` (the default): each pick maximises informativeness x class balance x coverage, the three
  terms LightlyOne combines (weights, balance, diversity): informativeness is the larger of uncertainty and
  disagreement, balance is 1 + rarity, coverage is the distance to the nearest labeled or picked image
  relative to the median such distance (capped at 1), so near-duplicates of what people already drew lose
  to equally uncertain images of another kind.

Besides the strategy's picks a round sends a few images drawn uniformly at random among those auto-accept
may take (the audit): they are exchangeable with the images that get auto-accepted, which is what
calibrating auto-accept needs (loom/stages/calibration.py). The strategies are measured side by side in
BENCHMARKS.md ("The flywheel, simulated").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

STRATEGIES = ("random", "uncertainty", "disagreement", "diversity", "rarity", "combined")


@dataclass
class Candidates:
    """What selection may look at, one entry per unreviewed candidate image (N of them).

    uncertainty: (N,) in [0, 1], the teacher's review uncertainty (tasks/pseudo_label.review_uncertainty).
    score: (N,) the teacher's image anomaly score (only its order matters).
    classes: N tuples of the class names in each image's pseudo-label (empty for images predicted normal).
    disagreement: (N,) in [0, 1], 1 - IoU of teacher and champion masks; None before there is a champion.
    embeddings: (N, D) image embeddings (backbone features); None when not computed.
    labeled_embeddings: (M, D) embeddings of the images people labeled so far (M may be 0).
    labeled_counts: class name -> how many human-labeled images contain it.
    """

    uncertainty: np.ndarray
    score: np.ndarray
    classes: Sequence[tuple[str, ...]]
    disagreement: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    labeled_counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uncertainty)

    def subset(self, index: Sequence[int]) -> Candidates:
        """The candidates at ``index`` (what people labeled stays as it is)."""
        index = np.asarray(index, dtype=np.int64)

        def take(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else np.asarray(values)[index]

        return replace(
            self,
            uncertainty=take(self.uncertainty),
            score=take(self.score),
            classes=[self.classes[i] for i in index],
            disagreement=take(self.disagreement),
            embeddings=take(self.embeddings),
        )


@dataclass
class ReviewPlan:
    """Candidate indices a round sends to people: the random audit, then the strategy's picks."""

    audit: list[int]
    picks: list[int]

    @property
    def review(self) -> list[int]:
        return self.audit + self.picks


def select(strategy: str, candidates: Candidates, budget: int, seed: int = 0) -> list[int]:
    """Indices of up to ``budget`` candidates for review, in the order people should see them.

    Raises:
        ValueError: an unknown strategy, or one that needs embeddings given none.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    budget = min(max(int(budget), 0), len(candidates))
    if budget == 0:
        return []
    return _PICKERS[strategy](candidates, budget, seed)


def plan_review(
    strategy: str,
    candidates: Candidates,
    budget: int,
    n_audit: int,
    auditable: np.ndarray | None = None,
    accepted: np.ndarray | None = None,
    seed: int = 0,
) -> ReviewPlan:
    """Split a round's review budget into a uniform audit and the strategy's picks.

    Args:
        budget: reviews this round, audit included.
        n_audit: how many of them are drawn uniformly from the ``auditable`` candidates (those auto-accept
            may take, loom/calibration.acceptable; all when None), whether auto-accept passes them or not:
            what calibration needs. Every strategy gets the same audit: only the picks differ.
        accepted: (N,) bool, candidates auto-accept already passes: the strategy does not spend reviews on
            them, so as auto-accept widens fewer images need people and a round may use less than its budget.
    """
    budget = min(max(int(budget), 0), len(candidates))
    pool = np.arange(len(candidates)) if auditable is None else np.flatnonzero(auditable)
    n_audit = min(n_audit, budget, len(pool))
    audit = [int(pool[i]) for i in audit_sample(len(pool), n_audit, seed)]
    skip = set(audit)
    if accepted is not None:
        skip |= set(np.flatnonzero(accepted).tolist())
    rest = [i for i in range(len(candidates)) if i not in skip]
    picks = select(strategy, candidates.subset(rest), budget - len(audit), seed) if rest else []
    return ReviewPlan(audit=audit, picks=[rest[i] for i in picks])


def audit_sample(n_candidates: int, n_audit: int, seed: int) -> list[int]:
    """``n_audit`` candidate indices drawn uniformly without replacement (the calibration audit)."""
    n_audit = min(max(int(n_audit), 0), n_candidates)
    return np.random.default_rng(seed).choice(n_candidates, size=n_audit, replace=False).tolist()


# ---- the strategies ------------------------------------------------------------------------------------


def _random(c: Candidates, budget: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(len(c))[:budget].tolist()


def _ranked(primary: np.ndarray, c: Candidates, budget: int) -> list[int]:
    """Highest ``primary`` first, then the highest score, then the lowest index (a stable order)."""
    order = np.lexsort((np.arange(len(c)), -np.asarray(c.score, float), -np.asarray(primary, float)))
    return order[:budget].tolist()


def _uncertainty(c: Candidates, budget: int, seed: int) -> list[int]:
    return _ranked(c.uncertainty, c, budget)


def _disagreement(c: Candidates, budget: int, seed: int) -> list[int]:
    signal = c.uncertainty if c.disagreement is None else c.disagreement
    return _ranked(signal, c, budget)


def rarity(c: Candidates) -> np.ndarray:
    """(N,) in [0, 1]: how rare in people's labels the rarest class predicted in each image is.

    A class seen in n human-labeled images weighs 1 / (1 + n), scaled so the rarest class present anywhere
    weighs 1. A region left unnamed (``defect``) could be any class: it weighs the mean of the named ones.
    Images predicted normal weigh 0.
    """
    named = {name for names in c.classes for name in names if name != "defect"} | set(c.labeled_counts)
    named.discard("defect")
    weight = {name: 1.0 / (1.0 + c.labeled_counts.get(name, 0)) for name in named}
    unknown = float(np.mean(list(weight.values()))) if weight else 1.0
    raw = np.array(
        [max((weight.get(name, unknown) for name in names), default=0.0) for names in c.classes],
        dtype=np.float64,
    )
    top = raw.max() if len(raw) else 0.0
    return raw / top if top > 0 else raw


def _rarity(c: Candidates, budget: int, seed: int) -> list[int]:
    return _ranked(rarity(c), c, budget)


def _need_embeddings(c: Candidates, strategy: str) -> np.ndarray:
    if c.embeddings is None:
        raise ValueError(f"selection strategy {strategy!r} needs image embeddings; none were computed")
    return np.asarray(c.embeddings, dtype=np.float32)


def _nearest_labeled(c: Candidates, embeddings: np.ndarray) -> np.ndarray:
    """(N,) distance of each candidate to its nearest human-labeled image (inf when none is labeled)."""
    labeled = c.labeled_embeddings
    if labeled is None or len(labeled) == 0:
        return np.full(len(embeddings), np.inf)
    return _distances(embeddings, np.asarray(labeled, dtype=np.float32)).min(axis=1)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _greedy(
    c: Candidates, budget: int, embeddings: np.ndarray, value: Callable[[np.ndarray], np.ndarray]
) -> list[int]:
    """Pick ``budget`` candidates one at a time by ``value(nearest)``, where nearest (N,) is each candidate's
    distance to the nearest labeled or already-picked image; picked candidates are never picked again."""
    nearest = _nearest_labeled(c, embeddings)
    picked: list[int] = []
    for _ in range(budget):
        gain = value(nearest)
        gain[picked] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        nearest = np.minimum(nearest, _distances(embeddings, embeddings[best : best + 1])[:, 0])
    return picked


def _diversity(c: Candidates, budget: int, seed: int) -> list[int]:
    embeddings = _need_embeddings(c, "diversity")
    # k-center greedy; with nothing labeled yet every distance is inf: start from the most anomalous image.
    first_tiebreak = np.asarray(c.score, float)
    ranks = first_tiebreak.argsort().argsort() / max(len(c) - 1, 1)
    return _greedy(c, budget, embeddings, lambda near: np.where(np.isinf(near), 1e9 + ranks, near))


def _combined(c: Candidates, budget: int, seed: int) -> list[int]:
    embeddings = _need_embeddings(c, "combined")
    informative = np.asarray(c.uncertainty, float)
    if c.disagreement is not None:
        informative = np.maximum(informative, np.asarray(c.disagreement, float))
    # Ties in informativeness (every unnamed region is uncertainty 1.0) go to the more anomalous image.
    ranks = np.asarray(c.score, float).argsort().argsort() / max(len(c) - 1, 1)
    weight = (informative + 0.01 * ranks) * (1.0 + rarity(c))

    def value(nearest: np.ndarray) -> np.ndarray:
        finite = nearest[np.isfinite(nearest) & (nearest > 0)]
        scale = float(np.median(finite)) if len(finite) else 1.0
        coverage = np.minimum(np.where(np.isfinite(nearest), nearest, scale) / scale, 1.0)
        return weight * coverage

    return _greedy(c, budget, embeddings, value)


_PICKERS: dict[str, Callable[[Candidates, int, int], list[int]]] = {
    "random": _random,
    "uncertainty": _uncertainty,
    "disagreement": _disagreement,
    "diversity": _diversity,
    "rarity": _rarity,
    "combined": _combined,
}
