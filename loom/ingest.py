"""Ingest: bring new images into the workspace, deduplicated by content, with bad files quarantined.

Two kinds of input folder:

- **A Loom dataset folder** (it has ``manifest.parquet``; see ``loom.datasets``): its ``split`` column is
  honoured. Test images bring their masks (validated, remapped by class name to the project's classes) and
  captions as human labels. Train masks are *not* copied: they are ground truth kept outside the workspace for
  evaluation and simulated annotators only. Image files under ``images/`` the manifest does not list are
  ingested too, with the ``split`` argument (default train).
- **Any other folder**: every non-hidden file below it, recursively, is tried as an image (a stray PDF is
  quarantined with a reason rather than silently skipped).

Each good image is stored as an 8-bit RGB PNG ``data/images/<sha256 of the original bytes>.png``; the same
bytes ingested again are a no-op. Each bad file is copied (never moved) to ``data/quarantine/`` with a
manifest row and a line in ``data/quarantine/reasons.csv``; one bad file never stops the others.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from loom import manifest
from loom.config import Settings
from loom.imageio import (
    ImageReadError,
    MaskError,
    decode_image,
    is_plain_rgb8_png,
    read_mask,
    write_mask,
    write_png,
)

logger = logging.getLogger(__name__)

REASONS_CSV = "reasons.csv"
_REASONS_HEADER = ("file", "image_id", "reason", "round")
# Decoding and PNG encoding release the GIL; a few threads keep both cores busy without oversubscribing.
_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class IngestReport:
    """What one ingest did. Paths are the source files as found."""

    added: list[str] = field(default_factory=list)  # image ids stored
    duplicates: list[str] = field(default_factory=list)  # source paths whose bytes were already known
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    human_labeled: list[str] = field(default_factory=list)  # image ids that came with a human mask

    def summary(self) -> str:
        text = (
            f"ingested {len(self.added)} new image(s) ({len(self.human_labeled)} with human masks), "
            f"skipped {len(self.duplicates)} duplicate(s), quarantined {len(self.quarantined)}"
        )
        return text + (" (reasons in data/quarantine/reasons.csv)" if self.quarantined else "")


@dataclass(frozen=True)
class _Candidate:
    """One source file to ingest, with what comes along with it."""

    path: Path
    split: str
    source: str
    mask: Path | None = None  # human mask (test split of a dataset folder)
    caption: Path | None = None


@dataclass
class _Outcome:
    candidate: _Candidate
    image_id: str
    width: int | None = None
    height: int | None = None
    classes: str = ""
    human: bool = False
    reason: str = ""  # non-empty: quarantine


# ---- collecting candidates -----------------------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden regular file below root, sorted (deterministic order decides which duplicate wins)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root))


def _plain_candidates(src: Path, split: str, source: str) -> list[_Candidate]:
    files = [src] if src.is_file() else _walk_files(src)
    return [_Candidate(path=p, split=split, source=source) for p in files]


def _dataset_classes(src: Path, settings: Settings) -> tuple[str, ...]:
    path = src / "classes.json"
    if not path.exists():
        return tuple(settings.classes)
    try:
        names = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err}); it must be a JSON list of class names") from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: must be a JSON list of class names, got {type(names).__name__}")
    return tuple(names)


def _class_lookup(dataset_classes: Sequence[str], settings: Settings) -> np.ndarray:
    """Dataset mask value -> project mask value, matched by class name (unknown names -> ``defect``)."""
    lookup = np.zeros(256, np.uint8)
    for k, name in enumerate(dataset_classes, start=1):
        if name not in settings.classes and "defect" not in settings.classes:
            raise ValueError(
                f"dataset class {name!r} is not a project class and the project has no 'defect' class "
                f"to fall back to; project classes: {list(settings.classes)}"
            )
        lookup[k] = settings.class_index(name)
    return lookup


def _read_dataset_manifest(src: Path, split: str) -> pd.DataFrame:
    """The dataset's manifest with ``split`` filled in (empty -> the default) and checked."""
    path = src / "manifest.parquet"
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(
            f"{path}: not a readable parquet file ({err}); re-create the dataset folder"
        ) from err
    if "path" not in table.columns:
        raise ValueError(f"{path}: has no 'path' column; is it a Loom dataset manifest?")
    splits = table["split"].astype("string") if "split" in table else pd.Series(pd.NA, table.index, "string")
    table["split"] = splits.fillna(split).replace("", split)
    bad = sorted(set(table["split"]) - set(manifest.SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split(s) {bad}; expected one of {manifest.SPLITS}")
    return table


def _dataset_candidate(src: Path, path: Path, split: str, source: str) -> _Candidate:
    """A listed dataset image; test images bring their mask and caption (train ground truth stays behind)."""
    mask, caption = src / "masks" / f"{path.stem}.png", src / "captions" / f"{path.stem}.txt"
    is_test = split == "test"
    return _Candidate(
        path=path,
        split=split,
        source=source,
        mask=mask if is_test and mask.is_file() else None,
        caption=caption if is_test and caption.is_file() else None,
    )


def _dataset_candidates(
    src: Path, split: str, source: str | None
) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Candidates from a Loom dataset folder, and (path, reason) for rows whose image file is missing."""
    table = _read_dataset_manifest(src, split)
    root = src.resolve()
    candidates: list[_Candidate] = []
    missing: list[tuple[str, str]] = []
    for rel, row_split, row_source in zip(
        table["path"], table["split"], _row_sources(table, src, source), strict=True
    ):
        path = (src / str(rel)).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            why = "outside the dataset folder" if not path.is_relative_to(root) else "missing"
            missing.append((str(src / str(rel)), f"listed in manifest.parquet but {why}"))
        else:
            candidates.append(_dataset_candidate(src, path, str(row_split), row_source))
    listed = {c.path for c in candidates}
    if (src / "images").is_dir():  # files the manifest forgot are not lost
        extra = [p for p in _walk_files(src / "images") if p.resolve() not in listed]
        candidates += [_Candidate(path=p, split=split, source=source or root.name) for p in extra]
    return candidates, missing


def _row_sources(table: pd.DataFrame, src: Path, source: str | None) -> Iterable[str]:
    """Explicit ``source`` argument, else the dataset row's own source, else the folder's name."""
    if source:
        return [source] * len(table)
    own = table["source"] if "source" in table.columns else pd.Series(pd.NA, index=table.index)
    return [str(s) if isinstance(s, str) and s else src.resolve().name for s in own]


# ---- per-file work -------------------------------------------------------------------------------------


def _hash(candidate: _Candidate) -> tuple[str | None, str]:
    """(sha256, "") or (None, reason) when the file cannot even be read."""
    try:
        return manifest.sha256_file(candidate.path), ""
    except OSError as err:
        return None, f"cannot read file ({err.strerror or err})"


def _store(
    candidate: _Candidate, image_id: str, settings: Settings, n_mask_classes: int, lookup: np.ndarray
) -> _Outcome:
    """Decode, check the mask, write the PNG (+ mask, caption); bad input gives an outcome with a reason."""
    outcome = _Outcome(candidate=candidate, image_id=image_id)
    try:
        data = candidate.path.read_bytes()
        rgb = decode_image(data, candidate.path)
    except ImageReadError as err:
        outcome.reason = err.reason
        return outcome
    except OSError as err:
        outcome.reason = f"cannot read file ({err.strerror or err})"
        return outcome
    outcome.height, outcome.width = rgb.shape[:2]
    mask: np.ndarray | None = None
    if candidate.mask is not None:
        try:
            mask = lookup[read_mask(candidate.mask, n_mask_classes, expected_hw=rgb.shape[:2])]
        except MaskError as err:
            outcome.reason = f"mask {candidate.mask.name}: {err.reason}"
            return outcome
    target = settings.images_dir / f"{image_id}.png"
    if is_plain_rgb8_png(data):  # already in the stored form: keep the bytes, skip the costly re-encode
        _write_bytes_atomic(target, data)
    else:
        write_png(target, rgb)
    if mask is not None:
        write_mask(settings.masks_dir / f"{image_id}.png", mask)
        present = sorted(int(v) for v in np.unique(mask) if v)
        outcome.classes = ",".join(settings.classes[v - 1] for v in present)
        outcome.human = True
    if candidate.caption is not None:
        settings.captions_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidate.caption, settings.captions_dir / f"{image_id}.txt")
    return outcome


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _quarantine(outcome: _Outcome, settings: Settings, round_no: int) -> str:
    """Copy a bad file to quarantine/, append its reason to reasons.csv; returns its data-relative path."""
    qdir = settings.quarantine_dir
    qdir.mkdir(parents=True, exist_ok=True)
    name = f"{outcome.image_id[:12]}_{outcome.candidate.path.name}"
    try:
        shutil.copyfile(outcome.candidate.path, qdir / name)
    except OSError as err:  # the reason is still recorded; the original stays where it was
        logger.error("could not copy %s to quarantine: %s", outcome.candidate.path, err)
    reasons = qdir / REASONS_CSV
    new_file = not reasons.exists()
    with open(reasons, "a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(_REASONS_HEADER)
        writer.writerow([str(outcome.candidate.path), outcome.image_id, outcome.reason, round_no])
    logger.warning("quarantined %s: %s", outcome.candidate.path, outcome.reason)
    return f"{qdir.name}/{name}"


def _row(outcome: _Outcome, path: str, round_no: int) -> dict[str, object]:
    human = outcome.human and not outcome.reason
    return {
        "image_id": outcome.image_id,
        "path": path,
        "width": outcome.width if not outcome.reason else pd.NA,
        "height": outcome.height if not outcome.reason else pd.NA,
        "source": outcome.candidate.source,
        "split": outcome.candidate.split,
        "round": round_no,
        "score": np.nan,  # no labeler has scored it yet
        "uncertainty": np.nan,
        "label_source": "human" if human else "none",
        "classes": outcome.classes if human else "",
        "review_state": "reviewed" if human else "none",
        "quarantine_reason": outcome.reason,
    }


# ---- progress ------------------------------------------------------------------------------------------


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable; draws a rich progress bar only when stderr is a terminal."""
    if not sys.stderr.isatty() or total == 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _mapped(fn: Callable[..., object], items: Sequence[object], description: str) -> list:
    """``[fn(x) for x in items]`` on a thread pool, in order, with a progress bar."""
    results = []
    with _progress(description, len(items)) as advance, ThreadPoolExecutor(_WORKERS) as pool:
        for result in pool.map(fn, items):
            results.append(result)
            advance()
    return results


# ---- the entry point -----------------------------------------------------------------------------------


def ingest_folder(
    settings: Settings, src: Path, *, round_no: int, source: str | None = None, split: str | None = None
) -> IngestReport:
    """Ingest every image below ``src`` (or a Loom dataset folder) into the workspace's manifest.

    Args:
        settings: the workspace (``settings.data_dir`` receives images, masks, captions, quarantine).
        src: a folder of images, a single image file, or a Loom dataset folder (has ``manifest.parquet``).
        round_no: the round the images arrive in (manifest ``round``).
        source: manifest ``source``; default: the dataset row's source, else ``src``'s folder name.
        split: split for images without one (default ``train``); a dataset manifest's split wins.
    Returns:
        An IngestReport; the manifest at ``settings.manifest_path`` is saved.
    Raises:
        FileNotFoundError: ``src`` does not exist. ValueError: a malformed dataset manifest or classes.json.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(
            f"ingest source {src} does not exist; pass a folder of images or a dataset folder"
        )
    split = split or "train"
    if split not in manifest.SPLITS:
        raise ValueError(f"split {split!r} is not one of {manifest.SPLITS}")
    report = IngestReport()
    lookup = np.arange(256, dtype=np.uint8)
    n_mask_classes = len(settings.classes)
    if src.is_dir() and (src / "manifest.parquet").is_file():
        dataset_classes = _dataset_classes(src, settings)
        lookup, n_mask_classes = _class_lookup(dataset_classes, settings), len(dataset_classes)
        candidates, missing = _dataset_candidates(src, split, source)
        for path, reason in missing:
            logger.warning("cannot ingest %s: %s", path, reason)
        report.quarantined += missing
    else:
        candidates = _plain_candidates(src, split, source or src.resolve().name)

    table = manifest.load(settings.manifest_path)
    known = set(table["image_id"].dropna())
    hashes = _mapped(_hash, candidates, "hashing")
    fresh: list[tuple[_Candidate, str]] = []
    for candidate, (image_id, reason) in zip(candidates, hashes, strict=True):
        if image_id is None:  # unreadable: no bytes to hash or keep
            logger.warning("cannot ingest %s: %s", candidate.path, reason)
            report.quarantined.append((str(candidate.path), reason))
        elif image_id in known:
            report.duplicates.append(str(candidate.path))
        else:
            known.add(image_id)
            fresh.append((candidate, image_id))

    def store(item: tuple[_Candidate, str]) -> _Outcome:
        return _store(item[0], item[1], settings, n_mask_classes, lookup)

    rows = []
    for outcome in _mapped(store, fresh, f"ingesting {src.name}"):
        if outcome.reason:
            path = _quarantine(outcome, settings, round_no)
            report.quarantined.append((str(outcome.candidate.path), outcome.reason))
        else:
            path = f"{settings.images_dir.name}/{outcome.image_id}.png"
            report.added.append(outcome.image_id)
            if outcome.human:
                report.human_labeled.append(outcome.image_id)
        rows.append(_row(outcome, path, round_no))
    if rows:
        table = manifest.upsert(table, pd.DataFrame(rows))
    manifest.save(table, settings.manifest_path)
    logger.info("%s: %s", src, report.summary())
    return report
