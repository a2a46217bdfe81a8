"""The quarantine: input Loom cannot use, kept with its reason beside the data, not in it.

Layout, in the workspace (``Settings.quarantine_dir``; git-ignored, not tracked by DVC)::

    quarantine/
      <sha256[:12]>_<name>   the bytes of each bad file as found (a symbolic link's target is never read)
      reasons.csv            file, image_id, reason, round: one line per file set aside by ingest
                             (image_id empty when it was set aside unread: a link out of the source folder,
                             a named pipe)
      annotations.csv        image_id, project_id, reason: Label Studio annotations set aside by
                             ``pull_corrections`` (they stay in review; Label Studio keeps the annotation)

Why outside ``data/``: ``data/`` is what DVC versions and pushes every round. Bad files are not training data,
and a camera share that keeps dropping broken frames would grow the DVC remote with them round after round.
The manifest row of each bad file keeps its reason (and a path ``../quarantine/<name>``, relative to ``data/``
like every manifest path), so the versioned record still says what was refused and why.

Workspaces made before the move kept the quarantine in ``data/quarantine/``; ``move_legacy`` moves it out.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from loom.config import Settings

logger = logging.getLogger(__name__)

REASONS_CSV = "reasons.csv"
ANNOTATIONS_CSV = "annotations.csv"
REASONS_HEADER = ("file", "image_id", "reason", "round")
ANNOTATIONS_HEADER = ("image_id", "project_id", "reason")
LEGACY_DIR = "quarantine"  # under data/, before the quarantine moved out of it
_NAME_LIMIT = 120  # characters of the original name kept in the stored name (file names stop at 255 bytes)


def printable(text: str) -> str:
    """``text`` safe to write as UTF-8: bytes of a file name that are not UTF-8 show as ``\\udcxx`` escapes.

    Python keeps such bytes as lone surrogates, which a CSV writer or parquet refuses, so one odd file name
    would otherwise stop the whole ingest.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stored_name(image_id: str, name: str) -> str:
    """``<sha256[:12]>_<name>``: unique per content, readable, portable and short enough for any file system.

    Characters outside ``[A-Za-z0-9._-]`` become ``_`` and a long name is cut from the middle (its suffix
    stays), so names with newlines, undecodable bytes or 250 characters are kept as well as plain ones.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "unnamed"
    if len(safe) > _NAME_LIMIT:
        stem, dot, suffix = safe.rpartition(".")
        suffix = suffix[:16] if dot else ""
        safe = f"{(stem if dot else safe)[: _NAME_LIMIT - len(suffix) - 1]}{dot}{suffix}"
    return f"{image_id[:12]}_{safe}"


def manifest_path(settings: Settings, name: str) -> str:
    """The manifest ``path`` of a quarantined file: relative to ``data/``, like every manifest path."""
    return Path(os.path.relpath(settings.quarantine_dir / name, settings.data_dir)).as_posix()


def keep(settings: Settings, source: BinaryIO, name: str) -> None:
    """Copy an open bad file into the quarantine as ``name`` (through a temporary file: never half a copy)."""
    qdir = settings.quarantine_dir
    qdir.mkdir(parents=True, exist_ok=True)
    tmp = qdir / f".incoming.{os.getpid()}.{id(source)}.tmp"
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        tmp.replace(qdir / name)
    finally:
        tmp.unlink(missing_ok=True)


def _append(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[printable(str(v)) for v in row] for row in rows]
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(header)
        writer.writerows(rows)


def record_reasons(settings: Settings, rows: Sequence[tuple[str, str, str, int]]) -> None:
    """Append ``(file, image_id, reason, round)`` lines to ``reasons.csv``.

    A file set aside unread (no image id) is set aside again at every ingest of its folder; its line is
    written once, not once per round.
    """
    path = settings.quarantine_dir / REASONS_CSV
    unread = {(f, r) for f, i, r, _ in rows if not i}
    if unread and path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            seen = {
                (line.get("file"), line.get("reason"))
                for line in csv.DictReader(f)
                if not line.get("image_id")
            }
        rows = [row for row in rows if row[1] or (printable(row[0]), printable(row[2])) not in seen]
    _append(path, REASONS_HEADER, rows)


def record_annotations(settings: Settings, project_id: int, malformed: Sequence[tuple[str, str]]) -> Path:
    """Append Label Studio annotations set aside (``(image_id, reason)``) to ``annotations.csv``; its path."""
    path = settings.quarantine_dir / ANNOTATIONS_CSV
    _append(path, ANNOTATIONS_HEADER, [(image_id, project_id, reason) for image_id, reason in malformed])
    return path


def move_legacy(settings: Settings, table: pd.DataFrame) -> pd.DataFrame:
    """Move an old ``data/quarantine/`` out of the versioned data; returns the manifest with paths updated.

    Its files join ``quarantine/`` (the CSV files are appended to, header once). The next versioned round
    records ``data/`` without them; earlier rounds keep them, as DVC keeps every version.
    """
    old = settings.data_dir / LEGACY_DIR
    if not old.is_dir() or old.resolve() == settings.quarantine_dir.resolve():
        return table
    new = settings.quarantine_dir
    new.mkdir(parents=True, exist_ok=True)
    for item in sorted(old.iterdir()):
        if item.name in (REASONS_CSV, ANNOTATIONS_CSV) and (new / item.name).exists():
            lines = item.read_text(encoding="utf-8", errors="backslashreplace").splitlines(keepends=True)
            if lines and lines[0].startswith(("file,", "image_id,project_id,reason")):
                lines = lines[1:]
            with open(new / item.name, "a", encoding="utf-8") as f:
                f.writelines(lines)
            item.unlink()
        else:
            shutil.move(str(item), str(new / item.name))
    old.rmdir()
    prefix = f"{LEGACY_DIR}/"
    paths = table["path"].astype("string")
    moved = paths.str.startswith(prefix).fillna(False) & (table["quarantine_reason"].fillna("") != "")
    if moved.any():
        table = table.copy()
        table.loc[moved, "path"] = [manifest_path(settings, p[len(prefix) :]) for p in paths[moved]]
    logger.info("moved the quarantine out of the versioned data: %s -> %s", old, new)
    return table
