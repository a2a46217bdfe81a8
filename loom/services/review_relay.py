"""The review relay: resumes a suspended round when people are done or its review time is up.

A round run from a deployment does not keep a worker busy while people review: it registers its review
here (``POST /review/suspended`` on ``loom backend``) and suspends itself with Prefect's
``suspend_flow_run``; its process exits. The relay, inside ``loom backend``, then resumes that flow run
with a typed input (:class:`ReviewResumed`):

- on a Label Studio webhook (an annotation created or updated) once every task of the review has a
  submitted annotation: ``reason="done"``, ``trigger="webhook"``;
- at the review's deadline, by a timer armed at registration: ``reason="timeout"``;
- from a sweep at the backend's start and every ``review_relay_poll_s``, for webhooks missed while the
  backend was down (``trigger="sweep"``).

Prefect reschedules a resumed run; the worker runs the flow again from the top, its finished tasks come
back from their persisted results, and ``suspend_flow_run`` returns the input. Pending reviews are kept as
one JSON file per flow run under ``stack/backend/suspended/`` so a restarted backend picks them up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.input import RunInput

from loom.config import Settings
from loom.journal import write_atomic

logger = logging.getLogger(__name__)

#: How long the relay waits for a round that registered its review to reach the Suspended state (the
#: last annotation can land between the round's registration and its suspension).
SUSPEND_WAIT_S = 60.0


class ReviewResumed(RunInput):
    """What a suspended round is resumed with (also the form shown when resuming it from Prefect's UI)."""

    reason: str = "manual"  # done | timeout | manual
    trigger: str = "ui"  # webhook | timer | sweep | ui
    annotated: int = 0
    total: int = 0
    waited_s: float = 0.0  # from the round's registration to its resumption


@dataclass(frozen=True)
class PendingReview:
    """A round waiting for people: its flow run, Label Studio tasks and deadline (unix seconds)."""

    flow_run_id: str
    round_no: int
    project_id: int
    task_ids: list[int]
    deadline: float
    registered: float = 0.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PendingReview:
        try:
            review = cls(
                flow_run_id=str(UUID(str(raw["flow_run_id"]))),
                round_no=int(raw["round_no"]),
                project_id=int(raw["project_id"]),
                task_ids=[int(t) for t in raw["task_ids"]],
                deadline=float(raw["deadline"]),
                registered=float(raw.get("registered") or time.time()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"a pending review needs flow_run_id (UUID), round_no, project_id, task_ids and "
                f"deadline: {exc}"
            ) from exc
        if not review.task_ids:
            raise ValueError("a pending review needs at least one task id")
        return review


def pending_dir(settings: Settings) -> Path:
    return settings.backend_dir / "suspended"


def save_pending(settings: Settings, review: PendingReview) -> Path:
    """Write the review's file atomically (a crash never leaves half a file for the next start)."""
    folder = pending_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{review.flow_run_id}.json"
    write_atomic(path, json.dumps(asdict(review)))
    return path


def drop_pending(settings: Settings, flow_run_id: str) -> None:
    (pending_dir(settings) / f"{flow_run_id}.json").unlink(missing_ok=True)


def load_pending(settings: Settings) -> list[PendingReview]:
    """Every pending review; an unreadable file is moved aside with a ``.bad`` suffix and logged."""
    reviews = []
    for path in sorted(pending_dir(settings).glob("*.json")):
        try:
            reviews.append(PendingReview.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            logger.error("pending review %s is unreadable (%s): moved aside as %s.bad", path, exc, path.name)
            path.replace(path.with_name(path.name + ".bad"))
    return reviews


# A review's progress, (annotated, total): Label Studio's count unless a caller gives another.
Progress = Callable[[PendingReview], tuple[int, int]]


class ReviewRelay:
    """Resumes suspended rounds; thread-safe (webhooks, timers and the sweep run on their own threads)."""

    def __init__(
        self,
        settings: Settings,
        progress: Progress | None = None,
        record: Callable[[dict], None] | None = None,
    ) -> None:
        self.settings = settings
        self._progress = progress or self._label_studio_progress
        self._record = record or (lambda entry: None)
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}
        self._stop = threading.Event()

    # -- entry points ------------------------------------------------------------------------------

    def register(self, review: PendingReview) -> None:
        """A round is about to suspend: keep its review and arm the deadline's timer."""
        save_pending(self.settings, review)
        self._arm(review)
        logger.info(
            "round %d (flow run %s) waits for %d tasks of project %d until %s",
            review.round_no,
            review.flow_run_id,
            len(review.task_ids),
            review.project_id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(review.deadline)),
        )

    def on_annotation(self, project_id: int | None) -> None:
        """A webhook: resume every review of that project whose tasks are now all annotated."""
        for review in load_pending(self.settings):
            if project_id is None or review.project_id == project_id:
                self._check(review, trigger="webhook", deadline_passed=False)

    def sweep(self) -> None:
        """Resume what is done or overdue (webhooks missed while the backend was down); arm the rest."""
        for review in load_pending(self.settings):
            overdue = time.time() >= review.deadline
            self._check(review, trigger="sweep", deadline_passed=overdue)
            if not overdue:
                self._arm(review)

    def start(self, poll_s: float) -> threading.Thread:
        """The sweep at start and every ``poll_s`` seconds, on a daemon thread."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.sweep()
                except Exception:  # the relay must outlive a bad sweep; the next one tries again
                    logger.exception("review relay sweep failed")
                self._stop.wait(poll_s)

        thread = threading.Thread(target=loop, name="review-relay", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    # -- internals --------------------------------------------------------------------------------

    def _arm(self, review: PendingReview) -> None:
        with self._lock:
            if review.flow_run_id in self._timers:
                return
            delay = max(0.0, review.deadline - time.time())
            timer = threading.Timer(delay, self._on_deadline, args=(review.flow_run_id,))
            timer.daemon = True
            self._timers[review.flow_run_id] = timer
            timer.start()

    def _on_deadline(self, flow_run_id: str) -> None:
        with self._lock:
            self._timers.pop(flow_run_id, None)
        for review in load_pending(self.settings):
            if review.flow_run_id == flow_run_id:
                self._check(review, trigger="timer", deadline_passed=True)

    def _check(self, review: PendingReview, trigger: str, deadline_passed: bool) -> None:
        try:
            annotated, total = self._progress(review)
        except Exception as exc:
            if not deadline_passed:
                logger.warning("review of round %d: progress unknown (%s)", review.round_no, exc)
                return
            annotated, total = -1, len(review.task_ids)  # the deadline holds even if Label Studio is down
        done = annotated >= total
        if not done and not deadline_passed:
            return
        answer = ReviewResumed(
            reason="done" if done else "timeout",
            trigger=trigger,
            annotated=max(annotated, 0),
            total=total,
            waited_s=round(time.time() - review.registered, 1),
        )
        try:
            self._resume(review, answer)
        except Exception:  # Prefect unreachable: the review stays pending for the next trigger or sweep
            logger.exception("could not resume round %d (flow run %s)", review.round_no, review.flow_run_id)

    def _resume(self, review: PendingReview, answer: ReviewResumed) -> None:
        from prefect.client.orchestration import get_client
        from prefect.flow_runs import resume_flow_run

        with self._lock:  # one resume per review, whichever trigger comes first
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(review.flow_run_id)).state
                waited = time.monotonic()
                # Registered but not suspended yet: the round is on its way there.
                while state and state.is_running() and time.monotonic() - waited < SUSPEND_WAIT_S:
                    time.sleep(0.5)
                    state = client.read_flow_run(UUID(review.flow_run_id)).state
            if state is None or not state.is_paused():
                if state is not None and state.is_final():
                    drop_pending(self.settings, review.flow_run_id)
                logger.info(
                    "round %d (flow run %s) is %s, not suspended: nothing to resume",
                    review.round_no,
                    review.flow_run_id,
                    state.name if state else "unknown",
                )
                return
            resume_flow_run(UUID(review.flow_run_id), run_input=answer.model_dump())
            drop_pending(self.settings, review.flow_run_id)
            timer = self._timers.pop(review.flow_run_id, None)
        if timer is not None:
            timer.cancel()
        entry = {"action": "review_resumed", "flow_run": review.flow_run_id, "round": review.round_no}
        self._record({**entry, **answer.model_dump()})
        logger.info(
            "resumed round %d (flow run %s): %s by %s, %d of %d tasks annotated",
            review.round_no,
            review.flow_run_id,
            answer.reason,
            answer.trigger,
            answer.annotated,
            answer.total,
        )

    def _label_studio_progress(self, review: PendingReview) -> tuple[int, int]:
        from loom.services import labelstudio

        return labelstudio.review_progress(self.settings, review.project_id, review.task_ids)
