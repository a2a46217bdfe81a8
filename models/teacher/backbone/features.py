"""Multi-level patch features of a frozen ImageNet EfficientNet-Lite0 on the stride-8 grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone.efficientnet_lite import (
    FEATURE_CHANNELS,
    FEATURE_STRIDES,
    EfficientNetLite0,
    fuse_batchnorm,
)

PATCH_STRIDE = 8
#: The levels the backbone teacher scores with (see torch_model.py): 16 + 24 + 40 + 112 = 192 channels.
TEACHER_STRIDES: tuple[int, ...] = (2, 4, 8, 16)


def feature_dim(strides: Sequence[int]) -> int:
    """Channels of the patch features built from `strides`."""
    return sum(FEATURE_CHANNELS[FEATURE_STRIDES.index(stride)] for stride in strides)


class PatchFeatureExtractor(nn.Module):
    """Frozen Lite0 -> (B, D, ceil(H / 8), ceil(W / 8)) multi-level patch features.

    Args:
        backbone: the Lite0 network (its BatchNorms are fused into a copy here, unless `fused`).
        strides: feature levels to use, each of 2, 4, 8, 16; finer ones are average-pooled to stride 8,
            coarser ones bilinearly upsampled. D is the sum of their channels.
        context: side of the average-pooling window applied to each level at its own resolution
            (1 = none). The defaults (8, 16) and 3 are the region descriptors of models/teacher/naming.py;
            the teacher uses `TEACHER_STRIDES` without pooling (see the module docstring).
    """

    def __init__(
        self,
        backbone: EfficientNetLite0,
        strides: Sequence[int] = (8, 16),
        context: int = 3,
        fused: bool = False,
    ):
        super().__init__()
        if not strides or any(stride not in (2, 4, 8, 16) for stride in strides):
            raise ValueError(f"strides must be a non-empty subset of (2, 4, 8, 16), got {tuple(strides)}")
        self.strides = tuple(sorted(strides))
        self.context = context
        self.dim = feature_dim(self.strides)
        if not fused:
            backbone = fuse_batchnorm(backbone).to(memory_format=torch.channels_last)
        self.backbone = backbone

    def sharing_backbone(self, strides: Sequence[int], context: int) -> PatchFeatureExtractor:
        """Another set of levels on the same (already fused) network: no second copy of the weights."""
        return PatchFeatureExtractor(self.backbone, strides, context, fused=True).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, ceil(H / 8), ceil(W / 8))."""
        images = images.contiguous(memory_format=torch.channels_last)
        maps = self.backbone.forward_features(images, max_stride=max(self.strides))
        grid = (math.ceil(images.shape[-2] / PATCH_STRIDE), math.ceil(images.shape[-1] / PATCH_STRIDE))
        levels = []
        for stride in self.strides:
            level = maps[FEATURE_STRIDES.index(stride)]
            if self.context > 1:
                pad = self.context // 2
                level = F.avg_pool2d(level, self.context, stride=1, padding=pad, count_include_pad=False)
            if stride < PATCH_STRIDE:
                # ceil_mode keeps the partial last cell, so the grid is ceil(H / 8) as for stride 8.
                factor = PATCH_STRIDE // stride
                level = F.avg_pool2d(level, factor, stride=factor, ceil_mode=True)
            elif stride > PATCH_STRIDE:
                level = F.interpolate(level, size=grid, mode="bilinear", align_corners=False)
            levels.append(F.normalize(level, dim=1))
        return torch.cat(levels, dim=1).mul_(1.0 / math.sqrt(len(levels)))

    def descriptor(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, D) patch features of one image -> (D_coarse,) the mean of its stride >= 8 levels.

        Describes the image as a whole (which fabric, which weave angle and density). The finer levels are
        left out: averaged over an image they are dominated by sensor noise and lighting, which drowns a
        change of the whole weave (BENCHMARKS.md).
        """
        first = sum(feature_dim([stride]) for stride in self.strides if stride < PATCH_STRIDE)
        return patches[:, first:].mean(dim=0)
