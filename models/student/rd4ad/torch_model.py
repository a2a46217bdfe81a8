"""RD4AD: reverse distillation from a one-class embedding (unsupervised).

Teacher. A frozen ImageNet EfficientNet-Lite0 encoder gives three levels at strides 4, 8 and 16 (24, 40
and 112 channels).

One-class bottleneck embedding (OCBE, trainable). Multi-scale fusion brings the three levels to stride
16 with strided 3 x 3 convolutions and merges them with a 1 x 1 convolution; a residual bottleneck
block with stride 2 then squeezes the result into a compact stride-32 embedding. The bottleneck is the
point of the method: it has room for the patterns of normal fabric, not for every perturbation, so a
defect is not carried through to the decoder.

Student decoder (trainable). It mirrors the encoder: from the embedding it rebuilds the teacher's three
levels, coarse to fine (stride 16, 8, 4), each stage an upsampling to the teacher's size for that level,
two 3 x 3 convolutions and a 1 x 1 projection to the teacher's channel count. Sizes are taken from the
teacher's maps, so inputs whose side is not a multiple of 32 work.

Training pulls every decoder level to the teacher level (1 - cosine per position, :class:`RD4ADLoss`) on
normal images only. At inference the anomaly map is the sum over levels of the upsampled per-position
(1 - cosine) maps, Gaussian-smoothed: where the decoder cannot rebuild the teacher, something unseen is.
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
    gaussian_blur,
    upsample,
)
from models.student.checkpoint import PretrainedMixin
from models.student.fpn.torch_model import SegmentationOutput


@dataclass
class RD4ADConfig(AnomalyStudentConfig):
    """Settings of :class:`RD4ADModel` (base fields in :class:`AnomalyStudentConfig`).

    Args:
        bottleneck_channels: channels of the stride-32 one-class embedding.
        decoder_channels: width of the finest (stride-4) decoder stage; doubled at each coarser stage.
    """

    bottleneck_channels: int = 256
    decoder_channels: int = 64


@dataclass
class DistillationOutput:
    """Training-mode output of the reverse-distillation students.

    Attributes:
        teacher: three (B, C_i, h_i, w_i) frozen encoder maps at strides 4, 8, 16 (no gradients).
        student: three decoder maps of the same shapes.
    """

    teacher: list[torch.Tensor]
    student: list[torch.Tensor]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (padding keeps ceil(size / stride)) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class OneClassBottleneck(nn.Module):
    """Multi-scale fusion + one-class embedding: three encoder levels -> (B, E, ceil(H/32), ceil(W/32)).

    Args:
        channels: channels of the encoder levels at strides 4, 8, 16.
        out_channels: E, the embedding width.
    """

    def __init__(self, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        width = out_channels // 2
        self.to_stride16 = nn.ModuleList(
            [
                nn.Sequential(
                    conv_bn_relu(channels[0], width, stride=2), conv_bn_relu(width, width, stride=2)
                ),
                conv_bn_relu(channels[1], width, stride=2),
                conv_bn_relu(channels[2], width, kernel_size=1),
            ]
        )
        self.fuse = conv_bn_relu(3 * width, out_channels, kernel_size=1)
        # Residual bottleneck block with stride 2: 1x1 squeeze, 3x3 strided, 1x1 expand.
        self.residual = nn.Sequential(
            conv_bn_relu(out_channels, width, kernel_size=1),
            conv_bn_relu(width, width, stride=2),
            nn.Conv2d(width, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, h_i, w_i) at strides 4, 8, 16] -> (B, E, ceil(h_16 / 2), ceil(w_16 / 2))."""
        # Strided 3x3 convolutions with padding 1 give ceil(size / 2), the sizes of the coarser levels.
        fused = self.fuse(
            torch.cat([down(level) for down, level in zip(self.to_stride16, levels, strict=True)], 1)
        )
        return F.relu(self.residual(fused) + self.shortcut(fused))


class ReverseDecoder(nn.Module):
    """Decoder mirroring the encoder: embedding -> three maps shaped like the teacher's levels.

    Args:
        in_channels: E, the embedding width.
        teacher_channels: channels of the teacher levels at strides 4, 8, 16.
        width: channels of the stride-4 stage (2x at stride 8, 4x at stride 16).
    """

    def __init__(self, in_channels: int, teacher_channels: tuple[int, ...], width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]  # strides 4, 8, 16
        stages, projections, previous = [], [], in_channels
        for level in (2, 1, 0):  # coarse to fine
            stages.append(
                nn.Sequential(
                    conv_bn_relu(previous, widths[level]), conv_bn_relu(widths[level], widths[level])
                )
            )
            projections.append(nn.Conv2d(widths[level], teacher_channels[level], 1))
            previous = widths[level]
        self.stages = nn.ModuleList(stages)
        self.projections = nn.ModuleList(projections)

    def forward(self, embedding: torch.Tensor, sizes: list[torch.Size]) -> list[torch.Tensor]:
        """(B, E, h, w) -> three (B, C_i, *sizes[i]) maps, ordered fine to coarse like the teacher's."""
        outputs, x = [], embedding
        for stage, projection, size in zip(self.stages, self.projections, reversed(sizes), strict=True):
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
            outputs.append(projection(x))
        return outputs[::-1]


def cosine_distance_maps(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, 1 - cosine similarity over channels: [(B, C, h, w)] x2 -> [(B, h, w)]."""
    return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student, strict=True)]


class RD4ADModel(AnomalyScorerMixin, PretrainedMixin, nn.Module):
    """Reverse-distillation anomaly scorer; see the module docstring.

    Training mode: ``forward`` returns a :class:`DistillationOutput` for :class:`RD4ADLoss`. Eval mode: a
    :class:`SegmentationOutput` built from calibrated pseudo-logits.
    """

    config_class = RD4ADConfig
    supervised = False

    def __init__(self, config: RD4ADConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = FrozenEncoder(config.pretrained, config.tiny)
        self.bottleneck = OneClassBottleneck(self.encoder.channels, config.bottleneck_channels)
        self.decoder = ReverseDecoder(
            config.bottleneck_channels, self.encoder.channels, config.decoder_channels
        )
        self.register_calibration()

    def distill(self, x: torch.Tensor) -> DistillationOutput:
        """(B, 3, H, W) normalised images -> teacher levels and the decoder's reconstruction of them."""
        teacher = self.encoder(x)
        student = self.decoder(self.bottleneck(teacher), [t.shape[-2:] for t in teacher])
        return DistillationOutput(teacher=teacher, student=student)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H, W): sum over levels of upsampled (1 - cosine), Gaussian-smoothed."""
        output = self.distill(x)
        maps = cosine_distance_maps(output.teacher, output.student)
        total = torch.stack([upsample(level, x.shape[-2:]) for level in maps]).sum(dim=0)
        return gaussian_blur(total, self.config.smoothing_sigma)

    def forward(self, x: torch.Tensor) -> DistillationOutput | SegmentationOutput:
        """Training mode: teacher and student levels. Eval mode: a SegmentationOutput."""
        if not self.training:
            return self.eval_output(x)
        return self.distill(x)
