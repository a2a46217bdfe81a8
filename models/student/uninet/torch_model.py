"""UniNet: contrastive teacher-student scorer with feature selection, supervised or not.

Architecture. The reverse-distillation layout of RD4AD: a frozen ImageNet EfficientNet-Lite0 teacher
(strides 4, 8, 16), the one-class bottleneck (multi-scale fusion + a strided residual block) and a
student decoder that rebuilds the teacher's three levels (see models/student/rd4ad).

Domain-related feature selection. Not every ImageNet channel says something about fabric. A learned
weight per channel and level, 0.5 + sigmoid(theta) in (0.5, 1.5) (1 at the start), scales teacher and
student features alike before they are compared, in training and at inference, so the comparison leans
on the channels that describe this fabric. The floor of 0.5 keeps any channel from being switched off:
the weights train with the loss, and a channel the student finds hard to rebuild (as a defect would be)
must not be silenced for that reason alone.

Losses (:class:`UniNetLoss`). Normal positions are pulled to the teacher (1 - cosine) and made
distinguishable from the other positions of the same image (a similarity-contrastive InfoNCE term: the
student's feature must be closer to the teacher's at its own position than at others); a margin term
lifts normal similarities above ``normal_margin`` and, when masks with defects are given
(``supervised=True``), pushes defect positions below ``defect_margin``. Unsupervised, the model trains
on normal images only and the defect term is simply empty.

Weighted decision. Per level, the map 1 - cosine (selected features) is upsampled and standardised with
that level's median and MAD-sigma over normal pixels (set by ``calibrate``). The levels are combined with
per-image weights, a softmax over the levels' peak standardised scores (``decision_temperature``): the
level that sees a defect most clearly decides the map, instead of being averaged away by levels that see
nothing, while on normal fabric the weights stay near uniform. The result is Gaussian-smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.student.anomaly_base import (
    AnomalyScorerMixin,
    AnomalyStudentConfig,
    FrozenEncoder,
    check_normal_images,
    gaussian_blur,
    median_and_sigma,
    sample_pixels,
    upsample,
)
from models.student.checkpoint import PretrainedMixin
from models.student.fpn.torch_model import SegmentationOutput
from models.student.rd4ad.torch_model import (
    DistillationOutput,
    OneClassBottleneck,
    ReverseDecoder,
    cosine_distance_maps,
)

NUM_LEVELS = 3


@dataclass
class UniNetConfig(AnomalyStudentConfig):
    """Settings of :class:`UniNetModel` (base fields in :class:`AnomalyStudentConfig`).

    Args:
        supervised: train on all samples, pushing labelled defect positions below ``defect_margin``;
            False trains on normal images only.
        bottleneck_channels: channels of the stride-32 one-class embedding.
        decoder_channels: width of the finest (stride-4) decoder stage.
        cosine_weight: lambda, share of the cosine term against the contrastive term.
        temperature: temperature of the contrastive softmax over positions.
        contrast_positions: positions per image (sampled) in the contrastive term.
        normal_margin: cosine similarity normal positions are pushed above.
        defect_margin: cosine similarity defect positions are pushed below.
        decision_temperature: temperature of the softmax over the levels' peak scores.
    """

    supervised: bool = False
    bottleneck_channels: int = 256
    decoder_channels: int = 64
    cosine_weight: float = 0.7
    temperature: float = 0.5
    contrast_positions: int = 256
    normal_margin: float = 0.9
    defect_margin: float = 0.5
    decision_temperature: float = 1.0


class FeatureSelection(nn.Module):
    """Learned per-channel weights in (0.5, 1.5), one vector per level (see the module docstring)."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in channels)

    def weights(self) -> list[torch.Tensor]:
        """Per level, (C_i,) channel weights."""
        return [0.5 + torch.sigmoid(logit) for logit in self.logits]

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(B, C_i, h_i, w_i)] -> the same maps with each channel scaled by its weight."""
        return [level * w.view(1, -1, 1, 1) for level, w in zip(levels, self.weights(), strict=True)]


class UniNetModel(AnomalyScorerMixin, PretrainedMixin, nn.Module):
    """UniNet scorer; see the module docstring.

    ``supervised`` is False on the class and follows ``config.supervised`` on an instance. Training mode:
    ``forward`` returns the selected teacher and student levels (:class:`DistillationOutput`) for
    :class:`UniNetLoss`. Eval mode: a :class:`SegmentationOutput` built from calibrated pseudo-logits.
    """

    config_class = UniNetConfig
    supervised = False

    def __init__(self, config: UniNetConfig) -> None:
        super().__init__()
        self.config = config
        self.supervised = config.supervised
        self.encoder = FrozenEncoder(config.pretrained, config.tiny)
        self.bottleneck = OneClassBottleneck(self.encoder.channels, config.bottleneck_channels)
        self.decoder = ReverseDecoder(
            config.bottleneck_channels, self.encoder.channels, config.decoder_channels
        )
        self.selection = FeatureSelection(self.encoder.channels)
        # Per-level median and spread of the level maps on normal pixels (identity until calibrated).
        self.register_buffer("level_center", torch.zeros(NUM_LEVELS))
        self.register_buffer("level_scale", torch.ones(NUM_LEVELS))
        self.register_calibration()

    def distill(self, x: torch.Tensor) -> DistillationOutput:
        """(B, 3, H, W) -> teacher and student levels (strides 4, 8, 16), both after feature selection."""
        teacher = self.encoder(x)
        student = self.decoder(self.bottleneck(teacher), [t.shape[-2:] for t in teacher])
        return DistillationOutput(teacher=self.selection(teacher), student=self.selection(student))

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per level, (B, H, W) upsampled 1 - cosine of the selected features."""
        output = self.distill(x)
        return [
            upsample(level, x.shape[-2:]) for level in cosine_distance_maps(output.teacher, output.student)
        ]

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H, W): standardised level maps combined by the weighted decision, smoothed."""
        levels = torch.stack(self.level_maps(x), dim=1)  # (B, L, H, W)
        standardised = (levels - self.level_center.view(1, -1, 1, 1)) / self.level_scale.view(1, -1, 1, 1)
        # Peaks of a 3x3 local mean, so one noisy pixel does not claim the decision.
        peaks = F.avg_pool2d(standardised, 3, stride=1, padding=1, count_include_pad=False).amax(dim=(2, 3))
        weights = torch.softmax(peaks / self.config.decision_temperature, dim=1)  # (B, L)
        combined = (standardised * weights[:, :, None, None]).sum(dim=1)
        return gaussian_blur(combined, self.config.smoothing_sigma)

    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        """Standardise each level on normal pixels, then set the pseudo-logit threshold and scale.

        Args:
            normal_images: (N, 3, H, W) normalised images without defects.
            batch_size: images per forward pass.
        """
        check_normal_images(normal_images)
        was_training = self.training
        self.eval()
        per_level: list[list[torch.Tensor]] = [[] for _ in range(NUM_LEVELS)]
        for batch in normal_images.split(batch_size):
            for index, level in enumerate(self.level_maps(batch.to(self.threshold.device))):
                per_level[index].append(level.cpu())
        for index, maps in enumerate(per_level):
            center, scale = median_and_sigma(sample_pixels(torch.cat(maps)))
            self.level_center[index], self.level_scale[index] = center, scale
        self.train(was_training)
        super().calibrate(normal_images, batch_size)

    def forward(self, x: torch.Tensor) -> DistillationOutput | SegmentationOutput:
        """Training mode: selected teacher and student levels. Eval mode: a SegmentationOutput."""
        if not self.training:
            return self.eval_output(x)
        return self.distill(x)
