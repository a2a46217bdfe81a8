"""UniNet loss: cosine pull + similarity-contrastive term + margins, per level, summed.

Per level, with t and s the teacher's and student's selected features and cos their cosine similarity
at each position:

- cosine term: mean (1 - cos) over normal positions;
- similarity-contrastive term (InfoNCE over positions): for a sample of positions of each image, the
  softmax over ``cos(s_i, t_j) / temperature`` across j must put its mass on j = i. Pulling s_i to t_i is
  not enough on a texture where every patch resembles every other; this term makes the student keep what
  is particular to each position, so a local defect cannot be painted over with the average weave;
- margin term: relu(normal_margin - cos) on normal positions (the hard ones get extra pull) plus
  relu(cos - defect_margin) on labelled defect positions (supervised training only).

The level loss is ``cosine_weight * cosine + (1 - cosine_weight) * contrastive + margin``. Positions count
by their share of normal (or defect) pixels times the sample weight; unlabelled pixels count as neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.student.anomaly_base import position_weights, weighted_mean
from models.student.rd4ad.torch_model import DistillationOutput
from models.student.uninet.torch_model import UniNetConfig


def contrastive_per_position(
    teacher: torch.Tensor, student: torch.Tensor, positions: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over positions of each image.

    Args:
        teacher, student: (B, C, h, w).
        positions: positions sampled per image (all of them when the map has fewer).
        temperature: softmax temperature.

    Returns:
        loss (B, P) per sampled position, and the (P,) flat indices of the sampled positions.
    """
    teacher = F.normalize(teacher.flatten(2), dim=1)  # (B, C, N)
    student = F.normalize(student.flatten(2), dim=1)
    count = teacher.shape[-1]
    chosen = torch.randperm(count, device=teacher.device)[:positions] if count > positions else None
    if chosen is None:
        chosen = torch.arange(count, device=teacher.device)
    teacher, student = teacher[:, :, chosen], student[:, :, chosen]
    logits = torch.einsum("bci,bcj->bij", student, teacher) / temperature  # (B, P, P)
    targets = torch.arange(len(chosen), device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits, targets, reduction="none"), chosen


class UniNetLoss(nn.Module):
    """Sum over levels of the cosine, contrastive and margin terms (see the module docstring)."""

    def __init__(
        self,
        cosine_weight: float = 0.7,
        temperature: float = 0.5,
        contrast_positions: int = 256,
        normal_margin: float = 0.9,
        defect_margin: float = 0.5,
    ) -> None:
        super().__init__()
        self.cosine_weight = cosine_weight
        self.temperature = temperature
        self.contrast_positions = contrast_positions
        self.normal_margin = normal_margin
        self.defect_margin = defect_margin

    @classmethod
    def from_config(cls, config: UniNetConfig) -> UniNetLoss:
        return cls(
            config.cosine_weight,
            config.temperature,
            config.contrast_positions,
            config.normal_margin,
            config.defect_margin,
        )

    def level_loss(
        self, teacher: torch.Tensor, student: torch.Tensor, normal: torch.Tensor, defect: torch.Tensor
    ) -> torch.Tensor:
        """Loss of one level: features (B, C, h, w), position weights (B, h, w)."""
        cos = F.cosine_similarity(teacher, student, dim=1)  # (B, h, w)
        cosine = weighted_mean(1 - cos, normal)
        per_position, chosen = contrastive_per_position(
            teacher, student, self.contrast_positions, self.temperature
        )
        contrastive = weighted_mean(per_position, normal.flatten(1)[:, chosen])
        margin = weighted_mean(F.relu(self.normal_margin - cos), normal) + weighted_mean(
            F.relu(cos - self.defect_margin), defect
        )
        return self.cosine_weight * cosine + (1 - self.cosine_weight) * contrastive + margin

    def forward(
        self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            output: training-mode output of :class:`UniNetModel` (selected teacher and student levels).
            masks: (B, H, W) class masks of the crops (0 normal, >0 defect, IGNORE_INDEX unknown).
            weights: (B,) per-sample weights or None.

        Returns:
            Scalar loss.
        """
        loss = output.student[0].new_zeros(())
        for teacher, student in zip(output.teacher, output.student, strict=True):
            normal, defect = position_weights(masks, weights, teacher.shape[-2:])
            loss = loss + self.level_loss(teacher, student, normal, defect)
        return loss
