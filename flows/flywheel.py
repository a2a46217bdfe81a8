"""One flywheel round as a Prefect flow: a readable sequence of task calls (see DESIGN.md, "One round")."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from loom import tracking
from loom.config import Settings, load_settings
from loom.plots import curve_points, round_curve
from tasks.augment import augment, log_generator
from tasks.clicker import fine_tune_round_clicker
from tasks.common import StepClock
from tasks.ingest import ingest
from tasks.pseudo_label import pseudo_label
from tasks.review import human_review
from tasks.select import auto_accept, select_for_review
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
    with clock.step("auto_accept"):
        accepted = auto_accept(settings, labels)
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
        "source": str(source) if source else None,
        "prefect_flow_run_id": str(flow_run.id) if flow_run.id else None,
        "label_studio": {
            "project_id": review.project_id,
            "task_ids": review.task_ids,
            "export": review.export,
            "skipped": review.skipped,
        },
        "mlflow": asdict(promotion),
        "promotion": promotion.decision(),  # the gate: challenger vs champion on this round's test split
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
        "summary": (
            f"{len(selection.review)} sent to review, best student {student.name} "
            f"mIoU {evaluation.metrics.get('miou', 0.0):.3f}"
        ),
    }
    log_round_curve(settings, promotion.run_id, [*round_records(settings), record])
    with clock.step("version"):
        record["step_seconds"] = clock.seconds  # everything but versioning itself
        version = version_round(settings, round_no, record)
    record["step_seconds"] = clock.seconds
    record["git"] = version
    get_run_logger().info("round %d done: %s", round_no, record["summary"])
    return record


def log_round_curve(settings: Settings, run_id: str, records: list[dict[str, Any]]) -> None:
    """The round curve so far (test mIoU against reviews, reviews per round) on the challenger's run."""
    tracking.log_figure(
        settings, run_id, round_curve({"this workspace": curve_points(records)}), "round_curve.png"
    )


def unprocessed_batches(settings: Settings, incoming: str | None) -> list[str]:
    """Sub-folders of ``incoming`` (in name order) that no recorded round has ingested yet."""
    if not incoming:
        return []
    folder = Path(incoming)
    if not folder.is_dir():
        raise FileNotFoundError(f"flywheel: incoming folder {folder} does not exist; point it at the batches")
    done = {record.get("source") for record in round_records(settings)}
    return [
        str(batch) for batch in sorted(p for p in folder.iterdir() if p.is_dir()) if str(batch) not in done
    ]


def round_records(settings: Settings) -> list[dict[str, Any]]:
    """Every round record of the workspace, in round order."""
    paths = sorted(settings.rounds_dir.glob("[0-9][0-9][0-9][0-9]/round.json"))
    return [json.loads(path.read_text()) for path in paths]


def stop_reason(
    records: list[dict[str, Any]],
    rounds_run: int,
    max_rounds: int,
    review_limit: int | None,
    target_miou: float | None,
    plateau_rounds: int,
) -> str | None:
    """Why the loop stops before another round, or None to go on.

    Args:
        records: the workspace's round records so far (all runs of the loop, in order).
        rounds_run: rounds this run of the loop has made.
        review_limit: stop once people have reviewed this many images in all.
        target_miou: stop once the champion reaches this test mIoU.
        plateau_rounds: stop when the last this many rounds promoted nothing (0: never).
    """
    if rounds_run >= max_rounds:
        return f"ran the {max_rounds} rounds asked for"
    reviewed = sum(int(r.get("counts", {}).get("reviewed", 0)) for r in records)
    if review_limit is not None and reviewed >= review_limit:
        return f"people reviewed {reviewed} images, the limit is {review_limit}"
    promoted = [r for r in records if r.get("mlflow", {}).get("promoted")]
    best = max((float(r.get("metrics", {}).get("miou", float("nan"))) for r in promoted), default=None)
    if target_miou is not None and best is not None and best >= target_miou:
        return f"the champion's test mIoU {best:.3f} reached the target {target_miou:.3f}"
    recent = records[-plateau_rounds:] if plateau_rounds > 0 else []
    if (
        plateau_rounds > 0
        and len(recent) == plateau_rounds
        and not any(r["mlflow"]["promoted"] for r in recent)
    ):
        return f"plateau: the last {plateau_rounds} rounds promoted no better model"
    return None


@flow(name="flywheel")
def flywheel(
    workspace: str | None = None,
    incoming: str | None = None,
    max_rounds: int = 6,
    review_limit: int | None = None,
    target_miou: float | None = None,
    plateau_rounds: int = 3,
    review_budget: int | None = None,
    review_timeout_s: float | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Turn the wheel: rounds (each a subflow run) until ``max_rounds``, a limit on people's reviews, a
    target champion mIoU, or a plateau. Each round ingests the next sub-folder of ``incoming`` that no round
    has taken yet (none left: the round re-labels and reviews what the workspace holds)."""
    settings = load_settings(workspace)
    log = get_run_logger()
    summaries = []
    while True:
        reason = stop_reason(
            round_records(settings), len(summaries), max_rounds, review_limit, target_miou, plateau_rounds
        )
        if reason:
            break
        batches = unprocessed_batches(settings, incoming)
        record = flywheel_round(
            workspace=str(settings.workspace),
            source=batches[0] if batches else None,
            review_budget=review_budget,
            review_timeout_s=review_timeout_s,
            epochs=epochs,
        )
        summaries.append({"round": record["round"], "summary": record["summary"]})
    log.info("flywheel stopped after %d rounds: %s", len(summaries), reason)
    return {"rounds": summaries, "stopped": reason}


if __name__ == "__main__":
    flywheel_round()
