"""A simulated annotator for the demo and the tests: it answers Label Studio tasks from known masks.

Never used on a production path: real rounds wait for people. It behaves like a person who opens a
task, looks at the pre-annotation, fixes it to the truth and submits, through the same REST API and
under its own account, so Loom reads its answers exactly as it reads a person's. The truth is the
dataset's ground-truth mask; what changed between the pre-annotation and the truth is recorded as a
:class:`Correction` so the demo can report how much work the teacher left for people.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loom.config import Settings
from loom.labelstudio import MalformedAnnotation, connect, mask_to_results, results_to_mask

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
        token: the annotator's own API token (see :func:`loom.labelstudio.invite_annotator`).
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
    ) -> None:
        self.settings = settings
        self.client = connect(settings, token=token)
        self.ground_truth = ground_truth
        self.classes = tuple(classes)
        self.corrections: list[Correction] = []
        self._lock = threading.Lock()

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
        self.client.annotations.create(
            id=task_id,
            result=mask_to_results(truth, self.classes),
            parent_prediction=prediction.id if prediction is not None else None,
            lead_time=time.monotonic() - started,
        )
        logger.info(
            "Task %d (%s): IoU %.3f, +%d/-%d px%s",
            task_id,
            image_id,
            correction.pred_iou,
            correction.pixels_added,
            correction.pixels_removed,
            ", accepted as is" if correction.accepted_as_is else "",
        )
        return correction

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
