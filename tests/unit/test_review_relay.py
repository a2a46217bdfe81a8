"""The review relay's records and its rule for when a suspended round is resumed (no servers)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from loom.services.review_relay import (
    PendingReview,
    ReviewRelay,
    ReviewResumed,
    load_pending,
    pending_dir,
    save_pending,
)


def _review(deadline_in_s: float, tasks: int = 3) -> PendingReview:
    now = time.time()
    return PendingReview(str(uuid.uuid4()), 7, 1, list(range(10, 10 + tasks)), now + deadline_in_s, now)


class RecordingRelay(ReviewRelay):
    """The relay with Label Studio's progress given and the Prefect resume call recorded."""

    def __init__(self, settings, annotated: int) -> None:
        super().__init__(settings, progress=lambda review: (annotated, len(review.task_ids)))
        self.resumed: list[tuple[str, ReviewResumed]] = []

    def _resume(self, review: PendingReview, answer: ReviewResumed) -> None:
        self.resumed.append((review.flow_run_id, answer))


def test_pending_reviews_survive_a_restart_and_a_bad_file_is_set_aside(settings) -> None:
    review = _review(60)
    save_pending(settings, review)
    (pending_dir(settings) / "broken.json").write_text('{"flow_run_id": "not-a-uuid"}')
    assert load_pending(settings) == [review]
    assert (pending_dir(settings) / "broken.json.bad").exists()
    assert json.loads((pending_dir(settings) / f"{review.flow_run_id}.json").read_text())["round_no"] == 7


@pytest.mark.parametrize("raw", [{}, {"flow_run_id": str(uuid.uuid4()), "round_no": 1}, {"task_ids": []}])
def test_a_malformed_registration_is_refused_with_what_it_needs(raw) -> None:
    with pytest.raises(ValueError, match="pending review needs"):
        PendingReview.from_dict(raw)


def test_a_webhook_resumes_only_when_every_task_is_annotated(settings) -> None:
    review = _review(60)
    save_pending(settings, review)
    partly = RecordingRelay(settings, annotated=2)
    partly.on_annotation(review.project_id)
    assert partly.resumed == []

    done = RecordingRelay(settings, annotated=3)
    done.on_annotation(review.project_id + 1)  # another project's webhook
    assert done.resumed == []
    done.on_annotation(review.project_id)
    ((flow_run_id, answer),) = done.resumed
    assert flow_run_id == review.flow_run_id
    assert (answer.reason, answer.trigger, answer.annotated, answer.total) == ("done", "webhook", 3, 3)


def test_the_deadline_resumes_an_unfinished_review(settings) -> None:
    review = _review(0.2)
    relay = RecordingRelay(settings, annotated=1)
    relay.register(review)
    time.sleep(0.6)
    ((_, answer),) = relay.resumed
    assert (answer.reason, answer.trigger, answer.annotated) == ("timeout", "timer", 1)
    assert answer.waited_s >= 0.2
    relay.stop()


def test_a_sweep_resumes_what_was_missed_and_arms_the_rest(settings) -> None:
    overdue, later = _review(-5), _review(3600)
    save_pending(settings, overdue)
    save_pending(settings, later)
    relay = RecordingRelay(settings, annotated=0)
    relay.sweep()
    assert [(run, a.reason, a.trigger) for run, a in relay.resumed] == [
        (overdue.flow_run_id, "timeout", "sweep")
    ]
    assert later.flow_run_id in relay._timers
    relay.stop()


def test_loom_status_names_the_suspended_rounds(settings) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    overdue, waiting = _review(-5), _review(1800)
    save_pending(settings, overdue)
    save_pending(settings, waiting)
    result = CliRunner(env={"COLUMNS": "240"}).invoke(app, ["status", "--workspace", str(settings.workspace)])
    assert result.exit_code == 0, result.output
    assert f"flow run {waiting.flow_run_id}) is suspended for review: 3 tasks in project 1" in result.output
    assert "resumed in 30 min at the latest" in result.output
    assert f"flow run {overdue.flow_run_id}) is suspended" in result.output and "overdue" in result.output


def test_a_failed_resume_keeps_the_review_for_the_next_try(settings) -> None:
    class UnreachablePrefect(RecordingRelay):
        def _resume(self, review: PendingReview, answer: ReviewResumed) -> None:
            raise ConnectionError("Prefect at 127.0.0.1:4200 refused the connection")

    review = _review(60)
    save_pending(settings, review)
    UnreachablePrefect(settings, annotated=3).on_annotation(review.project_id)  # logged, not raised
    assert load_pending(settings) == [review]
    retry = RecordingRelay(settings, annotated=3)
    retry.sweep()
    assert [run for run, _ in retry.resumed] == [review.flow_run_id]
    retry.stop()
