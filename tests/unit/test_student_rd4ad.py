"""RD4AD student and the anomaly training loop: shapes, pseudo-logits, calibration, checkpoints, loss,
which samples train an unsupervised model, and a short training on a normal texture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbone.efficientnet_lite import normalize
from models.student.anomaly_base import gaussian_blur, position_weights
from models.student.anomaly_training import AnomalyTrainConfig, normal_samples, train_anomaly_model
from models.student.fpn import SegmentationOutput
from models.student.rd4ad import DistillationOutput, RD4ADConfig, RD4ADLoss, RD4ADModel
from models.student.rd4ad.torch_model import InvertedResidual, OneClassBottleneck, ReverseDecoder
from tests.students import assert_onnx_matches_torch, fabric, normal_batch, settle_batch_norm, with_square

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_rd4ad(seed: int = 0, **overrides: object) -> RD4ADModel:
    torch.manual_seed(seed)
    settings: dict = {
        "num_classes": 2,
        "tiny": True,
        "image_size": 64,
        "bottleneck_channels": 32,
    }
    return RD4ADModel(RD4ADConfig(**{**settings, **overrides}))


def normal_samples_of(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return [(fabric(rng), np.zeros((64, 64), np.uint8), 1.0) for _ in range(count)]


# ---- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "lite0"])
def test_shapes_in_train_and_eval_mode(tiny: bool) -> None:
    model = tiny_rd4ad(tiny=tiny, pretrained=False)
    x = torch.randn(2, 3, 40, 56)  # sides not multiples of 32

    model.train()
    output = model(x)
    assert isinstance(output, DistillationOutput)
    expected = [
        (2, c, s_h, s_w)
        for c, (s_h, s_w) in zip(model.encoder.channels, [(10, 14), (5, 7), (3, 4)], strict=True)
    ]
    assert [tuple(t.shape) for t in output.teacher] == expected
    assert [tuple(s.shape) for s in output.student] == expected
    assert all(s.requires_grad for s in output.student) and not any(t.requires_grad for t in output.teacher)

    model.eval()
    with torch.no_grad():
        result = model(x)
    assert isinstance(result, SegmentationOutput)
    assert result.logits.shape == (2, 3, 40, 56)
    assert result.anomaly_map.shape == result.pred_mask.shape == (2, 40, 56)
    assert result.score.shape == (2,)


def test_decoder_mirrors_lite0_stages_in_reverse() -> None:
    model = tiny_rd4ad(tiny=False, pretrained=False, bottleneck_channels=320)
    stages = [
        [(b.depthwise[0].in_channels, b.project[0].out_channels, b.depthwise[0].kernel_size[0], b.upsample)
         for b in stage]
        for stage in model.decoder.stages
    ]  # fmt: skip
    # Lite0 stages 7, 6, 5, 4, 3: (output -> input width, kernel, blocks); the stride-2 ones upsample first.
    assert [len(stage) for stage in stages] == [1, 4, 3, 3, 2]
    assert [(s[0][1], s[0][2], s[0][3]) for s in stages] == [
        (192, 3, False),
        (112, 5, True),
        (80, 5, False),
        (40, 3, True),
        (24, 5, True),
    ]
    assert stages[0][0][0] == 320 * 6  # expansion 6 of the embedding
    assert not any(up for stage in stages for _, _, _, up in stage[1:])
    assert model.decoder.levels == (None, 2, None, 1, 0)
    # The OCE: Lite0 stages 6 (4 blocks, 5x5, stride 2 first) and 7 (1 block, 3x3, -> E).
    oce = [
        [(b.project[0].out_channels, b.depthwise[0].stride[0]) for b in s] for s in model.bottleneck.stages
    ]
    assert oce == [[(192, 2), (192, 1), (192, 1), (192, 1)], [(320, 1)]]


def test_decoder_keeps_the_call_used_by_uninet() -> None:
    channels = (8, 16, 16)
    bottleneck, decoder = OneClassBottleneck(channels, 32), ReverseDecoder(32, channels)
    levels = [torch.randn(2, c, h, w) for c, (h, w) in zip(channels, [(9, 13), (5, 7), (3, 4)], strict=True)]
    embedding = bottleneck(levels)
    assert embedding.shape == (2, 32, 2, 2)
    outputs = decoder(embedding, [level.shape[-2:] for level in levels])
    assert [o.shape for o in outputs] == [level.shape for level in levels]


def test_upsampling_block_hits_the_requested_size_and_plain_blocks_keep_theirs() -> None:
    up = InvertedResidual(16, 8, 5, 6, "up")
    assert up(torch.randn(1, 16, 3, 4), torch.Size([5, 7])).shape == (1, 8, 5, 7)
    down = InvertedResidual(8, 16, 5, 6, "down")
    assert down(torch.randn(1, 8, 5, 7)).shape == (1, 16, 3, 4)
    same = InvertedResidual(8, 8, 3, 6)
    assert same.use_residual and same(torch.randn(1, 8, 5, 7)).shape == (1, 8, 5, 7)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    model = tiny_rd4ad()
    settle_batch_norm(model, normal_batch(8, seed=9))
    model.calibrate(normal_batch(4))
    assert_onnx_matches_torch(model, tmp_path / "rd4ad.onnx", num_outputs=3)


def test_encoder_stays_frozen_in_training_mode() -> None:
    model = tiny_rd4ad().train()
    assert not model.encoder.training and model.decoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    lite0 = tiny_rd4ad(tiny=False, pretrained=False)
    assert lite0.encoder.channels == (24, 40, 112)


def test_segment_gives_pseudo_logits_with_p_defect_equal_to_sigmoid_z() -> None:
    model = tiny_rd4ad(num_classes=4).eval()
    model.threshold.fill_(0.3)
    model.scale.fill_(0.05)
    x = normal_batch(2)
    with torch.no_grad():
        z = (model.anomaly_map(x) - 0.3) / 0.05
        probs = model.segment(x).softmax(dim=1)
    torch.testing.assert_close(probs[:, 4], torch.sigmoid(z), atol=1e-5, rtol=1e-4)
    assert probs[:, 1:4].max() < 1e-6


def test_calibrate_puts_nearly_all_normal_pixels_below_the_threshold() -> None:
    model = tiny_rd4ad().eval()
    calibration = normal_batch(8, seed=1)
    model.calibrate(calibration)
    assert (model.raw_maps(calibration) > model.threshold).float().mean() <= 0.002
    with torch.no_grad():
        p_defect = model(normal_batch(4, seed=2)).anomaly_map
    assert (p_defect > 0.5).float().mean() < 0.05


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = tiny_rd4ad()
    model.calibrate(normal_batch(4))
    model.save_pretrained(tmp_path, metadata={"classes": ["hole", "defect"]})
    loaded = RD4ADModel.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.threshold == model.threshold
    x = normal_batch(2, seed=5)
    with torch.no_grad():
        expected, actual = model.eval()(x), loaded(x)
    assert torch.equal(expected.logits, actual.logits)


def test_loss_decreases_over_a_few_steps() -> None:
    model = tiny_rd4ad().train()
    images = normal_batch(4)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = RD4ADLoss()(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- shared helpers ------------------------------------------------------------------------------


def test_gaussian_blur_keeps_flat_maps_and_mass() -> None:
    flat = torch.full((1, 20, 30), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 20, 20] == blurred.max() and blurred[0, 20, 20] < 0.1
    assert gaussian_blur(torch.ones(1, 2, 2), 4.0).shape == (1, 2, 2)  # smaller than the kernel


def test_position_weights_count_normal_and_defect_shares_and_skip_unknown_pixels() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 3  # one 2x2 cell full of defect
    masks[0, 2:, :2] = 255  # one cell unknown
    masks[1, 0, 0] = 1  # a quarter of a cell
    normal, defect = position_weights(masks, torch.tensor([1.0, 0.5]), (2, 2))
    torch.testing.assert_close(normal[0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(defect[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(normal[1], torch.tensor([[0.375, 0.5], [0.5, 0.5]]))
    torch.testing.assert_close(defect[1], torch.tensor([[0.125, 0.0], [0.0, 0.0]]))


# ---- training loop -------------------------------------------------------------------------------


class RecordingLoss(torch.nn.Module):
    """RD4ADLoss that remembers the masks it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.masks.append(masks.clone())
        return RD4ADLoss()(output, masks, weights)


