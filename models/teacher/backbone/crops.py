"""Cutting a large image into backbone crops whose features join without seams.

A convolutional backbone is translation-equivariant except near the border of its input, where zero
padding changes what it sees. Cutting a long line-scan frame into overlapping tiles and blending their
*scores* leaves a stripe at every tile border (each tile's border patches look unusual), and every
overlapping pixel is computed twice. Here an image is cut into cores that tile it exactly; each core is
run with `margin` pixels of real image context around it, and only the core's patch features are kept.
The features of neighbouring cores then meet on one patch grid, as if the whole image had run at once, and
the cost is the image's pixels plus the margins (6-9% for 2048-pixel cores with 128-pixel margins).

Along an axis longer than `whole` (a line-scan frame's width), the image's own ends get the same context,
mirrored: without it the outermost columns meet zero padding and look unlike any other patch, and as each
frame keeps only a small sample of its patches, the frames' ends would be the strongest responses of every
map. An axis up to `whole` (the frame's height, any side of a square image of the teacher's size) runs as
it is, as it always has; so images up to `whole` on both sides run exactly as before.

Core and crop edges fall on multiples of `ALIGN` (the coarsest feature stride), so every crop's stride-2
to stride-16 grids line up with the image's and the kept features sit on the image's stride-8 patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.teacher.backbone.features import PATCH_STRIDE

#: Crop and core edges are multiples of this (the coarsest feature stride), so the grids line up.
ALIGN = 16


@dataclass(frozen=True)
class Crop:
    """One backbone input: the pixel box fed to the network and the patch box of the image it fills.

    Pixel box: rows [top, bottom), columns [left, right); it may reach beyond the image by a margin at the
    image's ends (mirrored there, `crop_pixels`). Patch box: patch rows [row0, row1) and columns
    [col0, col1) of the image's patch grid, found at rows [row0 - top / 8, ...) of the crop's own grid.
    """

    top: int
    bottom: int
    left: int
    right: int
    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    @property
    def pixels(self) -> int:
        return (self.bottom - self.top) * (self.right - self.left)


@dataclass(frozen=True)
class CropLayout:
    """How one (height, width) image is cut: its patch grid and the crops that fill it exactly."""

    height: int
    width: int
    crops: tuple[Crop, ...]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of stride-8 patches: (ceil(H / 8), ceil(W / 8))."""
        return math.ceil(self.height / PATCH_STRIDE), math.ceil(self.width / PATCH_STRIDE)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _cores(length: int, core: int) -> list[tuple[int, int]]:
    """[start, end) cores of at most `core` pixels covering [0, length); a short last core joins its
    neighbour (so no crop is a sliver with more margin than content)."""
    if length <= core:
        return [(0, length)]
    starts = list(range(0, length, core))
    if length - starts[-1] < core // 4:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else length) for i, start in enumerate(starts)]


def crop_layout(height: int, width: int, core: int, margin: int, whole: int) -> CropLayout:
    """Cut a height x width image into cores of at most `core` pixels a side, each with `margin` pixels
    of context (less at the image's own border).

    Args:
        height, width: the image's size in pixels.
        core: largest core side; a multiple of `ALIGN`. Images up to `core` on both sides are one crop.
        margin: context kept around each core; a multiple of `ALIGN`.
        whole: axes up to this length run as they are, with no context beyond the image's ends.
    """
    if core <= 0 or core % ALIGN or margin < 0 or margin % ALIGN:
        raise ValueError(f"core ({core}) and margin ({margin}) must be positive multiples of {ALIGN}")
    crops = []
    # A long axis gets context at its own ends too (mirrored); a short one runs as it is.
    row_margin, col_margin = (margin if height > whole else 0), (margin if width > whole else 0)
    for row_start, row_end in _cores(height, core):
        for col_start, col_end in _cores(width, core):
            top, bottom = row_start - row_margin, row_end + row_margin
            left, right = col_start - col_margin, col_end + col_margin
            crops.append(
                Crop(
                    top,
                    bottom,
                    left,
                    right,
                    row_start // PATCH_STRIDE,
                    math.ceil(row_end / PATCH_STRIDE),
                    col_start // PATCH_STRIDE,
                    math.ceil(col_end / PATCH_STRIDE),
                )
            )
    return CropLayout(height, width, tuple(crops))


def crop_pixels(image: np.ndarray, crop: Crop) -> np.ndarray:
    """The crop's pixels (h, w, C): the image inside, mirrored (numpy "reflect") where it reaches beyond."""
    height, width = image.shape[:2]
    inside = image[max(crop.top, 0) : min(crop.bottom, height), max(crop.left, 0) : min(crop.right, width)]
    pads = (
        (max(0, -crop.top), max(0, crop.bottom - height)),
        (max(0, -crop.left), max(0, crop.right - width)),
    )
    if not any(any(pad) for pad in pads):
        return inside
    return np.pad(inside, pads + ((0, 0),) * (image.ndim - 2), mode="reflect")
