"""One flywheel round as a Prefect flow: a readable sequence of task calls (see DESIGN.md, "One round")."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from loom.config import load_settings
from tasks.augment import augment, log_generator
from tasks.clicker import fine_tune_round_clicker
from tasks.common import StepClock
from tasks.ingest import ingest
from tasks.pseudo_label import pseudo_label
from tasks.review import human_review, select_for_review
from tasks.track import log_and_promote
from tasks.train import evaluate_student, train_student
from tasks.version import next_round_number, version_round


@flow(name="flywheel-round")
def flywheel_round(
    workspace: str | None = None,
    source: str | None = None,
    review_budget: int | None = None,
    review_timeout_s: float | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Ingest new images from ``source`` (optional), label, review, teach the click model, augment, train,
    evaluate, promote, version."""
    settings = load_settings(
        workspace, review_budget=review_budget, review_timeout_s=review_timeout_s, epochs=epochs
    )
    round_no = next_round_number(settings)
    clock = StepClock()
    with clock.step("ingest"):
        ingested = ingest(settings, source, round_no)
    with clock.step("pseudo_label"):
        labels = pseudo_label(settings, round_no)
    with clock.step("select"):
        selection = select_for_review(settings, labels)
    review = human_review(settings, labels, selection, clock)
    with clock.step("fine_tune_clicker"):
        clicker = fine_tune_round_clicker(settings, round_no)
    with clock.step("augment"):
        synthetic = augment(settings, round_no)
        generator_version = log_generator(settings, round_no, synthetic)
    with clock.step("train"):
        students = [
            train_student(settings, round_no, name, labels.pixel_threshold)
            for name in settings.round.students
        ]
    with clock.step("evaluate"):
        evaluations = [evaluate_student(settings, student) for student in students]
    with clock.step("log_and_promote"):
        promotion = log_and_promote(settings, round_no, students, evaluations, asdict(settings.round))
    best = [student.name for student in students].index(promotion.student)
    student, evaluation = students[best], evaluations[best]

    record = {
        "round": round_no,
        "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
        "label_studio": {
            "project_id": review.project_id,
            "task_ids": review.task_ids,
            "export": review.export,
            "skipped": review.skipped,
        },
        "mlflow": asdict(promotion),
        "counts": {
            "ingested": len(ingested.added) if ingested else 0,
            "quarantined": len(ingested.quarantined) if ingested else 0,
            "duplicates": len(ingested.duplicates) if ingested else 0,
            "sent_to_review": len(selection.review),
            "reviewed": review.reviewed,
            "pending_review": review.pending,
            "malformed_annotations": len(review.malformed),
            "auto_accepted": len(selection.auto_accepted),
            **review.click_counts(),
            "synthetic": synthetic.total,
            "synthetic_per_class": synthetic.per_class,
            "train_human": student.n_human,
            "train_pseudo": student.n_pseudo,
            "train_synthetic": student.n_synthetic,
            "test": evaluation.n_test,
        },
        "metrics": evaluation.metrics,
        "students": {
            s.name: {"metrics": e.metrics, "train_seconds": s.seconds}
            for s, e in zip(students, evaluations, strict=True)
        },
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
        "teacher": {"model_version": labels.model_version, "image_threshold": labels.image_threshold},
        "summary": (
            f"{len(selection.review)} sent to review, best student {student.name} "
            f"mIoU {evaluation.metrics.get('miou', 0.0):.3f}"
        ),
    }
    with clock.step("version"):
        record["step_seconds"] = clock.seconds  # everything but versioning itself
        version = version_round(settings, round_no, record)
    record["step_seconds"] = clock.seconds
    record["git"] = version
    get_run_logger().info("round %d done: %s", round_no, record["summary"])
    return record


if __name__ == "__main__":
    flywheel_round()
