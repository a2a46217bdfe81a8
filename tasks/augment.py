"""Synthetic defects for the round's student: Defect-Gen (or copy-paste) pairs for the classes people labeled.

The pairs go to ``data/synthetic/round-NNNN/{images,masks}`` (versioned by DVC with the round) and into the
manifest as ``label_source = synthetic`` train rows; the student trains on the latest round's pairs with the
weight of :data:`tasks.train.SOURCE_WEIGHTS`. Defect-Gen is trained only when people labeled new defects
(its cache key is the content hash of the training set).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from loom.config import Settings
from loom.data import manifest
from loom.data.human import human_labeled, image_of
from loom.services import tracking
from loom.stages.augment import (
    TRAINING_REPORT,
    Scorer,
    instance_counts,
    sample_grid,
    synthesise,
    train_defect_gen,
    write_pairs,
)
from tasks.common import (
    ONCE_PER_ROUND,
    class_names,
    load_manifest,
    presumed_normals,
    save_manifest,
    task_logger,
)


@dataclass
class AugmentOutcome:
    mode: str  # defect_gen | copy_paste | none
    per_class: dict[str, int] = field(default_factory=dict)  # accepted synthetic pairs per class
    methods: dict[str, str] = field(default_factory=dict)  # class -> defect_gen | copy_paste
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> reason -> count
    model_dir: str | None = None  # the Defect-Gen model that made them
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: str = ""  # why nothing was generated, else empty
    grid: np.ndarray | None = None  # samples beside their masks, for MLflow

    @property
    def total(self) -> int:
        return int(sum(self.per_class.values()))


def human_train_set(settings: Settings) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(defect images, their class masks, normal images) of the human-labeled train split.

    Normals are people's defect-free reviews, then auto-accepted pseudo-labels that name no class (the
    teacher saw nothing there): real fabric of this line on which the defects are placed. With neither (the
    first rounds, before auto-accept has enough audits) the teacher's lowest-scoring unflagged images.
    """
    images, masks, normals = [], [], []
    for row, mask in human_labeled(settings, "train"):
        (images if mask.any() else normals).append(image_of(settings, row))
        if mask.any():
            masks.append(mask)
    df = manifest.usable(load_manifest(settings))
    train = df[df["split"] == "train"]
    quiet = train[
        (train["label_source"] == "pseudo")
        & (train["review_state"] == "auto_accepted")
        & (train["classes"].fillna("") == "")
    ]
    if normals or len(quiet):
        normals += [image_of(settings, row) for _, row in quiet.iterrows()]
        return images, masks, normals
    return images, masks, [image_of(settings, row) for _, row in presumed_normals(settings).iterrows()]


def augment_mode(setting: str) -> str:
    """``round.augment`` as a mode: ``auto`` is Defect-Gen where CUDA is present, else copy-paste.

    Measured on 2 CPU cores (BENCHMARKS.md, Defect-Gen): the cpu preset's pairs move the student by
    +1.5 mIoU points, far inside the seed spread, for 3.5 min of training per round, so without a GPU the
    round spends nothing on it unless ``defect_gen`` is asked for by name.
    """
    if setting != "auto":
        return setting
    import torch

    return "defect_gen" if torch.cuda.is_available() else "copy_paste"


def teacher_scorer(settings: Settings, normals: list[np.ndarray], references: int = 16) -> Scorer:
    """The backbone teacher with a few of the line's normal images as references: a generated defect it does
    not see at all (no higher score inside the mask than around it) is rejected as ``unseen``.

    The teacher is built and fitted on the first call, so a round whose classes are all copy-pasted pays
    nothing for it.
    """
    from loom.stages.teachers import build_teacher

    fitted = []

    def anomaly_map(image: np.ndarray) -> np.ndarray:
        if not fitted:
            model, _ = build_teacher(settings, "backbone")
            refs = normals[:references]
            model.fit(refs, refs)
            fitted.append(model)
        return fitted[0].predict([image])[0].anomaly_map

    return anomaly_map