def test_unsupervised_training_uses_only_samples_without_defect_pixels() -> None:
    samples = normal_samples_of(4)
    defect_mask = np.zeros((64, 64), np.uint8)
    defect_mask[10:20, 10:20] = 1
    unknown_mask = np.full((64, 64), 255, np.uint8)  # unreviewed, not a defect
    samples += [(with_square(fabric(np.random.default_rng(7))), defect_mask, 1.0)] * 4
    samples += [(fabric(np.random.default_rng(8)), unknown_mask, 1.0)]
    samples[0] = (*samples[0], np.zeros((64, 64), np.float32))  # a teacher map is ignored
    assert len(normal_samples(samples)) == 5

    loss = RecordingLoss()
    config = AnomalyTrainConfig(epochs=2, batch_size=5, image_size=64, reference_crops=4)
    train_anomaly_model(tiny_rd4ad(), loss, samples, config)
    seen = torch.cat(loss.masks)
    assert len(seen) == 10  # 5 normal samples, twice
    assert not ((seen > 0) & (seen != 255)).any()
    assert (seen == 255).any()


def test_training_needs_a_normal_sample_and_is_deterministic() -> None:
    defect_mask = np.ones((64, 64), np.uint8)
    with pytest.raises(ValueError, match="free of defects"):
        train_anomaly_model(
            tiny_rd4ad(),
            RD4ADLoss(),
            [(fabric(np.random.default_rng(0)), defect_mask, 1.0)],
            AnomalyTrainConfig(),
        )
    config = AnomalyTrainConfig(epochs=2, batch_size=4, image_size=64, reference_crops=4)
    first = train_anomaly_model(tiny_rd4ad(seed=1), RD4ADLoss(), normal_samples_of(8), config)
    second = train_anomaly_model(tiny_rd4ad(seed=1), RD4ADLoss(), normal_samples_of(8), config)
    assert [h["loss"] for h in first] == [h["loss"] for h in second]
    assert all(h["images_per_s"] > 0 for h in first)


