"""Reverse-distillation loss: sum over levels of the mean (1 - cosine) between teacher and decoder.

Cosine, not Euclidean: the decoder has to rebuild the direction of each teacher feature (what pattern
is there), not its magnitude, which varies with lighting and contrast from one fabric roll to the next.
"""

from __future__ import annotations

import torch
from torch import nn

from models.student.anomaly_base import position_weights, weighted_mean
from models.student.rd4ad.torch_model import DistillationOutput, RD4ADConfig, cosine_distance_maps


class RD4ADLoss(nn.Module):
    """sum_levels mean_positions (1 - cos(teacher, student)), over normal positions only."""

    @classmethod
    def from_config(cls, config: RD4ADConfig) -> RD4ADLoss:
        """The loss has no settings; the method keeps the students' loss construction uniform."""
        return cls()

    def forward(
        self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            output: training-mode output of :class:`RD4ADModel`.
            masks: (B, H, W) class masks of the crops; a position counts by its share of normal pixels.
            weights: (B,) per-sample weights or None.

        Returns:
            Scalar loss.
        """
        loss = output.student[0].new_zeros(())
        for distance in cosine_distance_maps(output.teacher, output.student):
            normal, _ = position_weights(masks, weights, distance.shape[-2:])
            loss = loss + weighted_mean(distance, normal)
        return loss
