"""The prediction layout (scores.csv, maps/, masks/, overlays/) and `predict_paths` over real files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loom.data.predict import class_color, overlay, predict_paths, unique_stems, write_predictions
from models.student.fpn import FPNConfig, FPNSegmenter

CLASSES = ("hole", "stain", "defect")


pytestmark = pytest.mark.usefixtures("single_thread")


def read_scores(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "scores.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_write_predictions_writes_exactly_the_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask_a = np.zeros((20, 30), np.uint8)
    mask_a[2:6, 3:9] = 1
    mask_a[10:12, 10:20] = 3
    map_a = rng.random((20, 30)).astype(np.float64)  # written as float32 whatever comes in
    image_a = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    results = [
        ("a", map_a, mask_a, 0.9, image_a),
        ("b", np.zeros((8, 12), np.float32), np.zeros((8, 12), np.uint8), 0.1, None),
    ]
    out = write_predictions(tmp_path / "out", iter(results), CLASSES, image_threshold=0.5)

    assert relative_files(out) == {
        "scores.csv",
        "maps/a.npy",
        "maps/b.npy",
        "masks/a.png",
        "masks/b.png",
        "overlays/a.png",  # only where the image was given
    }
    rows = read_scores(out)
    assert list(rows[0]) == ["image", "score", "label", "classes", "error"]
    assert [(r["image"], r["label"], r["classes"]) for r in rows] == [
        ("a", "defect", "hole,defect"),
        ("b", "normal", ""),
    ]
    assert float(rows[0]["score"]) == pytest.approx(0.9)

    saved_map = np.load(out / "maps" / "a.npy")
    assert saved_map.dtype == np.float32 and saved_map.shape == (20, 30)
    np.testing.assert_allclose(saved_map, map_a, rtol=1e-6)
    saved_mask = Image.open(out / "masks" / "a.png")
    assert saved_mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(saved_mask), mask_a)
    saved_overlay = np.asarray(Image.open(out / "overlays" / "a.png"))
    assert saved_overlay.shape == (20, 30, 3) and saved_overlay.dtype == np.uint8


def test_write_predictions_lists_errors_after_results(tmp_path: Path) -> None:
    results = [("ok", np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), 0.5, None)]
    out = write_predictions(tmp_path, results, CLASSES, 0.5, errors=[("broken", "truncated")])
    rows = read_scores(out)
    assert [(r["image"], r["label"], r["error"]) for r in rows] == [
        ("ok", "defect", ""),
        ("broken", "error", "truncated"),
    ]
    assert not (out / "maps" / "broken.npy").exists()


def test_write_predictions_rejects_a_map_and_mask_of_different_sizes(tmp_path: Path) -> None:
    results = [("x", np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8), 0.5, None)]
    with pytest.raises(ValueError, match="x"):
        write_predictions(tmp_path, results, CLASSES, 0.5)


def test_overlay_tints_and_outlines_each_class_in_its_colour() -> None:
    image = np.full((16, 16, 3), 128, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 2
    out = overlay(image, mask, CLASSES)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])  # background untouched
    assert tuple(out[4, 4]) == class_color(2)  # contour in full colour
    inside = out[7, 7].astype(int)
    assert not np.array_equal(inside, image[7, 7]) and tuple(inside) != class_color(2)  # tinted, not painted
    assert class_color(1) != class_color(2)


def test_unique_stems_keeps_distinct_names_for_files_sharing_a_stem() -> None:
    names = unique_stems([Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png"), Path("d/x.png")])
    assert len(set(names)) == 4
    assert names[2] == "y"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = FPNSegmenter(FPNConfig(num_classes=len(CLASSES), fpn_channels=16, image_size=64, tiny=True))
    return model.save_pretrained(
        tmp_path / "model", metadata={"image_threshold": 0.0, "classes": list(CLASSES)}
    )


def test_predict_paths_writes_good_images_and_reports_a_corrupt_one(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 200, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths = sorted(images.iterdir())

    with caplog.at_level(logging.WARNING, logger="loom.data.predict"):
        progress: list[int] = []
        out = predict_paths(model_dir, paths, tmp_path / "out", CLASSES, on_progress=progress.append)

    assert relative_files(out) == {"scores.csv", "maps/good.npy", "masks/good.png", "overlays/good.png"}
    assert np.load(out / "maps" / "good.npy").shape == (48, 200)  # wider than the 64 px tile: stitched
    assert np.asarray(Image.open(out / "masks" / "good.png")).shape == (48, 200)
    rows = {r["image"]: r for r in read_scores(out)}
    assert rows["good"]["label"] == "defect"  # threshold 0.0 from the model's config.json
    assert rows["bad"]["label"] == "error" and "bad.png" in rows["bad"]["error"]
    assert any("bad.png" in record.getMessage() for record in caplog.records)
    assert progress == [1, 2]


def test_predict_paths_without_overlays_and_with_classes_from_the_model(
    tmp_path: Path, model_dir: Path
) -> None:
    image_path = tmp_path / "frame.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image_path)
    out = predict_paths(model_dir, [image_path], tmp_path / "out", classes=None, overlays=False)
    assert relative_files(out) == {"scores.csv", "maps/frame.npy", "masks/frame.png"}


def test_predict_paths_refuses_class_names_that_do_not_match_the_model(
    tmp_path: Path, model_dir: Path
) -> None:
    with pytest.raises(ValueError, match="3 defect classes"):
        predict_paths(model_dir, [], tmp_path / "out", classes=["hole"])
