"""Line-scan frames through the streaming tiler, the students' `iter_predictions` and `predict_paths`.

Tiles of consecutive frames share batches, every image's output is the one it gets alone, blended tiles
leave no seam, and memory holds a bounded number of frames whatever the length of the stream.
"""

from __future__ import annotations

import math
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import loom.data.predict as predict_module
from models.student.fpn import FPNConfig, FPNSegmenter
from models.student.training import iter_predictions, predict_images
from models.tiling import (
    TileFn,
    pad_to_min_size,
    predict_tiled,
    predict_tiled_stream,
    stitch_tiles,
    tile_origins,
)
from tests.students import normal_batch, settle_batch_norm

pytestmark = pytest.mark.usefixtures("single_thread")

TILE, OVERLAP = 32, 8
#: A line-scan frame in miniature: 40 x 600 cut into 32 px tiles with 8 px overlap is 2 x 25 = 50 tiles.
FRAME_SHAPE = (40, 600)
CLASSES = ("hole", "stain", "defect")


def local_mean_fn(mode: str = "reflect", size: int = 5) -> TileFn:
    """(B, h, w, 3) uint8 -> (B, 2, h, w) float32: the grey level's `size` x `size` local mean (in [0, 1])
    and its complement. Depends on neighbours, so a tile's border sees less context than the image does:
    ``mode="constant"`` pads tiles with zeros there, as a CNN does, and reads dark at every tile edge."""

    def fn(tiles: np.ndarray) -> np.ndarray:
        grey = tiles.astype(np.float64).mean(axis=-1) / 255.0  # (B, h, w)
        mean = ndimage.uniform_filter(grey, size=(1, size, size), mode=mode)
        return np.stack([mean, 1.0 - mean], axis=1).astype(np.float32)

    return fn


def untiled(fn: TileFn, image: np.ndarray) -> np.ndarray:
    """(C, H, W): `fn` on the whole image at once, the result tiling tries to reproduce."""
    return fn(image[None])[0]


