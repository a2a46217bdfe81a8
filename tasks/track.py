"""MLflow: log the round's evaluation and model; promote it to `champion` only when it is better."""

from __future__ import annotations

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
    run_id: str
    model_version: str
    promoted: bool
    champion_version: str | None


@task(name="log-and-promote", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_and_promote(
    settings: Settings, round_no: int, student: TrainedStudent, evaluation: Evaluation, params: dict
) -> Promotion:
    log = task_logger()
    run = tracking.log_round(
        settings,
        round_no,
        params=params,
        metrics={
            **evaluation.metrics,
            "train_seconds": student.seconds,
            "n_train_human": student.n_human,
            "n_train_pseudo": student.n_pseudo,
        },
        model_dir=Path(student.model_dir),
        images=evaluation.overlays,
        tags={"round": f"{round_no:04d}"},
    )
    metric = settings.round.promote_metric
    promoted = tracking.promote_if_better(settings, run.model_version, evaluation.metrics, metric=metric)
    current = tracking.champion(settings)
    log.info(
        "round %d: %s=%.4f, model version %s %s",
        round_no,
        metric,
        evaluation.metrics.get(metric, float("nan")),
        run.model_version,
        "promoted to champion" if promoted else "not better than the champion",
    )
    return Promotion(run.run_id, run.model_version, promoted, current[0] if current else None)
