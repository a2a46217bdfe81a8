"""Pseudo-label: the teacher proposes masks, scores and an uncertainty for every unreviewed train image.

From round 2 on the champion student labels the pool too; where teacher and student disagree the image
is uncertain whatever the teacher's own confidence (a strong review signal, see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from loom import manifest
from loom.config import Settings
from loom.predict import write_predictions
from models.teacher.backbone import BackboneTeacher, TeacherConfig
from tasks.common import class_names, image_of, load_manifest, save_manifest, task_logger


@dataclass
class PseudoLabels:
    round_no: int
    model_version: str
    image_ids: list[str]
    image_threshold: float
    out_dir: str


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two defect masks; 1.0 when both are empty (they agree the image is normal)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def review_uncertainty(preds: list, masks: list[np.ndarray], defect_id: int) -> np.ndarray:
    """How much a person's look at each image is worth, in [0, 1].

    - A flagged region of the generic ``defect`` class says where a defect is but not which: the class is
      left to a person, so the image is fully uncertain however sure the teacher is that something is there.
    - For the rest, the teacher's own uncertainty is scaled by the image's score rank in the pool: absolute
      scores are not comparable across fabrics and pools, ranks are. The most normal-looking images become
      confident (auto-accepted as normal), those just under the threshold stay uncertain.
    """
    scores = np.array([p.score for p in preds], dtype=np.float64)
    own = np.array([p.uncertainty for p in preds], dtype=np.float64)
    flagged = np.array([(m == defect_id).any() for m in masks])
    rank = np.zeros_like(scores)
    if (~flagged).sum() > 1:
        order = scores[~flagged].argsort().argsort()
        rank[~flagged] = order / ((~flagged).sum() - 1)
    return np.where(flagged, 1.0, own * rank)


def _champion_masks(settings: Settings, images: list[np.ndarray]) -> list[np.ndarray] | None:
    from loom.tracking import champion, download_student
    from models.student.fpn import FPNSegmenter
    from models.student.training import predict_images

    if champion(settings) is None:
        return None
    model = FPNSegmenter.from_pretrained(download_student(settings, "champion"))
    return [mask for _, mask, _ in predict_images(model, images)]


@task(name="pseudo-label", cache_policy=NO_CACHE)
def pseudo_label(settings: Settings, round_no: int) -> PseudoLabels:
    """Label every usable train image people have not labeled; update score/uncertainty in the manifest."""
    log = task_logger()
    df = load_manifest(settings)
    pool = manifest.usable(df)
    pool = pool[pool["split"] == "train"]
    if pool.empty:
        raise ValueError(
            f"pseudo-label: no usable train images in {settings.manifest_path}; ingest images first"
        )
    images = [image_of(settings, row) for _, row in pool.iterrows()]

    rp = settings.round
    teacher = BackboneTeacher(TeacherConfig(image_size=rp.image_size, seed=rp.seed))
    teacher.fit_pool(images)
    preds = teacher.predict_pool(images)
    model_version = f"teacher-backbone-r{round_no:04d}"

    defect_id = settings.class_index("defect")
    masks = [np.where(p.mask, defect_id, 0).astype(np.uint8) for p in preds]
    uncertainty = review_uncertainty(preds, masks, defect_id)
    student_masks = _champion_masks(settings, images) if round_no > 1 else None
    if student_masks is not None:
        disagreement = np.array([1.0 - _agreement(t, s) for t, s in zip(masks, student_masks, strict=True)])
        uncertainty = np.maximum(uncertainty, disagreement)
        model_version += "+champion"
        log.info("champion student labeled the pool too; mean disagreement %.3f", disagreement.mean())

    out_dir = settings.pseudo_dir / f"round-{round_no:04d}"
    ids = pool["image_id"].tolist()
    write_predictions(
        out_dir,
        ((i, p.anomaly_map, m, p.score, None) for i, p, m in zip(ids, preds, masks, strict=True)),
        settings.classes,
        image_threshold=teacher.image_threshold,
    )

    not_human = (pool["label_source"] != "human").to_numpy()
    labeled = pd.DataFrame(
        {
            "image_id": ids,
            "score": [float(p.score) for p in preds],
            "uncertainty": uncertainty,
            "label_source": "pseudo",
            "classes": [class_names(m, settings.classes) for m in masks],
        }
    )
    df = manifest.update_rows(df, labeled[not_human])
    save_manifest(settings, df)
    log.info(
        "teacher labeled %d images (%d human-labeled kept); image threshold %.4f",
        int(not_human.sum()),
        int((~not_human).sum()),
        teacher.image_threshold,
    )
    return PseudoLabels(round_no, model_version, ids, float(teacher.image_threshold), str(out_dir))
