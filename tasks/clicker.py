"""Defect-Click learns every round: fine-tune the click model on people's masks, keep it only if NoC improves.

The round's challenger starts from the current click model (the champion, else the pre-trained one) and
trains on the human-labeled train objects, each with the pre-annotation people corrected as its previous
mask. Both are measured on the same objects of the frozen test split from the two starts annotators have
(NoC@85 from nothing, and from the teacher's pre-annotation of the test image, which Label Studio shows
them); the challenger is registered in MLflow as ``loom-clicker`` and becomes the champion, which the ML
backend picks up on its next request, only when it needs fewer clicks on the mean of the two starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from loom.config import Settings
from loom.data.human import human_labeled, image_of
from loom.data.imageio import read_mask
from loom.journal import write_atomic
from loom.services import tracking
from loom.stages.clicking import (
    champion_clicker_pointer,
    clicker_choice,
    fine_tune_clicker,
    teacher_prelabels,
)
from models.clicker import ClickPredictor, NocObject, Segmenter, evaluate_noc, split_objects
from models.clicker.noc import STARTS
from tasks.common import once_per_round, pseudo_mask_path, task_logger

#: Test objects the gate measures at most (spread over the split; the NoC of 40 objects is stable to ~0.2).
GATE_OBJECTS = 40
GATE_METRIC = "noc85"
#: The teacher's zero-shot pre-annotations of the test split (frozen, so computed once per workspace).
GATE_PRELABELS = "gate-prelabels.npz"


@dataclass
class ClickerRound:
    base: str  # model_version of the clicker it started from
    model_dir: str | None = None  # the fine-tuned challenger
    version: str | None = None  # its loom-clicker registry version
    promoted: bool = False
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # base_* and tuned_* NoC rows
    objects: int = 0  # training objects
    seconds: float = 0.0


def current_clicker(settings: Settings) -> tuple[Path, str]:
    """(model folder, model_version) of the click model the backend answers with."""
    model_dir, _ = clicker_choice(settings)
    pointer = champion_clicker_pointer(settings)
    if pointer.is_file():
        return model_dir, f"loom-clicker-v{json.loads(pointer.read_text())['version']}"
    return model_dir, f"loom-clicker-pretrained-{model_dir.name[-8:]}"


PrelabelOf = Callable[[str, tuple[int, int]], np.ndarray | None]


def _objects(
    settings: Settings, labeled: Iterable[tuple[pd.Series, np.ndarray]], prelabel_of: PrelabelOf
) -> list[NocObject]:
    """Defect objects of human-labeled ``(row, class mask)`` pairs, each with ``prelabel_of(image_id,
    (H, W))`` (restricted to the object) as its previous mask."""
    objects: list[NocObject] = []
    for row, mask in labeled:
        if not mask.any():
            continue
        prelabel = prelabel_of(row["image_id"], mask.shape)
        objects += split_objects(image_of(settings, row), mask > 0, prelabel, row["image_id"][:12])
    return objects


def round_prelabel(settings: Settings, round_no: int) -> PrelabelOf:
    """image_id -> the pre-annotation round ``round_no`` sent people (None where it sent none)."""

    def prelabel_of(image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
        path = pseudo_mask_path(settings, round_no, image_id)
        return read_mask(path, len(settings.classes), shape) > 0 if path.is_file() else None

    return prelabel_of


def gate_prelabels(settings: Settings, rows: Sequence[pd.Series]) -> dict[str, np.ndarray]:
    """image_id -> the teacher's zero-shot pre-annotation of each test image (the split's normal images
    are in the teacher's pool too, as in a round).

    Cached in ``clicker/gate-prelabels.npz`` and reused while the test images are the same ones (their
    pixels are read only when the teacher has to run). A teacher that cannot run here leaves the gate with
    the start from nothing only (logged), not without a gate.
    """
    ids = [row["image_id"] for row in rows]
    cache = settings.clicker_dir / GATE_PRELABELS
    if cache.is_file():
        with np.load(cache) as stored:
            if sorted(stored.files) == sorted(ids):
                return {image_id: stored[image_id] for image_id in ids}
    if not rows:
        return {}
    log = task_logger()
    try:
        prelabels = teacher_prelabels(
            [image_of(settings, row) for row in rows], settings, settings.round.teacher
        )
    except Exception as error:
        log.warning(
            "clicker gate: no pre-annotations of the test split (%s); judging from nothing only", error
        )
        return {}
    out = dict(zip(ids, prelabels.masks, strict=True))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    log.info("clicker gate: %s", prelabels.source)
    return out


def gate_objects(settings: Settings) -> list[NocObject]:
    """At most :data:`GATE_OBJECTS` objects of the frozen test split, spread evenly over it, each with the
    teacher's pre-annotation of its image (see :func:`gate_prelabels`)."""
    labeled = list(human_labeled(settings, "test"))
    prelabels = gate_prelabels(settings, [row for row, _ in labeled])
    objects = _objects(settings, labeled, lambda image_id, _shape: prelabels.get(image_id))
    if len(objects) > GATE_OBJECTS:
        keep = np.linspace(0, len(objects) - 1, GATE_OBJECTS).round().astype(int)
        objects = [objects[i] for i in keep]
    return objects


