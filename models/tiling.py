"""Overlapping tiles for images larger than a model's input, stitched back with a smooth blend.

Line-scan frames (4096 x 256) and other large images are never squashed to the model's input size: they
are cut into overlapping tiles, each tile is predicted at full resolution, and the per-tile outputs are
blended with a separable weight window that ramps up over the overlap (raised cosine, never zero), so the
seams between tiles do not show. Images smaller than the tile are mirror-padded and cropped back.
`predict_tiled_stream` does this for a stream of frames, batching tiles across consecutive frames and
blending each tile in as its batch returns, so memory does not grow with the number of frames.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

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


class _Stitching:
    """One image on its way through :func:`predict_tiled_stream`: its tiles still to cut, its blend so far.

    Tile outputs are added into float64 buffers as their batch returns (the same sums, in the same order,
    as :func:`stitch_tiles`), so no per-tile output is kept. A one-tile image skips the blend: its output
    is the tile's, cropped, as the blend of one tile would give anyway.
    """

    __slots__ = (
        "accumulated",
        "done",
        "height",
        "image",
        "next_tile",
        "origins",
        "padded_shape",
        "single",
        "weight_sum",
        "width",
    )

    def __init__(self, image: np.ndarray, tile: int, overlap: int) -> None:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3), got {image.shape}")
        self.height, self.width = image.shape[:2]
        #: (Hp, Wp, 3), Hp >= tile and Wp >= tile, until the last tile is cut; then None (nothing holds it).
        self.image: np.ndarray | None = pad_to_min_size(image, tile, tile)
        self.padded_shape: tuple[int, int] = self.image.shape[:2]
        self.origins = tile_origins(*self.padded_shape, tile, overlap)
        self.next_tile = 0
        self.done = 0
        self.accumulated: np.ndarray | None = None  # (C, Hp, Wp) float64, sum of output * window
        self.weight_sum: np.ndarray | None = None  # (Hp, Wp) float64, sum of window
        self.single: np.ndarray | None = None  # (C, H, W) float32, the output of a one-tile image

    @property
    def all_cut(self) -> bool:
        return self.next_tile == len(self.origins)

    @property
    def complete(self) -> bool:
        return self.done == len(self.origins)

    def cut(self, tile: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The next tile, a (tile, tile, 3) view of the padded image, and its (top, left)."""
        assert self.image is not None
        top, left = self.origins[self.next_tile]
        crop = self.image[top : top + tile, left : left + tile]
        self.next_tile += 1
        if self.all_cut:
            self.image = None  # the crops (views) keep it only until the batch is stacked into a copy
        return crop, (top, left)

    def add(self, output: np.ndarray, origin: tuple[int, int], window: np.ndarray) -> None:
        """Blend one tile's (C, tile, tile) output in at `origin`, weighted by `window` (tile, tile)."""
        if len(self.origins) == 1:
            # A copy, not a view: a view would keep the whole batch of outputs alive as long as the result.
            self.single = np.array(output[:, : self.height, : self.width], dtype=np.float32)
        else:
            if self.accumulated is None:  # allocated with the first output: only then is C known
                self.accumulated = np.zeros((output.shape[0], *self.padded_shape), dtype=np.float64)
                self.weight_sum = np.zeros(self.padded_shape, dtype=np.float64)
            assert self.weight_sum is not None
            top, left = origin
            rows, cols = slice(top, top + window.shape[0]), slice(left, left + window.shape[1])
            self.accumulated[:, rows, cols] += output * window
            self.weight_sum[rows, cols] += window
        self.done += 1

    def result(self) -> np.ndarray:
        """The stitched (C, H, W) float32 output; the buffers are released."""
        if self.single is not None:
            stitched, self.single = self.single, None
            return stitched
        assert self.accumulated is not None and self.weight_sum is not None
        accumulated, weight_sum = self.accumulated, self.weight_sum
        self.accumulated = self.weight_sum = None
        accumulated /= weight_sum  # in place: no second float64 image; the window's floor keeps it > 0
        return np.ascontiguousarray(accumulated[:, : self.height, : self.width], dtype=np.float32)


