"""loom.datasets.importers: tiny fake MVTec AD trees and plain folders -> Loom dataset folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from loom.config import DEFAULT_CLASSES, load_settings
from loom.data import manifest
from loom.data.imageio import read_image, read_mask, write_png
from loom.data.ingest import ingest_folder
from loom.datasets.importers import defect_class, find_mvtec_category, import_mvtec, import_plain

H, W = 12, 16


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fabric(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def gt_mask(path: Path, box: tuple[slice, slice]) -> None:
    binary = np.zeros((H, W), np.uint8)
    binary[box] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(binary).save(path)


def make_mvtec(root: Path, category: str = "carpet") -> Path:
    """<category>/train/good (2), test/good (1), test/hole, test/metal_contamination, test/squeeze (GT each),
    test/color/001.png without a GT mask."""
    cat = root / category
    for i in range(2):
        write_png(cat / "train" / "good" / f"{i:03d}.png", fabric(i))
    write_png(cat / "test" / "good" / "000.png", fabric(10))
    for k, defect in enumerate(["hole", "metal_contamination", "squeeze"]):
        write_png(cat / "test" / defect / "000.png", fabric(20 + k))
        gt_mask(cat / "ground_truth" / defect / "000_mask.png", (slice(2, 5), slice(3 + k, 7 + k)))
    write_png(cat / "test" / "color" / "001.png", fabric(30))
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")
    return cat


def test_defect_class_mapping() -> None:
    classes = DEFAULT_CLASSES
    expected = {
        "hole": "hole",
        "cut": "hole",
        "color": "stain",
        "metal_contamination": "stain",
        "glue_strip": "stain",
        "thread": "broken_yarn",
        "broken_large": "broken_yarn",
        "Broken-Yarn": "broken_yarn",
        "fold": "misweave",
        "float": "misweave",
        "knot": "knot",
        "squeeze": "defect",
        "gray_stroke": "defect",
    }
    assert {name: defect_class(name, classes) for name in expected} == expected
    with pytest.raises(ValueError, match="no 'defect' class"):
        defect_class("squeeze", ["hole", "stain"])


def test_import_mvtec_category(tmp_path: Path) -> None:
    cat = make_mvtec(tmp_path / "mvtec")
    dst = import_mvtec(cat, tmp_path / "ds")
    assert json.loads((dst / "classes.json").read_text()) == list(DEFAULT_CLASSES)

    table = manifest.load(dst / "manifest.parquet").set_index("path")
    assert len(table) == 7
    assert (table["split"] == "train").sum() == 2 and (table["split"] == "test").sum() == 5
    assert set(table["source"]) == {"mvtec-carpet"}
    for rel, row in table.iterrows():
        assert row.name == rel and row["image_id"] == sha(dst / rel)
        assert (row["width"], row["height"]) == (W, H)
    # PNGs are copied byte for byte, so ids equal the original files' hashes
    assert table.loc["images/train_good_000.png", "image_id"] == sha(cat / "train" / "good" / "000.png")

    masks = {p.stem: read_mask(p, len(DEFAULT_CLASSES), (H, W)) for p in (dst / "masks").iterdir()}
    assert set(masks) == {
        "test_good_000",
        "test_hole_000",
        "test_metal_contamination_000",
        "test_squeeze_000",
    }
    assert not masks["test_good_000"].any()
    for stem, name, x0 in [("test_hole_000", "hole", 3), ("test_metal_contamination_000", "stain", 4)]:
        expected = np.zeros((H, W), np.uint8)
        expected[2:5, x0 : x0 + 4] = DEFAULT_CLASSES.index(name) + 1
        np.testing.assert_array_equal(masks[stem], expected)
    assert set(np.unique(masks["test_squeeze_000"])) == {0, DEFAULT_CLASSES.index("defect") + 1}

    assert table.loc["images/test_hole_000.png", ["label_source", "classes"]].tolist() == ["human", "hole"]
    assert table.loc["images/test_color_001.png", "label_source"] == "none"  # no GT mask for it
    assert table.loc["images/train_good_000.png", "label_source"] == "none"


def test_mvtec_root_with_several_categories(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    make_mvtec(root, "carpet")
    make_mvtec(root, "leather")
    with pytest.raises(ValueError, match=r"several MVTec AD categories.*\['carpet', 'leather'\]"):
        import_mvtec(root, tmp_path / "ds")
    with pytest.raises(ValueError, match=r"no MVTec AD category 'grid'.*carpet"):
        find_mvtec_category(root, "grid")
    dst = import_mvtec(root, tmp_path / "ds", category="leather")
    assert set(manifest.load(dst / "manifest.parquet")["source"]) == {"mvtec-leather"}
    with pytest.raises(FileExistsError, match="not empty"):
        import_mvtec(root, tmp_path / "ds", category="carpet")
    with pytest.raises(ValueError, match="not an MVTec AD folder"):
        find_mvtec_category(tmp_path / "ds")


def test_mvtec_then_ingest(tmp_path: Path) -> None:
    dst = import_mvtec(make_mvtec(tmp_path / "mvtec"), tmp_path / "ds")
    settings = load_settings(tmp_path / "ws")
    report = ingest_folder(settings, dst, round_no=0)
    assert len(report.added) == 7 and report.quarantined == [] and len(report.human_labeled) == 4
    table = manifest.load(settings.manifest_path)
    human = table[table["label_source"] == "human"]
    assert set(human["split"]) == {"test"} and len(list(settings.masks_dir.iterdir())) == 4
    assert sorted(human["classes"]) == ["", "defect", "hole", "stain"]


def test_import_plain_keeps_unreadable_files_for_quarantine(tmp_path: Path) -> None:
    src = tmp_path / "drop"
    write_png(src / "day" / "a.png", fabric(1))
    (src / "night").mkdir()
    Image.fromarray(fabric(2)).save(src / "night" / "b.jpg")
    Image.fromarray(fabric(3)).save(src / "c.tif")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "notes.txt").write_text("camera 2 refocused")
    (src / ".hidden.png").write_bytes(b"x")

    dst = import_plain(src, tmp_path / "ds")
    names = sorted(p.name for p in (dst / "images").iterdir())
    assert names == ["broken.jpg", "c.png", "day__a.png", "night__b.png", "notes.txt"]
    np.testing.assert_array_equal(read_image(dst / "images" / "c.png"), fabric(3))  # TIFF re-encoded as PNG
    table = manifest.load(dst / "manifest.parquet")
    assert len(table) == 5 and set(table["split"]) == {"train"} and not (dst / "masks").exists()
    assert pd.isna(table.set_index("path").loc["images/notes.txt", "width"])  # unreadable: no size

    settings = load_settings(tmp_path / "ws")
    report = ingest_folder(settings, dst, round_no=0)
    assert len(report.added) == 3
    reasons = {Path(p).name: r for p, r in report.quarantined}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert reasons["broken.jpg"].startswith("truncated or corrupt JPEG header")  # a JPEG start, then junk
    assert reasons["notes.txt"].startswith("not an image")
    assert (src / "broken.jpg").exists()  # never removed from the source
