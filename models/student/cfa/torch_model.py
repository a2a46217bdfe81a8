"""CFA: coupled-hypersphere feature adaptation with a compressed memory bank (unsupervised).

Features. A frozen encoder (ImageNet EfficientNet-Lite0) gives maps at strides 4, 8 and 16 (24, 40 and
112 channels). Each is averaged over its 3 x 3 neighbourhood (a little context, robust to one-pixel
shifts), brought to ``feature_stride`` (8 by default: the stride-4 map is area-pooled, the stride-16 map
bilinearly upsampled; 4 keeps the stride-4 grid for thin defects at four times the cost), L2-normalised
per level so the 112-channel level does not drown the others, and concatenated (176 channels).

Patch descriptor. A learnable 1 x 1 convolution maps each position to a ``descriptor_dim`` vector; it is
what training adapts from ImageNet statistics to the fabric at hand. The original method adds coordinate
channels (CoordConv) because its objects sit at fixed places in the frame; fabric is a stationary texture
seen through random crops and rotations, so position carries no information and is left out.

Memory bank. ``bank_size`` centroids (a buffer, saved with the weights), as many whatever the size of the
training set: k-means on the untrained descriptors of normal training crops (``initialize_from_normals``),
then, at every training step, each centroid moves towards the mean of the descriptors assigned to it with
an exponential moving average (``ema_decay``), like batch-norm statistics: in training mode only.

Score. For each position the K nearest centroids (squared distances d_1 <= ... <= d_K); the raw score is
d_1 times the softmin weight of d_1 among the K, the certainty of the match, between 1/K and 1. A normal
descriptor lying between several centroids (the rim of the normal distribution) is about as far from
each of them and is discounted up to K times, so the rim is not mistaken for a defect; a descriptor far
from every centroid keeps nearly its whole distance, because the gaps between its squared distances grow
with the distance. Scores are upsampled to the input and Gaussian-smoothed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.student.anomaly_base import (
    AnomalyScorerMixin,
    AnomalyStudentConfig,
    FrozenEncoder,
    gaussian_blur,
    upsample,
)
from models.student.checkpoint import PretrainedMixin
from models.student.fpn.torch_model import SegmentationOutput

logger = logging.getLogger(__name__)

#: Descriptors k-means is run on (a random subset when the crops give more).
KMEANS_SAMPLES = 20_000
KMEANS_ITERATIONS = 20


@dataclass
class CFAConfig(AnomalyStudentConfig):
    """Settings of :class:`CFAModel` (base fields in :class:`AnomalyStudentConfig`).

    Args:
        feature_stride: grid of the patch descriptors, 4 or 8 pixels.
        descriptor_dim: width of the learned descriptor.
        bank_size: number of memory-bank centroids.
        num_nearest: K, centroids a descriptor is attracted to (and scored against).
        num_repel: J, the next centroids it is pushed away from.
        radius: radius r of the attracting hyperspheres (squared distances below r^2 cost nothing).
        margin: the repelled centroids must lie beyond r^2 + margin (squared distance).
        ema_decay: weight of a centroid's old position in each training step's update.
        certainty_temperature: temperature of the softmin over the K nearest distances.
    """

    feature_stride: int = 8
    descriptor_dim: int = 128
    bank_size: int = 256
    num_nearest: int = 3
    num_repel: int = 3
    radius: float = 1e-5
    margin: float = 0.1
    ema_decay: float = 0.99
    certainty_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feature_stride not in (4, 8):
            raise ValueError(f"CFAConfig.feature_stride must be 4 or 8, got {self.feature_stride}")
        if self.bank_size < self.num_nearest + self.num_repel:
            raise ValueError(
                f"CFAConfig.bank_size ({self.bank_size}) must be at least num_nearest + num_repel "
                f"({self.num_nearest + self.num_repel})"
            )


@dataclass
class CFATrainOutput:
    """Training-mode output of :class:`CFAModel`.

    Attributes:
        descriptors: (B, D, h, w) learned patch descriptors (with gradients).
        bank: (M, D) the memory bank as it was before this step's EMA update (no gradients).
    """

    descriptors: torch.Tensor
    bank: torch.Tensor


def squared_distances(descriptors: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(N, D) descriptors, (M, D) centroids -> (N, M) squared Euclidean distances (clamped at 0)."""
    cross = descriptors @ bank.T
    return (descriptors.square().sum(1, keepdim=True) - 2 * cross + bank.square().sum(1)).clamp_min(0)


