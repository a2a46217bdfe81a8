"""Train the configured students on human + confident pseudo masks; evaluate each on the frozen test split.

Supervised students (FPN, BAFPN) learn the classes from the masks; BAFPN also distils the teacher's maps on
auto-accepted pseudo-labeled images. Anomaly scorers (CFA, RD4AD, UniNet) learn what normal fabric looks like
from the images without defects and mark the rest as the generic `defect`. All share one evaluation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from prefect import task

from loom import journal
from loom.config import Settings
from loom.data import manifest
from loom.data.human import human_labeled, image_of
from loom.data.imageio import read_mask
from loom.data.predict import overlay
from loom.datasets.folder import load_labeled_folder
from loom.evaluation import promotion
from loom.evaluation.metrics import evaluate_segmentation
from loom.evaluation.plots import per_class_bars
from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.fpn import IGNORE_INDEX
from models.student.registry import (
    LOSSES,
    build_loss,
    build_student,
    is_anomaly_scorer,
    load_student,
    scores_anomalies,
    student_class,
)
from models.student.training import SegmentationSamples, TrainConfig, predict_images, train_segmenter
from models.teacher.types import anomaly_probability
from tasks.common import load_manifest, once_per_round, presumed_normals, pseudo_mask_path, task_logger

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
    n_synthetic: int = 0
    warm_start: str = ""  # the champion version its weights started from ("" when trained from ImageNet)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    n_test: int
    overlays: dict[str, np.ndarray]
    # Per-image counts of the same predictions: the promotion gate resamples them instead of predicting again.
    stats: promotion.ModelStats | None = None


def training_samples(
    settings: Settings, round_no: int, teacher_threshold: float | None = None
) -> tuple[list, int, int, int]:
    """(image, mask, weight[, teacher map]) for human-labeled, auto-accepted and synthetic train images,
    with the counts of each kind.

    The test split never enters. With `teacher_threshold` (the teacher's pixel threshold) auto-accepted
    images also carry the teacher's anomaly map as a probability, for students that distil from it.
    """
    df = manifest.usable(load_manifest(settings))
    train = df[df["split"] == "train"]
    human = train[train["label_source"] == "human"]
    pseudo = train[(train["label_source"] == "pseudo") & (train["review_state"] == "auto_accepted")]
    synthetic = train[train["label_source"] == "synthetic"]
    # Each round's generator learned from more people's defects than the last: only its pairs train.
    synthetic = synthetic[synthetic["round"] == synthetic["round"].max()] if len(synthetic) else synthetic
    n_classes = len(settings.classes)
    defect_id = settings.class_index("defect")
    samples = [
        (image_of(settings, row), mask, SOURCE_WEIGHTS["human"])
        for row, mask in human_labeled(settings, "train", df)
    ]
    for _, row in pseudo.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        mask = read_mask(pseudo_mask_path(settings, round_no, row["image_id"]), n_classes, hw)
        sample = (image_of(settings, row), pseudo_training_mask(mask, defect_id), SOURCE_WEIGHTS["pseudo"])
        if teacher_threshold is not None:
            raw = np.load(settings.pseudo_dir / f"round-{round_no:04d}" / "maps" / f"{row['image_id']}.npy")
            sample = (*sample, anomaly_probability(raw, teacher_threshold))
        samples.append(sample)
    for _, row in synthetic.iterrows():
        hw = (int(row["height"]), int(row["width"]))
        mask = read_mask(synthetic_mask_path(settings, row["path"]), n_classes, hw)
        samples.append((image_of(settings, row), mask, SOURCE_WEIGHTS["synthetic"]))
    return samples, len(human), len(pseudo), len(synthetic)


def pseudo_training_mask(mask: np.ndarray, defect_id: int) -> np.ndarray:
    """A pseudo-label as a training target: (H, W) uint8 class ids, unnamed regions ignored.

    A region left as the generic `defect` says *where* but not *which*: it teaches nothing about the class
    and must not teach "background" either, so it is ignored. Regions the teacher or the prototypes named
    (confidently enough to be auto-accepted) and the normal pixels do count.
    """
    return np.where(mask == defect_id, IGNORE_INDEX, mask).astype(np.uint8)


def synthetic_mask_path(settings: Settings, image_path: str) -> Path:
    """The class mask beside a synthetic image: ``synthetic/.../images/X.png`` -> ``.../masks/X.png``."""
    path = settings.data_dir / image_path
    return path.parent.parent / "masks" / path.name


def nothing_to_train(settings: Settings) -> str | None:
    """Why no student can be trained now (no labeled, auto-accepted or synthetic train image), else None."""
    df = manifest.usable(load_manifest(settings))
    train = df[df["split"] == "train"]
    accepted = (train["label_source"] == "pseudo") & (train["review_state"] == "auto_accepted")
    if (train["label_source"].isin(["human", "synthetic"]) | accepted).any():
        return None
    return (
        "no human, auto-accepted or synthetic masks yet: people have reviewed nothing, and auto-accept waits "
        "for their audits"
    )


def student_samples(
    settings: Settings, round_no: int, name: str, teacher_threshold: float | None
) -> tuple[list, int, int, int]:
    """:func:`training_samples` for student ``name``: with the teacher's maps only for students that
    distil from them."""
    distils = getattr(LOSSES[name], "distills", False)  # a ClassVar: no model needs building to know
    samples, n_human, n_pseudo, n_synthetic = training_samples(
        settings, round_no, teacher_threshold if distils else None
    )
    if scores_anomalies(name) and not any(not sample[1].any() for sample in samples):
        # An anomaly scorer learns normal fabric: before any normal image is labeled or auto-accepted it
        # learns from the teacher's calmest images, as a practitioner would start one on a raw pool.
        calm = presumed_normals(settings)
        samples += [
            (
                image_of(settings, row),
                np.zeros((int(row["height"]), int(row["width"])), np.uint8),
                SOURCE_WEIGHTS["pseudo"],
            )
            for _, row in calm.iterrows()
        ]
        n_pseudo += len(calm)
    return samples, n_human, n_pseudo, n_synthetic


@task(name="train-student", cache_policy=once_per_round("name"), persist_result=True)
def train_student(
    settings: Settings, round_no: int, name: str | None = None, teacher_threshold: float | None = None
) -> TrainedStudent:
    """Train student `name` (default: the first of `round.students`) and save it under models/."""
    name = name or settings.round.students[0]
    samples, n_human, n_pseudo, n_synthetic = student_samples(settings, round_no, name, teacher_threshold)
    if not samples:
        raise ValueError("train: no human or auto-accepted pseudo masks yet; review some images first")
    model_dir = settings.models_dir / f"round-{round_no:04d}" / name
    version, init_from = warm_start_source(settings, name) if settings.round.warm_start else ("", None)
    student = fit_student(
        settings, name, samples, model_dir, {"round": round_no, "warm_start": version}, init_from
    )
    student.n_human, student.n_pseudo, student.n_synthetic = n_human, n_pseudo, n_synthetic
    student.warm_start = version
    task_logger().info(
        "%s trained on %d human + %d pseudo + %d synthetic masks", name, n_human, n_pseudo, n_synthetic
    )
    return student


def _build(settings: Settings, name: str):
    overrides = {"image_size": settings.round.image_size}
    if "defect_index" in {f.name for f in fields(student_class(name).config_class)}:
        overrides["defect_index"] = settings.class_index("defect")  # anomaly scorers mark `defect` pixels
    return build_student(name, len(settings.classes), **overrides)


def warm_start_source(settings: Settings, name: str) -> tuple[str, Path | None]:
    """(version, folder) of the champion when a round's `name` can start from its weights, else ("", None).

    Only a segmenter of the same architecture, classes and image size qualifies; anomaly scorers (whose
    memory banks and thresholds describe the previous data) always start fresh.
    """
    from loom.services.tracking import champion, download_student

    current = champion(settings)
    if current is None:
        return "", None
    folder = download_student(settings, current[0])
    config = json.loads((folder / "config.json").read_text())
    same = (
        config.get("student") == name
        and config.get("image_size") == settings.round.image_size
        and list(config.get("classes") or []) == list(settings.classes)
    )
    if not same or scores_anomalies(name):
        task_logger().info("%s starts fresh: champion v%s is not the same segmenter", name, current[0])
        return "", None
    return current[0], folder


def fit_student(
    settings: Settings,
    name: str,
    samples: list,
    model_dir: Path,
    metadata: dict | None = None,
    init_from: Path | None = None,
) -> TrainedStudent:
    """Train student `name` on (image, mask, weight[, teacher map]) samples and save it to `model_dir`;
    ``init_from``: a saved student of the same architecture whose weights it starts from (warm start)."""
    log = task_logger()
    rp = settings.round
    torch.manual_seed(rp.seed)  # the head's initial weights: the same seed gives the same student
    model = _build(settings, name)
    if init_from is not None:
        model.load_state_dict(load_student(init_from).state_dict())
    loss_fn = build_loss(name, model)
    epochs = max(rp.epochs, math.ceil(rp.train_samples / len(samples)))

    def on_epoch(epoch: int, history: dict) -> None:
        log.info("%s epoch %d: %s", name, epoch, history)
        journal.fault_point("train:epoch")  # the reliability tests kill a round here, mid-training

    start = time.perf_counter()
    if not is_anomaly_scorer(model):
        config = TrainConfig(
            epochs=epochs, batch_size=rp.batch_size, lr=rp.lr, image_size=rp.image_size, seed=rp.seed
        )
        samples_set = SegmentationSamples(samples, image_size=rp.image_size)
        history = train_segmenter(
            model, samples_set, config, on_epoch=on_epoch, loss_fn=loss_fn, description=f"train {name}"
        )
    else:
        config = AnomalyTrainConfig(
            epochs=epochs, batch_size=rp.batch_size, image_size=rp.image_size, seed=rp.seed
        )
        history = train_anomaly_model(
            model, loss_fn, samples, config, on_epoch=on_epoch, description=f"train {name}"
        )
    seconds = time.perf_counter() - start
    model.save_pretrained(
        model_dir, metadata={"classes": list(settings.classes), "student": name, **(metadata or {})}
    )
    log.info("%s trained on %d samples in %.1f s, saved to %s", name, len(samples), seconds, model_dir)
    return TrainedStudent(name, str(model_dir), len(samples), 0, seconds, history)


def folder_samples(settings: Settings, data: Path) -> list:
    """(image, mask, weight) for the train images of a folder dataset (all of a plain folder's images)."""
    items = load_labeled_folder(data, settings.classes, split="train")
    return [(item.image, item.mask, SOURCE_WEIGHTS["human"]) for item in items]


@task(name="evaluate-student", cache_policy=once_per_round("student"), persist_result=True)
def evaluate_student(settings: Settings, student: TrainedStudent, n_overlays: int = 6) -> Evaluation:
    """Metrics on the frozen, human-verified test split (never trained on)."""
    images, masks, names = frozen_test_split(settings)
    return evaluate_on(settings, Path(student.model_dir), images, masks, names, n_overlays)


def frozen_test_split(settings: Settings) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The frozen test split in manifest order: (H, W, 3) images, (H, W) class masks and their names
    (the promotion gate predicts the champion on the same images, under the same names)."""
    test = list(human_labeled(settings, "test"))
    if not test:
        raise ValueError(
            "evaluate: the workspace has no human-labeled test split; ingest a dataset folder with test masks"
        )
    images = [image_of(settings, row) for row, _ in test]
    masks = [mask for _, mask in test]
    names = [f"test_{row['image_id'][:12]}" for row, _ in test]
    return images, masks, names


def evaluate_on(
    settings: Settings,
    model_dir: Path,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    names: list[str] | None = None,
    n_overlays: int = 6,
) -> Evaluation:
    """Metrics of the student in `model_dir` on images with class masks, plus a few overlays and the
    per-image statistics the promotion gate needs (images named by `names`)."""
    model = load_student(model_dir)
    start = time.perf_counter()
    outputs = predict_images(model, images, progress_as="evaluate")
    seconds = time.perf_counter() - start
    maps = [m for m, _, _ in outputs]
    preds = [p for _, p, _ in outputs]
    scores = np.array([s for _, _, s in outputs])
    metrics = evaluate_segmentation(maps, preds, masks, scores, settings.classes)
    metrics["eval_images_per_s"] = len(images) / max(seconds, 1e-9)

    names = names or [f"image_{i:04d}" for i in range(len(images))]
    stats = promotion.image_stats(
        preds, maps, masks, settings.classes, anomaly_scorer=is_anomaly_scorer(model), image_ids=names
    )
    defective = [i for i, m in enumerate(masks) if m.any()][:n_overlays]
    overlays = {
        names[i]: np.concatenate(
            [overlay(images[i], masks[i], settings.classes), overlay(images[i], preds[i], settings.classes)],
            axis=1,
        )
        for i in defective
    }
    bars = per_class_bars(metrics, settings.classes)
    if bars is not None:
        overlays["per_class_iou"] = bars
    return Evaluation(metrics=metrics, n_test=len(images), overlays=overlays, stats=stats)
