"""Defect-Click: a click-to-mask segmenter that corrects an existing mask (RITM / FocalClick family).

Inputs are a crop of the image, normalised with ``normalize`` (B, 3, S, S), and an aux tensor (B, 3, S, S):
the positive click disks, the negative click disks and the previous mask (a pre-annotation or the model's
last answer). The output is one channel of mask logits (B, 1, S, S); the model is class-agnostic (the
class is the annotator's key-point label).

The network is split so that follow-up clicks on the same crop do not re-run the backbone:

- ``encode_image(x)``: the pretrained EfficientNet-Lite0's multi-scale features (strides 2..32) and the
  input itself; depends on the image only, so a predictor caches it per crop.
- ``decode(features, aux)``: an aux encoder (strided convs over the click maps and the previous mask)
  whose outputs are *added* to the feature pyramid's lateral projections at strides 4..32 (RITM adds its
  click encoding to the first backbone conv; adding it after the backbone keeps the backbone cacheable),
  a top-down pyramid merged at stride 4, a stride-2 refinement that also sees the backbone's stride-2
  features, and a full-resolution refinement over the upsampled features, the image and the aux maps,
  whose output is added to the upsampled coarse logits (sharp boundaries without a heavy full-size head).

``forward(x, aux) = decode(encode_image(x), aux)``. Saved as ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.backbone.efficientnet_lite import EfficientNetLite0, fuse_batchnorm, load_pretrained_lite0
from models.clicker.zoom import ZoomConfig
from models.student.checkpoint import PretrainedMixin
from models.student.fpn.torch_model import SeparableConv, TinyPyramid

#: Backbone levels fused with the aux maps in the pyramid (strides 4, 8, 16, 32).
PYRAMID_LEVELS = (1, 2, 3, 4)
#: Channels of the stride-2 and full-resolution refinements.
REFINE_CHANNELS = 16
FULL_RES_CHANNELS = 8


@dataclass
class ClickerConfig:
    """Everything needed to rebuild a :class:`ClickSegmenter` and to crop its inputs (``config.json``).

    Args:
        image_size: side S of the square model input (crops are resized to it).
        width: channels of the feature pyramid and its head.
        aux_channels: channels of the aux encoder at stride 4 (doubling per level after that).
        pretrained: start the backbone from the ImageNet weights (only matters when training starts).
        tiny: a small random conv pyramid instead of Lite0 (tests and smoke runs).
        min_crop: smallest crop side in image pixels (see :class:`models.clicker.zoom.ZoomConfig`).
        expand: context factor of the crop around the region of interest.
        near: previous-mask components within this many pixels of a click join the region of interest.
        click_radius: radius of the click disks in model-input pixels.
        threshold: foreground probability at or above which a pixel is in the mask.
    """

    image_size: int = 256
    width: int = 64
    aux_channels: int = 16
    pretrained: bool = True
    tiny: bool = False
    min_crop: int = 64
    expand: float = 1.6
    near: int = 12
    click_radius: float = 5.0
    threshold: float = 0.49

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"ClickerConfig.image_size must be a multiple of 32, got {self.image_size}")

    @property
    def zoom(self) -> ZoomConfig:
        return ZoomConfig(self.image_size, self.min_crop, self.expand, self.near)


class ImageFeatures(NamedTuple):
    """What ``encode_image`` returns and a predictor caches.

    levels: the backbone's five maps at strides 2, 4, 8, 16, 32, each (B, C_i, S / stride, S / stride).
    image: the normalised input (B, 3, S, S) (the full-resolution refinement looks at it).
    """

    levels: tuple[torch.Tensor, ...]
    image: torch.Tensor

    def detach(self) -> ImageFeatures:
        return ImageFeatures(tuple(level.detach() for level in self.levels), self.image.detach())


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def strided_separable(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AuxEncoder(nn.Module):
    """Click disks + previous mask (B, 3, S, S) -> five maps at strides 2..32.

    Stride 2 keeps ``REFINE_CHANNELS`` channels (for the stride-2 refinement); strides 4..32 are projected
    to the pyramid width, to be added to the backbone's lateral projections.
    """

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, REFINE_CHANNELS, stride=2)
        widths = [channels, channels * 2, channels * 4, channels * 4]
        # A full conv where the maps are still few-channel, depthwise-separable ones deeper down.
        stages = [conv_bn_relu(REFINE_CHANNELS, widths[0], stride=2)]
        stages += [strided_separable(a, b) for a, b in itertools.pairwise(widths)]
        self.stages = nn.ModuleList(stages)
        self.projections = nn.ModuleList(nn.Conv2d(c, width, 1) for c in widths)

    def forward(self, aux: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> [(B, 16, S/2, S/2), (B, width, S/4, S/4), ..., (B, width, S/32, S/32)]."""
        x = self.stem(aux)
        out = [x]
        for stage, projection in zip(self.stages, self.projections, strict=True):
            x = stage(x)
            out.append(projection(x))
        return out