def _prefix(start: str) -> str:
    """Metric-name prefix of a NoC start: none for the standard start from nothing."""
    return "" if start == "empty" else f"{start}_"


def gate_noc(segment: Segmenter, objects: list[NocObject]) -> dict[str, float]:
    """NoC rows from both starts (keys ``<metric>`` from nothing, ``prelabel_<metric>`` from the
    pre-annotation) and ``gate``: the mean NoC@85 of the starts measured (from nothing only when no object
    has a pre-annotation)."""
    starts = STARTS if any(o.prelabel is not None and o.prelabel.any() for o in objects) else ("empty",)
    out: dict[str, float] = {}
    for start in starts:
        row = evaluate_noc(segment, objects, start)
        out |= {f"{_prefix(start)}{k}": float(v) for k, v in row.items() if isinstance(v, int | float)}
    out["gate"] = float(np.mean([out[f"{_prefix(start)}{GATE_METRIC}"] for start in starts]))
    return out


@task(
    name="fine-tune-clicker",
    cache_policy=once_per_round("round_no", "suffix"),
    persist_result=True,
)
def fine_tune_round_clicker(settings: Settings, round_no: int, suffix: str = "") -> ClickerRound:
    """Fine-tune, measure beside the current clicker, register, promote when NoC@85 falls.

    Args:
        round_no: the round whose pre-annotations are the training objects' previous masks.
        suffix: added to the model folder's name (``round-NNNN<suffix>``), for runs between rounds.
    """
    log = task_logger()
    started = time.perf_counter()
    base_dir, base_version = current_clicker(settings)
    outcome = ClickerRound(base=base_version)
    steps = settings.round.clicker_fine_tune_steps
    if steps <= 0:  # decided before any image is read or the teacher runs for the gate
        outcome.reason = "fine-tuning is off (round.clicker_fine_tune_steps)"
        log.info("clicker: not fine-tuned: %s", outcome.reason)
        return outcome
    train = _objects(settings, human_labeled(settings, "train"), round_prelabel(settings, round_no))
    test = gate_objects(settings)
    if not train or not test:
        outcome.reason = (
            f"{len(train)} labeled train objects, {len(test)} test objects: nothing to learn or judge by"
        )
        log.info("clicker: not fine-tuned: %s", outcome.reason)
        return outcome
    steps_per_epoch = 25
    out_dir = settings.clicker_dir / f"round-{round_no:04d}{suffix}"
    tuned_dir, history = fine_tune_clicker(
        base_dir,
        train,
        out_dir,
        epochs=max(1, round(steps / steps_per_epoch)),
        steps_per_epoch=steps_per_epoch,
        seed=settings.round.seed + round_no,
    )
    outcome.model_dir, outcome.objects = str(tuned_dir), len(train)
    base = gate_noc(ClickPredictor.from_pretrained(base_dir).segmenter(), test)
    tuned = gate_noc(ClickPredictor.from_pretrained(tuned_dir).segmenter(), test)
    outcome.metrics = {
        **{f"base_{k}": v for k, v in base.items()},
        **{f"tuned_{k}": v for k, v in tuned.items()},
        "final_loss": float(history[-1]["loss"]),
    }
    better = tuned["gate"] < base["gate"]
    starts = "from nothing and from the pre-annotation" if "prelabel_noc85" in base else "from nothing"
    outcome.reason = (
        f"NoC@85 {tuned['gate']:.2f} {'<' if better else '>='} {base['gate']:.2f} "
        f"of {base_version} "
        f"on {len(test)} test objects ({starts}, mean)"
    )
    run = tracking.log_round(
        settings,
        round_no,
        params={"base": base_version, "steps": steps, "train_objects": len(train)},
        metrics=outcome.metrics,
        model_dir=tuned_dir,
        tags={"round": f"{round_no:04d}", "loom.model": "clicker"},
        run_name=f"round-{round_no:04d}-clicker",
        registered=settings.registered_clicker,
    )
    outcome.version = run.model_version
    outcome.promoted = tracking.decide_champion(
        settings, run.model_version, better, outcome.reason, registered=settings.registered_clicker
    )
    if outcome.promoted:
        write_pointer(settings, run.model_version, tuned_dir, round_no)
    outcome.seconds = time.perf_counter() - started
    log.info(
        "clicker round %d: %s -> %s", round_no, outcome.reason, "promoted" if outcome.promoted else "kept"
    )
    return outcome


def write_pointer(settings: Settings, version: str, model_dir: Path, round_no: int) -> None:
    """The backend's champion pointer, replaced atomically (it reloads on the file's modification time)."""
    pointer = champion_clicker_pointer(settings)
    write_atomic(pointer, json.dumps({"version": version, "model_dir": str(model_dir), "round": round_no}))
