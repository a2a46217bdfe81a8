"""`loom pseudo-label` on a folder as a user runs it: a real subprocess, real files, the prediction layout."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loom.data.imageio import read_image, read_mask
from loom.datasets.fabric import generate
from loom.evaluation.metrics import image_auroc

LOOM = [sys.executable, "-m", "app.cli"]


def run_loom(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # HF_HUB_OFFLINE: the open_clip path must never reach for the network, here as on an offline line PC.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOOM_WORKSPACE": str(cwd / "ws")}
    return subprocess.run([*LOOM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fabric")
    generate(root / "data", n_images=24, size=128, defect_fraction=0.3, test_fraction=0.0, seed=3)
    return root


def read_scores(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_pseudo_label_folder_writes_the_prediction_layout(fabric: Path) -> None:
    images = sorted((fabric / "data" / "images").glob("*.png"))
    (fabric / "data" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = fabric / "out-auto"
    result = run_loom("pseudo-label", str(fabric / "data" / "images"), "--out", str(out), cwd=fabric)
    assert result.returncode == 0, result.stderr[-2000:]
    # No open_clip weights on this machine: auto says it fell back to the backbone teacher.
    assert "teacher: backbone teacher: no open_clip weights" in result.stdout
    rows = {row["image"]: row for row in read_scores(out)}
    assert set(rows) >= {p.stem for p in images}
    for path in images:
        anomaly_map = np.load(out / "maps" / f"{path.stem}.npy")
        mask = read_mask(out / "masks" / f"{path.stem}.png", 6)
        assert anomaly_map.shape == mask.shape == read_image(path).shape[:2]
        assert anomaly_map.dtype == np.float32
        assert rows[path.stem]["label"] in ("defect", "normal")
        assert (rows[path.stem]["label"] == "defect") == bool(mask.any())
    # The generator's defective images score above its normal ones far more often than not (a tiny,
    # unlabeled pool of 24 images at 128 px: the teacher's benchmark is in BENCHMARKS.md).
    truth = [read_mask(fabric / "data" / "masks" / f"{p.stem}.png", 6).any() for p in images]
    scores = [float(rows[p.stem]["score"]) for p in images]
    assert image_auroc(np.array(scores), np.array(truth, dtype=int)) >= 0.7


def test_few_shot_with_normals_folder(fabric: Path) -> None:
    truth = {p.stem: read_mask(p, 6).any() for p in sorted((fabric / "data" / "masks").glob("*.png"))}
    normals = fabric / "normals"
    normals.mkdir(exist_ok=True)
    for stem in [s for s, defective in truth.items() if not defective][:2]:
        (normals / f"{stem}.png").write_bytes((fabric / "data" / "images" / f"{stem}.png").read_bytes())
    out = fabric / "out-fewshot"
    result = run_loom(
        "pseudo-label", str(fabric / "data" / "images"), "--out", str(out),
        "--normals", str(normals), "--shots", "2", "--teacher", "backbone", cwd=fabric,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone teacher (asked for)" in result.stdout
    assert len(read_scores(out)) >= len(truth)


def test_openclip_without_weights_names_both_ways_to_get_them(fabric: Path) -> None:
    result = run_loom(
        "pseudo-label", str(fabric / "data" / "images"), "--out", str(fabric / "out-clip"),
        "--teacher", "openclip", cwd=fabric,
    )  # fmt: skip
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "pretrained" in message and "checkpoint" in message
