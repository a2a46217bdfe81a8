"""Choose, build and run a pseudo-labeling teacher; name the regions it finds.

Used by the round's pseudo-label task and by `loom pseudo-label`, so both label the same way:
- `auto` picks the vision-language teacher (open_clip) when its weights are on this machine (a local
  checkpoint, or a pretrained tag already in the cache), else the offline backbone teacher, and says which;
- the teacher is fitted on the pool (zero-shot) and on up to `shots` known-good images (few-shot);
- each predicted region is named by the teacher's class prompts, else by prototypes of regions people
  labeled, else left as the generic `defect` (models/teacher/naming.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.config import Settings
from models.progress import track
from models.teacher.naming import RegionName, RegionPrototypes, name_regions
from models.teacher.types import Teacher, TeacherPrediction

log = logging.getLogger(__name__)

TEACHER_KINDS = ("auto", "openclip", "backbone")


@dataclass
class LabeledImage:
    """A teacher's prediction with its regions named: class mask (H, W) uint8 and one name per region."""

    prediction: TeacherPrediction
    class_mask: np.ndarray
    regions: list[RegionName]

    @property
    def naming_confidence(self) -> float:
        """Lowest confidence over the image's regions (1.0 for an image without regions)."""
        return min((region.confidence for region in self.regions), default=1.0)


def _openclip_config(settings: Settings, checkpoint: str | Path | None):
    from models.teacher.openclip import OpenClipTeacherConfig

    rp = settings.round
    named = tuple(name for name in settings.classes if name != "defect")
    return OpenClipTeacherConfig(
        model_name=rp.clip_model,
        pretrained=rp.clip_pretrained or None,
        checkpoint=str(checkpoint or rp.clip_checkpoint or "") or None,
        class_names=named,
    )


def build_teacher(
    settings: Settings, kind: str = "auto", clip_checkpoint: str | Path | None = None
) -> tuple[Teacher, str]:
    """The teacher to use and a sentence saying why.

    Args:
        settings: workspace settings (round.image_size, seed, clip_* settings).
        kind: "auto", "openclip" or "backbone".
        clip_checkpoint: a local open_clip checkpoint (overrides settings.round.clip_checkpoint).

    Raises:
        ValueError: unknown kind.
        OpenClipWeightsUnavailable: kind "openclip" with no weights on this machine (the message says how to
            get them).
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher {kind!r}: choose one of {', '.join(TEACHER_KINDS)}")
    rp = settings.round
    if kind in ("auto", "openclip"):
        from models.teacher.openclip import OpenClipTeacher, openclip_weights_available

        config = _openclip_config(settings, clip_checkpoint)
        if kind == "openclip" or openclip_weights_available(config):
            source = config.checkpoint or f"pretrained tag {config.pretrained}"
            return OpenClipTeacher(config), f"open_clip teacher {config.model_name} ({source})"
        reason = (
            f"backbone teacher: no open_clip weights on this machine ({config.model_name} / "
            f"{config.pretrained or 'no tag'}; set round.clip_checkpoint to a local file to use it)"
        )
    else:
        reason = "backbone teacher (asked for)"
    from models.teacher.backbone import BackboneTeacher, TeacherConfig

    return BackboneTeacher(TeacherConfig(image_size=rp.image_size, seed=rp.seed)), reason


def build_prototypes(
    settings: Settings,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    teacher: Teacher | None = None,
) -> RegionPrototypes:
    """Prototypes of the nameable classes from people's masks (empty when there are none).

    Region descriptors use the backbone teacher's frozen patch features: those of `teacher` when it is the
    backbone teacher (no second copy of the network), else a fresh extractor.
    """
    import torch

    from models.backbone.efficientnet_lite import load_pretrained_lite0, normalize
    from models.teacher.backbone.torch_model import PATCH_STRIDE, PatchFeatureExtractor

    extractor = getattr(teacher, "extractor", None)
    if not isinstance(extractor, PatchFeatureExtractor):
        extractor = PatchFeatureExtractor(load_pretrained_lite0(True)).eval()

    def features(crops: np.ndarray) -> torch.Tensor:
        return extractor(normalize(torch.from_numpy(np.ascontiguousarray(crops))))

    prototypes = RegionPrototypes(features, PATCH_STRIDE)
    nameable = [index + 1 for index, name in enumerate(settings.classes) if name != "defect"]
    if images:
        prototypes.fit(images, masks, nameable)
    return prototypes


def label_images(
    settings: Settings,
    teacher: Teacher,
    pool: Sequence[np.ndarray],
    normals: Sequence[np.ndarray] = (),
    prototypes: RegionPrototypes | None = None,
) -> list[LabeledImage]:
    """Fit `teacher` on the pool (and normals), predict the pool and name every region.

    Each pass over the pool reports its progress (``teacher features``, ``teacher scoring``, ...; see
    models/progress.py): on a pool of line-scan frames the whole takes tens of minutes.
    """
    teacher.fit(pool, normals)
    labeled = name_predictions(settings, teacher, pool, teacher.predict(pool), prototypes)
    named = sum(region.source != "none" for item in labeled for region in item.regions)
    total = sum(len(item.regions) for item in labeled)
    log.info("%s teacher: %d of %d regions named (%d images)", teacher.name, named, total, len(pool))
    return labeled


def name_predictions(
    settings: Settings,
    teacher: Teacher,
    images: Sequence[np.ndarray],
    predictions: Sequence[TeacherPrediction],
    prototypes: RegionPrototypes | None = None,
) -> list[LabeledImage]:
    """Name the regions of a teacher's predictions of `images` (its class prompts, else the prototypes)."""
    defect_index = settings.class_index("defect")
    prob_ids = [settings.class_index(name) for name in teacher.class_names]
    labeled = []
    pairs = zip(images, predictions, strict=True)
    for image, prediction in track(pairs, "teacher naming regions", len(predictions)):
        class_mask, regions = name_regions(
            image, prediction.mask, defect_index, prediction.class_probs, prob_ids, prototypes
        )
        labeled.append(LabeledImage(prediction, class_mask, regions))
    return labeled
