"""Shared parts of the anomaly-scoring students (CFA, RD4AD, UniNet).

These students compute a raw anomaly map (B, H, W) in units of their own (a distance, 1 - cosine, ...),
while every student speaks the same language downstream: logits (B, K+1, H, W) with background in
channel 0. So each scorer turns its raw map into calibrated pseudo-logits

    z = (raw_map - threshold) / scale
    logits[:, 0] = -z / 2,  logits[:, defect_index] = +z / 2,  every other channel = -1e4

and softmax gives p(defect) = sigmoid(z) exactly (the other classes get ~0). ``threshold`` and ``scale``
are buffers (saved in the safetensors file) set by ``calibrate`` from normal images: the threshold is the
99.9th percentile of the raw map over normal pixels, so about one normal pixel in a thousand is called a
defect, and the scale is a robust spread of those pixels (``calibration_scale``: their MAD-based standard
deviation, widened for heavy tails), so one scale above the threshold reads as p(defect) = 0.73 whatever
the raw units are. Tiling, evaluation, MLflow logging and
ONNX export then treat these students like any segmenter.

Also here: the frozen feature pyramid they share (EfficientNet-Lite0 at strides 4, 8, 16, or a tiny random
pyramid for tests), the config fields every one of them has, a Gaussian blur for anomaly maps and the
per-position loss weights derived from masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone.efficientnet_lite import load_pretrained_lite0
from models.robust_stats import median_and_sigma
from models.student.checkpoint import config_from_dict, config_to_dict
from models.student.fpn.loss import IGNORE_INDEX
from models.student.fpn.torch_model import FPNSegmenter, SegmentationOutput, TinyPyramid

logger = logging.getLogger(__name__)

#: Share of normal calibration pixels whose raw score stays below the threshold.
CALIBRATION_QUANTILE = 0.999
#: Raw scores sampled for the quantile (torch.quantile refuses inputs above 2**24 elements).
MAX_CALIBRATION_PIXELS = 4_000_000
#: Distance of the 99.9th percentile from the median of a Gaussian, in standard deviations.
TAIL_SIGMAS = 3.09
#: Standard deviation of normal data per median absolute deviation.
#: Logit of the classes an anomaly scorer cannot tell apart from the generic defect class.
OTHER_CLASS_LOGIT = -1e4
#: Lite0 blocks up to the stride-16 feature (blocks 0..10); the deeper ones are dropped, never used.
LITE0_BLOCKS_TO_STRIDE16 = 11


@dataclass
class AnomalyStudentConfig:
    """Fields every anomaly-scoring student has (its own config adds model-specific ones).

    Args:
        num_classes: defect classes, background excluded; logits have ``num_classes + 1`` channels.
        image_size: side of the square training crops and of the inference tiles.
        pretrained: start the frozen encoder from the ImageNet Lite0 weights (only matters when training).
        tiny: a small random conv pyramid instead of Lite0 (tests and smoke runs).
        defect_index: logit channel that carries p(defect); defaults to ``num_classes`` (the project's
            generic ``defect`` class is the last one).
        smoothing_sigma: Gaussian blur of the raw anomaly map, in pixels at input resolution.
    """

    num_classes: int
    image_size: int = 256
    pretrained: bool = True
    tiny: bool = False
    defect_index: int | None = None
    smoothing_sigma: float = 4.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.num_classes < 1:
            raise ValueError(f"{name}.num_classes must be >= 1 (defect classes), got {self.num_classes}")
        if self.defect_index is None:
            self.defect_index = self.num_classes
        if not 1 <= self.defect_index <= self.num_classes:
            raise ValueError(
                f"{name}.defect_index must name a defect channel in 1..{self.num_classes}, "
                f"got {self.defect_index}"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict; keys that are not config fields (metadata) are ignored."""
        return config_from_dict(cls, data)


