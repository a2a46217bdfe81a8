"""Train the configured students on human + confident pseudo masks; evaluate each on the frozen test split.

Supervised students (FPN, BAFPN) learn the classes from the masks; BAFPN also distils the teacher's maps on
auto-accepted pseudo-labeled images. Anomaly scorers (CFA, RD4AD, UniNet) learn what normal fabric looks like
from the images without defects and mark the rest as the generic `defect`. All share one evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import manifest
from loom.config import Settings
from loom.imageio import read_mask
from loom.metrics import evaluate_segmentation
from loom.plots import per_class_bars
from loom.predict import overlay
from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.fpn import IGNORE_INDEX
from models.student.registry import build_loss, build_student, is_anomaly_scorer, load_student, student_class
from models.student.training import SegmentationSamples, TrainConfig, predict_images, train_segmenter
from models.teacher.types import anomaly_probability
from tasks.common import human_mask_of, image_of, load_manifest, pseudo_mask_path, task_logger

#: How much a training mask counts, by where it came from (people are trusted most).
SOURCE_WEIGHTS = {"human": 1.0, "pseudo": 0.5, "synthetic": 0.7}


@dataclass
class TrainedStudent:
    name: str
    model_dir: str
    n_human: int
    n_pseudo: int
    seconds: float
    history: list[dict]


@dataclass
class Evaluation:
    metrics: dict[str, float]
    n_test: int
    overlays: dict[str, np.ndarray]


def training_samples(
    settings: Settings, round_no: int, teacher_threshold: float | None = None
) -> tuple[list, int, int]:
    """(image, mask, weight[, teacher map]) for human-labeled and auto-accepted train images.

    The test split never enters. With `teacher_threshold` (the teacher's pixel threshold) auto-accepted
    images also carry the teacher's anomaly map as a probability, for students that distil from it.
    """
    df = manifest.usable(load_manifest(settings))
    train = df[df["split"] == "train"]
    human = train[train["label_source"] == "human"]
    pseudo = train[(train["label_source"] == "pseudo") & (train["review_state"] == "auto_accepted")]
    n_classes = len(settings.classes)
    defect_id = settings.class_index("defect")
    samples = []
    for _, row in human.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        samples.append(
            (image_of(settings, row), human_mask_of(settings, row["image_id"], hw), SOURCE_WEIGHTS["human"])
        )
    for _, row in pseudo.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        mask = read_mask(pseudo_mask_path(settings, round_no, row["image_id"]), n_classes, hw)
        # A region left as the generic `defect` says *where* but not *which*: it teaches nothing about the
        # class and must not teach "background" either, so it is ignored. Regions the teacher or the
        # prototypes named (confidently enough to be auto-accepted) and the normal pixels do count.
        mask = np.where(mask == defect_id, IGNORE_INDEX, mask).astype(np.uint8)
        sample = (image_of(settings, row), mask, SOURCE_WEIGHTS["pseudo"])
        if teacher_threshold is not None:
            raw = np.load(settings.pseudo_dir / f"round-{round_no:04d}" / "maps" / f"{row['image_id']}.npy")
            sample = (*sample, anomaly_probability(raw, teacher_threshold))
        samples.append(sample)
    return samples, len(human), len(pseudo)


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(
    settings: Settings, round_no: int, name: str | None = None, teacher_threshold: float | None = None
) -> TrainedStudent:
    """Train student `name` (default: the first of `round.students`) and save it under models/."""
    log = task_logger()
    rp = settings.round
    name = name or rp.students[0]
    overrides = {"image_size": rp.image_size}
    if "defect_index" in {f.name for f in fields(student_class(name).config_class)}:
        overrides["defect_index"] = settings.class_index("defect")  # anomaly scorers mark `defect` pixels
    model = build_student(name, len(settings.classes), **overrides)
    loss_fn = build_loss(name, model)
    distils = getattr(loss_fn, "distills", False)
    samples, n_human, n_pseudo = training_samples(settings, round_no, teacher_threshold if distils else None)
    if not samples:
        raise ValueError("train: no human or auto-accepted pseudo masks yet; review some images first")
    epochs = max(rp.epochs, math.ceil(rp.train_samples / len(samples)))
    on_epoch = lambda epoch, h: log.info("%s epoch %d: %s", name, epoch, h)  # noqa: E731
    start = time.perf_counter()
    if not is_anomaly_scorer(model):
        config = TrainConfig(
            epochs=epochs, batch_size=rp.batch_size, lr=rp.lr, image_size=rp.image_size, seed=rp.seed
        )
        samples_set = SegmentationSamples(samples, image_size=rp.image_size)
        history = train_segmenter(model, samples_set, config, on_epoch=on_epoch, loss_fn=loss_fn)
    else:
        config = AnomalyTrainConfig(
            epochs=epochs, batch_size=rp.batch_size, image_size=rp.image_size, seed=rp.seed
        )
        history = train_anomaly_model(model, loss_fn, samples, config, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    model_dir = settings.models_dir / f"round-{round_no:04d}" / name
    model.save_pretrained(
        model_dir, metadata={"classes": list(settings.classes), "round": round_no, "student": name}
    )
    log.info("%s trained on %d human + %d pseudo masks in %.1f s", name, n_human, n_pseudo, seconds)
    return TrainedStudent(name, str(model_dir), n_human, n_pseudo, seconds, history)


@task(name="evaluate-student", cache_policy=NO_CACHE)
def evaluate_student(settings: Settings, student: TrainedStudent, n_overlays: int = 6) -> Evaluation:
    """Metrics on the frozen, human-verified test split (never trained on)."""
    df = manifest.usable(load_manifest(settings))
    test = df[(df["split"] == "test") & (df["label_source"] == "human")]
    if test.empty:
        raise ValueError(
            "evaluate: the workspace has no human-labeled test split; ingest a dataset folder with test masks"
        )
    images, masks = [], []
    for _, row in test.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        images.append(image_of(settings, row))
        masks.append(human_mask_of(settings, row["image_id"], hw))
    model = load_student(Path(student.model_dir))
    start = time.perf_counter()
    outputs = predict_images(model, images)
    seconds = time.perf_counter() - start
    maps = [m for m, _, _ in outputs]
    preds = [p for _, p, _ in outputs]
    scores = np.array([s for _, _, s in outputs])
    metrics = evaluate_segmentation(maps, preds, masks, scores, settings.classes)
    metrics["eval_images_per_s"] = len(images) / max(seconds, 1e-9)

    defective = [i for i, m in enumerate(masks) if m.any()][:n_overlays]
    overlays = {
        f"test_{test.iloc[i]['image_id'][:12]}": np.concatenate(
            [overlay(images[i], masks[i], settings.classes), overlay(images[i], preds[i], settings.classes)],
            axis=1,
        )
        for i in defective
    }
    bars = per_class_bars(metrics, settings.classes)
    if bars is not None:
        overlays["per_class_iou"] = bars
    return Evaluation(metrics=metrics, n_test=len(images), overlays=overlays)
