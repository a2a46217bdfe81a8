"""Version the round: its record plus its data in DVC, tagged `round-NNNN` in the workspace's git."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import versioning
from loom.config import Settings
from tasks.common import task_logger


def next_round_number(settings: Settings) -> int:
    """One more than the highest round recorded in the workspace."""
    done = [
        int(p.name) for p in settings.rounds_dir.glob("[0-9][0-9][0-9][0-9]") if (p / "round.json").exists()
    ]
    return max(done, default=0) + 1


def write_round_record(settings: Settings, round_no: int, record: dict[str, Any]) -> Path:
    path = settings.round_dir(round_no) / "round.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


@task(name="version-round", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def version_round(settings: Settings, round_no: int, record: dict[str, Any]) -> dict[str, Any]:
    """Write rounds/NNNN/round.json, then `dvc add data` + git commit + tag + `dvc push` in one go.

    The record names the tag; the data hash lives in `data.dvc` in the same tagged commit, so
    `git checkout round-NNNN && dvc checkout` gives back exactly that round's data.
    """
    versioning.init_repo(settings)
    record = {**record, "version": {"tag": f"round-{round_no:04d}", "data_file": "data.dvc"}}
    path = write_round_record(settings, round_no, record)
    version = versioning.version_round(
        settings,
        round_no,
        paths_to_commit=[path],
        message=f"round {round_no:04d}: {record.get('summary', '')}",
    )
    task_logger().info(
        "data versioned: tag %s, commit %s, data md5 %s", version.tag, version.commit, version.data_md5
    )
    return {"tag": version.tag, "commit": version.commit, "data_md5": version.data_md5}
