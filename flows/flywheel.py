"""One flywheel round as a Prefect flow: a readable sequence of task calls (docs/architecture.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from loom import journal
from loom.config import Settings, load_settings
from loom.evaluation.plots import curve_points, round_curve
from loom.journal import RoundJournal
from loom.services import tracking
from tasks.augment import augment, log_generator
from tasks.clicker import fine_tune_round_clicker
from tasks.common import StepClock
from tasks.ingest import ingest
from tasks.pseudo_label import pseudo_label
from tasks.review import human_review
from tasks.select import auto_accept, select_for_review
from tasks.track import Promotion, log_and_promote, publish_champion
from tasks.train import Evaluation, TrainedStudent, evaluate_student, nothing_to_train, train_student
from tasks.version import claimed_round, version_round


@flow(name="flywheel-round")
def flywheel_round(
    workspace: str | None = None,
    source: str | None = None,
    review_budget: int | None = None,
    review_timeout_s: float | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Ingest new images from ``source`` (optional), label, review, teach the click model, augment, train,
    evaluate, promote, version.

    One round at a time per workspace; a round interrupted (killed, a machine restart) is finished under
    its own number by the next run, its done steps taken from their results (loom/journal.py).
    """
    settings = load_settings(
        workspace, review_budget=review_budget, review_timeout_s=review_timeout_s, epochs=epochs
    )
    with claimed_round(settings) as claimed:
        return round_steps(settings, claimed, source)


def round_steps(settings: Settings, claimed: RoundJournal, source: str | None) -> dict[str, Any]:
    """The round's steps, in order, for the round ``claimed`` (held by the caller)."""
    round_no = claimed.round_no
    clock = StepClock(settings)
    with clock.step("ingest"):
        ingested = ingest(settings, source, round_no)
    with clock.step("pseudo_label"):
        labels = pseudo_label(settings, round_no)
    with clock.step("select"):
        selection = select_for_review(settings, labels)
    review = human_review(settings, labels, selection, clock)
    journal.note(settings, label_studio_project=review.project_id, label_studio_tasks=review.task_ids)
    with clock.step("auto_accept"):
        accepted = auto_accept(settings, labels)
    with clock.step("fine_tune_clicker"):
        clicker = fine_tune_round_clicker(settings, round_no)
    with clock.step("augment"):
        synthetic = augment(settings, round_no)
        generator_version = log_generator(settings, round_no, synthetic)
    with clock.step("train"):
        untrained = nothing_to_train(settings)
        students = [
            train_student(settings, round_no, name, labels.pixel_threshold)
            for name in ([] if untrained else settings.round.students)
        ]
    trained = evaluate_and_promote(settings, round_no, students, clock) if students else None
    if trained:
        journal.note(settings, mlflow_runs=trained.promotion.runs)

    record = {
        "round": round_no,
        "source": str(source) if source else None,
        "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
        "attempts": {"flow_runs": claimed.flow_runs, "started_at": claimed.started_at},
        "label_studio": {
            "project_id": review.project_id,
            "task_ids": review.task_ids,
            "export": review.export,
            "skipped": review.skipped,
            "wait": asdict(review.wait) if review.wait else None,
            "refreshed_preannotations": review.refreshed,
        },
        **training_record(trained, untrained),
        "counts": {
            "ingested": len(ingested.added) if ingested else 0,
            "quarantined": len(ingested.quarantined) if ingested else 0,
            "duplicates": len(ingested.duplicates) if ingested else 0,
            "sent_to_review": len(selection.review),
            "reviewed": review.reviewed,
            "pending_review": review.pending,
            "malformed_annotations": len(review.malformed),
            "audited": len(selection.audit),
            "auto_accepted": len(accepted.accepted),
            **review.click_counts(),
            "synthetic": synthetic.total,
            "synthetic_per_class": synthetic.per_class,
            **training_counts(trained),
        },
        "selection": {
            "strategy": selection.strategy,
            "audit": selection.audit,
            "passed_before_review": selection.provisionally_accepted,
        },
        "auto_accept": {k: v for k, v in asdict(accepted).items() if k != "accepted"},
        "clicker": asdict(clicker),
        "augment": {
            "mode": synthetic.mode,
            "per_class": synthetic.per_class,
            "methods": synthetic.methods,
            "rejected": synthetic.rejected,
            "model_dir": synthetic.model_dir,
            "model_version": generator_version,
            "seconds": synthetic.seconds,
            "skipped": synthetic.skipped,
        },
        "params": asdict(settings.round),
        "teacher": {
            "model_version": labels.model_version,
            "image_threshold": labels.image_threshold,
            "pixel_threshold": labels.pixel_threshold,
        },
        "summary": f"{len(selection.review)} sent to review, "
        + (
            f"best student {trained.best.name} mIoU {trained.evaluation.metrics.get('miou', 0.0):.3f}"
            if trained
            else f"no student trained ({untrained})"
        ),
    }
    if trained:
        log_round_curve(settings, trained.promotion.run_id, [*round_records(settings), record])
    with clock.step("version"):
        record["step_seconds"] = clock.seconds  # everything but versioning itself
        version = version_round(settings, round_no, record)
    journal.note(settings, git=version)
    with clock.step("publish"):
        if trained:
            publish_champion(settings, trained.promotion)
    journal.finish(settings, round_no)
    record["step_seconds"] = clock.seconds
    record["git"] = version
    get_run_logger().info("round %d done: %s", round_no, record["summary"])
    return record


