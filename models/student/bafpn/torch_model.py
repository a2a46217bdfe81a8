"""BAFPN segmentation student: a bidirectional attention feature pyramid on EfficientNet-Lite0.

After BAF-Detector's BAFPN, moved from a Faster R-CNN detector to a light per-pixel segmenter:

- backbone: EfficientNet-Lite0 (ImageNet) features at strides 4, 8, 16, 32;
- neck: lateral 1x1 convolutions to ``channels``; a top-down path (upsample, add, 3x3 depthwise-separable
  conv) carries semantics down to the fine levels; a bottom-up path (stride-2 separable conv, add, separable
  conv) as in PANet gives the fine, well-localised levels a short way up to the coarse ones, so thin
  defects (a broken yarn a few pixels wide) are not lost on the way;
- multi-head cosine non-local attention on the bottom-up path at the coarse levels (strides 16 and 32
  by default, 256 and 64 tokens for a 256 x 256 crop, so it stays cheap): cosine similarity instead of a
  dot product keeps the attention weights from collapsing after the softmax, which lets defect positions
  stand out against the regular weave; a zero-initialised gate makes the block an identity at the start,
  so training begins as a plain bidirectional pyramid;
- head: the four levels merged at stride 4, two separable convs and a 1x1 classifier; logits upsampled to
  the input.

``attention=False`` drops the attention blocks and ``bottom_up=False`` the bottom-up path; with both off
the network is a plain FPN, which gives the ablation within one class. Without the bottom-up path the
attention blocks sit on the same coarse levels of the top-down output.

In training mode ``forward`` returns logits (B, K+1, H, W) (what :class:`BAFPNLoss` takes); in eval mode
a :class:`~models.student.fpn.SegmentationOutput`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone.efficientnet_lite import load_pretrained_lite0
from models.student.checkpoint import PretrainedMixin, config_from_dict, config_to_dict
from models.student.fpn.torch_model import (
    FPNSegmenter,
    SegmentationOutput,
    SeparableConv,
    TinyPyramid,
    decode_pyramid,
)

#: Backbone feature levels the pyramid uses (strides 4, 8, 16, 32 of the five the backbone returns).
PYRAMID_LEVELS = (1, 2, 3, 4)
PYRAMID_STRIDES = (4, 8, 16, 32)
#: Initial softmax temperature of the cosine attention (cosines lie in [-1, 1]: a factor 1 would give
#: nearly uniform weights) and its ceiling, kept so the logits of the softmax cannot blow up.
INITIAL_TEMPERATURE = 10.0
MAX_TEMPERATURE = 100.0


@dataclass
class BAFPNConfig:
    """Everything needed to rebuild a :class:`BAFPNModel` (stored as ``config.json``).

    Args:
        num_classes: defect classes, background excluded; the model outputs ``num_classes + 1`` channels.
        image_size: side of the square training crops and of the inference tiles.
        pretrained: start the backbone from the ImageNet weights (only matters when training starts).
        tiny: a small random conv pyramid instead of Lite0 (tests and smoke runs).
        channels: width of the pyramid and of the head.
        attention: multi-head cosine non-local attention at ``attention_strides``.
        bottom_up: the PANet-style bottom-up path after the top-down one.
        attention_heads: heads of each attention block; must divide ``channels``.
        attention_strides: pyramid strides (of 4, 8, 16, 32) that get an attention block; the token count
            is (H / stride) * (W / stride), and the cost grows with its square.
    """

    num_classes: int
    image_size: int = 256
    pretrained: bool = True
    tiny: bool = False
    channels: int = 64
    attention: bool = True
    bottom_up: bool = True
    attention_heads: int = 4
    attention_strides: tuple[int, ...] = (16, 32)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"BAFPNConfig.num_classes must be >= 1 (defect classes), got {self.num_classes}")
        # JSON stores tuples as lists.
        self.attention_strides = tuple(int(s) for s in self.attention_strides)
        unknown = set(self.attention_strides) - set(PYRAMID_STRIDES)
        if unknown:
            raise ValueError(
                f"BAFPNConfig.attention_strides must be among {PYRAMID_STRIDES}, got {self.attention_strides}"
            )
        if self.attention and self.channels % self.attention_heads:
            raise ValueError(
                f"BAFPNConfig.attention_heads ({self.attention_heads}) must divide channels ({self.channels})"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict; keys that are not config fields (metadata) are ignored."""
        return config_from_dict(cls, data)


