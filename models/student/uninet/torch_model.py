"""UniNet (Wei, Jiang and Xu, CVPR 2025): two teachers, a student decoder, feature selection, a weighted
decision. Supervised or unsupervised.

Teachers. The source teacher is the shared frozen ImageNet encoder (EfficientNet-Lite0 at strides 4, 8,
16; a random tiny pyramid for tests). The target teacher starts as an exact copy of it and is trained
with the student, very slowly, to adapt the ImageNet features to this fabric while the source teacher
keeps them unchanged. Its weights are ``source + target_lr_ratio * offset`` with learned offsets (zero at
the start): under Adam a parameter moves by about the learning rate per step, so the target teacher moves
``target_lr_ratio`` times slower than the student, the paper's separate teacher learning rate (1e-6 against
5e-3) within the repo's single optimiser. Its batch norm follows the model's mode: batch statistics in
training, and the fabric's statistics (re-estimated after training) at inference. Both teachers see the
same images.

Bottleneck (:class:`UniNetBottleneck`). Per teacher, the three levels are brought to stride 16 (strided
3 x 3 convolutions) and concatenated with the stride-16 level; multi-scale embedding blocks (MEM,
:class:`MultiScaleEmbeddingBlock`) squeeze the result into the stride-32 embedding: each splits its channels
in two halves, one seen through two 3 x 3 convolutions and the other through two 7 x 7 convolutions, then
concatenates them, projects with a 1 x 1 convolution and adds a residual shortcut, so the embedding mixes
two receptive fields. The target and source teachers' levels go through it as one batch of 2B.

Student (rd4ad's ReverseDecoder). It decodes both embeddings; as in the paper's code (inherited from
ReContrast), the maps decoded from the target teacher's embedding are compared with the source teacher's
levels and those decoded from the source teacher's embedding with the target teacher's levels: six
(teacher, student) pairs, three levels each.

Domain-related feature selection (DFS, :class:`DomainFeatureSelection`, training only). Each student map is
multiplied by spatial weights derived from its teacher map: per channel, a softmax over positions of the
teacher's activation (where in the image that channel fires) times ``theta + mean activation`` (how much it
fires), with a learned ``theta`` per channel and level in [0.5, 1] (1 at the start). The student is thus
trained hardest on the positions and channels the teacher finds representative of the domain. At
inference the raw maps are compared, without selection.

Weighted decision (inference). The six maps 1 - cosine(teacher, student) are upsampled and summed, then
Gaussian-smoothed: the anomaly map. For the image score, the peaks of the six maps go through a softmax;
the peaks whose probability is at least the mean are averaged, and ``w = max(alpha * that mean, beta)``
sets how many of the image's pixels count: the score is the mean of the top ``w * H * W`` pixels of the
map. An image with a strong response scores over a wider area than one whose peaks are faint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from models.student.anomaly_base import (
    AnomalyScorerMixin,
    AnomalyStudentConfig,
    FrozenEncoder,
    gaussian_blur,
    pseudo_logits,
    upsample,
)
from models.student.checkpoint import PretrainedMixin
from models.student.fpn.torch_model import FPNSegmenter, SegmentationOutput
from models.student.rd4ad.torch_model import DistillationOutput, ReverseDecoder

NUM_LEVELS = 3
#: Temperatures of the paper's settings: one-class (unsupervised) and supervised training.
UNSUPERVISED_TEMPERATURE = 2.0
SUPERVISED_TEMPERATURE = 0.1


@dataclass
class UniNetConfig(AnomalyStudentConfig):
    """Settings of :class:`UniNetModel` (base fields in :class:`AnomalyStudentConfig`).

    Args:
        supervised: train on all samples, labelled defect positions entering the margin loss; False
            trains on normal images only.
        bottleneck_channels: channels of the stride-32 embedding.
        mem_blocks: multi-scale embedding blocks in the bottleneck (the first one has stride 2).
        target_lr_ratio: speed of the target teacher relative to the student (paper: 1e-6 / 5e-3).
        cosine_weight: lambda, share of the cosine term against the similarity-contrastive term.
        temperature: softmax temperature of the similarity-contrastive loss; None takes the paper's
            (2.0 unsupervised, 0.1 supervised).
        contrast_positions: anchor positions per image and pair in the contrastive and margin terms
            (all positions when a map has fewer); the softmax runs over every position.
        normal_margin: normal positions: the probability of their own position is pushed up to this.
        defect_margin: defect positions (supervised): that probability is pushed below this.
        decision_alpha: alpha of the weighted decision (upper limit of the share of pixels in the score).
        decision_beta: beta of the weighted decision (lower limit of that share).
    """

    supervised: bool = False
    bottleneck_channels: int = 256
    mem_blocks: int = 3
    target_lr_ratio: float = 2e-4
    cosine_weight: float = 0.7
    temperature: float | None = None
    contrast_positions: int = 256
    normal_margin: float = 1.0
    defect_margin: float = 0.5
    decision_alpha: float = 0.01
    decision_beta: float = 3e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature is None:
            self.temperature = SUPERVISED_TEMPERATURE if self.supervised else UNSUPERVISED_TEMPERATURE
        if self.mem_blocks < 1:
            raise ValueError(f"UniNetConfig.mem_blocks must be >= 1, got {self.mem_blocks}")


class _ScaledOffset(nn.Module):
    """Parametrization ``weight = base + ratio * offset`` with a learned offset, zeros at the start."""

    def __init__(self, base: torch.Tensor, ratio: float) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros_like(base))
        self.ratio = ratio

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.ratio * self.offset


class TargetTeacher(nn.Module):
    """Learnable copy of the source teacher: (B, 3, H, W) -> three maps at strides 4, 8, 16.

    Every weight is ``base + lr_ratio * offset``: ``base`` is a frozen copy of the source teacher's
    weight, ``offset`` the trained parameter (zeros at the start, so the two teachers agree until training
    moves the target one). Batch norm is not frozen: it follows the model's train/eval mode.

    Args:
        source: the frozen source teacher to copy.
        lr_ratio: how much slower than the other parameters the weights move.
    """

    def __init__(self, source: FrozenEncoder, lr_ratio: float) -> None:
        super().__init__()
        self.tiny = source.tiny
        self.network = copy.deepcopy(source.network)
        for module in list(self.network.modules()):
            for name, weight in list(module.named_parameters(recurse=False)):
                parametrize.register_parametrization(module, name, _ScaledOffset(weight, lr_ratio))
        for name, weight in self.network.named_parameters():
            weight.requires_grad_(name.endswith(".offset"))

    def offsets(self) -> list[nn.Parameter]:
        """The trained parameters (one per weight of the network)."""
        return [w for name, w in self.network.named_parameters() if name.endswith(".offset")]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> [(B, C_i, ceil(H / s), ceil(W / s)) for s in 4, 8, 16]."""
        if self.tiny:
            features = self.network.forward_features(x)
        else:
            features = self.network.forward_features(x, max_stride=16)
        return list(features[1:4])


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (padding keeps ceil(size / stride)) -> BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class MultiScaleEmbeddingBlock(nn.Module):
    """MEM block: half the channels through 3 x 3 convolutions, half through 7 x 7, a 1 x 1 projection
    of both and a residual shortcut. (B, C_in, h, w) -> (B, C_out, ceil(h / stride), ceil(w / stride)).

    Args:
        in_channels: C_in (even).
        out_channels: C_out.
        stride: 1 or 2, applied by the first convolution of each branch and by the shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels % 2:
            raise ValueError(f"a MEM block splits its input in halves; got {in_channels} channels")
        half_in, half_width = in_channels // 2, max(1, out_channels // 4)
        self.branches = nn.ModuleList(
            nn.Sequential(
                conv_bn(half_in, half_width, kernel, stride),
                nn.ReLU(inplace=True),
                conv_bn(half_width, half_width, kernel),
            )
            for kernel in (3, 7)
        )
        self.project = conv_bn(2 * half_width, out_channels, 1)
        self.shortcut = (
            conv_bn(in_channels, out_channels, 1, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = x.chunk(2, dim=1)
        mixed = torch.cat([branch(half) for branch, half in zip(self.branches, halves, strict=True)], 1)
        return F.relu(self.project(mixed) + self.shortcut(x))


class UniNetBottleneck(nn.Module):
    """Multi-scale fusion + MEM: three teacher levels -> (B, E, ceil(H / 32), ceil(W / 32)).

    The stride-4 and stride-8 levels are brought to stride 16 and to the stride-16 level's width C_2 by
    strided 3 x 3 convolutions (two and one), concatenated with the stride-16 level (3 * C_2 channels) and
    passed through ``blocks`` MEM blocks, the first with stride 2.

    Args:
        channels: channels of the teacher levels at strides 4, 8, 16.
        out_channels: E, the embedding width.
        blocks: number of MEM blocks.
    """

    def __init__(self, channels: tuple[int, ...], out_channels: int, blocks: int = 3) -> None:
        super().__init__()
        width = channels[2]
        self.to_stride16 = nn.ModuleList(
            [
                nn.Sequential(
                    conv_bn(channels[0], width, 3, 2),
                    nn.ReLU(inplace=True),
                    conv_bn(width, width, 3, 2),
                    nn.ReLU(inplace=True),
                ),
                nn.Sequential(conv_bn(channels[1], width, 3, 2), nn.ReLU(inplace=True)),
            ]
        )
        in_channels = 3 * width + (3 * width) % 2  # MEM splits in halves: pad an odd width by one channel
        self.pad = in_channels - 3 * width
        self.blocks = nn.Sequential(
            MultiScaleEmbeddingBlock(in_channels, out_channels, stride=2),
            *(MultiScaleEmbeddingBlock(out_channels, out_channels) for _ in range(blocks - 1)),
        )

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, h_i, w_i) at strides 4, 8, 16] -> (B, E, ceil(h_16 / 2), ceil(w_16 / 2))."""
        fused = torch.cat(
            [down(level) for down, level in zip(self.to_stride16, levels[:2], strict=True)] + [levels[2]], 1
        )
        if self.pad:
            fused = F.pad(fused, (0, 0, 0, 0, 0, self.pad))
        return self.blocks(fused)


