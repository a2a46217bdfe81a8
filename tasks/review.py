"""Human review in Label Studio: send the selection (tasks/select.py), wait, take corrections back.

A round run from a deployment waits without a process: it registers its review with the relay of
``loom backend`` and suspends (loom/services/review_relay.py); a Label Studio webhook or the review's deadline
resumes it. A round run in-process (``loom round``, the demo) or as a subflow of the ``flywheel`` loop,
which Prefect cannot suspend, polls Label Studio instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import requests
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from loom.config import Settings
from loom.data import manifest, quarantine
from loom.data.human import human_mask_of
from loom.data.imageio import read_mask, write_mask
from loom.services import labelstudio
from loom.services.backend import read_interactions
from loom.services.review_relay import PendingReview, ReviewResumed, drop_pending
from models.teacher.types import anomaly_probability
from tasks.common import (
    ONCE_PER_ROUND,
    StepClock,
    class_names,
    load_manifest,
    pseudo_mask_path,
    save_manifest,
    task_logger,
)
from tasks.pseudo_label import PseudoLabels
from tasks.select import Selection

#: Label Studio calls are retried after 5, 10, 20 and 40 s: a server restarting (a minute) does not cost the
#: round its review; longer outages do (the round goes on without review, nothing is lost).
LABEL_STUDIO_RETRIES = 4
LABEL_STUDIO_BACKOFF = exponential_backoff(backoff_factor=5)


@dataclass
class Pushed:
    project_id: int
    task_ids: dict[str, int]  # image_id -> Label Studio task id
    refreshed: list[str] = field(default_factory=list)  # queued tasks given today's pre-annotation


@dataclass
class ReviewWait:
    """How the round waited for people and why it went on."""

    how: str  # suspended | polled | none (nothing to wait for)
    reason: str  # done | timeout | manual | nothing sent
    trigger: str = ""  # what resumed a suspended round: webhook | timer | sweep | ui
    annotated: int = 0
    total: int = 0
    waited_s: float = 0.0
    note: str = ""  # why a deployment run polled instead of suspending


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
    wait: ReviewWait | None = None
    refreshed: list[str] = field(default_factory=list)

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


@task(
    name="push-to-label-studio",
    retries=LABEL_STUDIO_RETRIES,
    retry_delay_seconds=LABEL_STUDIO_BACKOFF,
    cache_policy=ONCE_PER_ROUND,
    persist_result=True,
)
def push_for_review(settings: Settings, labels: PseudoLabels, selection: Selection) -> Pushed:
    """Create the project if missing and one task per selected image with the teacher's pre-annotation;
    tasks still queued from earlier rounds get today's pre-annotation."""
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
    refreshed = labelstudio.refresh_predictions(settings, project_id, items)
    task_ids = labelstudio.push_tasks(settings, project_id, items)
    task_logger().info("label studio project %d: %d tasks for review", project_id, len(task_ids))
    return Pushed(project_id, task_ids, refreshed)


@task(
    name="wait-for-review",
    retries=LABEL_STUDIO_RETRIES,
    retry_delay_seconds=LABEL_STUDIO_BACKOFF,
    cache_policy=NO_CACHE,
)
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


def wait_for_people(settings: Settings, pushed: Pushed, round_no: int) -> ReviewWait:
    """Suspend the round until its review is done or times out; poll where suspending is not possible."""
    ids = list(pushed.task_ids.values())
    if not ids:
        return ReviewWait("none", "nothing sent")
    key = f"review-round-{round_no:04d}"
    why_not = _suspend_unavailable()
    if not why_not and not _resumed_before(key):
        # Registered first, checked second: an annotation that lands in between is seen by one of them.
        why_not = _register_with_relay(settings, pushed, round_no)
        done, total = labelstudio.review_progress(settings, pushed.project_id, ids)
        if done == total:
            drop_pending(settings, str(flow_run.id))
            return ReviewWait("none", "done", annotated=done, total=total)
    if why_not:
        task_logger().info("the round waits for its review in this process: %s", why_not)
        started = time.monotonic()
        done = wait_for_review(settings, pushed.project_id, pushed.task_ids)
        return ReviewWait(
            "polled",
            "done" if done == len(ids) else "timeout",
            annotated=done,
            total=len(ids),
            waited_s=round(time.monotonic() - started, 1),
            note=why_not,
        )
    # The process exits here; the worker runs the flow again once the relay resumes it, and then
    # suspend_flow_run returns the relay's answer (the key has fired).
    answer = suspend_flow_run(wait_for_input=ReviewResumed, key=key)
    drop_pending(settings, str(flow_run.id))
    return ReviewWait("suspended", **answer.model_dump(include=set(ReviewResumed.model_fields)))


def _suspend_unavailable() -> str:
    """Why this flow run cannot be suspended (Prefect's own rules), or "" when it can."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.deployment_id is None:
        return "not a deployment run (Prefect suspends only those)"
    if run.parent_task_run_id is not None:
        return "a subflow (Prefect cannot suspend those)"
    return ""


def _resumed_before(key: str) -> bool:
    """This flow run was suspended with ``key`` and resumed: it is now being run again from the top."""
    from prefect.client.orchestration import get_client

    if not flow_run.id:
        return False
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
    return key in (run.empirical_policy.pause_keys or set())


def _register_with_relay(settings: Settings, pushed: Pushed, round_no: int) -> str:
    """Tell ``loom backend``'s relay what the round waits for; "" when it took it, else why not."""
    now = time.time()
    review = PendingReview(
        flow_run_id=str(flow_run.id),
        round_no=round_no,
        project_id=pushed.project_id,
        task_ids=list(pushed.task_ids.values()),
        deadline=now + settings.round.review_timeout_s,
        registered=now,
    )
    try:
        answer = requests.post(
            f"{settings.backend_url}/review/suspended",
            json=asdict(review),
            auth=(settings.backend_user, settings.backend_password),
            timeout=30,
        )
    except requests.RequestException as exc:
        return f"the ML backend at {settings.backend_url} is not answering ({exc}); `loom up` starts it"
    if not answer.ok:
        return (
            f"the ML backend at {settings.backend_url} refused the review "
            f"(HTTP {answer.status_code}: {answer.text[:200]})"
        )
    return ""


@task(
    name="pull-corrections",
    retries=LABEL_STUDIO_RETRIES,
    retry_delay_seconds=LABEL_STUDIO_BACKOFF,
    cache_policy=ONCE_PER_ROUND,
    persist_result=True,
)
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
    # Kept with the quarantine, beside data/ (loom/data/quarantine.py); the image stays in review.
    if malformed:
        where = quarantine.record_annotations(settings, project_id, malformed)
        for image_id, reason in malformed:
            log.warning(
                "annotation of image %s set aside: %s (kept in review; see %s)", image_id, reason, where
            )
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
            pushed = push_for_review(settings, labels, selection)
        with clock.step("wait_for_review"):
            wait = wait_for_people(settings, pushed, labels.round_no)
        with clock.step("pull_corrections"):
            outcome = pull_corrections(settings, pushed.project_id)
    except labelstudio.LabelStudioError as err:
        task_logger().error(
            "no review this round: %s; the %d selected images stay queued", err, len(selection.review)
        )
        return ReviewOutcome(None, reviewed=0, pending=len(selection.review), skipped=str(err))
    outcome.task_ids = pushed.task_ids
    outcome.wait = wait
    outcome.refreshed = pushed.refreshed
    return outcome
