"""RD4AD: reverse distillation from a one-class embedding (Deng & Li, CVPR 2022), unsupervised.

Teacher E. A frozen ImageNet EfficientNet-Lite0 encoder gives three levels at strides 4, 8 and 16 (24, 40
and 112 channels) for a (B, 3, H, W) input, each (B, C_i, ceil(H / s), ceil(W / s)).

One-class bottleneck embedding (OCBE, trainable, :class:`OneClassBottleneck`). Multi-scale feature fusion
(MFF) brings the three levels to stride 16 with strided 3 x 3 convolutions, concatenates them and fuses
them with a 1 x 1 convolution; the one-class embedding (OCE) block is the encoder's next stages (Lite0
stages 6 and 7, inverted-residual blocks, the first with stride 2), as the paper takes ResNet's fourth
stage: (B, E, ceil(H / 32), ceil(W / 32)), E = 320. The bottleneck is the point of the method: it has
room for the patterns of normal fabric, not for every perturbation, so a defect is not carried through
to the decoder.

Student decoder D (trainable, :class:`ReverseDecoder`). The mirror of the encoder: Lite0's stages 7 to 3
in reverse order, the same inverted-residual blocks, kernels and block counts, each stage mapping its
output width back to its input width, the stride-2 stages turned into upsampling ones (bilinear
upsampling to the teacher level's size, then the depthwise convolution). It rebuilds the teacher's three
levels coarse to fine (stride 16, 8, 4) with the teacher's channels and exact sizes, so inputs whose
side is not a multiple of 32 work.

Training pulls every decoder level to the teacher level on normal images only: per position 1 - cosine
over channels, averaged over positions, summed over levels (:class:`RD4ADLoss`). At inference the
anomaly map is the sum over levels of the upsampled per-position (1 - cosine) maps, Gaussian-smoothed
(sigma 4 px): where the decoder cannot rebuild the teacher, something unseen is. See README.md for what
differs from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone.efficientnet_lite import LITE0_STAGES
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
        bottleneck_channels: E, channels of the stride-32 one-class embedding (Lite0's stage-7 width).
            The decoder's widths all come from the encoder's stages (:class:`ReverseDecoder`).
    """

    bottleneck_channels: int = 320


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


@dataclass(frozen=True)
class MirrorStage:
    """One stage of inverted-residual blocks in the OCE or the decoder.

    Attributes:
        in_channels, out_channels: the first block maps in -> out, the others repeat at ``out_channels``.
        kernel_size: depthwise kernel of every block.
        repeats: number of blocks.
        expand_ratio: hidden width of a block / its input width.
        resample: first block's change of resolution: "down" (stride-2 depthwise), "up" (bilinear
            upsampling to the target size before the depthwise) or "" (none).
        level: index of the teacher level this stage's output rebuilds (decoder only), else None.
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    repeats: int
    expand_ratio: int
    resample: str = ""
    level: int | None = None


def _lite0_widths(teacher_channels: tuple[int, ...], embedding_channels: int) -> dict[int, int]:
    """Lite0 stage width -> width used here: the teacher's own at its levels, the embedding's at the
    end; the widths in between (80, 192) scaled by the stride-16 level (exact for Lite0 itself)."""
    scale = teacher_channels[2] / 112
    return {
        16: max(1, round(16 * scale)),
        24: teacher_channels[0],
        40: teacher_channels[1],
        80: max(1, round(80 * scale)),
        112: teacher_channels[2],
        192: max(1, round(192 * scale)),
        320: embedding_channels,
    }


def oce_stages(teacher_channels: tuple[int, ...], embedding_channels: int) -> list[MirrorStage]:
    """The encoder's next stages after stride 16 (Lite0 stages 6 and 7): stride 16 -> 32, as the paper
    takes ResNet's fourth stage for its one-class embedding."""
    width = _lite0_widths(teacher_channels, embedding_channels)
    return [
        MirrorStage(width[s.in_channels], width[s.out_channels], s.kernel_size, s.repeats, s.expand_ratio,
                    "down" if s.stride == 2 else "")
        for s in LITE0_STAGES[5:7]
    ]  # fmt: skip


def decoder_stages(teacher_channels: tuple[int, ...], embedding_channels: int) -> list[MirrorStage]:
    """Lite0 stages 7, 6, 5, 4, 3 in reverse order, each mapping its output width back to its input
    width; a stride-2 stage becomes an upsampling one and emits the teacher level at its input stride."""
    width = _lite0_widths(teacher_channels, embedding_channels)
    stages, level = [], 2
    for s in reversed(LITE0_STAGES[2:7]):
        upsamples = s.stride == 2
        stages.append(
            MirrorStage(width[s.out_channels], width[s.in_channels], s.kernel_size, s.repeats, s.expand_ratio,
                        "up" if upsamples else "", level if upsamples else None)
        )  # fmt: skip
        level -= int(upsamples)
    return stages


