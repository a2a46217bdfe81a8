"""The wheel turning: rounds one after another until a stop rule (deployment `flywheel/until-plateau`).

Each round is a subflow run of this one. Prefect cannot suspend subflows, so these rounds wait for their
review by polling Label Studio (tasks/review.py), unlike a round run from its own deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.flywheel import flywheel_round, round_records
from loom.config import Settings, load_settings


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
        and not any(r.get("mlflow", {}).get("promoted") for r in recent)
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
