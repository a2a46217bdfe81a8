"""Zoom-in (FocalClick's target crop): the model always runs on a square crop around the clicked region.

The region of interest is the bounding box of the clicks and of the previous mask's connected components
near them; it is grown by ``expand``, never smaller than ``min_crop`` pixels, and resized to the model's
input side ``size``. A 4096 x 256 line-scan frame therefore costs what a 256 x 256 crop costs, and a
small defect is magnified. The answer is pasted back into the full-resolution mask, keeping the previous
mask outside the crop.

Crops are squares so the texture keeps its aspect ratio; a square wider than the image on one axis is
centred there and filled by mirroring the image (masks are zero outside it), and only its part inside the
image is ever pasted back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from models.clicker.clicks import Click

#: 8-connectivity, as loom/evaluation/metrics.py labels defect regions.
CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ZoomConfig:
    """How crops are chosen.

    Args:
        size: side of the model input the crop is resized to.
        min_crop: smallest crop side in image pixels (the most a small defect is magnified is
            ``size / min_crop``).
        expand: the region of interest's larger side is multiplied by this (context around the object).
        near: previous-mask components within this many pixels of a click belong to the region of interest.
    """

    size: int = 256
    min_crop: int = 64
    expand: float = 1.6
    near: int = 12


@dataclass(frozen=True)
class Crop:
    """A square crop ``[top, top + side) x [left, left + side)`` of an ``height x width`` image.

    It may reach outside the image (see the module docstring); ``box`` is its part inside the image.
    """

    top: int
    left: int
    side: int
    height: int
    width: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of the crop's part inside the image, in image pixels."""
        return (
            max(self.top, 0),
            max(self.left, 0),
            min(self.top + self.side, self.height),
            min(self.left + self.side, self.width),
        )

    def scale(self, size: int) -> float:
        """Model-input pixels per image pixel."""
        return size / self.side

    def to_crop(self, click: Click, size: int) -> Click:
        """A click in image coordinates -> the same click in the (size x size) model input."""
        s = self.scale(size)
        # Pixel centres map as cv2.resize maps them: u = (y - top + 0.5) * s - 0.5.
        return Click(
            (click.y - self.top + 0.5) * s - 0.5, (click.x - self.left + 0.5) * s - 0.5, click.is_positive
        )

    def contains(self, y: float, x: float, margin: float = 0.0) -> bool:
        """True when image point (y, x) lies in the crop's in-image part, ``margin`` px from its edges."""
        top, left, bottom, right = self.box
        return top + margin <= y <= bottom - 1 - margin and left + margin <= x <= right - 1 - margin


def _place(centre: float, side: int, length: int) -> int:
    """Start of a crop of ``side`` around ``centre`` on an axis of ``length``, kept inside when it fits."""
    if side >= length:
        return (length - side) // 2
    return int(np.clip(round(centre - side / 2), 0, length - side))


def square_crop(
    top: float, left: float, bottom: float, right: float, height: int, width: int, config: ZoomConfig
) -> Crop:
    """The crop for a region of interest [top, bottom) x [left, right) (image pixels, may be fractional)."""
    extent = max(bottom - top, right - left, 1.0)
    side = max(config.min_crop, math.ceil(extent * config.expand))
    side = min(side, max(height, width))  # beyond the larger image side a crop only adds mirrored fabric
    return Crop(
        _place((top + bottom) / 2, side, height), _place((left + right) / 2, side, width), side, height, width
    )


def near_components(prev_mask: np.ndarray, clicks: Sequence[Click], near: int) -> np.ndarray:
    """The previous mask's connected components (8-connectivity) that come within ``near`` px of a click.

    Args:
        prev_mask: (H, W) bool.
        clicks: image-coordinate clicks.
        near: window half-side in pixels.

    Returns:
        (H, W) bool, the union of those components.
    """
    if not prev_mask.any() or not clicks:
        return np.zeros(prev_mask.shape, dtype=bool)
    labels, _ = ndimage.label(prev_mask, structure=CONNECTIVITY)
    height, width = prev_mask.shape
    chosen: set[int] = set()
    for click in clicks:
        cy, cx = round(click.y), round(click.x)
        window = labels[
            max(cy - near, 0) : min(cy + near + 1, height), max(cx - near, 0) : min(cx + near + 1, width)
        ]
        chosen.update(int(v) for v in np.unique(window) if v)
    if not chosen:
        return np.zeros(prev_mask.shape, dtype=bool)
    return np.isin(labels, sorted(chosen))


