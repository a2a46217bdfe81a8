"""Pseudo-label: the teacher proposes masks, scores and an uncertainty for every unreviewed train image.

From round 2 on the champion student labels the pool too; how much teacher and student disagree on each image
is passed on to review selection (a strong review signal, loom/stages/selection.py). The manifest's
uncertainty is the teacher's own: it is what auto-accept is calibrated on (loom/stages/calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import task

from loom.config import Settings
from loom.data import manifest
from loom.data.human import human_references, image_of
from loom.data.predict import write_predictions
from loom.stages.teachers import LabeledImage, build_prototypes, build_teacher, label_images
from tasks.common import ONCE_PER_ROUND, class_names, load_manifest, save_manifest, task_logger


@dataclass
class PseudoLabels:
    round_no: int
    model_version: str
    image_ids: list[str]
    image_threshold: float
    pixel_threshold: float
    out_dir: str
    #: image id -> 1 - IoU of the teacher's and the champion's defect masks (empty before a champion exists)
    disagreement: dict[str, float] = field(default_factory=dict)


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two defect masks; 1.0 when both are empty (they agree the image is normal)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def review_uncertainty(labeled: list[LabeledImage], defect_id: int) -> np.ndarray:
    """How much a person's look at each image is worth, in [0, 1].

    - A region left as the generic ``defect`` class says where a defect is but not which: the class is left
      to a person, so the image is fully uncertain however sure the teacher is that something is there.
    - A region the teacher or the prototypes named is as uncertain as its naming (1 - vote share or class
      probability), and at least as uncertain as the teacher is about the image.
    - For images without regions, the teacher's own uncertainty is scaled by the image's score rank in the
      pool: absolute scores are not comparable across fabrics and pools, ranks are. The most normal-looking
      images become confident (auto-accepted as normal), those just under the threshold stay uncertain.
    """
    scores = np.array([item.prediction.score for item in labeled], dtype=np.float64)
    own = np.array([item.prediction.uncertainty for item in labeled], dtype=np.float64)
    flagged = np.array([item.class_mask.any() for item in labeled])
    unnamed = np.array([(item.class_mask == defect_id).any() for item in labeled])
    naming_doubt = np.array([1.0 - item.naming_confidence for item in labeled])
    rank = np.zeros_like(scores)
    if (~flagged).sum() > 1:
        order = scores[~flagged].argsort().argsort()
        rank[~flagged] = order / ((~flagged).sum() - 1)
    return np.where(unnamed, 1.0, np.where(flagged, np.maximum(own, naming_doubt), own * rank))


def _champion_masks(settings: Settings, images: list[np.ndarray]) -> list[np.ndarray] | None:
    from loom.services.tracking import champion, download_student
    from models.student.registry import load_student
    from models.student.training import predict_images

    if champion(settings) is None:
        return None
    model = load_student(download_student(settings, "champion"))
    return [mask for _, mask, _ in predict_images(model, images, progress_as="champion predict")]


@task(name="pseudo-label", cache_policy=ONCE_PER_ROUND, persist_result=True)
def pseudo_label(settings: Settings, round_no: int) -> PseudoLabels:
    """Label every usable train image people have not labeled; update score/uncertainty in the manifest."""
    log = task_logger()
    df = load_manifest(settings)
    pool = manifest.usable(df)
    # Synthetic pairs carry their own exact masks: the teacher neither labels them nor learns from them.
    pool = pool[(pool["split"] == "train") & (pool["label_source"] != "synthetic")]
    if pool.empty:
        raise ValueError(
            f"pseudo-label: no usable train images in {settings.manifest_path}; ingest images first"
        )
    images = [image_of(settings, row) for _, row in pool.iterrows()]

    normals, labeled_images, labeled_masks = human_references(settings, pool)
    teacher, why = build_teacher(settings, settings.round.teacher)
    log.info("%s; %d normal references, %d labeled images for naming", why, len(normals), len(labeled_images))
    prototypes = build_prototypes(settings, labeled_images, labeled_masks, teacher)
    labeled = label_images(settings, teacher, images, normals, prototypes)
    preds = [item.prediction for item in labeled]
    masks = [item.class_mask for item in labeled]
    model_version = f"teacher-{teacher.name}{'-fewshot' if normals else ''}-r{round_no:04d}"

    defect_id = settings.class_index("defect")
    uncertainty = review_uncertainty(labeled, defect_id)
    student_masks = _champion_masks(settings, images) if round_no > 1 else None
    disagreement: dict[str, float] = {}
    if student_masks is not None:
        values = [1.0 - mask_agreement(t, s) for t, s in zip(masks, student_masks, strict=True)]
        disagreement = dict(zip(pool["image_id"], values, strict=True))
        model_version += "+champion"
        log.info("champion student labeled the pool too; mean disagreement %.3f", float(np.mean(values)))

    out_dir = settings.pseudo_dir / f"round-{round_no:04d}"
    ids = pool["image_id"].tolist()
    write_predictions(
        out_dir,
        ((i, p.anomaly_map, m, p.score, None) for i, p, m in zip(ids, preds, masks, strict=True)),
        settings.classes,
        image_threshold=teacher.image_threshold,
    )

    not_human = (pool["label_source"] != "human").to_numpy()
    rows = pd.DataFrame(
        {
            "image_id": ids,
            "score": [float(p.score) for p in preds],
            "uncertainty": uncertainty,
            "label_source": "pseudo",
            "classes": [class_names(m, settings.classes) for m in masks],
        }
    )
    df = manifest.update_rows(df, rows[not_human])
    save_manifest(settings, df)
    log.info(
        "teacher labeled %d images (%d human-labeled kept); image threshold %.4f",
        int(not_human.sum()),
        int((~not_human).sum()),
        teacher.image_threshold,
    )
    return PseudoLabels(
        round_no,
        model_version,
        ids,
        float(teacher.image_threshold),
        float(teacher.pixel_threshold),
        str(out_dir),
        disagreement,
    )
