"""Weighted cross-entropy + soft Dice for multi-class defect segmentation.

Masks come from sources of different trust: human masks, confident pseudo-labels, synthetic pairs. Every
pixel carries a weight (usually one per image: 1.0 for human, about 0.5 for pseudo), which scales both
terms. Cross-entropy keeps every pixel honest (including false positives on normal images); Dice keeps
small defects from drowning in background pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Mask value for pixels that carry no label (excluded from both terms).
IGNORE_INDEX = 255


def expand_weights(weights: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights (B, H, W) from None, per-sample (B,) or per-pixel (B, H, W) weights.

    Pixels labelled :data:`IGNORE_INDEX` get weight 0.
    """
    if weights is None:
        pixel = torch.ones_like(target, dtype=torch.float32)
    elif weights.ndim == 1:
        pixel = weights.float().view(-1, 1, 1).expand_as(target)
    elif weights.shape == target.shape:
        pixel = weights.float()
    else:
        raise ValueError(
            f"weights must be (B,) or (B, H, W) = {tuple(target.shape)}, got {tuple(weights.shape)}"
        )
    return pixel * (target != IGNORE_INDEX).float()


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    pixel_weights: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged with pixel weights.

    Args:
        logits: (B, K+1, H, W).
        target: (B, H, W) int64 class indices, :data:`IGNORE_INDEX` for unlabelled pixels.
        pixel_weights: (B, H, W) non-negative.
        class_weights: optional (K+1,) factors for rare classes.

    Returns:
        Scalar: sum(w * ce) / sum(w), 0 when all weights are 0.
    """
    ce = F.cross_entropy(logits, target, weight=class_weights, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * pixel_weights).sum() / pixel_weights.sum().clamp_min(1e-6)


def weighted_soft_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    pixel_weights: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Dice loss over the defect classes present in the batch.

    Intersections and sums are pooled over the whole batch (per class), so a class with a few pixels in
    one image still gets a stable gradient. Classes absent from the batch's targets are skipped: their
    Dice would only reward predicting nothing, which cross-entropy already does. Background is skipped
    for the same reason (it is nearly always close to 1).

    Args:
        logits: (B, K+1, H, W).
        target: (B, H, W) int64, :data:`IGNORE_INDEX` for unlabelled pixels.
        pixel_weights: (B, H, W).
        class_weights: optional (K+1,) factors; the mean over present classes is weighted by them.
        smooth: added to numerator and denominator.

    Returns:
        Scalar 1 - mean Dice over present defect classes; 0 when no defect pixel is labelled.
    """
    num_outputs = logits.shape[1]
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(target.clamp(max=num_outputs - 1), num_outputs).permute(0, 3, 1, 2).float()
    w = pixel_weights.unsqueeze(1)
    dims = (0, 2, 3)
    intersection = (probs * one_hot * w).sum(dims)
    denominator = ((probs + one_hot) * w).sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = (one_hot * w).sum(dims) > 0
    present[0] = False
    if not present.any():
        return logits.new_zeros(())
    factors = class_weights.float() if class_weights is not None else torch.ones_like(dice)
    factors = factors * present.float()
    return 1.0 - (dice * factors).sum() / factors.sum().clamp_min(1e-6)


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` with per-pixel/per-sample weights.

    Args:
        ce_weight: factor of the cross-entropy term.
        dice_weight: factor of the Dice term.
        class_weights: optional (K+1,) factors (background first) to lift rare classes.
    """

    def __init__(
        self, ce_weight: float = 1.0, dice_weight: float = 1.0, class_weights: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.register_buffer("class_weights", class_weights.float() if class_weights is not None else None)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            logits: (B, K+1, H, W).
            target: (B, H, W) integer class indices (0 = background, :data:`IGNORE_INDEX` = unlabelled).
            weights: None, (B,) per-sample or (B, H, W) per-pixel weights.

        Returns:
            Scalar loss.
        """
        target = target.long()
        if logits.shape[0] != target.shape[0] or logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
        pixel_weights = expand_weights(weights, target)
        loss = self.ce_weight * weighted_cross_entropy(logits, target, pixel_weights, self.class_weights)
        if self.dice_weight:
            loss = loss + self.dice_weight * weighted_soft_dice(
                logits, target, pixel_weights, self.class_weights
            )
        return loss