class InvertedResidual(nn.Module):
    """Lite0's MBConv block (no squeeze-excitation, ReLU6), optionally resampling.

    1 x 1 expansion -> (bilinear upsampling to ``size``) -> depthwise k x k (stride 2 when ``down``) ->
    1 x 1 linear projection, with an identity shortcut when resolution and width are kept. Unlike the
    frozen Lite0 (models/backbone/efficientnet_lite.py) it trains from scratch, so it uses torch's
    symmetric padding (ceil(size / 2) on a stride) and batch-norm defaults instead of the TensorFlow ones.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, expand_ratio: int, resample: str = ""
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = (
            nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)
            )
            if expand_ratio != 1
            else nn.Identity()
        )
        self.upsample = resample == "up"
        stride = 2 if resample == "down" else 1
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.use_residual = not resample and in_channels == out_channels

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, h', w'): h' = h, ceil(h / 2) (down) or size[0] (up)."""
        hidden = self.expand(x)
        if self.upsample:
            # 2x keeps the grid of the encoder's stride-2 step; an odd target drops the last row/column.
            hidden = F.interpolate(hidden, scale_factor=2.0, mode="bilinear", align_corners=False)
            hidden = hidden[:, :, : int(size[0]), : int(size[1])]
        out = self.project(self.depthwise(hidden))
        return out + x if self.use_residual else out


def build_stage(stage: MirrorStage) -> nn.ModuleList:
    """The blocks of one stage: the first one resamples and changes width, the others repeat it."""
    return nn.ModuleList(
        InvertedResidual(
            stage.in_channels if index == 0 else stage.out_channels,
            stage.out_channels,
            stage.kernel_size,
            stage.expand_ratio,
            stage.resample if index == 0 else "",
        )
        for index in range(stage.repeats)
    )


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale fusion (MFF) + one-class embedding (OCE).

    MFF brings the strides-4 and -8 levels to stride 16 with strided 3 x 3 conv-BN-ReLU layers, each step
    to the next level's width (24 -> 40 -> 112, 40 -> 112 for Lite0), concatenates them with the
    stride-16 level as it is and fuses the 3 x 112 channels with a 1 x 1 conv-BN-ReLU to 112. OCE is the
    encoder's next stages, trained from scratch: Lite0 stage 6 (4 blocks, 5 x 5, the first with stride
    2, 112 -> 192) and stage 7 (1 block, 3 x 3, 192 -> E).

    Args:
        channels: channels of the encoder levels at strides 4, 8, 16.
        out_channels: E, the embedding width (320 in Lite0's stage 7).
    """

    def __init__(self, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.to_stride16 = nn.ModuleList(
            [
                nn.Sequential(
                    conv_bn_relu(channels[0], channels[1], stride=2),
                    conv_bn_relu(channels[1], channels[2], stride=2),
                ),
                conv_bn_relu(channels[1], channels[2], stride=2),
                nn.Identity(),
            ]
        )
        self.fuse = conv_bn_relu(3 * channels[2], channels[2], kernel_size=1)
        self.stages = nn.ModuleList(build_stage(stage) for stage in oce_stages(channels, out_channels))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, h_i, w_i) at strides 4, 8, 16] -> (B, E, ceil(h_16 / 2), ceil(w_16 / 2))."""
        # Strided 3x3 convolutions with padding 1 give ceil(size / 2), the sizes of the coarser levels.
        x = self.fuse(
            torch.cat([down(level) for down, level in zip(self.to_stride16, levels, strict=True)], 1)
        )
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x


class ReverseDecoder(nn.Module):
    """Student decoder, the encoder's mirror: embedding -> three maps shaped like the teacher's levels.

    Lite0 stages 7, 6, 5, 4, 3 in reverse order, same blocks (inverted residuals, expansion 6), kernels
    and block counts, each mapping its stage's output width back to its input width:

    ========  ==============  ======  ======  ========================  ===========
    mirrors   widths          kernel  blocks  resolution                emits
    ========  ==============  ======  ======  ========================  ===========
    stage 7   E -> 192        3       1       stride 32
    stage 6   192 -> 112      5       4       up to stride 16           level 2
    stage 5   112 -> 80       5       3       stride 16
    stage 4   80 -> 40        3       3       up to stride 8            level 1
    stage 3   40 -> 24        5       2       up to stride 4            level 0
    ========  ==============  ======  ======  ========================  ===========

    As in the paper's code, the first block of a stage changes width and resolution and the others
    repeat at the new width; a stride-2 depthwise convolution becomes a bilinear upsampling of the
    expanded features to the teacher level's exact size followed by a stride-1 depthwise convolution, so
    sizes follow the teacher's ceil(H / s) for any input. With another teacher (the tiny test pyramid),
    the widths at the levels are its own and the two in between scale with its stride-16 width.

    Args:
        in_channels: E, the embedding width.
        teacher_channels: channels of the teacher levels at strides 4, 8, 16.
    """

    def __init__(self, in_channels: int, teacher_channels: tuple[int, ...]) -> None:
        super().__init__()
        plan = decoder_stages(tuple(teacher_channels), in_channels)
        self.levels: tuple[int | None, ...] = tuple(stage.level for stage in plan)
        self.stages = nn.ModuleList(build_stage(stage) for stage in plan)

    def forward(self, embedding: torch.Tensor, sizes: list[torch.Size]) -> list[torch.Tensor]:
        """(B, E, h, w) -> three (B, C_i, *sizes[i]) maps, ordered fine to coarse like the teacher's."""
        outputs: list[torch.Tensor | None] = [None] * len(sizes)
        x = embedding
        for stage, level in zip(self.stages, self.levels, strict=True):
            for index, block in enumerate(stage):
                x = block(x, sizes[level] if index == 0 and level is not None else None)
            if level is not None:
                outputs[level] = x
        return [output for output in outputs if output is not None]


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
        self.decoder = ReverseDecoder(config.bottleneck_channels, self.encoder.channels)
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