def _lite0_features(pretrained: bool) -> EfficientNetLite0:
    """Lite0 without its ImageNet head (1280-channel conv + classifier, unused here)."""
    backbone = load_pretrained_lite0(pretrained)
    backbone.head = nn.Identity()
    backbone.classifier = nn.Identity()
    return backbone


def _backbone_channels(backbone: nn.Module) -> list[int]:
    """Channels of the backbone's five feature levels, from one small dry run."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.zeros(1, 3, 64, 64))
    backbone.train(was_training)
    return [f.shape[1] for f in features]


class ClickSegmenter(PretrainedMixin, nn.Module):
    """Click segmenter; see the module docstring for the architecture."""

    config_class = ClickerConfig

    def __init__(self, config: ClickerConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone: nn.Module = TinyPyramid() if config.tiny else _lite0_features(config.pretrained)
        channels = _backbone_channels(self.backbone)
        width = config.width
        self.aux_encoder = AuxEncoder(width, config.aux_channels)
        self.laterals = nn.ModuleList(nn.Conv2d(channels[i], width, 1) for i in PYRAMID_LEVELS)
        self.smooth = nn.ModuleList(SeparableConv(width, width) for _ in PYRAMID_LEVELS)
        self.head = nn.Sequential(SeparableConv(width, width), SeparableConv(width, width))
        self.coarse = nn.Conv2d(width, 1, 1)
        self.reduce = nn.Conv2d(width, REFINE_CHANNELS, 1)
        # The stride-2 refinement ends narrow so that only FULL_RES_CHANNELS maps are upsampled to S x S.
        self.refine_half = nn.Sequential(
            SeparableConv(REFINE_CHANNELS + channels[0] + REFINE_CHANNELS, REFINE_CHANNELS),
            SeparableConv(REFINE_CHANNELS, FULL_RES_CHANNELS),
        )
        self.refine_full = nn.Sequential(
            SeparableConv(FULL_RES_CHANNELS + 6, FULL_RES_CHANNELS), nn.Conv2d(FULL_RES_CHANNELS, 1, 1)
        )

    def encode_image(self, x: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) normalised crops -> backbone features (cacheable: they depend on the image only)."""
        return ImageFeatures(tuple(self.backbone.forward_features(x)), x)

    def decode(self, features: ImageFeatures, aux: torch.Tensor) -> torch.Tensor:
        """Mask logits from cached image features and the click/previous-mask maps.

        Args:
            features: ``encode_image`` output for B crops (or for 1 crop, broadcast over B aux maps).
            aux: (B, 3, S, S): positive disks, negative disks, previous mask, each in [0, 1].

        Returns:
            (B, 1, S, S) logits.
        """
        levels, image = features
        if levels[0].shape[0] != aux.shape[0]:  # one cached crop, several click sets
            levels = tuple(level.expand(aux.shape[0], -1, -1, -1) for level in levels)
            image = image.expand(aux.shape[0], -1, -1, -1)
        aux_levels = self.aux_encoder(aux)
        laterals = [
            conv(levels[i]) + aux_levels[i] for conv, i in zip(self.laterals, PYRAMID_LEVELS, strict=True)
        ]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(
                laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest"
            )
        pyramid = [smooth(level) for smooth, level in zip(self.smooth, laterals, strict=True)]
        merged = pyramid[0]
        for level in pyramid[1:]:
            merged = merged + F.interpolate(
                level, size=merged.shape[-2:], mode="bilinear", align_corners=False
            )
        merged = self.head(merged)  # stride 4
        size = aux.shape[-2:]
        coarse = F.interpolate(self.coarse(merged), size=size, mode="bilinear", align_corners=False)
        half = levels[0].shape[-2:]
        x = F.interpolate(self.reduce(merged), size=half, mode="bilinear", align_corners=False)
        x = self.refine_half(torch.cat([x, levels[0], aux_levels[0]], dim=1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return coarse + self.refine_full(torch.cat([x, image, aux], dim=1))

    def forward(self, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised crops and (B, 3, S, S) aux maps -> (B, 1, S, S) logits."""
        return self.decode(self.encode_image(x), aux)


def _fuse_sequential(module: nn.Module) -> None:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential`` (in place)."""
    for child in module.children():
        _fuse_sequential(child)
    if not isinstance(module, nn.Sequential):
        return
    keys = list(module._modules)
    for first, second in itertools.pairwise(keys):
        conv, norm = module._modules[first], module._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            module._modules[first] = fuse_conv_bn_eval(conv, norm)
            module._modules[second] = nn.Identity()


def fuse_for_inference(model: ClickSegmenter) -> ClickSegmenter:
    """An eval-mode copy with every BatchNorm folded into the conv before it (same outputs, faster).

    The copy cannot be trained."""
    fused = copy.deepcopy(model).eval()
    if isinstance(fused.backbone, EfficientNetLite0):
        fused.backbone = fuse_batchnorm(fused.backbone)
    _fuse_sequential(fused)
    return fused
