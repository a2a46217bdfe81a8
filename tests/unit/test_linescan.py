"""The procedural line-scan set: layout, grayscale frames, defect geometry, fabric region and falloff."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from loom.config import DEFAULT_CLASSES, load_settings
from loom.data.ingest import ingest_folder
from loom.datasets.fabric import LINE_SCAN_KINDS, build_line_frame, generate_line_scan
from loom.datasets.fabric.linescan import LINE_KINDS, LinePlan, plan_frame
from loom.datasets.folder import load_labeled_folder

KINDS = list(LINE_SCAN_KINDS)
H, W = 64, 1024


def _seed_where(
    predicate: Callable[[LinePlan], bool], defective: bool, first: str | None = None, h: int = H, w: int = W
) -> int:
    """The first seed whose plan (cheap: nothing is rendered) satisfies ``predicate``."""
    for seed in range(500):
        if predicate(plan_frame(seed, h, w, KINDS, defective, first)):
            return seed
    raise AssertionError("no seed found")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_set_is_a_deterministic_loom_dataset_folder(tmp_path: Path) -> None:
    out = generate_line_scan(tmp_path / "a", 6, width=W, height=H, defect_fraction=0.5, seed=3, workers=1)
    table = pd.read_parquet(out / "manifest.parquet")
    frames = json.loads((out / "frames.json").read_text())
    assert json.loads((out / "classes.json").read_text()) == list(DEFAULT_CLASSES)
    assert len(table) == 6 and set(table["split"]) <= {"train", "test"}
    assert sum(bool(c) for c in table["classes"]) == 3  # half the frames hold defects
    for row in table.itertuples():
        data = (out / row.path).read_bytes()
        stem = Path(row.path).stem
        assert row.image_id == hashlib.sha256(data).hexdigest() == frames[stem]["image_id"]
        with Image.open(out / row.path) as image, Image.open(out / "masks" / f"{stem}.png") as mask:
            assert image.mode == "L" and mask.mode == "L"
            assert image.size == mask.size == (row.width, row.height) == (W, H)
            values = np.asarray(mask)
        b0, b1 = frames[stem]["body"]
        assert not values[:, :b0].any() and not values[:, b1:].any()  # never the selvedge or background
        present = [DEFAULT_CLASSES[k - 1] for k in np.unique(values) if k]
        assert ",".join(present) == row.classes
        assert (out / "captions" / f"{stem}.txt").read_text().startswith(frames[stem]["weave"])

    assert len(load_labeled_folder(out, DEFAULT_CLASSES)) == 6
    report = ingest_folder(load_settings(tmp_path / "ws"), out, round_no=0)
    assert len(report.added) == 6 and not report.quarantined

    again = generate_line_scan(tmp_path / "b", 6, width=W, height=H, defect_fraction=0.5, seed=3, workers=1)
    assert _files(again) == _files(out)
    other = generate_line_scan(tmp_path / "c", 2, width=W, height=H, seed=4, workers=1)
    assert _files(other)["images/linescan_00000.png"] != _files(out)["images/linescan_00000.png"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_defect_kind_has_its_geometry(kind: str) -> None:
    seed = _seed_where(lambda p: any(d.kind == kind for d in p.defects), True, kind)
    frame, mask, records = build_line_frame(seed, H, W, first=kind)
    plan = frame.plan
    k = next(i for i, d in enumerate(plan.defects) if d.kind == kind)
    d, m = plan.defects[k], frame.masks[k]
    b0, b1 = plan.body
    assert m.any() and not m[:, :b0].any() and not m[:, b1:].any()
    assert any(r["kind"] == kind for r in records)
    ys, xs = np.nonzero(m)
    if kind == "broken_pick":  # across the whole fabric width, in one band of rows
        assert m[:, b0:b1].any(axis=0).all()
        assert ys.max() - ys.min() <= 4 * plan.spec.pitch * plan.spec.aspect + 2
        assert ys.min() - 3 * plan.spec.pitch <= d.row <= ys.max() + 3 * plan.spec.pitch
    elif kind == "broken_end":  # along the whole frame height, in one band of columns
        assert m.any(axis=1).all()
        assert xs.max() - xs.min() <= 4 * plan.spec.pitch + 2
        assert xs.min() - 3 * plan.spec.pitch <= d.col <= xs.max() + 3 * plan.spec.pitch
    elif kind == "density_change":  # from its start row to the bottom, across the fabric
        start = int(d.row)
        assert 0 < start < H and m[start:, b0:b1].all() and not m[:start].any()
    else:  # local: near where it was placed, small
        assert np.hypot(ys.mean() - d.row, xs.mean() - d.col) < 4 * d.size + 3 * plan.spec.pitch
        assert xs.max() - xs.min() < W / 4
    assert mask.max() <= len(DEFAULT_CLASSES)


def test_clean_frames_have_empty_masks() -> None:
    for seed in (0, 1, 2):
        frame, mask, records = build_line_frame(seed, H, W, defective=False)
        assert not mask.any() and records == [] and frame.plan.defects == ()


def test_brightness_falls_off_toward_both_ends_of_the_line() -> None:
    w = 2048
    seed = _seed_where(lambda p: p.background is None and p.falloff > 0.3, False, w=w)
    frame, _, _ = build_line_frame(seed, H, w, defective=False)
    image = frame.image.astype(np.float64)
    b0, b1 = frame.plan.body
    middle = image[:, int(w * 0.45) : int(w * 0.55)].mean()
    assert image[:, b0 : b0 + w // 20].mean() < 0.9 * middle
    assert image[:, b1 - w // 20 : b1].mean() < 0.9 * middle


@pytest.mark.parametrize("kind", ["dark", "saturated", "clutter"])
def test_the_fabric_region_record_matches_the_background(kind: str) -> None:
    seed = _seed_where(lambda p: p.background == kind, False)
    frame, _, _ = build_line_frame(seed, H, W, defective=False)
    plan, image = frame.plan, frame.image.astype(np.float64)
    x0, x1 = plan.fabric
    assert (x0 == 0) != (x1 == W)  # background at exactly one end
    background = image[:, :x0] if x0 > 0 else image[:, x1:]
    fabric = image[:, x0:x1]
    selvedge = plan.selvedges
    assert len(selvedge) == 1 and (selvedge[0][0] == x0 or selvedge[0][1] == x1)
    assert x0 <= plan.body[0] < plan.body[1] <= x1
    if kind == "dark":
        assert background.mean() < 20 and background.mean() < fabric.mean()
    elif kind == "saturated":
        assert (background == 255).mean() > 0.99 and fabric.mean() < 250
    else:  # stationary machine parts: columns vary much more than a column does along the frame
        assert background.mean(axis=0).std() > 2 * np.median(background.std(axis=0)) or background.std() > 5


def test_a_full_size_frame_has_the_sensor_shape() -> None:
    seed = _seed_where(lambda p: any(d.kind in LINE_KINDS for d in p.defects), True, h=256, w=4096)
    frame, mask, _ = build_line_frame(seed, 256, 4096)
    assert frame.image.shape == mask.shape == (256, 4096) and frame.image.dtype == np.uint8
    assert mask.any()


def test_cli_writes_the_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "datasets",
            "linescan",
            "--out",
            str(tmp_path / "ls"),
            "--frames",
            "2",
            "--size",
            "512x32",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "ls" / "manifest.parquet")
    assert list(table["width"]) == [512, 512] and list(table["height"]) == [32, 32]
    bad = CliRunner().invoke(app, ["datasets", "linescan", "--out", str(tmp_path / "x"), "--size", "big"])
    assert bad.exit_code != 0
