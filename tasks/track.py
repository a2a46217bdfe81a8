"""MLflow: log the round's students; the best is the round's challenger and meets the champion at the gate.

Every round the champion is downloaded and predicted again on today's frozen test split, beside the
challenger's predictions from its evaluation, and :func:`loom.evaluation.promotion.decide` compares the two
(paired bootstrap over test images, per-class guard). The registry alias ``challenger`` goes to the round's
best every round, ``champion`` only when the gate promotes it; the decision is written as ``loom.promotion.*``
tags on the challenger's model version and run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loom.config import Settings
from loom.data.manifest import sha256_file
from loom.evaluation import promotion
from loom.evaluation.promotion import TAG_PREFIX, GateDecision, ModelStats
from loom.services import tracking
from models.student.registry import is_anomaly_scorer, load_student
from models.student.training import predict_images
from tasks.common import task_logger
from tasks.train import Evaluation, TrainedStudent, frozen_test_split

#: Tag of the decision naming the champion version the challenger was judged against.
COMPARED_WITH_TAG = TAG_PREFIX + "champion_version"


@dataclass
class Promotion:
    student: str  # the round's best student, the challenger that met the champion at the gate
    run_id: str
    model_version: str
    champion_version: str | None  # the champion after the decision
    runs: dict[str, dict[str, str]]  # student name -> run_id, model_version
    gate: GateDecision
    compared_with: str | None = None  # the champion version the challenger was judged against (None: first)

    @property
    def promoted(self) -> bool:
        return self.gate.promoted

    @property
    def reasons(self) -> list[str]:
        return self.gate.reasons

    def summary(self) -> dict[str, Any]:
        """Who competed and what came of it (the round record's ``mlflow``)."""
        return {
            "student": self.student,
            "run_id": self.run_id,
            "model_version": self.model_version,
            "promoted": self.promoted,
            "champion_version": self.champion_version,
            "runs": self.runs,
        }

    def decision(self) -> dict[str, Any]:
        """The gate's numbers and reasons, JSON-ready (the round record's ``promotion``)."""
        return {"compared_with": self.compared_with, **self.gate.to_record()}


def best_student(evaluations: list[Evaluation], metric: str) -> int:
    """Index of the evaluation with the highest `metric` (NaN counts as worst; ties go to the first)."""
    values = [evaluation.metrics.get(metric, float("nan")) for evaluation in evaluations]
    return max(
        range(len(values)),
        key=lambda i: (math.isfinite(values[i]), values[i] if math.isfinite(values[i]) else 0),
    )


@task(name="log-and-promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_and_promote(
    settings: Settings,
    round_no: int,
    students: list[TrainedStudent],
    evaluations: list[Evaluation],
    params: dict,
) -> Promotion:
    """One MLflow run (and model version) per student; the round's best competes with the champion.

    A retry finds the versions its first try logged (same round, student and weights) and the decision
    recorded on the challenger, and repeats that decision rather than taking another one.

    The gate's rule (:func:`loom.evaluation.promotion.decide`) comes from ``round.promote_min_gain``,
    ``promote_class_tolerance`` and ``promote_min_class_pixels``.
    """
    log = task_logger()
    runs = [
        _log_student(settings, round_no, s, e, params) for s, e in zip(students, evaluations, strict=True)
    ]
    best = best_student(evaluations, settings.round.promote_metric)
    challenger = runs[best]
    recorded = tracking.version_tags(settings, challenger.model_version)
    if TAG_PREFIX + "promoted" in recorded:  # a retry: the first decision stands
        decision, compared_with = GateDecision.from_tags(recorded), recorded.get(COMPARED_WITH_TAG) or None
    else:
        rp = settings.round
        gate = {
            "min_gain": rp.promote_min_gain,
            "class_tolerance": rp.promote_class_tolerance,
            "min_class_pixels": rp.promote_min_class_pixels,
        }
        compared_with, decision = judge(settings, evaluations[best], challenger.model_version, **gate)
    tracking.decide_champion(
        settings,
        challenger.model_version,
        decision.promoted,
        decision.reason,
        tags={COMPARED_WITH_TAG: compared_with or "", **decision.to_tags()},  # `promoted` stays last
        run_id=challenger.run_id,
        challenger=True,
        publish=False,  # the alias moves once the round is versioned: publish_champion
    )
    log.info(
        "round %d: challenger %s (version %s) %s: %s",
        round_no,
        students[best].name,
        challenger.model_version,
        "promoted to champion" if decision.promoted else "not promoted",
        decision.reason,
    )
    return Promotion(
        student=students[best].name,
        run_id=challenger.run_id,
        model_version=challenger.model_version,
        champion_version=challenger.model_version if decision.promoted else compared_with,
        runs={
            s.name: {"run_id": r.run_id, "model_version": r.model_version}
            for s, r in zip(students, runs, strict=True)
        },
        gate=decision,
        compared_with=compared_with,
    )


@task(name="publish-champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_champion(settings: Settings, promotion: Promotion) -> None:
    """Move the ``champion`` alias to the round's challenger if the gate promoted it; the round calls this
    once its data is versioned, so the champion always comes from a versioned round. Idempotent."""
    if promotion.promoted:
        tracking.set_champion(settings, promotion.model_version)


def _log_student(
    settings: Settings, round_no: int, student: TrainedStudent, evaluation: Evaluation, params: dict
) -> tracking.RoundRun:
    """Log one student as a run and a registered version, unless an earlier try of this task did.

    An earlier try killed half-way left a run without its version (or a version without its tags):
    :func:`tracking.recover_run` finishes the one it can use and deletes the others, so a round has one
    run and one version per student however often it was interrupted.
    """
    weights = sha256_file(Path(student.model_dir) / tracking.STUDENT_FILES[1])
    key = {"loom.student": student.name, "loom.weights_sha256": weights}
    logged = tracking.logged_version(settings, {"loom.round": str(round_no), **key})
    if logged is not None:
        return logged
    recovered = tracking.recover_run(settings, {"loom.round": str(round_no), **key})
    if recovered is not None:
        return recovered
    return tracking.log_round(
        settings,
        round_no,
        params={**params, "student": student.name},
        metrics={
            **evaluation.metrics,
            "train_seconds": student.seconds,
            "n_train_human": student.n_human,
            "n_train_pseudo": student.n_pseudo,
        },
        model_dir=Path(student.model_dir),
        images=evaluation.overlays,
        tags={"round": f"{round_no:04d}", **key},
        run_name=f"round-{round_no:04d}-{student.name}",
        version_tags=key,
    )


def judge(
    settings: Settings, evaluation: Evaluation, version: str, **gate: Any
) -> tuple[str | None, GateDecision]:
    """The gate's decision on the challenger ``version`` (evaluated in ``evaluation``) against the current
    champion, which is predicted again on the same test images; also the champion's version (None if none).

    Args:
        **gate: ``min_gain``, ``class_tolerance``, ``min_class_pixels`` of
        :func:`loom.evaluation.promotion.decide`.
    """
    if evaluation.stats is None:
        raise ValueError("the evaluation has no per-image statistics; evaluate with tasks.train.evaluate_on")
    current = tracking.champion(settings)
    if current is None:
        return None, promotion.decide(evaluation.stats, None, **gate)
    champion_version = current[0]
    if champion_version == version:  # it already is the champion: nothing to compare, nothing to move
        metric = promotion.gate_metric(evaluation.stats, None)
        value = promotion.metric_value(evaluation.stats, metric)
        return champion_version, GateDecision(True, metric, value, reasons=["Already the champion."])
    return champion_version, promotion.decide(
        evaluation.stats, champion_stats(settings, champion_version), **gate
    )


def champion_stats(settings: Settings, version: str) -> ModelStats:
    """Registered student ``version`` predicted on today's frozen test split, as per-image statistics."""
    try:
        model = load_student(tracking.download_student(settings, version))
    except (OSError, ValueError, LookupError) as err:
        raise RuntimeError(
            f"the promotion gate cannot load champion version {version} to judge the challenger "
            f"against it: {err}"
        ) from err
    images, masks, names = frozen_test_split(settings)
    outputs = predict_images(model, images, progress_as="evaluate champion")
    return promotion.image_stats(
        [pred for _, pred, _ in outputs],
        [anomaly_map for anomaly_map, _, _ in outputs],
        masks,
        settings.classes,
        anomaly_scorer=is_anomaly_scorer(model),
        image_ids=names,
    )