class FrozenEncoder(nn.Module):
    """Frozen feature pyramid: (B, 3, H, W) -> three maps at strides 4, 8, 16.

    Lite0 gives 24, 40 and 112 channels of ImageNet features; ``tiny`` gives a random ``TinyPyramid``
    (8, 16, 16 channels). The encoder never trains: no gradients, batch norm always in eval mode (its
    statistics are the pretrained ones), whatever mode the owning model is put in.
    """

    def __init__(self, pretrained: bool, tiny: bool) -> None:
        super().__init__()
        self.tiny = tiny
        if tiny:
            self.network: nn.Module = TinyPyramid()
        else:
            lite0 = load_pretrained_lite0(pretrained)
            lite0.blocks = lite0.blocks[:LITE0_BLOCKS_TO_STRIDE16]
            lite0.head, lite0.classifier = nn.Identity(), nn.Identity()
            self.network = lite0
        self.network.requires_grad_(False)
        self.network.eval()
        self.channels: tuple[int, ...] = tuple(f.shape[1] for f in self(torch.zeros(1, 3, 32, 32)))

    def train(self, mode: bool = True) -> Self:
        """Stay in eval mode: the encoder is a fixed reference, its batch-norm statistics included."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> [(B, C_i, ceil(H / s), ceil(W / s)) for s in 4, 8, 16]."""
        with torch.no_grad():
            if self.tiny:
                features = self.network.forward_features(x)
            else:
                features = self.network.forward_features(x, max_stride=16)
        return list(features[1:4])


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (kernel truncated at 4 sigma, like scipy).

    Args:
        maps: (B, H, W).
        sigma: standard deviation in pixels; 0 returns the input.

    Returns:
        (B, H, W).
    """
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    radius = min(int(4 * sigma + 0.5), height - 1, width - 1)  # reflect padding needs pad < size
    if radius < 1:
        return maps
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, h, w) -> (B, *size), bilinear."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def position_weights(
    masks: torch.Tensor, weights: torch.Tensor | None, size: tuple[int, int] | torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much each feature position counts as normal and as defect in a loss.

    A position covers a cell of pixels; its weight is the share of that cell's pixels labelled normal
    (mask 0) or defect (any class other than 0 and IGNORE_INDEX), times the sample's weight. Unlabelled
    pixels (IGNORE_INDEX) count as neither.

    Args:
        masks: (B, H, W) integer class masks.
        weights: (B,) per-sample weights, or None for 1.
        size: (h, w) of the feature map.

    Returns:
        normal, defect: two (B, h, w) tensors in [0, max weight].
    """
    normal = (masks == 0).float().unsqueeze(1)
    defect = ((masks > 0) & (masks != IGNORE_INDEX)).float().unsqueeze(1)
    normal = F.adaptive_avg_pool2d(normal, size).squeeze(1)
    defect = F.adaptive_avg_pool2d(defect, size).squeeze(1)
    if weights is not None:
        sample = weights.float().view(-1, 1, 1)
        normal, defect = normal * sample, defect * sample
    return normal, defect


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w) over all elements; 0 (with a graph) when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def pseudo_logits(
    raw_map: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor, num_outputs: int, defect_index: int
) -> torch.Tensor:
    """Calibrated pseudo-logits from a raw anomaly map (see the module docstring).

    Args:
        raw_map: (B, H, W).
        threshold, scale: () tensors.
        num_outputs: K + 1 channels.
        defect_index: channel that receives +z/2.

    Returns:
        (B, K+1, H, W) logits with softmax(logits)[:, defect_index] == sigmoid(z).
    """
    z = (raw_map - threshold) / scale
    channels = [torch.full_like(z, OTHER_CLASS_LOGIT) for _ in range(num_outputs)]
    channels[0], channels[defect_index] = -0.5 * z, 0.5 * z
    return torch.stack(channels, dim=1)


