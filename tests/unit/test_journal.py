"""The round journal: one round at a time per workspace, and an interrupted round keeps its number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from loom import journal
from loom.config import Settings
from loom.services.versioning import next_round_number


def test_a_new_round_is_claimed_and_an_interrupted_one_is_taken_up_again(settings: Settings) -> None:
    first = journal.claim(settings, next_round_number(settings), "run-a")
    assert (first.round_no, first.flow_runs, first.reached) == (1, ["run-a"], "claimed")
    journal.mark(settings, "ingest", "start")
    journal.mark(settings, "ingest", "done", project_id=7)
    journal.mark(settings, "train", "start")
    journal.note(settings, mlflow_runs={"fpn": {"run_id": "r1"}})

    assert next_round_number(settings) == 1  # the round in progress, not the next one
    again = journal.claim(settings, 99, "run-b")
    assert again.round_no == 1 and again.claim == first.claim
    assert again.flow_runs == ["run-a", "run-b"] and again.reached == "train"
    assert again.steps == {"ingest": "done", "train": "start"}
    assert again.ids == {"project_id": 7, "mlflow_runs": {"fpn": {"run_id": "r1"}}}

    journal.finish(settings, 1)
    assert journal.load(settings) is None
    assert journal.claim(settings, 2, "run-c").claim != first.claim


def test_a_round_suspended_for_review_refuses_another_run_but_not_its_own(settings: Settings) -> None:
    journal.claim(settings, 1, "run-a")
    with pytest.raises(journal.RoundBusy, match=r"suspended waiting for review.*run-a"):
        journal.claim(settings, 1, "run-b", waiting_run="run-a")
    resumed = journal.claim(settings, 1, "run-a", waiting_run="run-a")  # Prefect resumed it
    assert resumed.flow_runs == ["run-a"]


def test_an_unreadable_journal_is_named_with_what_to_do(settings: Settings) -> None:
    journal.journal_path(settings).parent.mkdir(parents=True)
    journal.journal_path(settings).write_text("{not json")
    with pytest.raises(journal.RoundBusy, match=r"in-progress\.json is unreadable.*delete it"):
        journal.load(settings)


def test_a_second_holder_is_refused_with_the_first_ones_name(settings: Settings) -> None:
    busy = pytest.raises(journal.RoundBusy, match=r"busy: round 3 \(flow run abc\) \(pid \d+")
    first = journal.workspace_lock(settings, "round 3 (flow run abc)")
    with first, busy, journal.workspace_lock(settings, "round 4"):
        pass
    with journal.workspace_lock(settings, "round 4"):  # free again once the first is done
        pass


def test_a_waiting_holder_gets_the_lock_when_the_first_lets_go(settings: Settings) -> None:
    import threading

    got = threading.Event()
    with journal.workspace_lock(settings, "first"):

        def second() -> None:
            with journal.workspace_lock(settings, "second", wait_s=10):
                got.set()

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert not got.is_set()
    thread.join(timeout=10)
    assert got.is_set()


def _python(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env}, stdout=subprocess.PIPE
    )


def test_a_killed_holder_leaves_no_stale_lock(settings: Settings) -> None:
    """The kernel drops an flock with its process: kill -9 of a round never blocks the next one."""
    holder = _python(
        f"""
        import sys, time
        from loom import journal
        from loom.config import load_settings
        with journal.workspace_lock(load_settings({str(settings.workspace)!r}), "doomed round"):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    assert holder.stdout.readline().strip() == b"held"
    refused = pytest.raises(journal.RoundBusy, match="doomed round")
    with refused, journal.workspace_lock(settings, "next round"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with journal.workspace_lock(settings, "next round"):
        assert journal.lock_path(settings).read_text().startswith("next round")


def test_kill_at_kills_the_process_at_that_point_only(settings: Settings) -> None:
    code = f"""
        from loom import journal
        from loom.config import load_settings
        settings = load_settings({str(settings.workspace)!r})
        journal.claim(settings, 1, None)
        journal.mark(settings, "ingest", "done")
        print("passed ingest", flush=True)
        journal.mark(settings, "train", "start")
        print("passed train", flush=True)
        """
    run = _python(code, **{journal.KILL_AT_ENV: "train:start"})
    out, _ = run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL and out.decode().split() == ["passed", "ingest"]
    assert journal.load(settings).steps == {"ingest": "done", "train": "start"}


def test_atomic_writes_never_leave_a_partial_file(settings: Settings) -> None:
    path = settings.workspace / "rounds" / "x.json"
    journal.write_atomic(path, "one")
    journal.write_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_resume_without_a_round_in_progress_says_so(settings: Settings) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    result = CliRunner().invoke(app, ["round", "--workspace", str(settings.workspace), "--resume"])
    assert result.exit_code == 2
    assert "no round is in progress" in result.output and "nothing to resume" in result.output