@task(name="augment", cache_policy=ONCE_PER_ROUND, persist_result=True)
def augment(settings: Settings, round_no: int) -> AugmentOutcome:
    """Generate ``round.synthetic_per_round`` pairs over the labeled classes (most for the rarest)."""
    log = task_logger()
    rp = settings.round
    mode = augment_mode(rp.augment)
    if mode == "none" or rp.synthetic_per_round <= 0:
        return AugmentOutcome("none", skipped="augmentation is off (round.augment)")
    images, masks, normals = human_train_set(settings)
    if not images or not normals:
        why = f"{len(images)} labeled defect images and {len(normals)} normal images: nothing to learn from"
        log.info("augment: skipped, %s", why)
        return AugmentOutcome(mode, skipped=why)
    instances = instance_counts(masks, settings.classes)
    log.info("augment (%s): %d labeled defect images, instances %s", mode, len(images), instances)
    started = time.perf_counter()
    model_dir, train_seconds = None, 0.0
    if mode == "defect_gen":
        # Trained with the round's fixed seed: the cache key then changes only when people's labels do.
        model_dir = train_defect_gen(
            images,
            masks,
            settings.classes,
            settings.stack_dir / "defect-gen",
            None if rp.augment_preset == "auto" else rp.augment_preset,
            seed=rp.seed,
        )
        train_seconds = time.perf_counter() - started
    # The teacher needs two references at least; with fewer, samples are judged on their masks alone.
    scorer = teacher_scorer(settings, normals) if mode == "defect_gen" and len(normals) > 1 else None
    made = synthesise(
        mode,
        images,
        masks,
        settings.classes,
        normals,
        rp.synthetic_per_round,
        seed=rp.seed + round_no,  # new places and noise every round
        model_dir=model_dir,
        scorer=scorer,
    )
    made.seconds["train"] = train_seconds
    out = settings.synthetic_dir / f"round-{round_no:04d}"
    stems = [f"r{round_no:04d}-{name}-{k:04d}" for k, name in enumerate(made.pair_classes)]
    if made.pairs:
        write_pairs(out, made.pairs, stems, settings.classes)
    rows = []
    for (_, mask), stem in zip(made.pairs, stems, strict=True):
        rows.append(
            {
                "image_id": f"synthetic-{round_no:04d}-{stem}",  # made, not ingested: no content hash
                "path": str((out / "images" / f"{stem}.png").relative_to(settings.data_dir)),
                "width": mask.shape[1],
                "height": mask.shape[0],
                "source": mode,
                "split": "train",
                "round": round_no,
                "label_source": "synthetic",
                "classes": class_names(mask, settings.classes),
                "review_state": "none",
                "quarantine_reason": "",
            }
        )
    if rows:
        save_manifest(settings, manifest.upsert(load_manifest(settings), pd.DataFrame(rows)))
    per_class = {name: made.pair_classes.count(name) for name in made.plan if made.plan[name] > 0}
    rejected = {
        name: {reason: n for reason, n in counts.items() if reason != "accepted" and n}
        for name, counts in made.counts.items()
    }
    seconds = {**made.seconds, "total": time.perf_counter() - started}
    log.info(
        "augment: %d synthetic pairs %s (%s) in %.0f s, rejected %s",
        len(rows),
        per_class,
        made.methods,
        seconds["total"],
        rejected,
    )
    return AugmentOutcome(
        mode,
        per_class=per_class,
        methods=made.methods,
        rejected=rejected,
        model_dir=str(made.model_dir) if made.model_dir else None,
        seconds=seconds,
        grid=sample_grid(made.pairs) if made.pairs else None,
    )


@task(
    name="log-defect-gen",
    retries=2,
    retry_delay_seconds=5,
    cache_policy=ONCE_PER_ROUND,
    persist_result=True,
)
def log_generator(settings: Settings, round_no: int, outcome: AugmentOutcome) -> str | None:
    """Register a newly trained Defect-Gen model as ``loom-defect-gen`` with a grid of its samples.

    A model reused from the cache (nobody labeled new defects) is registered once, not every round.
    """
    if outcome.model_dir is None:
        return None
    key = Path(outcome.model_dir).name
    known = tracking.version_tagged(settings, settings.registered_generator, "loom.training_key", key)
    if known is not None:
        return known
    report = json.loads((Path(outcome.model_dir) / TRAINING_REPORT).read_text())
    metrics = {
        k: float(v) for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    metrics |= {f"synthetic_{name}": float(n) for name, n in outcome.per_class.items()}
    run = tracking.log_round(
        settings,
        round_no,
        params={"mode": outcome.mode, "preset": settings.round.augment_preset, "training_key": key},
        metrics=metrics,
        model_dir=Path(outcome.model_dir),
        images={"samples": outcome.grid} if outcome.grid is not None else None,
        tags={"round": f"{round_no:04d}", "loom.model": "defect_gen"},
        run_name=f"round-{round_no:04d}-defect-gen",
        registered=settings.registered_generator,
        required=("defect_gen.json",),
    )
    tracking.tag_version(settings, settings.registered_generator, run.model_version, "loom.training_key", key)
    return run.model_version