def test_short_training_scores_a_bright_square_above_plain_fabric() -> None:
    epochs_seen: list[int] = []
    model = tiny_rd4ad(tiny=False)  # the real ImageNet teacher: random tiny features say little
    config = AnomalyTrainConfig(epochs=8, batch_size=4, lr=5e-3, image_size=64, reference_crops=12)
    history = train_anomaly_model(
        model, RD4ADLoss(), normal_samples_of(12), config, on_epoch=lambda e, _: epochs_seen.append(e)
    )
    assert epochs_seen == list(range(8)) and history[-1]["loss"] < history[0]["loss"]

    held_out = np.random.default_rng(42)
    plains = [fabric(held_out) for _ in range(3)]
    square = with_square(fabric(held_out))
    with torch.no_grad():
        result = model(normalize(np.stack([square, *plains])))
    assert result.score[0] > result.score[1:].max()
    # The square's region stands well above plain fabric, which stays under the calibrated 0.5. Its own mean
    # after 8 epochs sits near 0.5 and on one machine fell just under it (0.455, plain fabric 0.073), so
    # the test holds the contrast, not that level.
    square_level, plain_level = result.anomaly_map[0, 20:34, 24:38].mean(), result.anomaly_map[1:].mean()
    assert square_level > 4 * plain_level and plain_level < 0.5