def cosine_attention_weights(
    queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Softmax over temperature-scaled cosine similarities.

    Args:
        queries: (B, heads, N, D).
        keys: (B, heads, M, D).
        temperature: (heads,) positive factors.

    Returns:
        (B, heads, N, M) weights; each row sums to 1.
    """
    similarity = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-2, -1)
    return (similarity * temperature.view(1, -1, 1, 1)).softmax(dim=-1)


class CosineNonLocalAttention(nn.Module):
    """Multi-head cosine non-local attention over all positions of a map, with a zero-init gated residual.

    ``y = x + gate * proj(softmax(temperature * cos(q_i, k_j)) v)`` with q, k, v linear maps of x per head
    and ``gate`` a per-channel vector starting at zero, so the block is an identity at initialisation.
    No positional encoding: the operation on tokens is equivariant to any permutation of positions (a
    defect is unusual wherever it is).

    Args:
        channels: C of the input map.
        heads: attention heads; C / heads channels each.
    """

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads ({heads}) must divide channels ({channels})")
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        # Stored as a log so it stays positive; clamped on use so the softmax logits stay bounded.
        self.log_temperature = nn.Parameter(torch.full((heads,), math.log(INITIAL_TEMPERATURE)))
        self.gate = nn.Parameter(torch.zeros(channels))

    def temperature(self) -> torch.Tensor:
        """(heads,) current softmax temperatures."""
        return self.log_temperature.clamp(max=math.log(MAX_TEMPERATURE)).exp()

    def _split_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> queries, keys, values, each (B, heads, N, C / heads)."""
        n, c = tokens.shape[1], tokens.shape[2]
        # -1 for the batch so an exported graph keeps a dynamic batch size.
        qkv = self.qkv(tokens).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> (B, heads, N, N) attention weights (rows sum to 1)."""
        queries, keys, _ = self._split_heads(tokens)
        return cosine_attention_weights(queries, keys, self.temperature())

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """The non-local update before the gate: (B, N, C) -> (B, N, C)."""
        n, c = tokens.shape[1], tokens.shape[2]
        queries, keys, values = self._split_heads(tokens)
        weights = cosine_attention_weights(queries, keys, self.temperature())
        mixed = (weights @ values).transpose(1, 2).reshape(-1, n, c)
        return self.proj(mixed)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gated residual attention on tokens: (B, N, C) -> (B, N, C)."""
        return tokens + self.gate * self.attend(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        channels, height, width = x.shape[1:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.forward_tokens(tokens)
        return out.transpose(1, 2).reshape(-1, channels, height, width)


class Downsample(nn.Sequential):
    """Stride-2 depthwise 3x3 + pointwise 1x1 with batch norm and ReLU: the bottom-up path's step."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


def _resize_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Resize (nearest) x to reference's spatial size unless it already matches.

    Sizes are matched exactly, not by a factor of 2, so inputs whose side is not a multiple of 32 work.
    """
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="nearest")


def _lite0_backbone(pretrained: bool) -> nn.Module:
    """Lite0 without its ImageNet head (1280-channel conv + classifier, 1.7 M unused parameters)."""
    backbone = load_pretrained_lite0(pretrained)
    backbone.head = nn.Identity()
    backbone.classifier = nn.Identity()
    return backbone


class BAFPNModel(PretrainedMixin, nn.Module):
    """Bidirectional attention FPN segmenter; see the module docstring for the architecture."""

    config_class = BAFPNConfig
    supervised = True

    def __init__(self, config: BAFPNConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = TinyPyramid() if config.tiny else _lite0_backbone(config.pretrained)
        in_channels = self._backbone_channels()
        width, levels = config.channels, len(PYRAMID_LEVELS)
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        # Top-down: one separable conv per level below the coarsest (which is its lateral as is).
        self.top_down = nn.ModuleList(SeparableConv(width, width) for _ in range(levels - 1))
        if config.bottom_up:
            self.downsample = nn.ModuleList(Downsample(width) for _ in range(levels - 1))
            self.bottom_up = nn.ModuleList(SeparableConv(width, width) for _ in range(levels - 1))
        strides = config.attention_strides if config.attention else ()
        self.attention = nn.ModuleDict(
            {str(s): CosineNonLocalAttention(width, config.attention_heads) for s in strides}
        )
        self.head = nn.Sequential(SeparableConv(width, width), SeparableConv(width, width))
        self.classifier = nn.Conv2d(width, config.num_classes + 1, 1)

    def _backbone_channels(self) -> list[int]:
        """Channels of the four pyramid levels, from one small dry run of the backbone."""
        was_training = self.backbone.training
        self.backbone.eval()  # a dry run must not touch batch-norm statistics
        with torch.no_grad():
            features = self.backbone.forward_features(torch.zeros(1, 3, 64, 64))
        self.backbone.train(was_training)
        return [features[i].shape[1] for i in PYRAMID_LEVELS]

    @property
    def num_outputs(self) -> int:
        """Output channels: defect classes plus background."""
        return self.config.num_classes + 1

    def _attend(self, level: torch.Tensor, stride: int) -> torch.Tensor:
        """The level through its attention block, or unchanged when that stride has none."""
        key = str(stride)
        return self.attention[key](level) if key in self.attention else level

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone and neck.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            Four (B, C, ceil(H / s), ceil(W / s)) maps for s = 4, 8, 16, 32, C = ``channels``.
        """
        features = self.backbone.forward_features(x)
        laterals = [conv(features[i]) for conv, i in zip(self.laterals, PYRAMID_LEVELS, strict=True)]
        # Top-down, coarse to fine.
        levels = list(laterals)
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = self.top_down[i](laterals[i] + _resize_to(levels[i + 1], laterals[i]))
        if not self.config.bottom_up:
            return [self._attend(level, s) for level, s in zip(levels, PYRAMID_STRIDES, strict=True)]
        # Bottom-up, fine to coarse; attention refines a level before it feeds the next coarser one.
        outputs = [self._attend(levels[0], PYRAMID_STRIDES[0])]
        for i in range(1, len(levels)):
            down = _resize_to(self.downsample[i - 1](outputs[-1]), levels[i])
            fused = self.bottom_up[i - 1](levels[i] + down)
            outputs.append(self._attend(fused, PYRAMID_STRIDES[i]))
        return outputs

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at input resolution.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            (B, K+1, H, W) logits, channel 0 is background.
        """
        return decode_pyramid(self.pyramid(x), self.head, self.classifier, x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegmentationOutput:
        """Logits (B, K+1, H, W) in training mode, a ``SegmentationOutput`` in eval mode."""
        logits = self.segment(x)
        if self.training:
            return logits
        return self.postprocess(logits)

    @staticmethod
    def postprocess(logits: torch.Tensor) -> SegmentationOutput:
        """(B, K+1, H, W) logits -> anomaly map, class mask and image score (as the FPN student)."""
        return FPNSegmenter.postprocess(logits)