def stitched_reference(fn: TileFn, image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """(C, H, W): every tile predicted alone, then blended by `stitch_tiles` (the non-streaming path)."""
    height, width = image.shape[:2]
    padded = pad_to_min_size(image, tile, tile)
    origins = tile_origins(padded.shape[0], padded.shape[1], tile, overlap)
    outputs = [fn(padded[None, top : top + tile, left : left + tile])[0] for top, left in origins]
    return stitch_tiles(outputs, origins, padded.shape[0], padded.shape[1], overlap)[:, :height, :width]


def weave(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 grey weave-like texture with sensor noise."""
    yy, xx = np.mgrid[:height, :width]
    grey = 100 + 12 * np.sin(xx * 1.3) * np.sin(yy * 1.3) + rng.normal(0, 4, (height, width))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def mixed_images() -> list[np.ndarray]:
    """Small, tile-sized, square and long images, one a single row, one taller than wide."""
    shapes = [(20, 25), (32, 32), (70, 70), FRAME_SHAPE, (1, 100), (120, 40), FRAME_SHAPE, (31, 33)]
    return [random_image(h, w, seed) for seed, (h, w) in enumerate(shapes)]


def tiles_of(height: int, width: int, tile: int = TILE, overlap: int = OVERLAP) -> int:
    return len(tile_origins(max(height, tile), max(width, tile), tile, overlap))


# ---- the streaming tiler -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_streamed_images_get_what_each_gets_alone(batch_size: int) -> None:
    fn = local_mean_fn()
    images = mixed_images()
    streamed = list(predict_tiled_stream(fn, iter(images), TILE, OVERLAP, batch_size))
    assert len(streamed) == len(images)
    for image, output in zip(images, streamed, strict=True):
        assert output.shape == (2, *image.shape[:2]) and output.dtype == np.float32
        assert output.flags.c_contiguous
        alone = predict_tiled(fn, image, TILE, OVERLAP, batch_size=1)
        np.testing.assert_allclose(output, alone, atol=1e-5, rtol=0)
        # ... and what blending every tile's own output with `stitch_tiles` gives
        np.testing.assert_allclose(output, stitched_reference(fn, image, TILE, OVERLAP), atol=1e-5, rtol=0)


def test_tiles_of_consecutive_frames_share_batches() -> None:
    n_frames, batch_size = 5, 16
    # Each frame a different flat grey, so a batch tells which frames its tiles came from.
    frames = [np.full((*FRAME_SHAPE, 3), 10 * k + 5, np.uint8) for k in range(n_frames)]
    batches: list[tuple[int, set[int]]] = []

    def recording_fn(tiles: np.ndarray) -> np.ndarray:
        batches.append((len(tiles), {int(v) for v in np.unique(tiles)}))
        return local_mean_fn()(tiles)

    outputs = list(predict_tiled_stream(recording_fn, frames, TILE, OVERLAP, batch_size))

    per_frame = tiles_of(*FRAME_SHAPE)
    assert per_frame == 50
    assert len(batches) == math.ceil(n_frames * per_frame / batch_size) == 16
    assert len(batches) < n_frames * math.ceil(per_frame / batch_size) == 20  # tiling frame by frame
    assert all(size == batch_size for size, _ in batches[:-1])  # only the very last batch is short
    assert any(len(values) == 2 for _, values in batches)  # a batch spanning two frames
    for k, output in enumerate(outputs):
        np.testing.assert_allclose(output[0], (10 * k + 5) / 255.0, atol=1e-6)


def test_the_tile_function_must_return_one_tile_per_crop() -> None:
    with pytest.raises(ValueError, match="tile function must return"):
        list(
            predict_tiled_stream(
                lambda t: np.zeros((1, 1, TILE, TILE), np.float32), [random_image(40, 600, 0)], TILE, 8
            )
        )
    with pytest.raises(ValueError, match="batch_size"):
        list(predict_tiled_stream(local_mean_fn(), [random_image(40, 60, 0)], TILE, OVERLAP, batch_size=0))


# ---- seams ---------------------------------------------------------------------------------------------


def test_a_flat_image_stitched_from_many_tiles_is_flat() -> None:
    image = np.full((*FRAME_SHAPE, 3), 131, np.uint8)
    fn = local_mean_fn()
    np.testing.assert_allclose(predict_tiled(fn, image, TILE, OVERLAP), untiled(fn, image), atol=1e-6, rtol=0)


def test_a_ramp_stitched_from_many_tiles_matches_the_untiled_ramp() -> None:
    """A diagonal ramp (one grey level per 4 px across, 2.5 per row down): no step at any tile border."""
    rows, cols = np.mgrid[: FRAME_SHAPE[0], : FRAME_SHAPE[1]]
    grey = (2.5 * rows + cols / 4.0).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2)
    fn = local_mean_fn()
    stitched, whole = predict_tiled(fn, image, TILE, OVERLAP), untiled(fn, image)
    np.testing.assert_allclose(stitched, whole, atol=5e-4, rtol=0)  # 0.13 grey levels
    # Along a row, the step from pixel to pixel is the untiled one everywhere, tile borders included.
    np.testing.assert_allclose(np.diff(stitched[0], axis=1), np.diff(whole[0], axis=1), atol=5e-4, rtol=0)


def pasted(fn: TileFn, image: np.ndarray) -> np.ndarray:
    """(C, H, W): each tile's output pasted over the previous ones, no blending (what a seam looks like)."""
    out = np.zeros((2, *image.shape[:2]), np.float32)
    for top, left in tile_origins(*image.shape[:2], TILE, OVERLAP):
        out[:, top : top + TILE, left : left + TILE] = fn(image[None, top : top + TILE, left : left + TILE])[
            0
        ]
    return out


def test_a_zero_padded_tile_function_leaves_no_visible_seam() -> None:
    """A CNN-like function reads every tile edge dark (zero padding); the blend weighs those edges down
    to a tenth of the step that pasted tiles show."""
    image = np.full((*FRAME_SHAPE, 3), 200, np.uint8)
    fn = local_mean_fn(mode="constant")
    whole = untiled(fn, image)
    inner = (slice(None), slice(2, -2), slice(2, -2))  # the untiled image's own border is dark too
    seam_error = np.abs(pasted(fn, image) - whole)[inner].max()
    assert seam_error > 0.2  # a tile's edge column misses 2 of its 5 columns: 40 % darker
    assert np.abs(predict_tiled(fn, image, TILE, OVERLAP) - whole)[inner].max() < 0.1 * seam_error


def bar_image() -> tuple[np.ndarray, int]:
    """A plain frame with a bright horizontal bar from x = 10 to 40, across the tile border at x = 24 (the
    second tile's left edge), and that border's column."""
    image = np.full((*FRAME_SHAPE, 3), 100, np.uint8)
    image[14:25, 10:40] = 255
    border = tile_origins(*FRAME_SHAPE, TILE, OVERLAP)[1][1]
    assert border == 24
    return image, border


def test_a_defect_across_a_tile_border_stays_one_region() -> None:
    image, border = bar_image()
    fn = local_mean_fn(mode="constant")
    threshold = (100 + 255) / 2 / 255  # halfway between fabric and bar

    stitched = predict_tiled(fn, image, TILE, OVERLAP)[0]
    _, regions = ndimage.label(stitched > threshold)
    assert regions == 1
    _, untiled_regions = ndimage.label(untiled(fn, image)[0] > threshold)
    assert untiled_regions == 1

    # The check can fail: the same tiles pasted without blending cut the bar in two where the second
    # tile's dark (zero-padded) edge column lands on it.
    unblended = pasted(fn, image)[0]
    _, pasted_regions = ndimage.label(unblended > threshold)
    assert pasted_regions == 2 and not (unblended[14:25, border] > threshold).any()


# ---- memory --------------------------------------------------------------------------------------------


class CountingFrames:
    """A lazy stream of `n` distinct frames that counts how many were pulled and watches which are alive."""

    def __init__(self, n: int, shape: tuple[int, int] = FRAME_SHAPE) -> None:
        self.n, self.shape = n, shape
        self.pulled = 0
        self._refs: list[weakref.ref[np.ndarray]] = []

    def _made(self, k: int) -> np.ndarray:
        frame = random_image(*self.shape, seed=k)
        self._refs.append(weakref.ref(frame))
        self.pulled += 1
        return frame

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(self.n):
            yield self._made(k)  # no local keeps the frame: only the consumer does

    def alive(self) -> int:
        return sum(ref() is not None for ref in self._refs)


def test_the_stream_holds_at_most_two_frames_whatever_its_length() -> None:
    frames = CountingFrames(50)
    pulled_at_yield, alive_at_yield = [], []
    for index, output in enumerate(predict_tiled_stream(local_mean_fn(), frames, TILE, OVERLAP, 16)):
        assert output.shape == (2, *FRAME_SHAPE)
        pulled_at_yield.append(frames.pulled - index)  # pulled but not yet given back, this one included
        alive_at_yield.append(frames.alive())
        del output
    assert len(pulled_at_yield) == 50
    assert pulled_at_yield[0] <= 2  # the first result comes before the third frame is read
    assert max(pulled_at_yield) <= 2
    assert max(alive_at_yield) <= 2  # frames are dropped, not only counted


def peak_traced_bytes(n_frames: int) -> int:
    """Peak bytes tracemalloc (numpy reports to it) sees while streaming `n_frames` frames."""
    tracemalloc.start()
    try:
        for output in predict_tiled_stream(local_mean_fn(), CountingFrames(n_frames), TILE, OVERLAP, 16):
            del output
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_frames() -> None:
    few, many = peak_traced_bytes(5), peak_traced_bytes(50)
    frame_buffers = 3 * FRAME_SHAPE[0] * FRAME_SHAPE[1] * 8  # 2 channels + weights, float64
    assert many < few + frame_buffers // 2  # 45 more frames, not even half a frame's buffers more
    assert many < 6 * frame_buffers  # a few frames' worth in all (the filter's temporaries included)


# ---- students ------------------------------------------------------------------------------------------


def tiny_student() -> FPNSegmenter:
    torch.manual_seed(0)
    model = FPNSegmenter(FPNConfig(num_classes=len(CLASSES), fpn_channels=16, image_size=64, tiny=True))
    settle_batch_norm(model, normal_batch(8, size=64))  # fresh statistics shrink the output to noise
    return model


def student_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        weave(rng, 64, 300),
        weave(rng, 40, 48),
        weave(rng, 64, 64),
        weave(rng, 90, 100),
        weave(rng, 64, 200),
    ]


def test_iter_predictions_gives_each_image_what_it_gets_alone() -> None:
    model = tiny_student()
    images = student_images()
    streamed = list(iter_predictions(model, iter(images), tile_overlap=16, batch_size=4))
    assert [r[0].shape for r in streamed] == [image.shape[:2] for image in images]
    for image, (anomaly_map, mask, score) in zip(images, streamed, strict=True):
        ((alone_map, alone_mask, alone_score),) = predict_images(
            model, [image], tile_overlap=16, batch_size=1
        )
        assert anomaly_map.dtype == np.float32 and mask.dtype == np.uint8
        np.testing.assert_allclose(anomaly_map, alone_map, atol=1e-5, rtol=0)
        assert (mask != alone_mask).mean() < 0.01 and score == pytest.approx(alone_score, abs=1e-5)
    listed = predict_images(model, images, tile_overlap=16, batch_size=4)
    for (map_a, mask_a, score_a), (map_b, mask_b, score_b) in zip(streamed, listed, strict=True):
        np.testing.assert_array_equal(map_a, map_b)
        np.testing.assert_array_equal(mask_a, mask_b)
        assert score_a == score_b
    assert not model.training


def test_iter_predictions_batches_across_frames_and_reads_lazily() -> None:
    model = tiny_student()
    model.train()
    forward_batches: list[int] = []
    segment = model.segment

    def counting_segment(x: torch.Tensor) -> torch.Tensor:
        forward_batches.append(len(x))
        return segment(x)

    model.segment = counting_segment  # type: ignore[method-assign]
    frames = CountingFrames(12, shape=(64, 200))
    results = iter_predictions(model, frames, tile_overlap=16, batch_size=8, progress_as="linescan")
    first = next(results)
    assert first[0].shape == (64, 200)
    assert frames.pulled <= 3  # 4 tiles a frame, 8 a batch: the first batch spans two frames
    assert not model.training  # eval mode while predicting
    rest = list(results)
    assert len(rest) == 11
    per_frame = tiles_of(64, 200, tile=64, overlap=16)
    assert sum(forward_batches) == 12 * per_frame
    assert len(forward_batches) == math.ceil(12 * per_frame / 8)
    assert model.training  # its mode back once the stream ends


def test_iter_predictions_rejects_a_wrong_image_when_it_comes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        list(iter_predictions(tiny_student(), [np.zeros((64, 64, 3), np.float32)]))


# ---- predict_paths -------------------------------------------------------------------------------------


def test_predict_paths_reads_and_writes_frame_by_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_student().save_pretrained(
        tmp_path / "model", metadata={"image_threshold": 0.0, "classes": list(CLASSES)}
    )
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for k in range(6):
        Image.fromarray(weave(rng, 64, 300)).save(images / f"frame{k}.png")
    (images / "frame3b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # between frame3 and frame4
    paths = sorted(images.iterdir())

    events: list[str] = []
    real_read, real_write_mask = predict_module.read_image, predict_module.write_mask

    def read(path: Path, *args: object, **kwargs: object) -> np.ndarray:
        events.append(f"read {Path(path).stem}")
        return real_read(path, *args, **kwargs)

    def write_mask(path: Path, mask: np.ndarray) -> None:
        events.append(f"write {Path(path).stem}")
        real_write_mask(path, mask)

    monkeypatch.setattr(predict_module, "read_image", read)
    monkeypatch.setattr(predict_module, "write_mask", write_mask)
    progress: list[int] = []
    out = predict_module.predict_paths(
        model_dir, paths, tmp_path / "out", CLASSES, on_progress=progress.append
    )

    # 9 tiles a frame (64 px tiles, 32 px overlap), 8 a batch: frame k is written before frame k + 2 is
    # read, whatever the number of frames.
    for k in range(6):
        written = events.index(f"write frame{k}")
        frames_read = [e for e in events[:written] if e.startswith("read") and e != "read frame3b"]
        assert len(frames_read) <= k + 2
    assert progress == list(range(1, 8))
    with (out / "scores.csv").open() as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 1 + 7 and lines[-1].startswith("frame3b,,error,")
    for k in range(6):
        assert np.load(out / "maps" / f"frame{k}.npy").shape == (64, 300)
        assert (out / "overlays" / f"frame{k}.png").exists()
    assert not (out / "maps" / "frame3b.npy").exists()
