"""Normalized focal loss (RITM), optionally with a soft Dice term.

The focal factor (1 - p_t)^gamma is renormalised per sample so that it sums to the number of (valid)
pixels: the loss keeps the scale of plain binary cross-entropy while the already-right pixels (most of a
crop) stop dominating it. RITM found this converges faster than plain focal loss and reaches better NoC.
"""

from __future__ import annotations

import torch
from torch import nn


def normalized_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 0.5,
    gamma: float = 2.0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """RITM's NormalizedFocalLossSigmoid.

    Args:
        logits: (B, 1, S, S).
        target: (B, 1, S, S) in {0, 1}.
        valid: optional (B, 1, S, S) pixel weights in [0, 1] (0 where the crop shows padding).
        alpha: weight of foreground pixels (1 - alpha for background).
        gamma: focusing exponent.

    Returns:
        Scalar: per sample, the focal-weighted BCE averaged over valid pixels; then the batch mean.
    """
    valid = torch.ones_like(target) if valid is None else valid
    prob = torch.sigmoid(logits)
    p_t = torch.where(target > 0.5, prob, 1.0 - prob)
    alpha_t = torch.where(target > 0.5, alpha, 1.0 - alpha)
    beta = (1.0 - p_t) ** gamma * valid
    dims = (1, 2, 3)
    # The normaliser is a constant (detached, as RITM does): it rescales, it is not optimised.
    scale = (valid.sum(dims, keepdim=True) / (beta.sum(dims, keepdim=True) + eps)).detach()
    log_p_t = torch.nn.functional.logsigmoid(torch.where(target > 0.5, logits, -logits))
    loss = -alpha_t * beta * scale * log_p_t
    return (loss.sum(dims) / (valid.sum(dims) + eps)).mean()


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, smooth: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice per sample, batch mean. Shapes as in :func:`normalized_focal_loss`."""
    valid = torch.ones_like(target) if valid is None else valid
    prob = torch.sigmoid(logits) * valid
    target = target * valid
    dims = (1, 2, 3)
    dice = (2 * (prob * target).sum(dims) + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)
    return (1.0 - dice).mean()


class ClickLoss(nn.Module):
    """``focal_weight * normalized focal + dice_weight * soft Dice``."""

    def __init__(self, focal_weight: float = 1.0, dice_weight: float = 0.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.gamma = gamma

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 1, S, S) logits, (B, 1, S, S) {0, 1} target, optional (B, 1, S, S) weights -> scalar."""
        loss = self.focal_weight * normalized_focal_loss(logits, target, valid, gamma=self.gamma)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, valid)
        return loss