class DomainFeatureSelection(nn.Module):
    """DFS: student maps times spatial weights derived from their teachers' maps (training only).

    For a teacher map t and student map s of one pair (B, C, h, w), with N = h * w positions:

        prior  = relu(t) / rms(relu(t))                      (per image; see the README: Lite0 is linear)
        w[c, i] = N * softmax_i(prior[c, i]) * (theta_c + mean_i prior[c, i])
        selected = s * w

    ``theta_c = min(0.5 + sigmoid(phi_c), 1)``, one learned ``phi`` per channel and level shared by the
    two teachers' pairs, 0 at the start (theta = 1). The factor N only rescales (the losses compare
    directions); it keeps the weights near 1 on average.

    Args:
        channels: channels of the teacher levels at strides 4, 8, 16.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.phi = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in channels)

    def theta(self, level: int) -> torch.Tensor:
        """(C,) theta of a level, in [0.5, 1]."""
        return (0.5 + torch.sigmoid(self.phi[level])).clamp(max=1.0)

    def weights(self, teacher: torch.Tensor, level: int) -> torch.Tensor:
        """Spatial selection weights: teacher map (B, C, h, w) -> (B, C, h, w), positive."""
        prior = F.relu(teacher)
        prior = prior / prior.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
        count = prior.shape[-2] * prior.shape[-1]
        spatial = torch.softmax(prior.flatten(2), dim=-1).view_as(prior) * count
        amount = self.theta(level).view(1, -1, 1, 1) + prior.mean(dim=(2, 3), keepdim=True)
        return spatial * amount

    def forward(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pairs of (B, C, h, w) maps, ordered by level within each teacher -> the selected student maps."""
        return [
            student * self.weights(teacher, index % NUM_LEVELS)
            for index, (student, teacher) in enumerate(zip(students, teachers, strict=True))
        ]


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels, (B, C, h, w) x2 -> (B, h, w); 1 where either vector is zero.

    Written out rather than F.cosine_similarity so that the ONNX graph computes the same at zero vectors
    (a ReLU teacher such as the tiny test pyramid has some).
    """
    dot = (teacher * student).sum(dim=1)
    norms = teacher.pow(2).sum(dim=1).sqrt() * student.pow(2).sum(dim=1).sqrt()
    return 1 - dot / norms.clamp_min(1e-8)


def weighted_decision(
    maps: list[torch.Tensor], anomaly_map: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Image scores by the weighted decision mechanism.

    Args:
        maps: the (B, h_k, w_k) 1 - cosine maps of the pairs, at feature resolution.
        anomaly_map: (B, H, W) their upsampled, summed and smoothed combination.
        alpha, beta: upper and lower factor of the share of pixels that count.

    Returns:
        (B,) mean of the top ``max(alpha * mean(selected peaks), beta) * H * W`` pixels of each map, the
        selected peaks being those whose softmax probability over the pairs is at least the mean.
    """
    peaks = torch.stack([m.flatten(1).amax(dim=1) for m in maps], dim=1)  # (B, K)
    probs = torch.softmax(peaks, dim=1)
    kept = (probs >= probs.mean(dim=1, keepdim=True)).float()
    share = ((peaks * kept).sum(dim=1) / kept.sum(dim=1) * alpha).clamp_min(beta)
    pixels = anomaly_map.flatten(1)
    count = (share * pixels.shape[1]).floor().clamp(1, pixels.shape[1]).long()  # (B,)
    ranked = pixels.sort(dim=1, descending=True).values.cumsum(dim=1)
    return ranked.gather(1, (count - 1).unsqueeze(1)).squeeze(1) / count.float()


