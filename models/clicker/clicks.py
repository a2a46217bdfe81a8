"""Clicks, their disk maps, and where a simulated annotator clicks next.

Coordinates: a click's ``(y, x)`` are pixel coordinates with pixel centres at integers, so the pixel in
row ``r`` and column ``c`` is ``Click(r, c, ...)``; a point given in continuous image coordinates (0..W, as
Label Studio's percentages times the width are) is at ``x - 0.5`` in these units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Click:
    """One annotator key point: ``y``, ``x`` in full-image pixel coordinates, positive = "this is defect"."""

    y: float
    x: float
    is_positive: bool


def disk_maps(clicks: Sequence[Click], shape: tuple[int, int], radius: float) -> np.ndarray:
    """Positive and negative click disks.

    Args:
        clicks: clicks in the coordinates of the output grid.
        shape: (h, w) of the grid.
        radius: disk radius in grid pixels.

    Returns:
        (2, h, w) float32: channel 0 positive disks, channel 1 negative disks, 1 inside a disk, else 0.
    """
    height, width = shape
    maps = np.zeros((2, height, width), dtype=np.float32)
    reach = int(np.ceil(radius))
    for click in clicks:
        # Only the window around the click is touched: 20 clicks cost 20 small windows, not 20 full grids.
        cy, cx = round(click.y), round(click.x)
        top, bottom = max(cy - reach, 0), min(cy + reach + 1, height)
        left, right = max(cx - reach, 0), min(cx + reach + 1, width)
        if top >= bottom or left >= right:
            continue
        yy, xx = np.ogrid[top:bottom, left:right]
        inside = (yy - click.y) ** 2 + (xx - click.x) ** 2 <= radius**2
        channel = maps[0 if click.is_positive else 1, top:bottom, left:right]
        channel[inside] = 1.0
    return maps


def _padded_distance(region: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Distance of each pixel of ``region`` to its border, computed on the region's bounding box.

    The box is padded with one background pixel on every side, so the image border counts as the region's
    border (RITM pads the whole image the same way); the result equals the whole-image transform.

    Returns:
        (distance map of the box, (top, left) of the box in the image); an empty map for an empty region.
    """
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if rows.size == 0:
        return np.zeros((0, 0), np.float32), (0, 0)
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.pad(region[top:bottom, left:right], 1)
    return ndimage.distance_transform_edt(box)[1:-1, 1:-1], (int(top), int(left))


def error_click(
    target: np.ndarray, prediction: np.ndarray, rng: np.random.Generator | None = None
) -> Click | None:
    """Where the next click goes: the centre of the larger error region (the standard NoC protocol).

    False negatives (missed defect) and false positives (false alarm) are compared by their largest
    distance to their own border; the click goes on the farther of the two, positive for a miss, negative
    for a false alarm. Without ``rng`` the click is the first pixel (raster order) at that largest
    distance, as the RITM evaluation does; with ``rng`` it is drawn among the pixels of that region whose
    distance exceeds half the largest (RITM's training clicks), so training does not always see one point.

    Args:
        target: (H, W) bool, the object.
        prediction: (H, W) bool, the current mask.
        rng: optional random generator (training).

    Returns:
        The click, or None when the prediction equals the target.
    """
    target, prediction = target.astype(bool), prediction.astype(bool)
    fn_dist, fn_origin = _padded_distance(target & ~prediction)
    fp_dist, fp_origin = _padded_distance(prediction & ~target)
    fn_max = float(fn_dist.max()) if fn_dist.size else 0.0
    fp_max = float(fp_dist.max()) if fp_dist.size else 0.0
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    dist, (top, left), best = (fn_dist, fn_origin, fn_max) if positive else (fp_dist, fp_origin, fp_max)
    if rng is None:
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    else:
        rows, cols = np.nonzero(dist > best / 2.0)
        pick = int(rng.integers(len(rows)))
        r, c = rows[pick], cols[pick]
    return Click(float(r + top), float(c + left), positive)


def interior_click(target: np.ndarray, rng: np.random.Generator) -> Click:
    """A positive click inside the object, away from its border (a first click from nothing).

    Drawn among the pixels at least half the object's largest border distance deep, so it lands where an
    annotator would aim, yet not always on one pixel.

    Args:
        target: (H, W) bool, a non-empty object.
        rng: random generator.
    """
    dist, (top, left) = _padded_distance(target.astype(bool))
    if dist.size == 0:
        raise ValueError("interior_click needs a non-empty object mask")
    rows, cols = np.nonzero(dist >= dist.max() / 2.0)
    pick = int(rng.integers(len(rows)))
    return Click(float(rows[pick] + top), float(cols[pick] + left), True)
