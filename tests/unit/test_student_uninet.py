"""UniNet student: shapes, the two teachers, DFS, the weighted decision, pseudo-logits, calibration,
checkpoints, the loss's terms, supervised and unsupervised training."""

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
from models.student.uninet.torch_model import weighted_decision
from tests.students import assert_onnx_matches_torch, fabric, normal_batch, settle_batch_norm, with_square

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_uninet(seed: int = 0, **overrides: object) -> UniNetModel:
    torch.manual_seed(seed)
    settings: dict = {
        "num_classes": 1,
        "tiny": True,
        "image_size": 64,
        "bottleneck_channels": 32,
        "contrast_positions": 32,
    }
    return UniNetModel(UniNetConfig(**{**settings, **overrides}))


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
    # Six pairs: the source teacher's three levels, then the target teacher's.
    assert [t.shape[-2:] for t in output.teacher] == [(10, 14), (5, 7), (3, 4)] * 2
    model.eval()
    with torch.no_grad():
        result = model(x)
    assert isinstance(result, SegmentationOutput)
    assert result.logits.shape == (2, 3, 40, 56) and result.anomaly_map.shape == (2, 40, 56)
    assert result.score.shape == (2,) and ((result.score >= 0) & (result.score <= 1)).all()


def test_supervised_flag_and_temperature_follow_the_config() -> None:
    assert UniNetModel.supervised is False
    assert tiny_uninet().supervised is False
    assert tiny_uninet(supervised=True).supervised is True
    assert tiny_uninet().config.temperature == 2.0
    assert tiny_uninet(supervised=True).config.temperature == 0.1
    assert tiny_uninet(temperature=0.5).config.temperature == 0.5


def test_target_teacher_starts_as_the_source_and_only_it_trains() -> None:
    model = tiny_uninet().eval()
    x = normal_batch(2)
    with torch.no_grad():
        for source, target in zip(model.encoder(x), model.target(x), strict=True):
            torch.testing.assert_close(source, target)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    source_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    target_before = [t.detach().clone() for t in model.target(x)]

    model.train()
    loss_fn = UniNetLoss.from_config(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = loss_fn(model(x), torch.zeros(2, 64, 64, dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in source_before.items())
    assert any(offset.abs().sum() > 0 for offset in model.target.offsets())
    model.eval()
    with torch.no_grad():
        moved = [(t - before).abs().max() for t, before in zip(model.target(x), target_before, strict=True)]
    assert max(moved) > 0


def test_target_teacher_moves_target_lr_ratio_times_slower() -> None:
    model = tiny_uninet(target_lr_ratio=1e-3)
    conv = model.target.network.stages[0][0]
    base = conv.parametrizations.weight.original
    assert not base.requires_grad and conv.parametrizations.weight[0].offset.requires_grad
    with torch.no_grad():
        conv.parametrizations.weight[0].offset.fill_(2.0)
    torch.testing.assert_close(conv.weight, base + 2e-3)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in model.target.offsets()} <= trainable
    assert not any(id(p) in trainable for p in model.encoder.parameters())


def test_dfs_starts_at_theta_one_stays_in_range_and_weights_are_spatial() -> None:
    model = tiny_uninet()
    selection = model.selection
    assert all(
        torch.equal(selection.theta(level), torch.ones_like(selection.theta(level))) for level in range(3)
    )
    for phi in selection.phi:
        phi.data.fill_(-50.0)
    assert all(torch.all(selection.theta(level) >= 0.5) for level in range(3))

    teacher = torch.zeros(2, 8, 6, 6)
    teacher[:, :, 2, 3] = 5.0  # every channel fires at one position
    weights = selection.weights(teacher, 0)
    assert weights.shape == teacher.shape and (weights > 0).all()
    assert (weights[:, :, 2, 3] > 10 * weights[:, :, 0, 0]).all()  # weights vary over positions
    # The selected student maps are the decoder's maps times these weights.
    student = torch.ones(2, 8, 6, 6)
    torch.testing.assert_close(selection([student], [teacher])[0], weights)


def test_weighted_decision_averages_the_top_share_of_pixels() -> None:
    anomaly_map = torch.zeros(2, 10, 10)
    anomaly_map[0].view(-1)[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    anomaly_map[1].view(-1)[:5] = 1.0
    peaks = [torch.full((2, 3, 3), 2.0), torch.full((2, 3, 3), 2.0)]  # both kept, mean 2
    # alpha 0.015: share 0.03 -> the top 3 of 100 pixels.
    scores = weighted_decision(peaks, anomaly_map, alpha=0.015, beta=1e-4)
    torch.testing.assert_close(scores, torch.tensor([4.0, 1.0]))
    # beta floors the share: at least one pixel, the maximum.
    scores = weighted_decision([torch.zeros(2, 3, 3)], anomaly_map, alpha=0.015, beta=1e-4)
    torch.testing.assert_close(scores, torch.tensor([5.0, 1.0]))


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


def test_calibrate_puts_normal_pixels_below_the_threshold() -> None:
    model = tiny_uninet().eval()
    calibration = normal_batch(8, seed=1)
    model.calibrate(calibration)
    assert model.scale > 0
    assert (model.raw_maps(calibration) > model.threshold).float().mean() <= 0.002
    with torch.no_grad():
        assert (model(normal_batch(4, seed=2)).anomaly_map > 0.5).float().mean() < 0.05


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = tiny_uninet(supervised=True)
    with torch.no_grad():
        for offset in model.target.offsets():
            offset.normal_()  # a trained target teacher differs from the source
        model.selection.phi[0].normal_()
    model.calibrate(normal_batch(4))
    model.save_pretrained(tmp_path)
    loaded = UniNetModel.from_pretrained(tmp_path)
    assert loaded.supervised is True and loaded.config.temperature == 0.1
    x = normal_batch(2, seed=5)
    with torch.no_grad():
        expected, actual = model.eval()(x), loaded(x)
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.score, actual.score)
    assert torch.equal(model.selection.theta(0), loaded.selection.theta(0))


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    model = tiny_uninet()
    with torch.no_grad():
        for offset in model.target.offsets():
            offset.normal_()
    settle_batch_norm(model, normal_batch(8, seed=9))
    model.calibrate(normal_batch(4))
    assert_onnx_matches_torch(model, tmp_path / "uninet.onnx", num_outputs=2)


def test_margin_term_pushes_labelled_defect_positions_away_from_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 6, 6)]
    perfect = DistillationOutput(teacher=teacher, student=[teacher[0].clone()])
    normal_masks = torch.zeros(2, 12, 12, dtype=torch.long)
    defect_masks = normal_masks.clone()
    defect_masks[:, :6, :6] = 1
    loss = UniNetLoss(temperature=0.1, contrast_positions=36)
    # A student that copies the teacher everywhere is right on normal positions, wrong on defects.
    assert loss(perfect, defect_masks) > loss(perfect, normal_masks) + 0.1
    unrelated = DistillationOutput(teacher=teacher, student=[torch.randn(2, 8, 6, 6)])
    assert loss(perfect, normal_masks) < loss(unrelated, normal_masks) - 0.3
    opposite = DistillationOutput(
        teacher=teacher, student=[torch.where(defect_masks[:, None, ::2, ::2] > 0, -teacher[0], teacher[0])]
    )
    assert loss(opposite, defect_masks) < loss(perfect, defect_masks)


