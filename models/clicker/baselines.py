"""Baselines behind the same ``segment(image, clicks, prev_mask) -> mask`` signature as the clicker.

- :class:`GrabCutSegmenter`: OpenCV's GrabCut in the clicker's zoom crop (at most S x S pixels, so it is
  as fast and sees what the clicker sees): positive click disks are sure foreground, negative ones sure
  background, the previous mask probable foreground, the rest probable background.
- :class:`TeacherMapGrowing`: region growing on a teacher's anomaly map. Each positive click grows the
  pixels connected to it whose map value stays above a level between the crop's typical value (its
  median) and the click's value; the level starts at ``level`` of the way up and rises until the region
  holds no negative click. Each negative click cuts its connected component out of the previous mask,
  then the positive regions are added back, so a false alarm fused to the object leaves with the click.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
from scipy import ndimage

from models.clicker.clicks import Click, disk_maps
from models.clicker.predictor import image_digest
from models.clicker.zoom import CONNECTIVITY, ZoomConfig, crop_image, crop_mask, paste, roi_crop, valid_map


class GrabCutSegmenter:
    """GrabCut given the clicks; see the module docstring.

    Args:
        zoom: crop settings (the clicker's, for a like-for-like comparison).
        click_radius: disk radius in pixels of an S x S crop (the clicker's).
        iterations: GrabCut iterations per call.
    """

    def __init__(
        self, zoom: ZoomConfig | None = None, click_radius: float = 5.0, iterations: int = 5
    ) -> None:
        self.zoom = zoom or ZoomConfig()
        self.click_radius = click_radius
        self.iterations = iterations

    def __call__(
        self, image: np.ndarray, clicks: Sequence[Click], prev_mask: np.ndarray | None
    ) -> np.ndarray:
        """(H, W, 3) uint8, clicks, (H, W) bool or None -> (H, W) bool."""
        shape = image.shape[:2]
        crop = roi_crop(clicks, prev_mask, shape, self.zoom)
        work = min(crop.side, self.zoom.size)  # native resolution, or the model's side when larger
        pixels = crop_image(image, crop, work)
        prev = np.zeros((work, work), bool) if prev_mask is None else crop_mask(prev_mask, crop, work) >= 0.5
        radius = max(1.0, self.click_radius * work / self.zoom.size)
        disks = disk_maps([crop.to_crop(c, work) for c in clicks], (work, work), radius) > 0
        labels = np.full((work, work), cv2.GC_PR_BGD, np.uint8)
        labels[prev] = cv2.GC_PR_FGD
        labels[disks[0]] = cv2.GC_FGD
        labels[disks[1] | (valid_map(crop, work) < 0.5)] = cv2.GC_BGD
        foreground = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        if not foreground.any() or foreground.all():  # GrabCut needs samples of both sides for its models
            result = foreground
        else:
            background_model = np.zeros((1, 65), np.float64)
            foreground_model = np.zeros((1, 65), np.float64)
            cv2.grabCut(
                np.ascontiguousarray(pixels),
                labels,
                None,
                background_model,
                foreground_model,
                self.iterations,
                cv2.GC_INIT_WITH_MASK,
            )
            result = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        return paste(result.astype(np.float32), crop, prev_mask, 0.5)


MapSource = Mapping[str, np.ndarray] | Callable[[np.ndarray], np.ndarray]


class TeacherMapGrowing:
    """Grow the clicked regions on a teacher anomaly map; see the module docstring.

    Args:
        maps: the teacher's (H, W) float map per image: a mapping from ``image_digest(image)`` or a
            callable ``image -> map``.
        zoom: crop settings (growing is confined to the clicker's crop).
        level: share of the way from the crop's median to the click's value a pixel must reach.
        click_radius: disk radius in pixels of an S x S crop (the clicker's); disks are always included
            (positive) or excluded (negative).
    """

    def __init__(
        self, maps: MapSource, zoom: ZoomConfig | None = None, level: float = 0.5, click_radius: float = 5.0
    ) -> None:
        self.maps = maps
        self.zoom = zoom or ZoomConfig()
        self.level = level
        self.click_radius = click_radius

    def _map(self, image: np.ndarray) -> np.ndarray:
        if callable(self.maps):
            return np.asarray(self.maps(image), dtype=np.float32)
        key = image_digest(image)
        if key not in self.maps:
            raise KeyError("no teacher map for this image: build the mapping with image_digest(image) keys")
        return np.asarray(self.maps[key], dtype=np.float32)

    def _grown(
        self, values: np.ndarray, y: int, x: int, floor: float, negatives: Sequence[tuple[int, int]]
    ) -> np.ndarray:
        """Pixels connected to (y, x) whose value stays at or above the click's level (see the class doc)."""
        peak = float(values[y, x])
        if peak <= floor:  # the teacher sees nothing here: growing would flood the crop
            return np.zeros(values.shape, bool)
        for level in np.linspace(self.level, 0.95, 10):
            labels, _ = ndimage.label(values >= floor + level * (peak - floor), structure=CONNECTIVITY)
            region = labels == labels[y, x]
            if not any(region[ny, nx] for ny, nx in negatives):
                return region
        return np.zeros(values.shape, bool)

    def __call__(
        self, image: np.ndarray, clicks: Sequence[Click], prev_mask: np.ndarray | None
    ) -> np.ndarray:
        """(H, W, 3) uint8, clicks, (H, W) bool or None -> (H, W) bool."""
        shape = image.shape[:2]
        teacher_map = self._map(image)
        if teacher_map.shape != shape:
            raise ValueError(f"teacher map {teacher_map.shape} does not match image {shape}")
        crop = roi_crop(clicks, prev_mask, shape, self.zoom)
        top, left, bottom, right = crop.box
        values = teacher_map[top:bottom, left:right]
        floor = float(np.median(values))
        mask = (
            np.zeros(values.shape, bool)
            if prev_mask is None
            else prev_mask[top:bottom, left:right].astype(bool)
        )
        radius = max(1.0, self.click_radius * crop.side / self.zoom.size)
        local = [Click(c.y - top, c.x - left, c.is_positive) for c in clicks]
        points = [
            (
                int(np.clip(round(c.y), 0, values.shape[0] - 1)),
                int(np.clip(round(c.x), 0, values.shape[1] - 1)),
                c.is_positive,
            )
            for c in local
        ]
        negatives = [(y, x) for y, x, positive in points if not positive]
        if negatives:
            labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
            cut = {int(labels[y, x]) for y, x in negatives} - {0}
            mask &= ~np.isin(labels, sorted(cut))
        for y, x, positive in points:
            if positive:
                mask |= self._grown(values, y, x, floor, negatives)
        disks = disk_maps(local, values.shape, radius) > 0
        mask = (mask | disks[0]) & ~disks[1]
        out = np.zeros(shape, bool) if prev_mask is None else prev_mask.astype(bool)
        out[top:bottom, left:right] = mask
        return out