class UniNetModel(AnomalyScorerMixin, PretrainedMixin, nn.Module):
    """UniNet scorer; see the module docstring.

    ``supervised`` is False on the class and follows ``config.supervised`` on an instance. Training mode:
    ``forward`` returns the six teacher maps (source levels, then target levels) and the student maps
    paired with them after DFS (:class:`DistillationOutput`) for :class:`UniNetLoss`. Eval mode: a
    :class:`SegmentationOutput` from calibrated pseudo-logits, its image score by the weighted decision.
    """

    config_class = UniNetConfig
    supervised = False

    def __init__(self, config: UniNetConfig) -> None:
        super().__init__()
        self.config = config
        self.supervised = config.supervised
        self.encoder = FrozenEncoder(config.pretrained, config.tiny)  # the source teacher
        self.target = TargetTeacher(self.encoder, config.target_lr_ratio)
        channels = self.encoder.channels
        self.bottleneck = UniNetBottleneck(channels, config.bottleneck_channels, config.mem_blocks)
        self.decoder = ReverseDecoder(config.bottleneck_channels, channels)
        self.selection = DomainFeatureSelection(channels)
        self.register_calibration()

    def pairs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) -> six teacher maps (source strides 4, 8, 16, then target) and the six student
        maps paired with them (decoded from the target, then from the source teacher's embedding)."""
        source = self.encoder(x)
        target = self.target(x)
        sizes = [level.shape[-2:] for level in source]
        embedding = self.bottleneck([torch.cat([t, s]) for t, s in zip(target, source, strict=True)])
        decoded = self.decoder(embedding, sizes)
        batch = x.shape[0]  # slices, not chunk(2): an exported graph keeps the batch size dynamic
        student = [level[:batch] for level in decoded] + [level[batch:] for level in decoded]
        return source + target, student

    def decide(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> raw anomaly map (B, H, W) and raw image scores (B,) (weighted decision)."""
        teacher, student = self.pairs(x)
        maps = [cosine_distance(t, s) for t, s in zip(teacher, student, strict=True)]
        total = torch.stack([upsample(m, x.shape[-2:]) for m in maps]).sum(dim=0)
        anomaly_map = gaussian_blur(total, self.config.smoothing_sigma)
        return anomaly_map, weighted_decision(
            maps, anomaly_map, self.config.decision_alpha, self.config.decision_beta
        )

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H, W): sum of the six upsampled 1 - cosine maps, Gaussian-smoothed."""
        return self.decide(x)[0]

    def eval_output(self, x: torch.Tensor) -> SegmentationOutput:
        """Maps and masks from the calibrated pseudo-logits; image score sigmoid((s - threshold) / scale)
        of the weighted decision's raw score s, in the same units as p(defect)."""
        assert self.config.defect_index is not None
        raw_map, raw_score = self.decide(x)
        logits = pseudo_logits(
            raw_map, self.threshold, self.scale, self.num_outputs, self.config.defect_index
        )
        output = FPNSegmenter.postprocess(logits)
        return replace(output, score=torch.sigmoid((raw_score - self.threshold) / self.scale))

    def forward(self, x: torch.Tensor) -> DistillationOutput | SegmentationOutput:
        """Training mode: teacher maps and DFS-selected student maps. Eval mode: a SegmentationOutput."""
        if not self.training:
            return self.eval_output(x)
        teacher, student = self.pairs(x)
        return DistillationOutput(teacher=teacher, student=self.selection(student, teacher))
