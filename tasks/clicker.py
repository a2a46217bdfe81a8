"""Defect-Click learns every round: fine-tune the click model on people's masks, keep it only if NoC improves.

The round's challenger starts from the current click model (the champion, else the pre-trained one) and
trains on the human-labeled train objects, each with the pre-annotation people corrected as its previous
mask. Both are measured on the same objects of the frozen test split (NoC@85 from nothing, the standard
protocol); the challenger is registered in MLflow as ``loom-clicker`` and becomes the champion, which the ML
backend picks up on its next request, only when it needs fewer clicks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import tracking
from loom.clicking import (
    champion_clicker_pointer,
    clicker_choice,
    fine_tune_clicker,
)
from loom.config import Settings
from loom.imageio import read_mask
from models.clicker import ClickPredictor, NocObject, evaluate_noc, split_objects
from tasks.common import human_labeled, image_of, pseudo_mask_path, task_logger

#: Test objects the gate measures at most (spread over the split; the NoC of 40 objects is stable to ~0.2).
GATE_OBJECTS = 40
GATE_METRIC = "noc85"


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


def _objects(settings: Settings, split: str, round_no: int | None) -> list[NocObject]:
    """Connected defect regions of the human masks of ``split``; with ``round_no``, each carries the
    pre-annotation of that round (where the image had one) as its previous mask."""
    objects: list[NocObject] = []
    for row, mask in human_labeled(settings, split):  # the manifest is stored sorted by image_id
        if not mask.any():
            continue
        prelabel = None
        if round_no is not None:
            path = pseudo_mask_path(settings, round_no, row["image_id"])
            prelabel = read_mask(path, len(settings.classes), mask.shape) > 0 if path.is_file() else None
        objects += split_objects(image_of(settings, row), mask > 0, prelabel, row["image_id"][:12])
    return objects


def gate_objects(settings: Settings) -> list[NocObject]:
    """At most :data:`GATE_OBJECTS` objects of the frozen test split, spread evenly over it."""
    objects = _objects(settings, "test", None)
    if len(objects) > GATE_OBJECTS:
        keep = np.linspace(0, len(objects) - 1, GATE_OBJECTS).round().astype(int)
        objects = [objects[i] for i in keep]
    return objects


@task(name="fine-tune-clicker", cache_policy=NO_CACHE)
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
    train = _objects(settings, "train", round_no)
    test = gate_objects(settings)
    if steps <= 0 or not train or not test:
        outcome.reason = (
            "fine-tuning is off (round.clicker_fine_tune_steps)"
            if steps <= 0
            else f"{len(train)} labeled train objects, {len(test)} test objects: nothing to learn or judge by"
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
    base = evaluate_noc(ClickPredictor.from_pretrained(base_dir).segmenter(), test, "empty")
    tuned = evaluate_noc(ClickPredictor.from_pretrained(tuned_dir).segmenter(), test, "empty")
    outcome.metrics = {
        **{f"base_{k}": float(v) for k, v in base.items() if isinstance(v, int | float)},
        **{f"tuned_{k}": float(v) for k, v in tuned.items() if isinstance(v, int | float)},
        "final_loss": float(history[-1]["loss"]),
    }
    better = tuned[GATE_METRIC] < base[GATE_METRIC]
    outcome.reason = (
        f"NoC@85 {tuned[GATE_METRIC]:.2f} {'<' if better else '>='} {base[GATE_METRIC]:.2f} "
        f"of {base_version} "
        f"on {len(test)} test objects (from nothing)"
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
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "model_dir": str(model_dir), "round": round_no}))
    tmp.replace(pointer)
