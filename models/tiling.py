"""Overlapping tiles for images larger than a model's input, stitched back with a smooth blend.

Line-scan frames (4096 x 256) and other large images are never squashed to the model's input size: they
are cut into overlapping tiles, each tile is predicted at full resolution, and the per-tile outputs are
blended with a separable weight window that ramps up over the overlap (raised cosine, never zero), so the
seams between tiles do not show. Images smaller than the tile are mirror-padded and cropped back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TileFn = Callable[[np.ndarray], np.ndarray]
"""(B, h, w, 3) uint8 tiles -> (B, C, h, w) float32 outputs."""

_MIN_WEIGHT = 1e-3  # the window's floor: a pixel covered by a single tile edge still gets a weight


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), consecutive tiles sharing >= `overlap`.

    The last tile is aligned to the end, so it may overlap its neighbour by more than `overlap`.
    A length up to `tile` gives one tile at 0.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_origins(height: int, width: int, tile: int | tuple[int, int], overlap: int) -> list[tuple[int, int]]:
    """(top, left) of every tile, row-major, for a `tile` (square or (th, tw)) grid over height x width."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    return [
        (top, left)
        for top in tile_starts(height, tile_h, min(overlap, tile_h - 1))
        for left in tile_starts(width, tile_w, min(overlap, tile_w - 1))
    ]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1-D weights (length,): raised-cosine ramp over `overlap` pixels at both ends, 1 in between."""
    weights = np.ones(length, dtype=np.float64)
    ramp_length = min(overlap, length)
    if ramp_length > 0:
        # (i + 0.5) keeps the first weight above zero; the ramp reaches 1 just after the overlap.
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_length) + 0.5) / ramp_length)
        weights[:ramp_length] = np.minimum(weights[:ramp_length], ramp)
        weights[length - ramp_length :] = np.minimum(weights[length - ramp_length :], ramp[::-1])
    return np.maximum(weights, _MIN_WEIGHT)


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """Separable blend weights (height, width), float64, in [1e-3, 1]."""
    return np.outer(_ramp(height, overlap), _ramp(width, overlap))


def stitch_tiles(
    tile_outputs: Sequence[np.ndarray],
    origins: Sequence[tuple[int, int]],
    height: int,
    width: int,
    overlap: int,
) -> np.ndarray:
    """Blend per-tile outputs (C, th, tw) placed at `origins` into one (C, height, width) float32 array.

    Weights are accumulated in float64, so where all tiles agree on a pixel the result equals that value.
    """
    if len(tile_outputs) != len(origins) or not tile_outputs:
        raise ValueError(f"need one output per tile origin, got {len(tile_outputs)} and {len(origins)}")
    channels = tile_outputs[0].shape[0]
    accumulated = np.zeros((channels, height, width), dtype=np.float64)
    weight_sum = np.zeros((height, width), dtype=np.float64)
    for output, (top, left) in zip(tile_outputs, origins, strict=True):
        tile_h, tile_w = output.shape[-2:]
        window = blend_window(tile_h, tile_w, overlap)
        accumulated[:, top : top + tile_h, left : left + tile_w] += output * window
        weight_sum[top : top + tile_h, left : left + tile_w] += window
    if np.any(weight_sum == 0):
        raise ValueError("the tiles do not cover the whole image")
    return (accumulated / weight_sum).astype(np.float32)


def pad_to_min_size(array: np.ndarray, min_height: int, min_width: int) -> np.ndarray:
    """Mirror-pad an (H, W, ...) array at the bottom/right to at least min_height x min_width.

    Mirrored with the edge pixel repeated (numpy's "symmetric"), as training crops of small images are
    padded (models/student/training.py), so a model sees the same borders when it predicts.
    """
    pad_h, pad_w = max(min_height - array.shape[0], 0), max(min_width - array.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2), mode="symmetric")


def predict_tiled(
    fn: TileFn,
    image: np.ndarray,
    tile: int,
    overlap: int,
    batch_size: int = 8,
) -> np.ndarray:
    """Run `fn` on overlapping `tile` x `tile` crops of `image` and blend the results.

    Args:
        fn: (B, tile, tile, 3) uint8 -> (B, C, tile, tile) float32.
        image: (H, W, 3) uint8.
        tile: tile side in pixels.
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).
        batch_size: tiles per call of `fn`.

    Returns:
        (C, H, W) float32.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    height, width = image.shape[:2]
    padded = pad_to_min_size(image, tile, tile)
    origins = tile_origins(padded.shape[0], padded.shape[1], tile, overlap)
    outputs: list[np.ndarray] = []
    for first in range(0, len(origins), batch_size):
        batch_origins = origins[first : first + batch_size]
        crops = np.stack([padded[top : top + tile, left : left + tile] for top, left in batch_origins])
        predicted = np.asarray(fn(crops))
        if predicted.ndim != 4 or predicted.shape[0] != len(crops) or predicted.shape[-2:] != (tile, tile):
            raise ValueError(
                f"tile function must return (B={len(crops)}, C, {tile}, {tile}), got {predicted.shape}"
            )
        outputs.extend(predicted)
    if len(outputs) == 1:
        stitched = outputs[0].astype(np.float32, copy=False)
    else:
        stitched = stitch_tiles(outputs, origins, padded.shape[0], padded.shape[1], overlap)
    return np.ascontiguousarray(stitched[:, :height, :width])
