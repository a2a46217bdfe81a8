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
bytes ingested again are a no-op. Each bad file is copied (never moved) to the workspace's ``quarantine/``
(beside ``data/``, so DVC never pushes it; loom/data/quarantine.py) with a manifest row that keeps its reason
and a line in ``quarantine/reasons.csv``; one bad file never stops the others.

Every entry found ends as added, duplicate or quarantined, never silently dropped. Entries that are not
read at all are set aside with a reason line (and no manifest row, as they have no bytes to identify them):

- a symbolic link whose target lies outside the source folder is not followed (a link to ``/etc`` or to
  another line's share must not pull files in); a broken or looping link is reported as such. A link to a
  file inside the source folder is read (it ends as a duplicate of its target);
- named pipes, sockets and devices are not opened: reading a pipe would wait forever.

Files are opened without following a last-moment symbolic link and without blocking, a file larger than any
image under the pixel limit is refused before it is read (``loom.data.imageio.max_file_bytes``), and a file
whose bytes change between hashing and decoding (a copy still being written) is quarantined rather than stored
under the wrong id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from loom.config import Settings
from loom.data import manifest, quarantine
from loom.data.imageio import (
    ImageReadError,
    MaskError,
    check_file_size,
    decode_image,
    is_plain_rgb8_png,
    read_mask,
    write_mask,
    write_png,
)
from models.progress import progress

logger = logging.getLogger(__name__)

REASONS_CSV = quarantine.REASONS_CSV
# Decoding and PNG encoding release the GIL; a few threads keep both cores busy without oversubscribing.
_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class IngestReport:
    """What one ingest did. Paths are the source files as found."""

    added: list[str] = field(default_factory=list)  # image ids stored
    duplicates: list[str] = field(default_factory=list)  # source paths whose bytes were already known
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    human_labeled: list[str] = field(default_factory=list)  # image ids that came with a human mask
    sources: dict[str, str] = field(default_factory=dict)  # image id -> source path, for each one added

    def tried(self) -> int:
        """Entries this ingest accounted for: added + duplicates + quarantined (and set aside)."""
        return len(self.added) + len(self.duplicates) + len(self.quarantined)

    def quarantined_by_kind(self) -> dict[str, int]:
        """How many were quarantined for each kind of reason (its words before any colon or bracket)."""
        return dict(Counter(reason_kind(reason) for _, reason in self.quarantined).most_common())

    def summary(self) -> str:
        text = (
            f"ingested {len(self.added)} new image(s) ({len(self.human_labeled)} with human masks), "
            f"skipped {len(self.duplicates)} duplicate(s), quarantined {len(self.quarantined)}"
        )
        return text + (" (reasons in quarantine/reasons.csv)" if self.quarantined else "")


def reason_kind(reason: str) -> str:
    """The kind of a quarantine reason: "truncated or corrupt PNG header (...)" -> "truncated or corrupt"."""
    head = reason.split(":", 1)[0].split("(", 1)[0].strip()
    for kind in ("truncated or corrupt", "unsupported format", "unsupported mode", "cannot read file"):
        if head.startswith(kind):
            return kind
    return head


@dataclass(frozen=True)
class _Candidate:
    """One source file to ingest, with what comes along with it."""

    path: Path  # as found (reported, and named in reasons)
    split: str
    source: str
    mask: Path | None = None  # human mask (test split of a dataset folder)
    caption: Path | None = None
    real: Path | None = None  # what is read when it differs: the target of a link inside the source folder

    @property
    def read_path(self) -> Path:
        return self.real or self.path


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


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def _not_regular(mode: int) -> str:
    what = next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")
    return f"not a regular file ({what}): not read"


def _follow_link(path: Path, boundary: Path) -> tuple[Path | None, str]:
    """(file to read, "") for a link to a file inside ``boundary``; (None, reason) for any other link.

    A target outside the boundary is never opened: only the links on the way to it are read. ``(None, "")``
    for a link to a folder inside it, whose files are walked where they really are.
    """
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(boundary):
        return None, f"symbolic link out of the source folder (to {target}): not followed, not read"
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return None, f"broken symbolic link (its target {target} does not exist)"
    except OSError as err:
        return None, f"broken symbolic link ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return None, ""
    if not stat.S_ISREG(mode):
        return None, _not_regular(mode)
    return target, ""


def _walk(folder: Path, boundary: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Every non-hidden entry below ``folder``, links not followed out of ``boundary`` (a resolved folder).

    Returns:
        ``(path as found, path to read)`` of the files to try, sorted (the order decides which of two equal
        files is the duplicate), and ``(path, reason)`` of the entries set aside unread.
    """
    files: list[tuple[Path, Path]] = []
    set_aside: list[tuple[str, str]] = []
    pending = [folder]
    while pending:  # a stack, not recursion: a deep tree cannot overflow it
        here = pending.pop()
        try:
            with os.scandir(here) as listing:
                entries = list(listing)
        except OSError as err:
            set_aside.append((str(here), f"cannot list folder ({err.strerror or err})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_symlink():
                    real, reason = _follow_link(path, boundary)
                    if real is not None:
                        files.append((path, real))
                    elif reason:
                        set_aside.append((str(path), reason))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                elif entry.is_file(follow_symlinks=False):
                    files.append((path, path))
                else:
                    set_aside.append((str(path), _not_regular(entry.stat(follow_symlinks=False).st_mode)))
            except OSError as err:  # vanished while listed, or a permission problem
                set_aside.append((str(path), f"cannot read file ({err.strerror or err})"))
    files.sort()
    set_aside.sort()
    return files, set_aside


def _plain_candidates(src: Path, split: str, source: str) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Candidates below a plain folder (or the one file given), and the entries set aside unread."""
    if src.is_dir():
        files, set_aside = _walk(src, src.resolve())
    else:  # named explicitly: a file or a link to one is read wherever it is
        mode = os.stat(src).st_mode
        files, set_aside = (
            ([(src, src.resolve())], []) if stat.S_ISREG(mode) else ([], [(str(src), _not_regular(mode))])
        )
    candidates = [
        _Candidate(path=p, split=split, source=source, real=real if real != p else None) for p, real in files
    ]
    return candidates, set_aside


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
    """Candidates from a Loom dataset folder, and (path, reason) for rows whose image file is missing and for
    entries under ``images/`` set aside unread."""
    table = _read_dataset_manifest(src, split)
    root = src.resolve()
    candidates: list[_Candidate] = []
    missing: list[tuple[str, str]] = []
    for rel, row_split, row_source in zip(
        table["path"], table["split"], _row_sources(table, src, source), strict=True
    ):
        path = (src / str(rel)).resolve()
        if not path.is_relative_to(root):
            missing.append((str(src / str(rel)), "listed in manifest.parquet but outside the dataset folder"))
        elif not path.exists():
            missing.append((str(src / str(rel)), "listed in manifest.parquet but missing"))
        elif not path.is_file():  # a folder, a pipe: opening a pipe would wait forever
            missing.append((str(src / str(rel)), "listed in manifest.parquet but not a regular file"))
        else:
            candidates.append(_dataset_candidate(src, path, str(row_split), row_source))
    listed = {c.path for c in candidates}
    if (src / "images").is_dir():  # files the manifest forgot are not lost
        files, set_aside = _walk(src / "images", root)
        candidates += [
            _Candidate(path=p, split=split, source=source or root.name, real=real if real != p else None)
            for p, real in files
            if real.resolve() not in listed
        ]
        missing += set_aside
    return candidates, missing


def _row_sources(table: pd.DataFrame, src: Path, source: str | None) -> Iterable[str]:
    """Explicit ``source`` argument, else the dataset row's own source, else the folder's name."""
    if source:
        return [source] * len(table)
    own = table["source"] if "source" in table.columns else pd.Series(pd.NA, index=table.index)
    return [str(s) if isinstance(s, str) and s else src.resolve().name for s in own]


# ---- per-file work -------------------------------------------------------------------------------------


def _open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; never follows a last symbolic link, never blocks on a pipe.

    The walk already sorted links and pipes out; this closes the gap of an entry swapped for one since.

    Raises:
        OSError: cannot be opened, or is not a regular file (``strerror`` says which).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(0, _not_regular(mode).split(":", 1)[0])
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _hash(candidate: _Candidate) -> tuple[str | None, str]:
    """(sha256, "") or (None, reason) when the file cannot even be read. Streams: memory stays flat."""
    try:
        with _open_regular(candidate.read_path) as f:
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest(), ""
    except OSError as err:
        return None, f"cannot read file ({err.strerror or err})"


def _store(
    candidate: _Candidate, image_id: str, settings: Settings, n_mask_classes: int, lookup: np.ndarray
) -> _Outcome:
    """Decode, check the mask, write the PNG (+ mask, caption); bad input gives an outcome with a reason."""
    outcome = _Outcome(candidate=candidate, image_id=image_id)
    try:
        with _open_regular(candidate.read_path) as f:
            check_file_size(candidate.path, os.fstat(f.fileno()).st_size)  # before reading it whole
            data = f.read()
        if manifest.sha256_bytes(data) != image_id:
            outcome.reason = (
                "changed while being ingested: its bytes differ from when it was hashed (a copy still being "
                "written?); copy it again once it is complete"
            )
            return outcome
        rgb = decode_image(data, candidate.path)
    except ImageReadError as err:
        outcome.reason = err.reason
        return outcome
    except OSError as err:
        outcome.reason = f"cannot read file ({err.strerror or err})"
        return outcome
    except Exception as err:  # a decoder bug on one file must not stop the night's ingest
        logger.warning("decoding %s failed unexpectedly", candidate.path, exc_info=True)
        outcome.reason = f"truncated or corrupt image: the decoder failed ({type(err).__name__}: {err})"
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


def _quarantine(outcome: _Outcome, settings: Settings) -> str:
    """Copy a bad file into the quarantine (beside data/); returns its manifest path (relative to data/)."""
    name = quarantine.stored_name(outcome.image_id, outcome.candidate.path.name)
    try:
        with _open_regular(outcome.candidate.read_path) as f:
            quarantine.keep(settings, f, name)
    except OSError as err:  # the reason is still recorded; the original stays where it was
        logger.error("could not copy %s to quarantine: %s", outcome.candidate.path, err)
    logger.warning("quarantined %s: %s", outcome.candidate.path, outcome.reason)
    return quarantine.manifest_path(settings, name)


def _row(outcome: _Outcome, path: str, round_no: int) -> dict[str, object]:
    human = outcome.human and not outcome.reason
    return {
        "image_id": outcome.image_id,
        "path": path,
        "width": outcome.width if not outcome.reason else pd.NA,
        "height": outcome.height if not outcome.reason else pd.NA,
        "source": quarantine.printable(outcome.candidate.source),
        "split": outcome.candidate.split,
        "round": round_no,
        "score": np.nan,  # no labeler has scored it yet
        "uncertainty": np.nan,
        "label_source": "human" if human else "none",
        "classes": outcome.classes if human else "",
        "review_state": "reviewed" if human else "none",
        "quarantine_reason": quarantine.printable(outcome.reason),
    }


# ---- progress ------------------------------------------------------------------------------------------


def _mapped(fn: Callable[..., object], items: Sequence[object], description: str) -> list:
    """``[fn(x) for x in items]`` on a thread pool, in order, with progress (models/progress.py)."""
    results = []
    with progress(description, len(items), "files") as bar, ThreadPoolExecutor(_WORKERS) as pool:
        for result in pool.map(fn, items):
            results.append(result)
            bar.advance()
    return results


# ---- the entry point -----------------------------------------------------------------------------------


def ingest_folder(
    settings: Settings, src: Path, *, round_no: int, source: str | None = None, split: str | None = None
) -> IngestReport:
    """Ingest every image below ``src`` (or a Loom dataset folder) into the workspace's manifest.

    Args:
        settings: the workspace (``settings.data_dir`` receives images, masks and captions, and
            ``settings.quarantine_dir`` the bad files).
        src: a folder of images, a single image file, or a Loom dataset folder (has ``manifest.parquet``).
        round_no: the round the images arrive in (manifest ``round``).
        source: manifest ``source``; default: the dataset row's source, else ``src``'s folder name.
        split: split for images without one (default ``train``); a dataset manifest's split wins.
    Returns:
        An IngestReport: every entry found is in exactly one of added (``sources``), duplicates and
        quarantined; the manifest at ``settings.manifest_path`` is saved.
    Raises:
        FileNotFoundError: ``src`` does not exist. ValueError: a malformed dataset manifest or classes.json.
    """
    src = Path(src)
    if not src.exists() and not src.is_symlink():
        raise FileNotFoundError(
            f"ingest source {src} does not exist; pass a folder of images or a dataset folder"
        )
    split = split or "train"
    if split not in manifest.SPLITS:
        raise ValueError(f"split {split!r} is not one of {manifest.SPLITS}")
    if not src.exists():
        raise FileNotFoundError(f"ingest source {src} is a broken symbolic link; point it at a folder")
    report = IngestReport()
    lookup = np.arange(256, dtype=np.uint8)
    n_mask_classes = len(settings.classes)
    if src.is_dir() and (src / "manifest.parquet").is_file():
        dataset_classes = _dataset_classes(src, settings)
        lookup, n_mask_classes = _class_lookup(dataset_classes, settings), len(dataset_classes)
        candidates, unread = _dataset_candidates(src, split, source)
    else:
        candidates, unread = _plain_candidates(src, split, source or src.resolve().name)
    reasons: list[tuple[str, str, str, int]] = []  # reasons.csv lines: file, image id, reason, round
    for path, reason in unread:
        logger.warning("cannot ingest %s: %s", path, reason)
        report.quarantined.append((path, reason))
        reasons.append((path, "", reason, round_no))

    table = quarantine.move_legacy(settings, manifest.load(settings.manifest_path))
    known = set(table["image_id"].dropna())
    hashes = _mapped(_hash, candidates, f"hashing {src.name}")
    fresh: list[tuple[_Candidate, str]] = []
    for candidate, (image_id, reason) in zip(candidates, hashes, strict=True):
        if image_id is None:  # unreadable: no bytes to hash or keep
            logger.warning("cannot ingest %s: %s", candidate.path, reason)
            report.quarantined.append((str(candidate.path), reason))
            reasons.append((str(candidate.path), "", reason, round_no))
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
            path = _quarantine(outcome, settings)
            report.quarantined.append((str(outcome.candidate.path), outcome.reason))
            reasons.append((str(outcome.candidate.path), outcome.image_id, outcome.reason, round_no))
        else:
            path = f"{settings.images_dir.name}/{outcome.image_id}.png"
            report.added.append(outcome.image_id)
            report.sources[outcome.image_id] = str(outcome.candidate.path)
            if outcome.human:
                report.human_labeled.append(outcome.image_id)
        rows.append(_row(outcome, path, round_no))
    if rows:
        table = manifest.upsert(table, pd.DataFrame(rows))
    quarantine.record_reasons(settings, reasons)
    manifest.save(table, settings.manifest_path)
    logger.info("%s: %s", src, report.summary())
    return report