def test_contrastive_term_prefers_the_own_position_over_a_copy_of_the_average() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(1, 8, 6, 6) + 2.0  # a shared component, like a uniform weave
    average = teacher.mean(dim=(2, 3), keepdim=True).expand_as(teacher)
    masks = torch.zeros(1, 12, 12, dtype=torch.long)
    loss = UniNetLoss(cosine_weight=0.0, temperature=0.1, contrast_positions=36)
    own = DistillationOutput(teacher=[teacher], student=[teacher.clone()])
    painted = DistillationOutput(teacher=[teacher], student=[average.contiguous()])
    assert loss(own, masks) < loss(painted, masks) - 1.0


def test_ignored_pixels_count_as_neither_normal_nor_defect() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 6, 6)]
    output = DistillationOutput(teacher=teacher, student=[torch.randn(2, 8, 6, 6)])
    masks = torch.zeros(2, 12, 12, dtype=torch.long)
    masks[:, :, :6] = 255
    loss = UniNetLoss(contrast_positions=36)
    half = DistillationOutput(teacher=[teacher[0][..., 3:]], student=[output.student[0][..., 3:]])
    # The cosine term over the unignored half equals the same term on that half alone.
    only_cosine = UniNetLoss(cosine_weight=1.0, normal_margin=0.0, contrast_positions=36)
    torch.testing.assert_close(
        only_cosine(output, masks), only_cosine(half, torch.zeros(2, 12, 6, dtype=torch.long))
    )
    assert torch.isfinite(loss(output, masks))


def test_loss_is_finite_and_decreases_over_a_few_steps() -> None:
    model = tiny_uninet().train()
    images = normal_batch(4)
    masks = torch.zeros(4, 64, 64, dtype=torch.long)
    loss_fn = UniNetLoss.from_config(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same contrastive anchors each step
        loss = loss_fn(model(images), masks)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # At temperature 2 the contrastive and margin terms sit near log(N) and 1; the fall is in the cosine.
    assert losses[-1] < losses[0] - 0.5


class RecordingLoss(UniNetLoss):
    def __init__(self) -> None:
        super().__init__(contrast_positions=32)
        self.defect_pixels = 0
        self.defect_anchor_weight = 0.0

    def forward(self, output: DistillationOutput, masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.defect_pixels += int(((masks > 0) & (masks != 255)).sum())
        return super().forward(output, masks, weights)

    def pair_loss(self, teacher, student, normal, defect):  # type: ignore[no-untyped-def]
        self.defect_anchor_weight += float(defect.sum())
        return super().pair_loss(teacher, student, normal, defect)


@pytest.mark.parametrize("supervised", [False, True], ids=["unsupervised", "supervised"])
def test_training_uses_defect_positions_only_when_supervised(supervised: bool) -> None:
    loss = RecordingLoss()
    config = AnomalyTrainConfig(epochs=1, batch_size=4, image_size=64, reference_crops=4)
    train_anomaly_model(tiny_uninet(supervised=supervised), loss, square_samples(4, 4), config)
    assert (loss.defect_pixels > 0) == supervised
    assert (loss.defect_anchor_weight > 0) == supervised


def test_anchors_draw_defect_positions_when_there_are_some() -> None:
    from models.student.uninet.loss import anchor_positions

    normal = torch.ones(4, 400)
    defect = torch.zeros(4, 400)
    defect[:, :8] = 1.0
    normal[:, :8] = 0.0
    anchors = anchor_positions(normal, defect, 32)
    assert anchors.shape == (4, 32)
    assert all(len(set(row.tolist())) == 32 for row in anchors)
    assert ((anchors < 8).sum(dim=1) >= 4).all()  # about half would be 16; at random, 32 / 400 * 8 < 1


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
    inside = result.anomaly_map[0, 20:34, 24:38].mean()
    # Contrast, not a calibrated level: after 8 epochs the supervised square's mean ranges 0.36-0.4 from
    # one CPU to another (plain fabric ~0.05-0.1, its brightest pixel ~0.32).
    assert inside > result.anomaly_map[1:].amax() and inside > 3 * result.anomaly_map[1:].mean()
