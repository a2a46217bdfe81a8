"""Coupled-hypersphere loss of CFA: attract each descriptor to its K nearest centroids, repel the next J.

Around each of the K nearest memory-bank centroids lies a hypersphere of radius r: a descriptor outside
it pays its squared distance beyond r^2 (attraction, the normal features cluster densely). The next J
centroids must stay beyond r^2 + margin (repulsion, keeps the clusters apart and stops the descriptor
from collapsing every patch onto one point, which would also make defects look normal). Squared
Euclidean distances throughout, as in the score.
"""

from __future__ import annotations

import torch
from torch import nn

from models.student.anomaly_base import position_weights, weighted_mean
from models.student.cfa.torch_model import CFAConfig, CFATrainOutput, flatten_positions, squared_distances


class CFALoss(nn.Module):
    """L = L_att + L_rep, averaged over normal positions (weighted by their share of normal pixels).

    Args:
        num_nearest: K attracting centroids.
        num_repel: J repelling centroids (ranks K+1 .. K+J).
        radius: hypersphere radius r.
        margin: extra squared distance the repelled centroids must keep.
    """

    def __init__(self, num_nearest: int = 3, num_repel: int = 3, radius: float = 1e-5, margin: float = 0.1):
        super().__init__()
        self.num_nearest = num_nearest
        self.num_repel = num_repel
        self.radius = radius
        self.margin = margin

    @classmethod
    def from_config(cls, config: CFAConfig) -> CFALoss:
        return cls(config.num_nearest, config.num_repel, config.radius, config.margin)

    def forward(
        self, output: CFATrainOutput, masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            output: training-mode output of :class:`CFAModel` (descriptors (B, D, h, w), bank (M, D)).
            masks: (B, H, W) class masks of the crops; only normal pixels (0) count.
            weights: (B,) per-sample weights or None.

        Returns:
            Scalar loss.
        """
        descriptors = output.descriptors
        normal, _ = position_weights(masks, weights, descriptors.shape[-2:])
        distances = squared_distances(flatten_positions(descriptors), output.bank)
        nearest = distances.topk(self.num_nearest + self.num_repel, dim=1, largest=False).values
        radius_sq = self.radius**2
        attract = (nearest[:, : self.num_nearest] - radius_sq).clamp_min(0).mean(dim=1)
        repel = (radius_sq + self.margin - nearest[:, self.num_nearest :]).clamp_min(0).mean(dim=1)
        return weighted_mean(attract + repel, normal.flatten())
