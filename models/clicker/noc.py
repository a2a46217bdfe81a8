"""The NoC protocol (number of clicks), per object, for any click segmentation method.

Each defect region of a mask is one object: its 8-connected components (as loom/evaluation/metrics.py labels
them), with components less than ``OBJECT_GAP`` pixels apart merged, so a stain's speckled rim or a yarn drawn
as dashes is one object, as an annotator sees it, not a dozen one-pixel objects worth 20 clicks each. A
simulated annotator clicks at the centre of the larger error region (``models.clicker.clicks.error_click``:
the point farthest from the border of the false-negative or the false-positive region, positive for a miss,
negative for a false alarm), at most ``max_clicks`` times; the method gets all clicks so far and its own last
mask. NoC@t is the number of clicks until IoU >= t with the object, ``max_clicks`` when never reached; a run
stops once the highest threshold is reached (RITM's evaluation does the same).

Two starts: from nothing (empty previous mask), and from a pre-annotation (the teacher's mask restricted
to its connected components that touch the object's dilated neighbourhood); from a pre-annotation that
already meets a threshold, NoC at that threshold is 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from models.clicker.clicks import Click, error_click
from models.clicker.zoom import CONNECTIVITY

#: segment(image (H, W, 3) uint8, clicks so far, previous mask (H, W) bool) -> mask (H, W) bool.
Segmenter = Callable[[np.ndarray, Sequence[Click], np.ndarray | None], np.ndarray]

STARTS = ("empty", "prelabel")
#: Pixels the object is dilated by to find the pre-annotation components that belong to it.
NEIGHBOURHOOD = 5
#: Defect components closer than this many pixels (gap of at most 2 * OBJECT_GAP background pixels
#: between them) form one object.
OBJECT_GAP = 2


@dataclass
class NocObject:
    """One object to segment: image (H, W, 3) uint8, mask (H, W) bool, prelabel (H, W) bool or None."""

    image: np.ndarray
    mask: np.ndarray
    prelabel: np.ndarray | None = None
    name: str = ""


def restrict_prelabel(prelabel: np.ndarray, mask: np.ndarray, radius: int = NEIGHBOURHOOD) -> np.ndarray:
    """The pre-annotation's connected components that touch the object dilated by ``radius`` pixels."""
    labels, _ = ndimage.label(prelabel.astype(bool), structure=CONNECTIVITY)
    near = ndimage.binary_dilation(mask.astype(bool), iterations=radius) if radius > 0 else mask.astype(bool)
    touching = np.unique(labels[near & (labels > 0)])
    return np.isin(labels, touching) if touching.size else np.zeros(mask.shape, dtype=bool)


def defect_objects(defect_mask: np.ndarray, gap: int = OBJECT_GAP) -> list[np.ndarray]:
    """The objects of a mask: 8-connected components of ``defect_mask > 0``, those within ``gap`` px merged.

    Args:
        defect_mask: (H, W) binary or class-index mask (>0 = defect, all classes together).
        gap: components whose pixels come within ``2 * gap`` background pixels of each other are one
            object (0: plain 8-connected components).

    Returns:
        One (H, W) bool mask per object (defect pixels only; the gap stays background), in label order.
    """
    defect = np.asarray(defect_mask) > 0
    grown = ndimage.binary_dilation(defect, structure=CONNECTIVITY, iterations=gap) if gap > 0 else defect
    labels, count = ndimage.label(grown, structure=CONNECTIVITY)
    labels[~defect] = 0
    return [labels == index for index in range(1, count + 1)]


def split_objects(
    image: np.ndarray,
    defect_mask: np.ndarray,
    prelabel: np.ndarray | None = None,
    name: str = "",
    radius: int = NEIGHBOURHOOD,
    gap: int = OBJECT_GAP,
) -> list[NocObject]:
    """One :class:`NocObject` per object of ``defect_mask`` (see :func:`defect_objects`).

    Args:
        image: (H, W, 3) uint8.
        defect_mask: (H, W) binary or class-index mask (>0 = defect, all classes together).
        prelabel: (H, W) bool pre-annotation of the whole image, restricted per object.
        name: prefix of the objects' names (``name#k``).
        radius: neighbourhood of :func:`restrict_prelabel`.
        gap: see :func:`defect_objects`.
    """
    objects = []
    for index, mask in enumerate(defect_objects(defect_mask, gap), start=1):
        restricted = None if prelabel is None else restrict_prelabel(prelabel, mask, radius)
        objects.append(NocObject(image, mask, restricted, f"{name}#{index}"))
    return objects


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclass
class NocRun:
    """One object's run: IoU before any click (index 0) and after each click; time spent in the method."""

    ious: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def clicks_to(self, threshold: float, max_clicks: int) -> int:
        """Clicks until IoU >= threshold (0 when the start already meets it), ``max_clicks`` if never."""
        for clicks, value in enumerate(self.ious):
            if value >= threshold:
                return clicks
        return max_clicks

    def iou_after(self, clicks: int) -> float:
        """IoU after ``clicks`` clicks (a stopped run keeps its last IoU)."""
        return self.ious[min(clicks, len(self.ious) - 1)]


