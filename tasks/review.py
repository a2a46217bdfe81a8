"""Human review in Label Studio: send the selection (tasks/select.py), wait, take corrections back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import labelstudio, manifest
from loom.backend import read_interactions
from loom.config import Settings
from loom.imageio import read_mask, write_mask
from models.teacher.types import anomaly_probability
from tasks.common import (
    StepClock,
    class_names,
    human_mask_of,
    load_manifest,
    pseudo_mask_path,
    save_manifest,
    task_logger,
)
from tasks.pseudo_label import PseudoLabels
from tasks.select import Selection


@dataclass
class ReviewOutcome:
    project_id: int | None
    reviewed: int  # newly reviewed this round (annotations re-read from earlier rounds are not counted)
    pending: int
    malformed: list[tuple[str, str]] = field(default_factory=list)
    export: list[dict] = field(default_factory=list)  # who annotated what, when: kept in the round record
    task_ids: dict[str, int] = field(default_factory=dict)
    skipped: str = ""  # why there was no review this round (Label Studio unreachable), else empty
    clicks: dict[str, int] = field(default_factory=dict)  # image_id -> smart key points, new reviews
    painted: dict[str, int] = field(default_factory=dict)  # image_id -> regions drawn by hand, new reviews

    def click_counts(self) -> dict[str, float | int]:
        """Clicks per reviewed image and how many images needed painting, for the round record."""
        reviewed = len(self.clicks)
        return {
            "clicks": int(sum(self.clicks.values())),
            "clicks_per_reviewed": float(np.mean(list(self.clicks.values()))) if reviewed else 0.0,
            "painted_images": int(sum(1 for n in self.painted.values() if n > 0)),
            "painted_regions": int(sum(self.painted.values())),
        }


def defect_probability(score: float, image_threshold: float) -> float:
    """The teacher's raw image score as a probability that the image is defective, 0.5 at its threshold."""
    return float(anomaly_probability(np.array([score], dtype=np.float32), image_threshold)[0])


@task(name="push-to-label-studio", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def push_for_review(
    settings: Settings, labels: PseudoLabels, selection: Selection
) -> tuple[int, dict[str, int]]:
    """Create the project if missing and one task per selected image with the teacher's pre-annotation."""
    project_id = labelstudio.ensure_project(settings)
    df = load_manifest(settings).set_index("image_id")
    items = []
    for image_id in selection.review:
        row = df.loc[image_id]
        hw = (int(row["height"]), int(row["width"]))
        mask = read_mask(pseudo_mask_path(settings, labels.round_no, image_id), len(settings.classes), hw)
        items.append(
            labelstudio.TaskItem(
                image_id=image_id,
                mask=mask,
                score=defect_probability(float(row["score"]), labels.image_threshold),
                model_version=labels.model_version,
                round_no=labels.round_no,
            )
        )
    task_ids = labelstudio.push_tasks(settings, project_id, items)
    task_logger().info("label studio project %d: %d tasks for review", project_id, len(task_ids))
    return project_id, task_ids


@task(name="wait-for-review", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def wait_for_review(
    settings: Settings, project_id: int, task_ids: dict[str, int], poll_s: float = 2.0
) -> int:
    """Poll Label Studio until every task is annotated or the review timeout passes; return how many are done.

    A timeout is not a failure: the round goes on with what people finished, the rest stays queued
    for the next round.
    """
    log = task_logger()
    deadline = time.monotonic() + settings.round.review_timeout_s
    ids = list(task_ids.values())
    done, total = labelstudio.review_progress(settings, project_id, ids)
    while done < total and time.monotonic() < deadline:
        time.sleep(poll_s)
        done, total = labelstudio.review_progress(settings, project_id, ids)
    if done < total:
        log.warning("review timeout: %d of %d tasks annotated; the rest stays queued", done, total)
    else:
        log.info("all %d review tasks annotated", total)
    return done


@task(name="pull-corrections", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def pull_corrections(settings: Settings, project_id: int) -> ReviewOutcome:
    """Turn the latest annotation of each task into a human class mask; a malformed one is set aside."""
    log = task_logger()
    df = load_manifest(settings)
    usable = manifest.usable(df)
    sizes = {r.image_id: (int(r.height), int(r.width)) for r in usable.itertuples()}
    pulled, malformed = labelstudio.pull_annotations(settings, project_id, sizes)
    already = set(df.loc[df["review_state"] == "reviewed", "image_id"])
    new = [ann for ann in pulled if ann.image_id not in already]
    # Key points the ML backend answered for these tasks (its own record of every interactive request).
    keypoints: dict[int, int] = {}
    for row in read_interactions(settings, {ann.task_id for ann in new}):
        keypoints[row["task"]] = keypoints.get(row["task"], 0) + int(row.get("new_keypoints", 1))
    for ann in pulled:
        mask = ann.mask.astype(np.uint8)
        # Earlier rounds' annotations come back every round: rewrite only the masks people changed.
        unchanged = ann.image_id in already and np.array_equal(
            human_mask_of(settings, ann.image_id, mask.shape), mask
        )
        if not unchanged:
            write_mask(settings.masks_dir / f"{ann.image_id}.png", mask)
    reviewed = pd.DataFrame(
        {
            "image_id": [ann.image_id for ann in pulled],
            "label_source": "human",
            "review_state": "reviewed",
            "classes": [class_names(ann.mask, settings.classes) for ann in pulled],
        }
    )
    df = manifest.update_rows(df, reviewed)
    if malformed:
        reasons = settings.quarantine_dir / "annotations.csv"
        reasons.parent.mkdir(parents=True, exist_ok=True)
        with reasons.open("a") as f:
            for image_id, reason in malformed:
                f.write(f"{image_id},{project_id},{reason!r}\n")
                log.warning("annotation of image %s set aside: %s (kept in review)", image_id, reason)
    save_manifest(settings, df)
    pending = int((df["review_state"] == "queued").sum())
    export = [
        {
            "image_id": a.image_id,
            "task_id": a.task_id,
            "annotation_id": a.annotation_id,
            "completed_by": a.completed_by,
            "updated_at": str(a.updated_at),
            "lead_time": a.lead_time,
            "hand_drawn": a.hand_drawn,
        }
        for a in pulled
    ]
    return ReviewOutcome(
        project_id,
        reviewed=len(new),
        pending=pending,
        malformed=malformed,
        export=export,
        clicks={a.image_id: keypoints.get(a.task_id, 0) for a in new},
        painted={a.image_id: a.hand_drawn for a in new},
    )


def human_review(
    settings: Settings, labels: PseudoLabels, selection: Selection, clock: StepClock
) -> ReviewOutcome:
    """Push the selection to Label Studio, wait for people, pull their corrections back.

    Label Studio being down must not cost the night's round: after the I/O retries the round goes on
    without new reviews (trained on the labels it has), the selected images stay queued for the next
    round, and the record says why.
    """
    try:
        with clock.step("push_to_label_studio"):
            project_id, task_ids = push_for_review(settings, labels, selection)
        with clock.step("wait_for_review"):
            wait_for_review(settings, project_id, task_ids)
        with clock.step("pull_corrections"):
            outcome = pull_corrections(settings, project_id)
    except labelstudio.LabelStudioError as err:
        task_logger().error(
            "no review this round: %s; the %d selected images stay queued", err, len(selection.review)
        )
        return ReviewOutcome(None, reviewed=0, pending=len(selection.review), skipped=str(err))
    outcome.task_ids = task_ids
    return outcome
