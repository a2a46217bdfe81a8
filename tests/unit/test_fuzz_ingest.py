"""Ingest over the fuzz set (tests/fuzzset.py): each bad file quarantined or set aside with a reason."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import loom.data.ingest
from loom.config import Settings, load_settings
from loom.data import manifest
from loom.data.imageio import read_image, write_png
from loom.data.ingest import IngestReport, ingest_folder
from tests.fuzzset import (
    ADDED,
    DUPLICATE,
    QUARANTINED,
    FuzzSet,
    entries_below,
    pipes_guarded,
    write_fuzz_set,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def outcomes(report: IngestReport) -> dict[str, tuple[str, str]]:
    """Source path -> (outcome, reason), checking that no path has two outcomes."""
    pairs = [(p, (ADDED, "")) for p in report.sources.values()]
    pairs += [(p, (DUPLICATE, "")) for p in report.duplicates]
    pairs += [(p, (QUARANTINED, r)) for p, r in report.quarantined]
    found = dict(pairs)
    assert len(found) == len(pairs), "a file has two outcomes"
    return found


def ingest_guarded(settings: Settings, src: Path, fuzz: FuzzSet, round_no: int = 1) -> IngestReport:
    with pipes_guarded(fuzz.fifos) as opened:
        report = ingest_folder(settings, src, round_no=round_no)
    assert opened == [], f"ingest read named pipes {opened}: it would hang on a camera share"
    return report


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings(tmp_path / "ws")


@pytest.fixture()
def fuzz(tmp_path: Path) -> FuzzSet:
    return write_fuzz_set(tmp_path / "drop", tmp_path / "elsewhere", seed=0)


def test_the_fuzz_set_is_large_and_covers_every_kind(fuzz: FuzzSet) -> None:
    bad = fuzz.expected(QUARANTINED)
    assert len(fuzz.cases) >= 250 and len(bad) >= 200
    kinds = {c.kind for c in fuzz.cases}
    for kind in (
        "random_bytes",
        "truncated_png",
        "truncated_jpeg",
        "truncated_tiff",
        "truncated_bmp",
        "huge_png",
        "huge_jpeg",
        "huge_tiff",
        "huge_bmp",
        "zero_size",
        "bad_mode_tiff",
        "odd_mode",
        "empty",
        "symlink_out",
        "symlink_broken",
        "special_file",
        "same_name",
        "hostile_name",
        "unsupported_format",
    ):
        assert kind in kinds, kind
    assert (
        len({c.path.name for c in fuzz.cases if c.kind == "same_name"}) == 2
    )  # frame_0001.png, FRAME_0001.PNG
    again = write_fuzz_set(fuzz.root.parent / "again", fuzz.root.parent / "elsewhere2", seed=0)
    assert [(c.path.relative_to(again.root), c.expected, c.reason) for c in again.cases] == [
        (c.path.relative_to(fuzz.root), c.expected, c.reason) for c in fuzz.cases
    ]  # seeded: the same set every time


def test_every_file_ends_as_expected_and_none_is_lost(settings: Settings, fuzz: FuzzSet) -> None:
    report = ingest_guarded(settings, fuzz.root, fuzz)
    found = outcomes(report)

    # zero lost: every entry below the folder, counted without ingest's help, has exactly one outcome
    entries = {str(p) for p in entries_below(fuzz.root)}
    assert set(found) == entries == {str(c.path) for c in fuzz.cases}
    assert report.tried() == len(entries)
    assert len(report.added) + len(report.duplicates) + len(report.quarantined) - len(entries) == 0

    wrong = [
        (str(c.path.relative_to(fuzz.root)), c.expected, c.reason, found[str(c.path)])
        for c in fuzz.cases
        if found[str(c.path)][0] != c.expected or not found[str(c.path)][1].startswith(c.reason)
    ]
    assert wrong == []
    assert all(reason for _, reason in report.quarantined)  # each one says why
    by_kind = report.quarantined_by_kind()
    assert sum(by_kind.values()) == len(report.quarantined)
    assert by_kind["symbolic link out of the source folder"] == 8


def test_links_out_of_the_folder_are_never_followed(settings: Settings, fuzz: FuzzSet) -> None:
    report = ingest_guarded(settings, fuzz.root, fuzz)
    secret = sha((fuzz.outside / "secret.png").read_bytes())
    table = manifest.load(settings.manifest_path)
    assert secret not in set(table["image_id"]) and secret not in report.added
    outside = {sha(p.read_bytes()) for p in fuzz.outside.rglob("*") if p.is_file() and not p.is_fifo()}
    kept = {sha(p.read_bytes()) for p in settings.quarantine_dir.iterdir() if p.suffix != ".csv"}
    stored = {sha(p.read_bytes()) for p in settings.data_dir.rglob("*") if p.is_file()}
    assert not outside & (kept | stored)  # no byte of a link's target came in
    for case in fuzz.cases:
        if case.kind in ("symlink_out", "symlink_broken", "special_file"):
            assert case.path.is_symlink() or case.path.is_fifo()  # left where it was


def test_quarantine_keeps_bytes_and_reasons_outside_data(settings: Settings, fuzz: FuzzSet) -> None:
    report = ingest_guarded(settings, fuzz.root, fuzz)
    table = manifest.load(settings.manifest_path)
    bad_rows = table[table["quarantine_reason"] != ""].set_index("image_id")
    unread = {"symlink_out", "symlink_broken", "special_file"}
    with_bytes = [c for c in fuzz.expected(QUARANTINED) if c.kind not in unread]
    assert len(bad_rows) == len(with_bytes)  # one manifest row (with its reason) per bad file read
    reasons = dict(report.quarantined)
    assert not settings.quarantine_dir.is_relative_to(settings.data_dir)
    for case in with_bytes:
        data = case.path.read_bytes()
        row = bad_rows.loc[sha(data)]
        assert (
            row["quarantine_reason"] == reasons[str(case.path)].encode("utf-8", "backslashreplace").decode()
        )
        kept = (settings.data_dir / row["path"]).resolve()
        assert kept.parent == settings.quarantine_dir and kept.read_bytes() == data
        assert len(kept.name.encode()) <= 255 and kept.name.isascii()  # hostile names are made safe
    with open(settings.quarantine_dir / "reasons.csv", newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(report.quarantined)
    assert sum(1 for line in lines if not line["image_id"]) == sum(1 for c in fuzz.cases if c.kind in unread)
    assert any("\\udcff" in line["file"] for line in lines)  # an undecodable name, written readably


def test_odd_modes_decode_exactly(settings: Settings, fuzz: FuzzSet) -> None:
    report = ingest_guarded(settings, fuzz.root, fuzz)
    ids = {path: image_id for image_id, path in report.sources.items()}
    checked = 0
    for case in fuzz.expected(ADDED):
        stored = read_image(settings.images_dir / f"{ids[str(case.path)]}.png")
        assert stored.dtype == np.uint8 and stored.ndim == 3 and stored.shape[2] == 3
        if case.pixels is not None:
            np.testing.assert_array_equal(stored, case.pixels, err_msg=str(case.path.name))
            checked += 1
    assert checked == 33  # the lossless odd modes, pixel for pixel


def test_reingest_adds_nothing_and_writes_no_new_reason(settings: Settings, fuzz: FuzzSet) -> None:
    first = ingest_guarded(settings, fuzz.root, fuzz)
    table = manifest.load(settings.manifest_path)
    reasons_csv = (settings.quarantine_dir / "reasons.csv").read_text()
    again = ingest_guarded(settings, fuzz.root, fuzz, round_no=2)
    assert again.added == [] and again.tried() == first.tried()
    unread = {str(c.path) for c in fuzz.cases if c.kind in ("symlink_out", "symlink_broken", "special_file")}
    assert {p for p, _ in again.quarantined} == unread  # still there, still set aside
    pd.testing.assert_frame_equal(manifest.load(settings.manifest_path), table)
    assert (settings.quarantine_dir / "reasons.csv").read_text() == reasons_csv  # set-aside lines once


def test_fuzz_in_a_dataset_folder_leaves_its_images_alone(settings: Settings, tmp_path: Path) -> None:
    """Look-alikes (a good image's name with bad bytes, its bytes under another name) in images/."""
    src = tmp_path / "ds"
    rng = np.random.default_rng(7)
    good = []
    for k in range(3):
        write_png(src / "images" / f"img_{k}.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        good.append(src / "images" / f"img_{k}.png")
    manifest.save(
        pd.DataFrame(
            {"image_id": [sha(p.read_bytes()) for p in good], "path": [f"images/{p.name}" for p in good]}
        ),
        src / "manifest.parquet",
    )
    fuzz = write_fuzz_set(src / "images" / "fuzz", tmp_path / "elsewhere", accepted=False, look_alikes=good)
    report = ingest_guarded(settings, src, fuzz)
    found = outcomes(report)
    assert sorted(report.added) == sorted(sha(p.read_bytes()) for p in good)  # the good ones, only them
    wrong = [
        (str(c.path), c.expected, c.reason, found.get(str(c.path)))
        for c in fuzz.cases
        if str(c.path) not in found
        or found[str(c.path)][0] != c.expected
        or not found[str(c.path)][1].startswith(c.reason)
    ]
    assert wrong == []
    assert len(found) == len(good) + len(entries_below(fuzz.root))


def test_a_file_too_large_for_the_pixel_limit_is_refused_unread(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_MAX_IMAGE_PIXELS", "1000")  # files over 8 * 1000 + 16 MiB are refused
    src = tmp_path / "drop"
    src.mkdir()
    with open(src / "huge.png", "wb") as f:
        f.truncate((1 << 24) + 9000)  # sparse: no disk, no memory
    report = ingest_folder(settings, src, round_no=1)
    [(path, reason)] = report.quarantined
    assert path == str(src / "huge.png") and reason.startswith("too large: file of 16.8 MB exceeds")


def test_a_file_that_changes_while_ingested_is_not_stored_under_a_wrong_id(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "drop"
    write_png(src / "growing.png", np.zeros((8, 8, 3), np.uint8))
    hash_then_grow = loom.data.ingest._hash

    def grows_after_hashing(candidate):  # a camera still writing the file
        result = hash_then_grow(candidate)
        with open(candidate.path, "ab") as f:
            f.write(b"more bytes")
        return result

    monkeypatch.setattr(loom.data.ingest, "_hash", grows_after_hashing)
    report = ingest_folder(settings, src, round_no=1)
    assert report.added == []
    assert report.quarantined[0][1].startswith("changed while being ingested")


def test_an_unexpected_decoder_error_quarantines_that_file_only(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "drop"
    write_png(src / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(src / "b.png", np.full((8, 8, 3), 9, np.uint8))
    decode = loom.data.ingest.decode_image

    def flaky(data: bytes, name: Path, *args: object) -> np.ndarray:
        if Path(name).name == "a.png":
            raise KeyError("a decoder bug")
        return decode(data, name)

    monkeypatch.setattr(loom.data.ingest, "decode_image", flaky)
    report = ingest_folder(settings, src, round_no=1)
    assert len(report.added) == 1 and report.sources[report.added[0]].endswith("b.png")
    assert report.quarantined == [
        (str(src / "a.png"), "truncated or corrupt image: the decoder failed (KeyError: 'a decoder bug')")
    ]


def test_an_old_quarantine_inside_data_moves_out(settings: Settings, tmp_path: Path) -> None:
    """Workspaces from before the move kept bad files in data/quarantine/, which DVC pushed every round."""
    old = settings.data_dir / "quarantine"
    old.mkdir(parents=True)
    (old / "0123456789ab_bad.png").write_bytes(b"junk")
    (old / "reasons.csv").write_text("file,image_id,reason,round\n/cam/bad.png,0123456789ab,not an image,0\n")
    (old / "annotations.csv").write_text("img1,3,'result 0: unknown label'\n")
    row = {"image_id": "0123456789ab" + "0" * 52, "path": "quarantine/0123456789ab_bad.png"}
    manifest.save(pd.DataFrame([{**row, "quarantine_reason": "not an image"}]), settings.manifest_path)
    src = tmp_path / "drop"
    write_png(src / "new_bad_neighbour.png", np.zeros((4, 4, 3), np.uint8))
    (src / "notes.txt").write_text("x")

    ingest_folder(settings, src, round_no=1)
    assert not old.exists()
    assert (settings.quarantine_dir / "0123456789ab_bad.png").read_bytes() == b"junk"
    table = manifest.load(settings.manifest_path).set_index("image_id")
    assert table.loc[row["image_id"], "path"] == "../quarantine/0123456789ab_bad.png"
    lines = (settings.quarantine_dir / "reasons.csv").read_text().splitlines()
    assert lines[0] == "file,image_id,reason,round" and lines[1].startswith("/cam/bad.png")
    assert lines[2].startswith(str(src / "notes.txt")) and len(lines) == 3
    assert (settings.quarantine_dir / "annotations.csv").read_text().startswith("img1,3,")