def run_object(
    segment: Segmenter, obj: NocObject, start: str = "empty", max_clicks: int = 20, stop_iou: float = 0.9
) -> NocRun:
    """Click on one object until IoU >= ``stop_iou`` or ``max_clicks`` clicks."""
    if start not in STARTS:
        raise ValueError(f"unknown start {start!r}: choose one of {', '.join(STARTS)}")
    target = obj.mask.astype(bool)
    if start == "prelabel" and obj.prelabel is not None:
        mask = obj.prelabel.astype(bool)
    else:
        mask = np.zeros(target.shape, dtype=bool)
    run = NocRun([iou(mask, target)])
    clicks: list[Click] = []
    while run.ious[-1] < stop_iou and len(clicks) < max_clicks:
        click = error_click(target, mask)
        if click is None:
            break
        clicks.append(click)
        started = time.perf_counter()
        answer = np.asarray(segment(obj.image, list(clicks), mask))
        run.seconds += time.perf_counter() - started
        if answer.shape != target.shape:
            raise ValueError(f"the method returned a mask of shape {answer.shape}, expected {target.shape}")
        mask = answer.astype(bool)
        run.ious.append(iou(mask, target))
    return run


def summarise(
    runs: Sequence[NocRun],
    max_clicks: int = 20,
    thresholds: Sequence[float] = (0.85, 0.9),
    fail_threshold: float = 0.9,
) -> dict[str, float | int]:
    """NoC table row from per-object runs (plain floats and ints, ready to log).

    Keys: ``noc85``, ``noc90`` (one per threshold), ``fail20`` (share of objects that never reach
    ``fail_threshold`` within ``max_clicks``; the key carries ``max_clicks``), ``objects``, ``clicks``
    (method calls), ``s_per_click``, ``start_iou`` (mean IoU before any click), ``iou1`` / ``iou3`` /
    ``iou5`` (mean IoU after that many clicks), ``fail_threshold``.
    """
    if not runs:
        return {"objects": 0}
    out: dict[str, float | int] = {}
    for threshold in thresholds:
        out[f"noc{round(threshold * 100)}"] = float(
            np.mean([r.clicks_to(threshold, max_clicks) for r in runs])
        )
    fails = [r.clicks_to(fail_threshold, max_clicks + 1) > max_clicks for r in runs]
    out[f"fail{max_clicks}"] = float(np.mean(fails))
    calls = sum(len(r.ious) - 1 for r in runs)
    out["objects"] = len(runs)
    out["clicks"] = calls
    out["s_per_click"] = float(sum(r.seconds for r in runs) / calls) if calls else 0.0
    out["start_iou"] = float(np.mean([r.ious[0] for r in runs]))
    for clicks in (1, 3, 5):
        out[f"iou{clicks}"] = float(np.mean([r.iou_after(clicks) for r in runs]))
    out["fail_threshold"] = fail_threshold
    return out


def evaluate_noc(
    segment: Segmenter,
    objects: Sequence[NocObject],
    start: str = "empty",
    max_clicks: int = 20,
    thresholds: Sequence[float] = (0.85, 0.9),
    fail_threshold: float = 0.9,
    on_runs: Callable[[list[NocRun]], None] | None = None,
) -> dict[str, float | int]:
    """The NoC protocol over ``objects`` from one start; see :func:`summarise` for the keys.

    ``on_runs`` receives the per-object runs (in ``objects`` order) before they are summarised.
    """
    stop = max(*thresholds, fail_threshold)
    runs = [run_object(segment, obj, start, max_clicks, stop) for obj in objects]
    if on_runs is not None:
        on_runs(runs)
    return summarise(runs, max_clicks, thresholds, fail_threshold)