def sample_pixels(maps: torch.Tensor, limit: int = MAX_CALIBRATION_PIXELS) -> torch.Tensor:
    """All values of ``maps`` flattened, or a fixed random subset of ``limit`` of them."""
    values = maps.flatten().float()
    if values.numel() > limit:
        generator = torch.Generator().manual_seed(0)
        values = values[torch.randperm(values.numel(), generator=generator)[:limit].to(values.device)]
    return values


def calibration_scale(median: torch.Tensor, sigma: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The pseudo-logit scale: the larger of the MAD-sigma and the spread the threshold implies.

    For Gaussian scores the 99.9th percentile lies ``TAIL_SIGMAS`` sigma above the median and both agree.
    Anomaly maps are heavy-tailed: there the MAD-sigma alone would make p(defect) jump from 0 to 1 just
    above the threshold, and every image with a slightly raised patch would score like a hole; the tail
    spread keeps p(defect) graded, so image scores still rank images.
    """
    tail_sigma = (threshold - median).abs() / TAIL_SIGMAS
    return torch.maximum(sigma, tail_sigma).clamp_min(1e-6)


def check_normal_images(normal_images: torch.Tensor) -> None:
    """Raise a clear error unless ``normal_images`` is a non-empty (N, 3, H, W) batch."""
    if normal_images.ndim != 4 or normal_images.shape[0] == 0 or normal_images.shape[1] != 3:
        raise ValueError(
            f"calibration needs a (N, 3, H, W) batch of normal images, got {tuple(normal_images.shape)}"
        )


class AnomalyScorerMixin:
    """``segment``, ``calibrate`` and the eval-mode output for a student that defines ``anomaly_map``.

    Mixed in before ``PretrainedMixin`` and ``nn.Module``; the model calls ``register_calibration()`` in
    its ``__init__``.
    """

    config: AnomalyStudentConfig
    threshold: torch.Tensor
    scale: torch.Tensor
    #: Defined by each model: (B, 3, H, W) normalised images -> (B, H, W) raw map, higher = more anomalous.
    anomaly_map: Callable[[torch.Tensor], torch.Tensor]

    def register_calibration(self) -> None:
        """Create the ``threshold`` and ``scale`` buffers (0 and 1 until ``calibrate`` runs)."""
        assert isinstance(self, nn.Module)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    @property
    def num_outputs(self) -> int:
        """Output channels: defect classes plus background."""
        return self.config.num_classes + 1

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K+1, H, W) calibrated pseudo-logits."""
        assert self.config.defect_index is not None
        return pseudo_logits(
            self.anomaly_map(x), self.threshold, self.scale, self.num_outputs, self.config.defect_index
        )

    def eval_output(self, x: torch.Tensor) -> SegmentationOutput:
        """The eval-mode output: maps, masks and image scores from ``segment``."""
        return FPNSegmenter.postprocess(self.segment(x))

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """``anomaly_map`` over (N, 3, H, W) images in eval mode, batch by batch -> (N, H, W) on the CPU."""
        assert isinstance(self, nn.Module)
        was_training = self.training
        self.eval()
        device = self.threshold.device
        maps = [self.anomaly_map(batch.to(device)).cpu() for batch in images.split(batch_size)]
        self.train(was_training)
        return torch.cat(maps)

    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """Set ``threshold`` and ``scale`` from defect-free images (see the module docstring).

        Args:
            normal_images: (N, 3, H, W) normalised images without defects.
            batch_size: images per forward pass.
        """
        check_normal_images(normal_images)
        values = sample_pixels(self.raw_maps(normal_images, batch_size))
        threshold = torch.quantile(values, CALIBRATION_QUANTILE)
        median, sigma = median_and_sigma(values)
        scale = calibration_scale(median, sigma, threshold)
        self.threshold.fill_(float(threshold))
        self.scale.fill_(float(scale))
        logger.info(
            "%s calibrated on %d normal images: threshold %.4g, scale %.4g",
            type(self).__name__,
            normal_images.shape[0],
            float(threshold),
            float(scale),
        )
