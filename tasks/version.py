"""Claim the round, and version it at the end: its record plus its data in DVC, tagged `round-NNNN`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from loom import journal
from loom.config import Settings
from loom.services import versioning
from loom.services.versioning import next_round_number
from tasks.common import task_logger

#: How long a deployment run waits for the workspace while another round holds it (a UI trigger during
#: the nightly round, say) before it gives up with the holder's name; `loom round` does not wait.
DEPLOYMENT_LOCK_WAIT_S = 1800.0


@contextmanager
def claimed_round(settings: Settings) -> Iterator[journal.RoundJournal]:
    """Hold the workspace for one round and yield its journal: the round in progress, or a new one.

    A second round is refused while this one runs (a deployment run waits up to
    :data:`DEPLOYMENT_LOCK_WAIT_S` first), and while the round in progress is suspended for review.
    """
    run_id = str(flow_run.id) if flow_run.id else None
    wait_s = DEPLOYMENT_LOCK_WAIT_S if deployment.id else 0.0
    with journal.workspace_lock(settings, f"a round runs (flow run {run_id})", wait_s=wait_s):
        yield journal.claim(settings, next_round_number(settings), run_id, suspended_run(settings))


def suspended_run(settings: Settings) -> str | None:
    """The flow run of the round in progress if Prefect holds it suspended (waiting for review), else None."""
    current = journal.load(settings)
    if current is None or not current.flow_runs:
        return None
    last = current.flow_runs[-1]
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(last)).state
    except Exception as exc:  # another Prefect server, or none: the run cannot be waiting here
        task_logger().info("flow run %s of round %d not found (%s)", last, current.round_no, exc)
        return None
    return last if state is not None and state.is_paused() else None


def write_round_record(settings: Settings, round_no: int, record: dict[str, Any]) -> Path:
    path = settings.round_dir(round_no) / "round.json"
    journal.write_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


@task(name="version-round", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def version_round(settings: Settings, round_no: int, record: dict[str, Any]) -> dict[str, Any]:
    """Write rounds/NNNN/round.json, then `dvc add data` + git commit + `dvc push` + tag in one go.

    The record names the tag; the data hash lives in `data.dvc` in the same tagged commit, so
    `git checkout round-NNNN && dvc checkout` gives back exactly that round's data. A rerun after an
    interruption finishes the same commit and tag (:func:`loom.services.versioning.commit_round`).
    """
    done = versioning.tagged_version(settings, round_no)
    if done is not None:  # a rerun after a kill once the tag was made: the round is versioned as it is
        task_logger().info("round %d is versioned already: %s at %s", round_no, done.tag, done.commit)
        return {"tag": done.tag, "commit": done.commit, "data_md5": done.data_md5}
    versioning.init_repo(settings)
    record = {**record, "version": {"tag": f"round-{round_no:04d}", "data_file": "data.dvc"}}
    path = write_round_record(settings, round_no, record)
    journal.fault_point("version:recorded")
    version = versioning.commit_round(
        settings,
        round_no,
        paths_to_commit=[path],
        message=f"round {round_no:04d}: {record.get('summary', '')}",
    )
    task_logger().info(
        "data versioned: tag %s, commit %s, data md5 %s", version.tag, version.commit, version.data_md5
    )
    return {"tag": version.tag, "commit": version.commit, "data_md5": version.data_md5}
