"""A simulated annotator for the demo and the tests: it answers Label Studio tasks from known masks.

Never used on a production path: real rounds wait for people. It behaves like a person who opens a
task, looks at the pre-annotation, fixes it to the truth and submits, through the same REST API and
under its own account, so Loom reads its answers exactly as it reads a person's. The truth is the
dataset's ground-truth mask; what changed between the pre-annotation and the truth is recorded as a
:class:`Correction` so the demo can report how much work the teacher left for people.

With a :class:`ClickPolicy` it corrects the way an annotator with Defect-Click does, through the real path:
for each defect object it places smart key points where the NoC protocol puts them (the centre of the
larger error region), each sent to Label Studio's interactive endpoint exactly as the labeling UI sends it
(Label Studio forwards it to the ML backend), until the returned mask covers the object with IoU >= the
target or 20 clicks are spent; only then does it paint the object by hand. Pre-annotation regions that
cover no defect are deleted. What it submits is what it would have got: the backend's masks where the
clicks sufficed, the truth where it painted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests
from scipy import ndimage

from loom.config import Settings
from loom.services.labelstudio import (
    PREANNOTATION_ID_PREFIX,
    MalformedAnnotation,
    connect,
    interactive_annotate,
    keypoint_result,
    mask_to_results,
    results_to_mask,
)
from models.clicker.noc import defect_objects

logger = logging.getLogger(__name__)


@dataclass
class Correction:
    """What the annotator changed on one task (pixel counts over the image)."""

    image_id: str
    task_id: int
    pred_iou: float  # prediction vs truth over defect pixels, same class required; 1.0 when both are empty
    region_iou: float  # the same, whatever the class: did the pre-annotation find the right pixels?
    pixels_added: int  # defect in the truth, background in the prediction
    pixels_removed: int  # defect in the prediction, background in the truth
    pixels_relabelled: int  # defect in both, but of another class
    classes_before: tuple[str, ...]
    classes_after: tuple[str, ...]
    accepted_as_is: bool  # the prediction already matched the truth
    objects: int = 0  # defect objects (connected regions) in the truth
    clicks: int = 0  # smart key points placed (click mode)
    painted: int = 0  # objects 20 clicks could not fix, painted by hand (click mode)
    final_iou: float = 1.0  # the submitted mask against the truth


@dataclass(frozen=True)
class ClickPolicy:
    """How the simulated annotator clicks: through ML backend ``ml_backend`` of the project."""

    ml_backend: int
    target_iou: float = 0.90
    max_clicks: int = 20
    neighbourhood_px: int = 8  # pre-annotation components this close to an object are its start


def objects_of(truth: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """(object mask (H, W) bool, class id) per defect object of a class-index mask (as the NoC protocol
    splits them: 8-connected regions, those a couple of pixels apart together)."""
    return [(region, int(np.bincount(truth[region]).argmax())) for region in defect_objects(truth)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def defect_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two (H, W) class-index masks over defect pixels; a pixel agrees only with the same class."""
    union = np.count_nonzero((pred > 0) | (truth > 0))
    if union == 0:
        return 1.0
    return float(np.count_nonzero((pred == truth) & (truth > 0)) / union)


def compare_masks(
    image_id: str, task_id: int, pred: np.ndarray, truth: np.ndarray, classes: Sequence[str]
) -> Correction:
    """The correction that turns ``pred`` into ``truth`` (both (H, W) class-index masks)."""

    def present(mask: np.ndarray) -> tuple[str, ...]:
        return tuple(classes[int(k) - 1] for k in np.unique(mask) if k > 0)

    return Correction(
        image_id=image_id,
        task_id=task_id,
        pred_iou=defect_iou(pred, truth),
        region_iou=defect_iou(pred > 0, truth > 0),
        pixels_added=int(np.count_nonzero((truth > 0) & (pred == 0))),
        pixels_removed=int(np.count_nonzero((pred > 0) & (truth == 0))),
        pixels_relabelled=int(np.count_nonzero((pred > 0) & (truth > 0) & (pred != truth))),
        classes_before=present(pred),
        classes_after=present(truth),
        accepted_as_is=bool(np.array_equal(pred, truth)),
    )


