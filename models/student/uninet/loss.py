"""UniNet loss: cosine term + similarity-contrastive term + margin term, per (teacher, student) pair, summed.

Per pair, with t the teacher map and s the DFS-selected student map (B, C, h, w), and for a position i of
an image

    p_i = softmax_j( cos(s_i, t_j) / temperature )  at j = i,   j over all h * w positions of that image

the probability that the student's feature at i is matched to the teacher's at its own position rather
than anywhere else in the image:

- cosine term: mean (1 - cos(s_i, t_i)) over normal positions;
- similarity-contrastive term: mean -log p_i over normal positions (positive: the teacher's own
  position; negatives: every other position of the same image);
- margin term: mean relu(normal_margin - p_i) over normal positions plus, with labelled defects
  (supervised training), mean relu(p_i - defect_margin) over defect positions.

Pair loss = ``cosine_weight * cosine + (1 - cosine_weight) * contrastive + margin``. Positions count by
their share of normal (or defect) pixels times the sample weight; unlabelled pixels (IGNORE_INDEX) count
as neither. The contrastive and margin terms are evaluated at ``contrast_positions`` anchors per image
(drawn at random, defect positions as often as normal ones when there are any), their softmax over all
positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.student.anomaly_base import position_weights, weighted_mean
from models.student.rd4ad.torch_model import DistillationOutput
from models.student.uninet.torch_model import UNSUPERVISED_TEMPERATURE, UniNetConfig


def anchor_positions(normal: torch.Tensor, defect: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) normal and defect weights -> (B, P) anchor indices, P = min(count, N), without repeats.

    All positions are eligible; defect positions are drawn with a combined weight equal to the normal
    ones', so a small defect still supplies anchors.
    """
    positions = normal.shape[1]
    if count >= positions:
        return torch.arange(positions, device=normal.device).expand(normal.shape[0], -1)
    is_defect = (defect > 0).float()
    boost = positions / is_defect.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.multinomial(1.0 + boost * is_defect, count, replacement=False)


def own_position_log_probability(
    teacher: torch.Tensor, student: torch.Tensor, anchors: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log p_i at the anchors.

    Args:
        teacher, student: (B, C, h, w).
        anchors: (B, P) flat position indices.
        temperature: softmax temperature.

    Returns:
        (B, P) log softmax_j(cos(s_i, t_j) / temperature) at j = i, j over all positions of the image.
    """
    teacher = F.normalize(teacher.flatten(2), dim=1)  # (B, C, N)
    student = F.normalize(student.flatten(2), dim=1)
    chosen = student.gather(2, anchors.unsqueeze(1).expand(-1, student.shape[1], -1))  # (B, C, P)
    log_probs = torch.log_softmax(torch.einsum("bcp,bcn->bpn", chosen, teacher) / temperature, dim=-1)
    return log_probs.gather(2, anchors.unsqueeze(-1)).squeeze(-1)


class UniNetLoss(nn.Module):
    """Sum over the (teacher, student) pairs of the cosine, contrastive and margin terms (see above)."""

    def __init__(
        self,
        cosine_weight: float = 0.7,
        temperature: float = UNSUPERVISED_TEMPERATURE,
        contrast_positions: int = 256,
        normal_margin: float = 1.0,
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
        assert config.temperature is not None  # set by UniNetConfig.__post_init__
        return cls(
            config.cosine_weight,
            config.temperature,
            config.contrast_positions,
            config.normal_margin,
            config.defect_margin,
        )

    def pair_loss(
        self, teacher: torch.Tensor, student: torch.Tensor, normal: torch.Tensor, defect: torch.Tensor
    ) -> torch.Tensor:
        """Loss of one pair: maps (B, C, h, w), position weights (B, h, w)."""
        cosine = weighted_mean(1 - F.cosine_similarity(teacher, student, dim=1), normal)
        normal, defect = normal.flatten(1), defect.flatten(1)
        anchors = anchor_positions(normal, defect, self.contrast_positions)
        log_p = own_position_log_probability(teacher, student, anchors, self.temperature)
        p = log_p.exp()
        normal, defect = normal.gather(1, anchors), defect.gather(1, anchors)
        contrastive = weighted_mean(-log_p, normal)
        margin = weighted_mean(F.relu(self.normal_margin - p), normal) + weighted_mean(
            F.relu(p - self.defect_margin), defect
        )
        return self.cosine_weight * cosine + (1 - self.cosine_weight) * contrastive + margin

    def forward(
        self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            output: training-mode output of :class:`UniNetModel` (teacher maps, DFS-selected student maps).
            masks: (B, H, W) class masks of the crops (0 normal, >0 defect, IGNORE_INDEX unknown).
            weights: (B,) per-sample weights or None.

        Returns:
            Scalar loss.
        """
        loss = output.student[0].new_zeros(())
        for teacher, student in zip(output.teacher, output.student, strict=True):
            normal, defect = position_weights(masks, weights, teacher.shape[-2:])
            loss = loss + self.pair_loss(teacher, student, normal, defect)
        return loss
