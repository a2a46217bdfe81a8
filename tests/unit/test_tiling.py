"""Tiling: tiles cover the image, stitching reproduces a per-pixel function exactly, seams stay smooth."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.tiling import blend_window, predict_tiled, stitch_tiles, tile_origins, tile_starts


def per_pixel_fn(tiles: np.ndarray) -> np.ndarray:
    """(B, h, w, 3) uint8 -> (B, 2, h, w) float32: a non-linear function of each pixel alone."""
    as_float = tiles.astype(np.float32) / 255.0
    channel_a = np.sin(3.0 * as_float[..., 0]) + as_float[..., 1] * as_float[..., 2]
    channel_b = np.sqrt(as_float.sum(axis=-1))
    return np.stack([channel_a, channel_b], axis=1).astype(np.float32)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(4096, 256, 32), (300, 256, 32), (256, 256, 32), (100, 256, 0), (1000, 7, 3)],
)
def test_tile_starts_cover_the_whole_length(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + tile == length if length > tile else starts == [0]
    covered = np.zeros(max(length, tile), dtype=bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered[:length].all()
    # neighbours share at least `overlap` pixels and no start repeats
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))
    assert len(set(starts)) == len(starts)


def test_tile_starts_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)
    with pytest.raises(ValueError, match="tile"):
        tile_starts(100, 0, 0)


def test_blend_window_is_positive_and_peaks_in_the_middle() -> None:
    window = blend_window(64, 48, 16)
    assert window.shape == (64, 48)
    assert window.min() > 0
    assert window[32, 24] == pytest.approx(1.0)
    assert window[0, 0] < window[8, 8] < window[20, 20]


def test_line_scan_frame_is_stitched_to_full_resolution() -> None:
    image = random_image(256, 4096)
    calls: list[tuple[int, ...]] = []

    def recording_fn(tiles: np.ndarray) -> np.ndarray:
        calls.append(tiles.shape)
        return per_pixel_fn(tiles)

    stitched = predict_tiled(recording_fn, image, tile=256, overlap=32, batch_size=8)
    assert stitched.shape == (2, 256, 4096)
    assert stitched.dtype == np.float32
    assert all(shape[1:] == (256, 256, 3) and shape[0] <= 8 for shape in calls)
    assert sum(shape[0] for shape in calls) == len(tile_origins(256, 4096, 256, 32))
    np.testing.assert_array_equal(stitched, per_pixel_fn(image[None])[0])


@pytest.mark.parametrize(("height", "width"), [(97, 61), (300, 517), (257, 255), (1, 40)])
def test_odd_and_small_sizes_match_the_direct_result(height: int, width: int) -> None:
    image = random_image(height, width, seed=height + width)
    stitched = predict_tiled(per_pixel_fn, image, tile=64, overlap=12, batch_size=3)
    assert stitched.shape == (2, height, width)
    np.testing.assert_array_equal(stitched, per_pixel_fn(image[None])[0])


def test_image_equal_to_the_tile_runs_once() -> None:
    image = random_image(128, 128)
    batches: list[int] = []

    def counting_fn(tiles: np.ndarray) -> np.ndarray:
        batches.append(len(tiles))
        return per_pixel_fn(tiles)

    stitched = predict_tiled(counting_fn, image, tile=128, overlap=16)
    assert batches == [1]
    np.testing.assert_array_equal(stitched, per_pixel_fn(image[None])[0])


def test_small_image_is_padded_then_cropped_back() -> None:
    image = random_image(40, 30)
    seen_shapes: list[tuple[int, ...]] = []

    def shape_fn(tiles: np.ndarray) -> np.ndarray:
        seen_shapes.append(tiles.shape)
        return per_pixel_fn(tiles)

    stitched = predict_tiled(shape_fn, image, tile=64, overlap=8)
    assert seen_shapes == [(1, 64, 64, 3)]
    assert stitched.shape == (2, 40, 30)
    np.testing.assert_array_equal(stitched, per_pixel_fn(image[None])[0])


def test_blending_hides_seams_between_disagreeing_tiles() -> None:
    """Tiles with a constant offset each: the blend changes gradually across the overlap, no step."""
    origins = tile_origins(64, 160, 64, 32)
    outputs = [np.full((1, 64, 64), float(index), dtype=np.float32) for index in range(len(origins))]
    stitched = stitch_tiles(outputs, origins, 64, 160, overlap=32)[0, 32]
    assert stitched.min() == pytest.approx(0.0) and stitched.max() == pytest.approx(len(origins) - 1)
    assert np.abs(np.diff(stitched)).max() < 0.15  # a hard seam would jump by 1.0


def test_wrong_output_shape_is_reported() -> None:
    with pytest.raises(ValueError, match="tile function must return"):
        predict_tiled(lambda tiles: np.zeros((len(tiles), 1, 8, 8), np.float32), random_image(64, 64), 32, 8)