def flatten_positions(maps: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B * h * w, D), row-major over positions."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def kmeans(points: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from distinct random points; an emptied cluster restarts at the worst-fit point.

    Args:
        points: (N, D) with N >= clusters.
        clusters: number of centroids M.
        iterations: Lloyd steps.
        generator: CPU generator for the initial choice.

    Returns:
        (M, D) centroids.
    """
    pick = torch.randperm(points.shape[0], generator=generator)[:clusters].to(points.device)
    centroids = points[pick].clone()
    for _ in range(iterations):
        distances = squared_distances(points, centroids)
        nearest, assignment = distances.min(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=clusters)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            worst = nearest.topk(int(empty.sum())).indices
            centroids[empty] = points[worst]
    return centroids


class CFAModel(AnomalyScorerMixin, PretrainedMixin, nn.Module):
    """CFA anomaly scorer; see the module docstring.

    Training mode: ``forward`` returns a :class:`CFATrainOutput` for :class:`CFALoss` and updates the
    memory bank. Eval mode: a :class:`SegmentationOutput` built from calibrated pseudo-logits.
    """

    config_class = CFAConfig
    supervised = False

    def __init__(self, config: CFAConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = FrozenEncoder(config.pretrained, config.tiny)
        feature_dim = sum(self.encoder.channels)
        self.descriptor = nn.Conv2d(feature_dim, config.descriptor_dim, kernel_size=1)
        # Orthogonal start: the untrained descriptor keeps the geometry of the pretrained features.
        nn.init.orthogonal_(self.descriptor.weight)
        nn.init.zeros_(self.descriptor.bias)
        self.register_buffer("memory_bank", torch.zeros(config.bank_size, config.descriptor_dim))
        self.register_calibration()

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, ceil(H / s), ceil(W / s)) frozen features, s = ``feature_stride``."""
        levels = self.encoder(x)
        size = (
            math.ceil(x.shape[-2] / self.config.feature_stride),
            math.ceil(x.shape[-1] / self.config.feature_stride),
        )
        resized = []
        for level in levels:
            level = F.avg_pool2d(level, 3, stride=1, padding=1, count_include_pad=False)
            if level.shape[-1] > size[1]:
                level = F.adaptive_avg_pool2d(level, size)
            elif level.shape[-2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            resized.append(F.normalize(level, dim=1))
        return torch.cat(resized, dim=1) / math.sqrt(len(resized))

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D, h, w) learned patch descriptors."""
        return self.descriptor(self.patch_features(x))

    @torch.no_grad()
    def initialize_from_normals(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """k-means initialisation of the memory bank on the descriptors of defect-free images.

        Args:
            normal_images: (N, 3, H, W) normalised crops; together they must give at least ``bank_size``
                descriptor positions.
        """
        device = self.memory_bank.device
        descriptors = torch.cat(
            [flatten_positions(self.describe(batch.to(device))) for batch in normal_images.split(batch_size)]
        )
        if descriptors.shape[0] < self.config.bank_size:
            raise ValueError(
                f"CFA memory bank: {normal_images.shape[0]} normal images give {descriptors.shape[0]} patch "
                f"descriptors, fewer than bank_size={self.config.bank_size}; give more or larger normal "
                "images, or lower bank_size"
            )
        generator = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
        if descriptors.shape[0] > KMEANS_SAMPLES:
            keep = torch.randperm(descriptors.shape[0], generator=generator)[:KMEANS_SAMPLES]
            descriptors = descriptors[keep.to(device)]
        self.memory_bank.copy_(kmeans(descriptors, self.config.bank_size, KMEANS_ITERATIONS, generator))
        logger.info(
            "CFA memory bank: %d centroids from %d descriptors", self.config.bank_size, len(descriptors)
        )

    @torch.no_grad()
    def update_memory_bank(self, descriptors: torch.Tensor) -> None:
        """Move each centroid towards the mean of the (N, D) descriptors nearest to it (EMA)."""
        assignment = squared_distances(descriptors, self.memory_bank).argmin(dim=1)
        sums = torch.zeros_like(self.memory_bank).index_add_(0, assignment, descriptors)
        counts = torch.bincount(assignment, minlength=self.config.bank_size)
        hit = counts > 0
        means = sums[hit] / counts[hit, None]
        decay = self.config.ema_decay
        self.memory_bank[hit] = decay * self.memory_bank[hit] + (1 - decay) * means

    def patch_scores(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) descriptors -> (B, h, w) certainty-weighted distance to the nearest centroid."""
        batch, _, height, width = descriptors.shape
        distances = squared_distances(flatten_positions(descriptors), self.memory_bank)
        nearest = distances.topk(self.config.num_nearest, dim=1, largest=False).values  # ascending
        certainty = torch.softmax(-nearest / self.config.certainty_temperature, dim=1)[:, 0]
        return (certainty * nearest[:, 0]).view(batch, height, width)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, H, W) raw anomaly map (smoothed patch scores)."""
        scores = upsample(self.patch_scores(self.describe(x)), x.shape[-2:])
        return gaussian_blur(scores, self.config.smoothing_sigma)

    def forward(self, x: torch.Tensor) -> CFATrainOutput | SegmentationOutput:
        """Training mode: descriptors and the bank (then the EMA update). Eval mode: a SegmentationOutput."""
        if not self.training:
            return self.eval_output(x)
        descriptors = self.describe(x)
        bank = self.memory_bank.clone()
        self.update_memory_bank(flatten_positions(descriptors.detach()))
        return CFATrainOutput(descriptors=descriptors, bank=bank)