def roi_bounds(
    clicks: Sequence[Click], prev_mask: np.ndarray | None, config: ZoomConfig
) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of the clicks and of the previous mask's components near them."""
    ys = [c.y for c in clicks]
    xs = [c.x for c in clicks]
    top, left, bottom, right = min(ys), min(xs), max(ys) + 1, max(xs) + 1
    if prev_mask is not None:
        region = near_components(prev_mask, clicks, config.near)
        rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
        if rows.size:
            top, bottom = min(top, rows[0]), max(bottom, rows[-1] + 1)
            left, right = min(left, cols[0]), max(right, cols[-1] + 1)
    return float(top), float(left), float(bottom), float(right)


def roi_crop(
    clicks: Sequence[Click], prev_mask: np.ndarray | None, shape: tuple[int, int], config: ZoomConfig
) -> Crop:
    """The crop the model runs on for these clicks and this previous mask.

    Args:
        clicks: at least one click, image coordinates.
        prev_mask: (H, W) bool or None.
        shape: (H, W) of the image.
        config: zoom settings.
    """
    if not clicks:
        raise ValueError("a crop needs at least one click")
    return square_crop(*roi_bounds(clicks, prev_mask, config), shape[0], shape[1], config)


def _interpolation(crop: Crop, size: int) -> int:
    # Area averaging when shrinking (no aliasing of the weave), bilinear when magnifying.
    return cv2.INTER_AREA if crop.side > size else cv2.INTER_LINEAR


def _cut(array: np.ndarray, crop: Crop, mirror: bool) -> np.ndarray:
    """The crop's pixels of an (H, W, ...) array, side x side, padded where the crop leaves the image."""
    top, left, bottom, right = crop.box
    piece = array[top:bottom, left:right]
    pad_top, pad_left = top - crop.top, left - crop.left
    pad_bottom, pad_right = crop.side - pad_top - (bottom - top), crop.side - pad_left - (right - left)
    if pad_top or pad_left or pad_bottom or pad_right:
        pads = ((pad_top, pad_bottom), (pad_left, pad_right)) + ((0, 0),) * (array.ndim - 2)
        piece = np.pad(piece, pads, mode="symmetric") if mirror else np.pad(piece, pads)
    return piece


def crop_image(image: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the crop resized to (size, size, 3) uint8 (mirrored outside the image)."""
    piece = np.ascontiguousarray(_cut(image, crop, mirror=True))
    if crop.side == size:
        return piece
    return cv2.resize(piece, (size, size), interpolation=_interpolation(crop, size))


def crop_mask(mask: np.ndarray, crop: Crop, size: int) -> np.ndarray:
    """(H, W) bool or float -> (size, size) float32 in [0, 1] (0 outside the image; soft at resized edges)."""
    piece = np.ascontiguousarray(_cut(mask.astype(np.float32), crop, mirror=False))
    if crop.side == size:
        return piece
    return cv2.resize(piece, (size, size), interpolation=_interpolation(crop, size))


def valid_map(crop: Crop, size: int) -> np.ndarray:
    """(size, size) float32: 1 where the model input shows the image, 0 where it shows mirrored padding."""
    return crop_mask(np.ones((crop.height, crop.width), np.float32), crop, size)


def uncrop(values: np.ndarray, crop: Crop) -> np.ndarray:
    """A (size, size) float map of the model input -> its values on the crop's in-image box (bilinear).

    Returns:
        (bottom - top, right - left) float32 for ``crop.box``.
    """
    size = values.shape[0]
    top, left, bottom, right = crop.box
    s = crop.scale(size)
    # Inverse map: box pixel (r, c) <- model-input point ((top + r - crop.top + 0.5) * s - 0.5, ...).
    matrix = np.array(
        [[s, 0.0, (left - crop.left + 0.5) * s - 0.5], [0.0, s, (top - crop.top + 0.5) * s - 0.5]],
        dtype=np.float64,
    )
    return cv2.warpAffine(
        values.astype(np.float32),
        matrix,
        (right - left, bottom - top),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def paste(
    probabilities: np.ndarray, crop: Crop, prev_mask: np.ndarray | None, threshold: float
) -> np.ndarray:
    """The full-resolution mask: inside the crop the thresholded answer, outside it the previous mask.

    Args:
        probabilities: (size, size) foreground probabilities of the model input.
        crop: the crop they belong to.
        prev_mask: (H, W) bool or None (empty).
        threshold: probability at or above which a pixel is foreground.

    Returns:
        (H, W) bool.
    """
    out = np.zeros((crop.height, crop.width), dtype=bool) if prev_mask is None else prev_mask.astype(bool)
    top, left, bottom, right = crop.box
    out[top:bottom, left:right] = uncrop(probabilities, crop) >= threshold
    return out
