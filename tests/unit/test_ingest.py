"""loom.data.ingest: good images stored as 8-bit RGB PNGs, bad files quarantined with reasons, re-ingest
no-op."""

from __future__ import annotations

import csv
import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from loom.config import Settings, load_settings
from loom.data import manifest
from loom.data.imageio import read_image, write_mask, write_png
from loom.data.ingest import ingest_folder


def mode_of(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def write_bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A valid 1-bit all-black PNG of the given size (~50 KB), written without allocating its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings(tmp_path / "ws")


@pytest.fixture()
def messy(tmp_path: Path) -> Path:
    """A camera drop folder: 4 good images of different modes, 4 bad files, a duplicate and a hidden file."""
    src = tmp_path / "line3"
    (src / "night").mkdir(parents=True)
    write_png(src / "rgb8.png", noise(20, 30))
    Image.fromarray((np.arange(24 * 16).reshape(16, 24) * 10).astype(np.uint16)).save(src / "gray16.png")
    Image.fromarray(noise(12, 10, 1, seed=1)).save(src / "night" / "gray.JPG")
    Image.fromarray(noise(8, 8, 4, seed=2)).save(src / "night" / "rgba.png")
    (src / "night" / "rgb8_copy.png").write_bytes((src / "rgb8.png").read_bytes())  # duplicate bytes
    Image.fromarray(noise(64, 64, seed=3)).save(src / "cut.jpg")
    (src / "cut.jpg").write_bytes((src / "cut.jpg").read_bytes()[:400])  # truncated
    (src / "empty.png").write_bytes(b"")
    (src / "readme.txt").write_text("line 3 camera, shift B\n")
    write_bomb_png(src / "bomb.png")
    (src / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden: skipped
    return src


def test_messy_folder(settings: Settings, messy: Path) -> None:
    before = {p: p.read_bytes() for p in messy.rglob("*") if p.is_file()}
    report = ingest_folder(settings, messy, round_no=0)

    assert len(report.added) == 4
    assert len(report.duplicates) == 1  # one of the two copies is kept
    assert report.duplicates[0] in {str(messy / "rgb8.png"), str(messy / "night" / "rgb8_copy.png")}
    reasons = {Path(p).name: r for p, r in report.quarantined}
    assert set(reasons) == {"cut.jpg", "empty.png", "readme.txt", "bomb.png"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["readme.txt"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("truncated or corrupt")
    assert reasons["bomb.png"].startswith("too large: 20000x20000")
    assert "4 new image(s)" in report.summary() and "quarantined 4" in report.summary()

    # originals untouched, nothing removed
    assert {p: p.read_bytes() for p in messy.rglob("*") if p.is_file()} == before

    table = manifest.load(settings.manifest_path)
    assert len(table) == 8 and set(table["round"]) == {0} and set(table["split"]) == {"train"}
    assert set(table["source"]) == {"line3"}
    good = manifest.usable(table).set_index("image_id")
    assert sorted(good.index) == sorted(report.added)
    assert good.loc[sha(messy / "gray16.png"), ["width", "height"]].tolist() == [24, 16]
    for image_id, row in good.iterrows():
        assert row["path"] == f"images/{image_id}.png" and row["label_source"] == "none"
        stored = read_image(settings.data_dir / row["path"])
        assert stored.shape == (row["height"], row["width"], 3)
        assert mode_of(settings.data_dir / row["path"]) == "RGB"
    np.testing.assert_array_equal(
        read_image(settings.images_dir / f"{sha(messy / 'rgb8.png')}.png"), read_image(messy / "rgb8.png")
    )
    assert read_image(settings.images_dir / f"{sha(messy / 'gray16.png')}.png").max() > 200  # not dark
    rgb8_id = sha(messy / "rgb8.png")
    assert sha(settings.images_dir / f"{rgb8_id}.png") == rgb8_id  # an 8-bit RGB PNG is kept byte for byte

    bad = table[table["quarantine_reason"] != ""]
    # the quarantine lies beside data/, not in it (DVC versions and pushes data/ every round)
    assert bad["width"].isna().all() and bad["path"].str.startswith("../quarantine/").all()
    assert not settings.quarantine_dir.is_relative_to(settings.data_dir)
    for rel in bad["path"]:
        assert (settings.data_dir / rel).resolve().parent == settings.quarantine_dir
        assert (settings.data_dir / rel).is_file()
    assert (
        (settings.quarantine_dir / f"{sha(messy / 'readme.txt')[:12]}_readme.txt")
        .read_text()
        .startswith("line")
    )

    with open(settings.quarantine_dir / "reasons.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert {Path(r["file"]).name: r["reason"] for r in lines} == reasons
    assert {r["round"] for r in lines} == {"0"} and all(len(r["image_id"]) == 64 for r in lines)


def test_reingest_adds_nothing(settings: Settings, messy: Path) -> None:
    ingest_folder(settings, messy, round_no=0)
    table = manifest.load(settings.manifest_path)
    csv_text = (settings.quarantine_dir / "reasons.csv").read_text()

    again = ingest_folder(settings, messy, round_no=1)
    assert again.added == [] and again.quarantined == []
    assert len(again.duplicates) == 9  # every non-hidden file, the bad ones included
    pd.testing.assert_frame_equal(manifest.load(settings.manifest_path), table)
    assert (settings.quarantine_dir / "reasons.csv").read_text() == csv_text


def test_new_files_join_an_existing_manifest(settings: Settings, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_png(first / "x.png", noise(8, 8, seed=5))
    write_png(second / "y.png", noise(8, 8, seed=6))
    (second / "x_again.png").write_bytes((first / "x.png").read_bytes())
    ingest_folder(settings, first, round_no=0)
    report = ingest_folder(settings, second, round_no=3, source="cam2", split="holdout")
    assert report.added == [sha(second / "y.png")] and report.duplicates == [str(second / "x_again.png")]
    table = manifest.load(settings.manifest_path).set_index("image_id")
    assert table.loc[sha(second / "y.png"), ["round", "source", "split"]].tolist() == [3, "cam2", "holdout"]
    assert table.loc[sha(first / "x.png"), ["round", "source", "split"]].tolist() == [0, "a", "train"]


def make_dataset(root: Path, classes: list[str]) -> Path:
    """A Loom dataset folder: a (train, GT mask), b (test, good mask + caption), c (test, wrong-size mask)."""
    write_png(root / "images" / "a.png", noise(16, 20, seed=10))
    write_png(root / "images" / "b.png", noise(16, 20, seed=11))
    write_png(root / "images" / "c.png", noise(16, 20, seed=12))
    train_mask = np.zeros((16, 20), np.uint8)
    train_mask[2:5, 2:5] = 1
    write_mask(root / "masks" / "a.png", train_mask)
    test_mask = np.zeros((16, 20), np.uint8)
    test_mask[4:8, 4:8] = 1  # dataset class 1
    test_mask[10:12, 10:12] = 2  # dataset class 2
    write_mask(root / "masks" / "b.png", test_mask)
    write_mask(root / "masks" / "c.png", np.zeros((8, 20), np.uint8))
    (root / "captions").mkdir()
    (root / "captions" / "b.txt").write_text("a brown stain next to a small hole")
    (root / "captions" / "a.txt").write_text("train caption")
    (root / "classes.json").write_text(json.dumps(classes))
    rows = pd.DataFrame(
        {
            "image_id": [sha(root / "images" / f"{s}.png") for s in "abc"],
            "path": [f"images/{s}.png" for s in "abc"],
            "split": ["train", "test", "test"],
            "source": "fabric-sim",
            "score": np.nan,
            "uncertainty": np.nan,
        }
    )
    manifest.save(rows, root / "manifest.parquet")
    return root


def test_dataset_folder_keeps_splits_and_copies_only_test_masks(settings: Settings, tmp_path: Path) -> None:
    # the dataset lists stain before hole: its mask values must be remapped to the project's order
    src = make_dataset(tmp_path / "ds", ["stain", "hole"])
    report = ingest_folder(settings, src, round_no=0)
    a, b, c = (sha(src / "images" / f"{s}.png") for s in "abc")

    assert sorted(report.added) == sorted([a, b]) and report.human_labeled == [b]
    assert report.quarantined == [(str((src / "images" / "c.png").resolve()), report.quarantined[0][1])]
    assert report.quarantined[0][1] == "mask c.png: wrong size: mask is 20x8 but its image is 20x16"

    table = manifest.load(settings.manifest_path).set_index("image_id")
    assert (
        table.loc[a, "split"] == "train"
        and table.loc[b, "split"] == "test"
        and table.loc[c, "split"] == "test"
    )
    assert table.loc[a, ["label_source", "review_state", "classes"]].tolist() == ["none", "none", ""]
    assert table.loc[b, ["label_source", "review_state", "classes"]].tolist() == [
        "human",
        "reviewed",
        "hole,stain",
    ]
    assert table.loc[a, "source"] == "fabric-sim"
    assert table.loc[c, "quarantine_reason"].startswith("mask c.png: wrong size")

    assert sorted(p.name for p in settings.masks_dir.iterdir()) == [f"{b}.png"]  # no train ground truth
    with Image.open(settings.masks_dir / f"{b}.png") as im:
        mask = np.asarray(im)
    assert (
        mask[5, 5] == settings.class_index("stain") == 2 and mask[10, 10] == settings.class_index("hole") == 1
    )
    assert sorted(p.name for p in settings.captions_dir.iterdir()) == [f"{b}.txt"]
    assert (settings.captions_dir / f"{b}.txt").read_text().startswith("a brown stain")


def test_dataset_mask_with_unknown_class_is_quarantined(settings: Settings, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "ds", list(settings.classes))
    bad = np.zeros((16, 20), np.uint8)
    bad[0, 0] = 255  # a binary 0/255 mask, not class indices
    write_mask(src / "masks" / "b.png", bad)
    report = ingest_folder(settings, src, round_no=0)
    reasons = dict(report.quarantined)
    assert reasons[str((src / "images" / "b.png").resolve())].startswith(
        "mask b.png: unknown class ids [255]"
    )
    assert not settings.masks_dir.exists() or not any(settings.masks_dir.iterdir())


def test_missing_source_and_bad_split(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest_folder(settings, tmp_path / "nowhere", round_no=0)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="split 'val'"):
        ingest_folder(settings, tmp_path / "x", round_no=0, split="val")


def test_dataset_rows_without_files_and_files_without_rows(settings: Settings, tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "ds", list(settings.classes))
    (src / "images" / "a.png").unlink()  # listed, missing
    write_png(src / "images" / "extra.png", noise(6, 6, seed=40))  # present, not listed
    report = ingest_folder(settings, src, round_no=2, split="holdout")
    assert (str(src / "images" / "a.png"), "listed in manifest.parquet but missing") in report.quarantined
    table = manifest.load(settings.manifest_path).set_index("image_id")
    assert table.loc[sha(src / "images" / "extra.png"), ["split", "source"]].tolist() == ["holdout", "ds"]
    assert table.loc[sha(src / "images" / "b.png"), "split"] == "test"  # the dataset's split wins
