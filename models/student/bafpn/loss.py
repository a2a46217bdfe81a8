"""BAFPN loss: weighted cross-entropy + soft Dice on masks, plus distillation from the teacher's maps.

The mask terms are the FPN student's (:mod:`models.student.fpn.loss`): per-sample weights by label source,
:data:`IGNORE_INDEX` pixels excluded. The distillation term teaches the student's anomaly probability
``p = 1 - softmax(logits)[:, 0]`` the teacher's anomaly map ``t`` in [0, 1] with a binary cross-entropy.
It matters where masks are thin: a pseudo-labelled image's mask is the teacher's thresholded map, and the
map itself says how sure the teacher was at every pixel.

How a caller passes teacher maps: as keyword arguments next to the usual three,

    loss = loss_fn(logits, masks, weights, teacher_map=maps, distill_weight=per_sample)

``maps`` (B, H, W) must have gone through the same crop, flips and rotations as ``masks`` and hold NaN where
there is no teacher map (a whole image, or the padding of a tile). ``per_sample`` (B,) is typically 1 for
pseudo-labelled images and 0 for human-labelled ones (people already corrected the teacher there).
Called with three arguments, as ``train_segmenter`` does, the loss is cross-entropy + Dice alone.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from models.student.fpn.loss import IGNORE_INDEX, SegmentationLoss

__all__ = ["IGNORE_INDEX", "BAFPNLoss", "distillation_loss"]


def distillation_loss(
    logits: torch.Tensor, teacher_map: torch.Tensor, distill_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy between the student's anomaly probability and the teacher's map.

    Computed from log-softmax, so it stays finite for confident logits: log p(defect) is the log-sum-exp of
    the defect classes' log-probabilities and log(1 - p(defect)) is log p(background).

    Args:
        logits: (B, K+1, H, W), channel 0 background.
        teacher_map: (B, H, W) anomaly probabilities in [0, 1], NaN where there is no teacher value.
        distill_weight: (B,) non-negative per-sample factors; None means 1 for every sample.

    Returns:
        Scalar: the weighted mean over pixels with a teacher value; 0 when all weights are 0.
    """
    if teacher_map.shape != (logits.shape[0], *logits.shape[-2:]):
        raise ValueError(
            f"teacher_map must be (B, H, W) = {(logits.shape[0], *logits.shape[-2:])} like the logits, "
            f"got {tuple(teacher_map.shape)}: crop and resize it with the masks"
        )
    present = ~torch.isnan(teacher_map)
    target = torch.where(present, teacher_map.float(), torch.zeros_like(teacher_map, dtype=torch.float32))
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError("teacher_map values must lie in [0, 1] (anomaly probabilities) or be NaN")
    log_probs = logits.float().log_softmax(dim=1)
    log_background = log_probs[:, 0]
    log_defect = torch.logsumexp(log_probs[:, 1:], dim=1)
    bce = -(target * log_defect + (1.0 - target) * log_background)
    if distill_weight is None:
        distill_weight = torch.ones(logits.shape[0], device=logits.device)
    if distill_weight.shape != (logits.shape[0],):
        raise ValueError(
            f"distill_weight must be (B,) = ({logits.shape[0]},), got {tuple(distill_weight.shape)}"
        )
    pixel_weights = distill_weight.float().view(-1, 1, 1) * present.float()
    total = pixel_weights.sum()
    if total <= 0:
        return logits.new_zeros(())
    return (bce * pixel_weights).sum() / total


class BAFPNLoss(SegmentationLoss):
    """The FPN student's CE + Dice plus ``distill_weight * BCE(student anomaly, teacher map)``.

    Args:
        ce_weight: factor of the cross-entropy term.
        dice_weight: factor of the Dice term.
        distill_weight: factor of the distillation term (only when teacher maps are passed).
        class_weights: optional (K+1,) factors (background first) to lift rare classes.
    """

    #: Training loops hand teacher maps to this loss (see models/student/training.py).
    distills: ClassVar[bool] = True

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        distill_weight: float = 1.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(ce_weight, dice_weight, class_weights)
        self.distill_weight = distill_weight

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        teacher_map: torch.Tensor | None = None,
        distill_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            logits: (B, K+1, H, W).
            target: (B, H, W) class indices (0 = background, :data:`IGNORE_INDEX` = unlabelled).
            weights: None, (B,) per-sample or (B, H, W) per-pixel weights of the mask terms.
            teacher_map: optional (B, H, W) teacher anomaly map in [0, 1], NaN where absent.
            distill_weight: optional (B,) per-sample factors of the distillation term (default 1).

        Returns:
            Scalar loss.
        """
        if distill_weight is not None and teacher_map is None:
            raise ValueError("distill_weight was given without teacher_map: pass both or neither")
        loss = super().forward(logits, target, weights)
        if teacher_map is not None and self.distill_weight:
            loss = loss + self.distill_weight * distillation_loss(logits, teacher_map, distill_weight)
        return loss
