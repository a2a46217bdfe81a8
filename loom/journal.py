"""A round in progress: one at a time per workspace, and finished under its own number after a kill.

A round claims its number at start in ``rounds/in-progress.json`` (the journal): the number, a random
claim id, the flow runs that worked on it, the steps reached and the ids it created in other services.
A rerun after a kill (``loom round --resume`` or a plain ``loom round``) finds the journal and finishes
the same round: steps already done come back from their persisted results, which are keyed by the claim
(:mod:`tasks.common`), and every side effect is looked up before it is made again (Label Studio tasks by
image id, MLflow runs and versions by round and student, git and DVC by the round's tag). The journal is
removed only once the round is versioned and its champion published.

One round at a time: the round holds an exclusive ``flock`` on ``stack/round.lock`` while it runs. The
kernel drops the lock with the process, so a killed round never leaves a stale lock behind. A round
suspended for review holds no process and no lock; its journal names its flow run, and a second round is
refused while that run waits (:func:`claim`).

``LOOM_KILL_AT=<step>:<start|done>`` makes the round's process kill itself (SIGKILL) when it reaches that
point, ``LOOM_STOP_AT`` stop itself (SIGSTOP): the reliability tests use them to cut a round exactly at a
step boundary or inside a step (:func:`fault_point`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loom.config import Settings

logger = logging.getLogger(__name__)

JOURNAL_NAME = "in-progress.json"
LOCK_NAME = "round.lock"
KILL_AT_ENV = "LOOM_KILL_AT"
STOP_AT_ENV = "LOOM_STOP_AT"


class RoundBusy(RuntimeError):
    """Another round holds the workspace (running, or suspended for review); the message says which."""


@dataclass
class RoundJournal:
    round_no: int
    claim: str  # random id of this round's attempt series: the key of its persisted step results
    started_at: float
    flow_runs: list[str] = field(default_factory=list)  # every flow run that worked on the round, in order
    steps: dict[str, str] = field(default_factory=dict)  # step -> started | done
    ids: dict[str, Any] = field(default_factory=dict)  # what the round created elsewhere (for people)

    @property
    def reached(self) -> str:
        """The last step started, or 'claimed'."""
        return next(reversed(self.steps), "claimed")

    @property
    def attempts(self) -> int:
        return len(self.flow_runs)


def journal_path(settings: Settings) -> Path:
    return settings.rounds_dir / JOURNAL_NAME


def lock_path(settings: Settings) -> Path:
    return settings.stack_dir / LOCK_NAME


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def load(settings: Settings) -> RoundJournal | None:
    """The round in progress, or None when the last round finished (or none ever started)."""
    path = journal_path(settings)
    if not path.exists():
        return None
    try:
        return RoundJournal(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise RoundBusy(
            f"the round journal {path} is unreadable ({exc}); it names the round in progress. Look at it, "
            "then delete it to start a new round number (the unfinished round's data stays unversioned)"
        ) from exc


def save(settings: Settings, journal: RoundJournal) -> None:
    write_atomic(journal_path(settings), json.dumps(asdict(journal), indent=2) + "\n")


def finish(settings: Settings, round_no: int) -> None:
    """The round is versioned and published: nothing is in progress any more."""
    current = load(settings)
    if current is not None and current.round_no == round_no:
        journal_path(settings).unlink(missing_ok=True)


# ---- one round at a time ----------------------------------------------------------------------------


@contextmanager
def workspace_lock(settings: Settings, holder: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the workspace's round lock for the block, or raise :class:`RoundBusy` naming who holds it.

    Args:
        holder: who takes it, for the message a second round gets (e.g. "a round runs (flow run ...)").
        wait_s: how long to wait for the holder to finish before giving up (0: refuse at once).
    """
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(settings, fd, wait_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(settings: Settings, fd: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process holds it"
            if time.monotonic() >= deadline:
                raise RoundBusy(
                    f"workspace {settings.workspace} is busy: {owner}. One round at a time: wait for it to "
                    "finish (`loom status` shows it) and trigger again"
                ) from exc
            logger.info("workspace busy (%s): waiting", owner)
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def claim(
    settings: Settings, next_round: int, flow_run_id: str | None, waiting_run: str | None = None
) -> RoundJournal:
    """The round this run works on: the one in progress if any (a resume), else ``next_round``, claimed.

    Call it holding :func:`workspace_lock`.

    Args:
        next_round: the number a new round gets.
        flow_run_id: this run's Prefect flow run id (None outside Prefect).
        waiting_run: the flow run of the journal's round when it is suspended for review right now (the
            caller asks Prefect); a different run is then refused: that round resumes on its own.
    """
    journal = load(settings)
    if journal is None:
        journal = RoundJournal(round_no=next_round, claim=uuid.uuid4().hex, started_at=time.time())
        logger.info("round %d claimed (workspace %s)", journal.round_no, settings.workspace)
    elif waiting_run is not None and waiting_run != flow_run_id:
        raise RoundBusy(
            f"round {journal.round_no} of {settings.workspace} is suspended waiting for review (flow run "
            f"{waiting_run}); it resumes when people finish or at its deadline. Resume it now from "
            "Prefect's UI or with `loom round --resume`"
        )
    else:
        logger.warning(
            "round %d was not finished (reached %s, %d earlier runs): finishing it under the same number",
            journal.round_no,
            journal.reached,
            journal.attempts,
        )
    if flow_run_id and flow_run_id not in journal.flow_runs:
        journal.flow_runs.append(flow_run_id)
    save(settings, journal)
    return journal


# ---- steps -------------------------------------------------------------------------------------------


def mark(settings: Settings, step: str, phase: str, **ids: Any) -> None:
    """Note that the round in progress has started or done ``step``, with ids it created there."""
    journal = load(settings)
    if journal is not None:
        journal.steps.pop(step, None)  # keep the order of the latest pass
        journal.steps[step] = phase
        journal.ids.update(ids)
        save(settings, journal)
    fault_point(f"{step}:{phase}")


def note(settings: Settings, **ids: Any) -> None:
    """Add ids the round in progress created in other services (Label Studio tasks, MLflow runs, commits),
    so a person looking at an interrupted round sees what it left where."""
    journal = load(settings)
    if journal is not None:
        journal.ids.update(ids)
        save(settings, journal)


def fault_point(name: str) -> None:
    """Fault injection for the reliability tests, at a named point of the round.

    ``LOOM_KILL_AT=name`` SIGKILLs this process there (kill -9 at a known point); ``LOOM_STOP_AT=name``
    SIGSTOPs it, so a test can break a service under it (stop Label Studio, kill MLflow) and SIGCONT it.
    """
    for variable, sig in ((KILL_AT_ENV, signal.SIGKILL), (STOP_AT_ENV, signal.SIGSTOP)):
        if os.environ.get(variable) == name:
            logger.warning(
                "%s=%s: sending %s to this round's process (pid %d)", variable, name, sig.name, os.getpid()
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), sig)
