"""FPN segmentation student on the EfficientNet-Lite0 backbone.

The network is a compact feature pyramid: backbone features at strides 4, 8, 16 and 32 go through
lateral 1x1 convolutions and a top-down path; the four pyramid levels are merged at stride 4, refined by a
light head of depthwise-separable convolutions and classified per pixel. Logits are upsampled to the input
size, so the output has one channel per defect class plus background (channel 0).

In training mode ``forward`` returns logits; in eval mode it returns a :class:`SegmentationOutput` with the
anomaly map (1 - background probability), the class mask and an image score, the way anomalib models do.
Checkpoints are a ``config.json`` and a ``model.safetensors`` in one folder (no pickles).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbone.efficientnet_lite import load_pretrained_lite0, normalize
from models.student.checkpoint import PretrainedMixin

#: Backbone feature levels the pyramid uses (strides 4, 8, 16, 32 of the five the backbone returns).
PYRAMID_LEVELS = (1, 2, 3, 4)
#: Side of the window the anomaly map is averaged over before taking its maximum as the image score.
SCORE_WINDOW = 5


@dataclass
class FPNConfig:
    """Everything needed to rebuild an :class:`FPNSegmenter` (stored as ``config.json``).

    Args:
        num_classes: defect classes, background excluded; the model outputs ``num_classes + 1`` channels.
        fpn_channels: width of the pyramid and of the head.
        pretrained: start the backbone from the ImageNet weights (only matters when training starts).
        image_size: side of the square crops the model is trained on; larger images are tiled at this size.
        tiny: replace the backbone by a small random-initialised conv pyramid (tests and smoke runs).
    """

    num_classes: int
    fpn_channels: int = 64
    pretrained: bool = True
    image_size: int = 256
    tiny: bool = False

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"FPNConfig.num_classes must be >= 1 (defect classes), got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FPNConfig:
        """Build from a dict; keys that are not config fields (e.g. ``image_threshold``) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SegmentationOutput:
    """Eval-mode output of a segmentation student.

    Attributes:
        logits: (B, K+1, H, W) raw class scores, channel 0 is background.
        anomaly_map: (B, H, W) probability that a pixel is any defect, ``1 - softmax[:, 0]``.
        pred_mask: (B, H, W) int64 class index per pixel (0 = background).
        score: (B,) image anomaly score, see :func:`image_score`.
    """

    logits: torch.Tensor
    anomaly_map: torch.Tensor
    pred_mask: torch.Tensor
    score: torch.Tensor


def image_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image score from an anomaly map: the maximum of its 5x5 local mean.

    Averaging first keeps a single noisy pixel from deciding the score of a whole image.

    Args:
        anomaly_map: (B, H, W) values in [0, 1].

    Returns:
        (B,) scores in [0, 1].
    """
    pooled = F.avg_pool2d(
        anomaly_map.unsqueeze(1), SCORE_WINDOW, stride=1, padding=SCORE_WINDOW // 2, count_include_pad=False
    )
    return pooled.flatten(1).amax(dim=1)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 convolution with batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class TinyPyramid(nn.Module):
    """A few strided convolutions standing in for Lite0 in tests: five levels at strides 2..32."""

    channels: tuple[int, ...] = (8, 8, 16, 16, 32)

    def __init__(self) -> None:
        super().__init__()
        stages, in_ch = [], 3
        for out_ch in self.channels:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> five maps at strides 2, 4, 8, 16, 32."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _lite0_features(pretrained: bool) -> nn.Module:
    """Lite0 without its ImageNet head (1280-channel conv + classifier, 1.7 M unused parameters)."""
    backbone = load_pretrained_lite0(pretrained)
    backbone.head = nn.Identity()
    backbone.classifier = nn.Identity()
    return backbone


def _backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of the backbone's five feature levels, found with one small dry run."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(1, 3, 64, 64))
    backbone.train(was_training)
    return [f.shape[1] for f in features]


def decode_pyramid(
    levels: list[torch.Tensor], head: nn.Module, classifier: nn.Module, size: tuple[int, int]
) -> torch.Tensor:
    """Pyramid levels (B, C, h_i, w_i), finest first -> (B, K+1, *size) logits.

    All levels are summed at the finest one's resolution (stride 4), so small defects (fine levels) and
    context (coarse levels) both count, then classified and upsampled to the input size.
    """
    finest = levels[0].shape[-2:]
    merged = levels[0]
    for level in levels[1:]:
        merged = merged + F.interpolate(level, size=finest, mode="bilinear", align_corners=False)
    logits = classifier(head(merged))
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class FPNSegmenter(PretrainedMixin, nn.Module):
    """Multi-class FPN segmenter; see the module docstring for the architecture."""

    config_class = FPNConfig

    def __init__(self, config: FPNConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = TinyPyramid() if config.tiny else _lite0_features(config.pretrained)
        channels = [_backbone_channels(self.backbone)[i] for i in PYRAMID_LEVELS]
        width = config.fpn_channels
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(SeparableConv(width, width) for _ in channels)
        self.head = nn.Sequential(SeparableConv(width, width), SeparableConv(width, width))
        self.classifier = nn.Conv2d(width, config.num_classes + 1, 1)

    @property
    def num_outputs(self) -> int:
        """Output channels: defect classes plus background."""
        return self.config.num_classes + 1

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Top-down pyramid.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            Four (B, C, h_i, w_i) maps at strides 4, 8, 16, 32 with C = ``fpn_channels``.
        """
        features = self.backbone.forward_features(x)
        laterals = [conv(features[i]) for conv, i in zip(self.laterals, PYRAMID_LEVELS, strict=True)]
        # Coarse-to-fine: each level adds the upsampled coarser one; sizes are matched exactly, not by
        # a factor of 2, so inputs whose side is not a multiple of 32 still work.
        for i in range(len(laterals) - 2, -1, -1):
            coarser = F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
            laterals[i] = laterals[i] + coarser
        return [smooth(level) for smooth, level in zip(self.smooth, laterals, strict=True)]

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at input resolution.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            (B, K+1, H, W) logits, channel 0 is background.
        """
        return decode_pyramid(self.pyramid(x), self.head, self.classifier, x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """Logits (B, K+1, H, W) in training mode, a :class:`SegmentationOutput` in eval mode."""
        logits = self.segment(x)
        if self.training:
            return logits
        return self.postprocess(logits)

    @staticmethod
    def postprocess(logits: torch.Tensor) -> SegmentationOutput:
        """Turn (B, K+1, H, W) logits into maps, masks and image scores."""
        probs = logits.softmax(dim=1)
        anomaly_map = 1.0 - probs[:, 0]
        return SegmentationOutput(
            logits=logits,
            anomaly_map=anomaly_map,
            pred_mask=probs.argmax(dim=1),
            score=image_score(anomaly_map),
        )

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB numpy images -> (B, 3, H, W) normalised float on the model's device."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"preprocess expects (B, H, W, 3) uint8 images, got {images.shape} {images.dtype}"
            )
        device = next(self.parameters()).device
        return normalize(torch.tensor(images)).to(device)  # a copy: decoded images may be read-only
