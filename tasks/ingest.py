"""Ingest: new images into the workspace (content-hash ids, dedupe, quarantine)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from loom.config import Settings
from loom.data.ingest import IngestReport, ingest_folder
from tasks.common import ONCE_PER_ROUND


@task(name="ingest", cache_policy=ONCE_PER_ROUND, persist_result=True)
def ingest(settings: Settings, source: str | None, round_no: int) -> IngestReport | None:
    """Copy new images from ``source`` into ``data/``; bad files are quarantined with a reason, never lost."""
    if not source:
        return None
    src = Path(source)
    if not src.is_dir():
        raise FileNotFoundError(
            f"ingest: source folder {src} does not exist; pass an existing folder of images"
        )
    return ingest_folder(settings, src, round_no=round_no)