class SimulatedAnnotator:
    """Answers every unannotated task of a project with the ground-truth mask.

    Args:
        settings: the workspace settings (server URL).
        token: the annotator's own API token (see :func:`loom.services.labelstudio.invite_annotator`).
        ground_truth: image_id -> (H, W) uint8 class-index mask (zeros for a normal image), or None
            when the truth is unknown; such tasks are left for a person.
        classes: the project's class names (mask value k is ``classes[k - 1]``).
    """

    def __init__(
        self,
        settings: Settings,
        token: str,
        ground_truth: Callable[[str], np.ndarray | None],
        classes: Sequence[str],
        clicks: ClickPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.token = token
        self.client = connect(settings, token=token)
        self.ground_truth = ground_truth
        self.classes = tuple(classes)
        self.policy = clicks
        self.corrections: list[Correction] = []
        self._lock = threading.Lock()
        self._http = requests.Session()

    def annotate_pending(self, project_id: int) -> list[Correction]:
        """Submit an annotation for every task without one; returns the corrections made now."""
        with self._lock:  # the background thread and a direct call must not answer a task twice
            done = []
            for task in self.client.tasks.list(project=project_id, fields="task_only", page_size=100):
                if (task.total_annotations or 0) + (task.cancelled_annotations or 0) > 0:
                    continue
                correction = self._annotate(int(task.id), str((task.data or {}).get("image_id")))
                if correction is not None:
                    done.append(correction)
            self.corrections.extend(done)
            return done

    def _annotate(self, task_id: int, image_id: str) -> Correction | None:
        started = time.monotonic()
        truth = self.ground_truth(image_id)
        if truth is None:
            logger.warning("Task %d: no ground truth for image %s; left for a person", task_id, image_id)
            return None
        height, width = truth.shape
        predictions = sorted(self.client.predictions.list(task=task_id), key=lambda p: p.id)
        prediction = predictions[-1] if predictions else None
        try:
            pred = (
                results_to_mask(prediction.result or [], height, width, self.classes)
                if prediction is not None
                else np.zeros_like(truth)
            )
        except MalformedAnnotation as exc:
            # A person would redraw from scratch: count the whole truth as added.
            logger.warning("Task %d: unreadable pre-annotation (%s); drawing from scratch", task_id, exc)
            pred = np.zeros_like(truth)
        correction = compare_masks(image_id, task_id, pred, truth, self.classes)
        correction.objects = len(objects_of(truth))
        if self.policy is None:
            result = mask_to_results(truth, self.classes)
        else:
            result, correction.clicks, correction.painted = self._click(task_id, truth, pred)
            submitted = results_to_mask(result, height, width, self.classes)
            correction.final_iou = defect_iou(submitted, truth)
        self.client.annotations.create(
            id=task_id,
            result=result,
            parent_prediction=prediction.id if prediction is not None else None,
            lead_time=time.monotonic() - started,
        )
        logger.info(
            "Task %d (%s): IoU %.3f, +%d/-%d px, %d clicks, %d painted%s",
            task_id,
            image_id,
            correction.pred_iou,
            correction.pixels_added,
            correction.pixels_removed,
            correction.clicks,
            correction.painted,
            ", accepted as is" if correction.accepted_as_is else "",
        )
        return correction

    def _click(
        self, task_id: int, truth: np.ndarray, pred: np.ndarray
    ) -> tuple[list[dict[str, Any]], int, int]:
        """Correct every object of ``truth`` by smart key points; returns (results, clicks, painted)."""
        from models.clicker import error_click

        assert self.policy is not None
        height, width = truth.shape
        prelabel = pred > 0
        grown = ndimage.binary_dilation
        labelled, _ = ndimage.label(prelabel, structure=np.ones((3, 3), dtype=bool))
        results: list[dict[str, Any]] = []
        clicks = painted = 0
        for obj, class_id in objects_of(truth):
            name = self.classes[class_id - 1]
            near = grown(obj, iterations=self.policy.neighbourhood_px)
            current = np.isin(labelled, np.unique(labelled[near & prelabel])) & prelabel
            region_id = None
            spent = 0
            while _iou(current, obj) < self.policy.target_iou and spent < self.policy.max_clicks:
                click = error_click(obj, current)
                point = keypoint_result(click.x, click.y, width, height, name, click.is_positive)
                answer = interactive_annotate(
                    self.settings, self._http, self.token, self.policy.ml_backend, task_id, [point]
                )
                spent += 1
                mine = [r for r in answer.get("result") or [] if r.get("type") == "brushlabels"]
                current = results_to_mask(mine, height, width, [name]) > 0 if mine else np.zeros_like(obj)
                region_id = mine[0]["id"] if mine else region_id
            clicks += spent
            prefix = PREANNOTATION_ID_PREFIX if spent == 0 else ""  # kept as the teacher drew it
            if _iou(current, obj) < self.policy.target_iou:
                painted += 1
                current, region_id, prefix = obj, None, ""  # painted by hand: a region of its own
            region = mask_to_results(current.astype(np.uint8), [name], id_prefix=prefix)
            for item in region:
                if region_id is not None and all(r["id"] != region_id for r in results):
                    item["id"] = region_id
            results.extend(region)
        return results, clicks, painted

    def run_in_background(self, project_id: int, poll_s: float = 1.0) -> threading.Event:
        """Keep answering new tasks from a daemon thread until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.annotate_pending(project_id)
                except Exception:  # a hiccup of the server must not end the simulation
                    logger.exception("Simulated annotator: polling project %d failed; retrying", project_id)
                stop.wait(poll_s)

        threading.Thread(target=loop, name=f"simulated-annotator-{project_id}", daemon=True).start()
        return stop
