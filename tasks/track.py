"""MLflow: log the round's evaluation and model; promote it to `champion` only when it is better."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import tracking
from loom.config import Settings
from tasks.common import task_logger
from tasks.train import Evaluation, TrainedStudent


@dataclass
class Promotion:
    student: str  # the round's best student, the one that competed with the champion
    run_id: str
    model_version: str
    promoted: bool
    champion_version: str | None
    runs: dict[str, dict[str, str]]  # student name -> run_id, model_version


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
    """One MLflow run (and model version) per student; the round's best competes with the champion."""
    log = task_logger()
    runs = []
    for student, evaluation in zip(students, evaluations, strict=True):
        runs.append(
            tracking.log_round(
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
                tags={"round": f"{round_no:04d}", "loom.student": student.name},
                run_name=f"round-{round_no:04d}-{student.name}",
            )
        )
    metric = settings.round.promote_metric
    best = best_student(evaluations, metric)
    promoted = tracking.promote_if_better(
        settings, runs[best].model_version, evaluations[best].metrics, metric=metric
    )
    current = tracking.champion(settings)
    log.info(
        "round %d: best student %s %s=%.4f, model version %s %s",
        round_no,
        students[best].name,
        metric,
        evaluations[best].metrics.get(metric, float("nan")),
        runs[best].model_version,
        "promoted to champion" if promoted else "not better than the champion",
    )
    return Promotion(
        student=students[best].name,
        run_id=runs[best].run_id,
        model_version=runs[best].model_version,
        promoted=promoted,
        champion_version=current[0] if current else None,
        runs={
            s.name: {"run_id": r.run_id, "model_version": r.model_version}
            for s, r in zip(students, runs, strict=True)
        },
    )
