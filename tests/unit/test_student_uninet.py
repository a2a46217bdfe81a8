"""UniNet student: shapes, pseudo-logits, calibration, checkpoints, the loss's terms, supervised and
unsupervised training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbone.efficientnet_lite import normalize
from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.fpn import SegmentationOutput
from models.student.rd4ad import DistillationOutput
from models.student.uninet import UniNetConfig, UniNetLoss, UniNetModel

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_uninet(seed: int = 0, **overrides: object) -> UniNetModel:
    torch.manual_seed(seed)
    settings: dict = {
        "num_classes": 1,
        "tiny": True,
        "image_size": 64,
        "bottleneck_channels": 32,
        "decoder_channels": 8,
        "contrast_positions": 32,
    }
    return UniNetModel(UniNetConfig(**{**settings, **overrides}))


def fabric(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A grey weave-like texture, (size, size, 3) uint8."""
    yy, xx = np.mgrid[:size, :size]
    weave = 100 + 12 * np.sin(xx * 1.3) * np.sin(yy * 1.3) + rng.normal(0, 4, (size, size))
    return np.repeat(np.clip(weave, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def with_square(image: np.ndarray, top: int = 20, left: int = 24, side: int = 14) -> np.ndarray:
    image = image.copy()
    image[top : top + side, left : left + side] = 240
    return image


def normal_batch(count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return normalize(np.stack([fabric(rng) for _ in range(count)]))


def square_samples(n_normal: int, n_defect: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    samples = [(fabric(rng), np.zeros((64, 64), np.uint8), 1.0) for _ in range(n_normal)]
    for _ in range(n_defect):
        top, left = rng.integers(0, 50, size=2)
        mask = np.zeros((64, 64), np.uint8)
        mask[top : top + 14, left : left + 14] = 1
        samples.append((with_square(fabric(rng), int(top), int(left)), mask, 1.0))
    return samples


def test_shapes_in_train_and_eval_mode() -> None:
    model = tiny_uninet(num_classes=2)
    x = torch.randn(2, 3, 40, 56)
    model.train()
    output = model(x)
    assert isinstance(output, DistillationOutput)
    assert [t.shape for t in output.teacher] == [s.shape for s in output.student]
    assert [t.shape[-2:] for t in output.teacher] == [(10, 14), (5, 7), (3, 4)]
    model.eval()
    with torch.no_grad():
        result = model(x)
    assert isinstance(result, SegmentationOutput)
    assert result.logits.shape == (2, 3, 40, 56) and result.anomaly_map.shape == (2, 40, 56)
    assert result.score.shape == (2,)


def test_supervised_flag_follows_the_config() -> None:
    assert UniNetModel.supervised is False
    assert tiny_uninet().supervised is False
    assert tiny_uninet(supervised=True).supervised is True


def test_feature_selection_starts_neutral_and_stays_in_range() -> None:
    model = tiny_uninet()
    assert all(torch.equal(w, torch.ones_like(w)) for w in model.selection.weights())
    for logit in model.selection.logits:
        logit.data.fill_(50.0)
    assert all(torch.all(w <= 1.5) for w in model.selection.weights())


def test_segment_gives_pseudo_logits_with_p_defect_equal_to_sigmoid_z() -> None:
    model = tiny_uninet(num_classes=3).eval()
    model.threshold.fill_(2.0)
    model.scale.fill_(0.5)
    x = normal_batch(2)
    with torch.no_grad():
        z = (model.anomaly_map(x) - 2.0) / 0.5
        probs = model.segment(x).softmax(dim=1)
    torch.testing.assert_close(probs[:, 3], torch.sigmoid(z), atol=1e-5, rtol=1e-4)
    assert probs[:, 1:3].max() < 1e-6


def test_calibrate_standardises_levels_and_puts_normal_pixels_below_the_threshold() -> None:
    model = tiny_uninet().eval()
    calibration = normal_batch(8, seed=1)
    model.calibrate(calibration)
    assert not torch.equal(model.level_scale, torch.ones(3)) and (model.level_scale > 0).all()
    assert (model.raw_maps(calibration) > model.threshold).float().mean() <= 0.002
    with torch.no_grad():
        assert (model(normal_batch(4, seed=2)).anomaly_map > 0.5).float().mean() < 0.05


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = tiny_uninet(supervised=True)
    model.calibrate(normal_batch(4))
    model.save_pretrained(tmp_path)
    loaded = UniNetModel.from_pretrained(tmp_path)
    assert loaded.supervised is True
    assert torch.equal(loaded.level_center, model.level_center)
    x = normal_batch(2, seed=5)
    with torch.no_grad():
        expected, actual = model.eval()(x), loaded(x)
    assert torch.equal(expected.logits, actual.logits)


def test_margin_term_pushes_labelled_defect_positions_away_from_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 6, 6)]
    perfect = DistillationOutput(teacher=teacher, student=[teacher[0].clone()])
    normal_masks = torch.zeros(2, 12, 12, dtype=torch.long)
    defect_masks = normal_masks.clone()
    defect_masks[:, :6, :6] = 1
    loss = UniNetLoss(contrast_positions=36)
    # A student that copies the teacher everywhere is right on normal positions, wrong on defects.
    assert loss(perfect, defect_masks) > loss(perfect, normal_masks) + 0.3
    unrelated = DistillationOutput(teacher=teacher, student=[torch.randn(2, 8, 6, 6)])
    assert loss(perfect, normal_masks) < loss(unrelated, normal_masks) - 0.3
    opposite = DistillationOutput(
        teacher=teacher, student=[torch.where(defect_masks[:, None, ::2, ::2] > 0, -teacher[0], teacher[0])]
    )
    assert loss(opposite, defect_masks) < loss(perfect, defect_masks)


def test_loss_decreases_over_a_few_steps() -> None:
    model = tiny_uninet().train()
    images = normal_batch(4)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    loss_fn = UniNetLoss.from_config(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same contrastive positions each step
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


class RecordingLoss(UniNetLoss):
    def __init__(self) -> None:
        super().__init__(contrast_positions=32)
        self.defect_pixels = 0

    def forward(self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.defect_pixels += int(((masks > 0) & (masks != 255)).sum())
        return super().forward(output, masks, weights)


@pytest.mark.parametrize("supervised", [False, True], ids=["unsupervised", "supervised"])
def test_training_sees_defects_only_when_supervised(supervised: bool) -> None:
    loss = RecordingLoss()
    config = AnomalyTrainConfig(epochs=1, batch_size=4, image_size=64, reference_crops=4)
    train_anomaly_model(tiny_uninet(supervised=supervised), loss, square_samples(4, 4), config)
    assert (loss.defect_pixels > 0) == supervised


@pytest.mark.parametrize("supervised", [False, True], ids=["unsupervised", "supervised"])
def test_short_training_scores_a_bright_square_above_plain_fabric(supervised: bool) -> None:
    model = tiny_uninet(tiny=False, supervised=supervised)  # the real ImageNet teacher
    config = AnomalyTrainConfig(epochs=8, batch_size=4, lr=5e-3, image_size=64, reference_crops=12)
    samples = square_samples(12, 6 if supervised else 0)
    history = train_anomaly_model(model, UniNetLoss.from_config(model.config), samples, config)
    assert history[-1]["loss"] < history[0]["loss"]

    held_out = np.random.default_rng(42)
    plains = [fabric(held_out) for _ in range(3)]
    square = with_square(fabric(held_out))
    with torch.no_grad():
        result = model(normalize(np.stack([square, *plains])))
    assert result.score[0] > result.score[1:].max()
    assert result.anomaly_map[0, 20:34, 24:38].mean() > 0.5 > result.anomaly_map[1:].mean()
