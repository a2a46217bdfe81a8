"""Small helpers shared by the tasks: the manifest, images and masks of the workspace."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from loom import journal
from loom.config import Settings
from loom.data import manifest


@dataclass
class RoundStepPolicy(CachePolicy):
    """Cache key: the claim of the workspace's round in progress, the task and the inputs named in ``by``.

    A round's steps run once per round, not once per flow run: a round resumed after its suspended review
    (run again from the top by the worker) and a round rerun after a kill (a new flow run) find the steps
    already done in their persisted results. Outside a claimed round nothing is cached.
    """

    by: tuple[str, ...] = ()

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        settings = inputs.get("settings")
        current = journal.load(settings) if isinstance(settings, Settings) else None
        if current is None:
            return None
        return hash_objects(current.claim, task_ctx.task.name, *(str(inputs.get(k)) for k in self.by))


#: Persist the result (``persist_result=True``) beside this policy.
ONCE_PER_ROUND = RoundStepPolicy() + TASK_SOURCE


def once_per_round(*by: str) -> CachePolicy:
    """:data:`ONCE_PER_ROUND` for a task called several times a round, told apart by the inputs ``by``."""
    return RoundStepPolicy(by=by) + TASK_SOURCE


def load_manifest(settings: Settings) -> pd.DataFrame:
    return manifest.load(settings.manifest_path)


def save_manifest(settings: Settings, df: pd.DataFrame) -> None:
    manifest.save(df, settings.manifest_path)


#: How many of the teacher's calmest images stand in for normal fabric while there is no other: people have
#: labeled no normal image and auto-accept has passed none yet (it waits for enough audits).
PRESUMED_NORMALS = 8


def presumed_normals(settings: Settings) -> pd.DataFrame:
    """Manifest rows of the train images the teacher found most normal (unflagged, lowest scores)."""
    df = manifest.usable(load_manifest(settings))
    unflagged = df[
        (df["split"] == "train") & (df["label_source"] == "pseudo") & (df["classes"].fillna("") == "")
    ]
    return unflagged.sort_values(["score", "image_id"]).head(PRESUMED_NORMALS)


def pseudo_mask_path(settings: Settings, round_no: int, image_id: str):
    return settings.pseudo_dir / f"round-{round_no:04d}" / "masks" / f"{image_id}.png"


def class_names(mask: np.ndarray, classes: tuple[str, ...]) -> str:
    """Comma-joined names of the classes present in a class-index mask."""
    ids = [int(v) for v in np.unique(mask) if 0 < v <= len(classes)]
    return ",".join(classes[i - 1] for i in ids)


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task run, the module logger when a stage is called directly."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("loom.tasks")


class StepClock:
    """Wall time per step, for the round record and BENCHMARKS.md; with ``settings``, each step's start and
    end are also noted in the round's journal (:mod:`loom.journal`)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.settings = settings

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.settings is not None:
            journal.mark(self.settings, name, "start")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
        if self.settings is not None:
            journal.mark(self.settings, name, "done")
