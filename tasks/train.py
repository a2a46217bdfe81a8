"""Train the student on human + confident pseudo masks, then evaluate it on the frozen test split."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
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
from models.student.fpn import IGNORE_INDEX, FPNConfig, FPNSegmenter
from models.student.training import SegmentationSamples, TrainConfig, predict_images, train_segmenter
from tasks.common import human_mask_of, image_of, load_manifest, pseudo_mask_path, task_logger

#: How much a training mask counts, by where it came from (people are trusted most).
SOURCE_WEIGHTS = {"human": 1.0, "pseudo": 0.5, "synthetic": 0.7}


@dataclass
class TrainedStudent:
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


def training_samples(settings: Settings, round_no: int) -> tuple[list, int, int]:
    """(image, mask, weight) for human-labeled and auto-accepted train images; the test split never enters."""
    df = manifest.usable(load_manifest(settings))
    train = df[df["split"] == "train"]
    human = train[train["label_source"] == "human"]
    pseudo = train[(train["label_source"] == "pseudo") & (train["review_state"] == "auto_accepted")]
    n_classes = len(settings.classes)
    samples = []
    for _, row in human.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        samples.append(
            (image_of(settings, row), human_mask_of(settings, row["image_id"], hw), SOURCE_WEIGHTS["human"])
        )
    for _, row in pseudo.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        mask = read_mask(pseudo_mask_path(settings, round_no, row["image_id"]), n_classes, hw)
        # The teacher says *where* but not *which* defect: its regions teach nothing about the class and
        # must not teach "background" either, so they are ignored; its confident normal pixels do count.
        mask = np.where(mask > 0, IGNORE_INDEX, 0).astype(np.uint8)
        samples.append((image_of(settings, row), mask, SOURCE_WEIGHTS["pseudo"]))
    return samples, len(human), len(pseudo)


@task(name="train-student", cache_policy=NO_CACHE)
def train_student(settings: Settings, round_no: int) -> TrainedStudent:
    log = task_logger()
    samples, n_human, n_pseudo = training_samples(settings, round_no)
    if not samples:
        raise ValueError("train: no human or auto-accepted pseudo masks yet; review some images first")
    rp = settings.round
    model = FPNSegmenter(FPNConfig(num_classes=len(settings.classes), image_size=rp.image_size))
    epochs = max(rp.epochs, math.ceil(rp.train_samples / len(samples)))
    config = TrainConfig(
        epochs=epochs, batch_size=rp.batch_size, lr=rp.lr, image_size=rp.image_size, seed=rp.seed
    )
    start = time.perf_counter()
    history = train_segmenter(
        model,
        SegmentationSamples(samples, image_size=rp.image_size),
        config,
        on_epoch=lambda epoch, h: log.info("epoch %d: %s", epoch, h),
    )
    seconds = time.perf_counter() - start
    model_dir = settings.models_dir / f"round-{round_no:04d}"
    model.save_pretrained(model_dir, metadata={"classes": list(settings.classes), "round": round_no})
    log.info("student trained on %d human + %d pseudo masks in %.1f s", n_human, n_pseudo, seconds)
    return TrainedStudent(str(model_dir), n_human, n_pseudo, seconds, history)


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
    model = FPNSegmenter.from_pretrained(Path(student.model_dir))
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