def predict_tiled_stream(
    fn: TileFn,
    images: Iterable[np.ndarray],
    tile: int,
    overlap: int,
    batch_size: int = 8,
) -> Iterator[np.ndarray]:
    """Run `fn` on overlapping tiles of a stream of images, batching tiles across consecutive images.

    Tiles are cut in input order (row-major within an image) and sent to `fn` in batches of `batch_size`,
    so a batch may hold the last tiles of one frame and the first of the next: a line-scan frame whose
    tile count is not a multiple of the batch size leaves no part-empty batch, and small images share
    batches. Images are pulled from `images` only when a batch needs their tiles, and each image's output
    is yielded as soon as its last tile has returned, then forgotten. Peak memory is therefore one batch
    (B x tile x tile x 3 uint8 in, B x C x tile x tile float32 out) plus, per image in flight, its padded
    copy (until its tiles are cut) and its float64 blend buffers ((C + 1) x H x W): with frames of at
    least `batch_size` tiles at most two images are in flight, whatever the length of the stream.

    Each output equals :func:`stitch_tiles` over the image's tiles (the same raised-cosine blend summed in
    the same order); images smaller than the tile are mirror-padded (:func:`pad_to_min_size`) and
    cropped back, and a one-tile image gets its tile's output as is.

    Args:
        fn: (B, tile, tile, 3) uint8 -> (B, C, tile, tile) float32, B <= batch_size.
        images: (H, W, 3) uint8 arrays of any sizes; any iterable, read lazily.
        tile: tile side in pixels.
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).
        batch_size: tiles per call of `fn`.

    Yields:
        Per image, in input order: (C, H, W) float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    window = blend_window(tile, tile, overlap)  # every tile is tile x tile: one window serves all
    sources = iter(images)
    in_flight: deque[_Stitching] = deque()  # images with tiles cut, oldest first
    filling: _Stitching | None = None  # the image whose tiles are being cut
    exhausted = False
    while True:
        crops: list[np.ndarray] = []
        owners: list[tuple[_Stitching, tuple[int, int]]] = []
        while len(crops) < batch_size:
            if filling is None or filling.all_cut:
                item: np.ndarray | None = None if exhausted else next(sources, None)
                if item is None:
                    exhausted = True
                    break
                filling = _Stitching(item, tile, overlap)
                del item  # the stitching state holds the image only until its tiles are cut
                in_flight.append(filling)
            crop, origin = filling.cut(tile)
            crops.append(crop)
            owners.append((filling, origin))
        if not crops:
            return
        predicted = np.asarray(fn(np.stack(crops)))
        if predicted.ndim != 4 or predicted.shape[0] != len(crops) or predicted.shape[-2:] != (tile, tile):
            raise ValueError(
                f"tile function must return (B={len(crops)}, C, {tile}, {tile}), got {predicted.shape}"
            )
        for (owner, origin), output in zip(owners, predicted, strict=True):
            owner.add(output, origin, window)
        del crops, owners, predicted  # the batch is blended in: free it before the caller gets control
        while in_flight and in_flight[0].complete:
            yield in_flight.popleft().result()


def predict_tiled(
    fn: TileFn,
    image: np.ndarray,
    tile: int,
    overlap: int,
    batch_size: int = 8,
) -> np.ndarray:
    """Run `fn` on overlapping `tile` x `tile` crops of `image` and blend the results.

    One image through :func:`predict_tiled_stream`.

    Args:
        fn: (B, tile, tile, 3) uint8 -> (B, C, tile, tile) float32.
        image: (H, W, 3) uint8.
        tile: tile side in pixels.
        overlap: pixels shared by neighbouring tiles (0 <= overlap < tile).
        batch_size: tiles per call of `fn`.

    Returns:
        (C, H, W) float32.
    """
    (stitched,) = predict_tiled_stream(fn, [image], tile, overlap, batch_size)
    return stitched