@dataclass
class TrainedRound:
    students: list[TrainedStudent]
    evaluations: list[Evaluation]
    promotion: Promotion

    @property
    def best(self) -> TrainedStudent:
        """The round's challenger: the student that met the champion at the gate."""
        return next(s for s in self.students if s.name == self.promotion.student)

    @property
    def evaluation(self) -> Evaluation:
        return self.evaluations[self.students.index(self.best)]


def evaluate_and_promote(
    settings: Settings, round_no: int, students: list[TrainedStudent], clock: StepClock
) -> TrainedRound:
    with clock.step("evaluate"):
        evaluations = [evaluate_student(settings, student) for student in students]
    with clock.step("log_and_promote"):
        promotion = log_and_promote(settings, round_no, students, evaluations, asdict(settings.round))
    return TrainedRound(students, evaluations, promotion)


def training_record(trained: TrainedRound | None, untrained: str | None) -> dict[str, Any]:
    """The round record's MLflow, promotion, metrics and students parts (empty when nothing trained)."""
    if trained is None:
        return {
            "mlflow": {"promoted": False, "skipped": untrained},
            "promotion": {},
            "metrics": {},
            "students": {},
        }
    return {
        "mlflow": trained.promotion.summary(),
        "promotion": trained.promotion.decision(),  # the gate: challenger vs champion on today's test split
        "metrics": trained.evaluation.metrics,
        "students": {
            s.name: {"metrics": e.metrics, "train_seconds": s.seconds, "warm_start": s.warm_start}
            for s, e in zip(trained.students, trained.evaluations, strict=True)
        },
    }


def training_counts(trained: TrainedRound | None) -> dict[str, int]:
    best = trained.best if trained else None
    return {
        "train_human": best.n_human if best else 0,
        "train_pseudo": best.n_pseudo if best else 0,
        "train_synthetic": best.n_synthetic if best else 0,
        "test": trained.evaluation.n_test if trained else 0,
    }


def log_round_curve(settings: Settings, run_id: str, records: list[dict[str, Any]]) -> None:
    """The round curve so far (test mIoU against reviews, reviews per round) on the challenger's run."""
    tracking.log_figure(
        settings, run_id, round_curve({"this workspace": curve_points(records)}), "round_curve.png"
    )


def round_records(settings: Settings) -> list[dict[str, Any]]:
    """Every round record of the workspace, in round order."""
    paths = sorted(settings.rounds_dir.glob("[0-9][0-9][0-9][0-9]/round.json"))
    return [json.loads(path.read_text()) for path in paths]


if __name__ == "__main__":
    flywheel_round()
