"""BAFPN student: shapes, cosine attention, checkpoints through the registry, loss and distillation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.student.bafpn import (
    BAFPNConfig,
    BAFPNLoss,
    BAFPNModel,
    CosineNonLocalAttention,
    distillation_loss,
)
from models.student.bafpn.torch_model import cosine_attention_weights
from models.student.fpn import FPNSegmenter, SegmentationOutput
from models.student.fpn.loss import IGNORE_INDEX
from models.student.registry import STUDENTS, build_student, load_student
from models.student.training import TrainConfig, train_segmenter

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 2


def tiny_bafpn(seed: int = 0, **overrides: object) -> BAFPNModel:
    torch.manual_seed(seed)
    return BAFPNModel(
        BAFPNConfig(num_classes=NUM_CLASSES, channels=16, image_size=64, tiny=True, **overrides)
    )


def open_gates(model: BAFPNModel, seed: int = 1) -> None:
    """Give the zero-initialised attention gates values, as training would, so attention changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.attention.values():
            block.gate.copy_(torch.randn(block.gate.shape, generator=generator))


# ---- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiny", "attention", "bottom_up"),
    [(True, True, True), (True, False, True), (True, True, False), (True, False, False), (False, True, True)],
    ids=["tiny-bafpn", "tiny-no-attention", "tiny-no-bottom-up", "tiny-plain-fpn", "lite0-bafpn"],
)
def test_output_shapes_in_train_and_eval(tiny: bool, attention: bool, bottom_up: bool) -> None:
    model = BAFPNModel(
        BAFPNConfig(
            num_classes=3, channels=16, pretrained=False, tiny=tiny, attention=attention, bottom_up=bottom_up
        )
    )
    x = torch.randn(2, 3, 64, 96)  # width not a multiple of 32 on purpose

    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 64, 96)
    levels = model.pyramid(x)
    assert [level.shape[-2:] for level in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)]

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 4, 64, 96)
    assert out.anomaly_map.shape == out.pred_mask.shape == (2, 64, 96)
    assert out.score.shape == (2,)
    assert torch.all((out.anomaly_map >= 0) & (out.anomaly_map <= 1))
    assert len(model.attention) == (2 if attention else 0)
    assert hasattr(model, "downsample") == bottom_up


def test_supervised_flag_and_config_checks() -> None:
    assert BAFPNModel.supervised is True
    with pytest.raises(ValueError, match="num_classes"):
        BAFPNConfig(num_classes=0)
    with pytest.raises(ValueError, match="attention_strides"):
        BAFPNConfig(num_classes=1, attention_strides=(12,))
    with pytest.raises(ValueError, match="attention_heads"):
        BAFPNConfig(num_classes=1, channels=30, attention_heads=4)
    assert BAFPNConfig(num_classes=1, attention_strides=[32]).attention_strides == (32,)  # from JSON


def test_zero_init_gate_makes_attention_an_identity() -> None:
    block = CosineNonLocalAttention(channels=16, heads=4)
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(block(x), x)
    assert block.attend(x.flatten(2).transpose(1, 2)).abs().sum() > 0  # the update itself is not zero

    # So at initialisation the whole model computes what the same network without attention computes.
    with_attention = tiny_bafpn(seed=0).eval()
    without = tiny_bafpn(seed=1, attention=False).eval()
    missing, unexpected = with_attention.load_state_dict(without.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("attention.") for key in missing)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(with_attention.segment(images), without.segment(images))
        open_gates(with_attention)
        assert not torch.allclose(with_attention.segment(images), without.segment(images))


def test_cosine_attention_rows_sum_to_one_and_ignore_vector_lengths() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, keys = (
        torch.randn(2, 4, 9, 8, generator=generator),
        torch.randn(2, 4, 11, 8, generator=generator),
    )
    temperature = torch.tensor([1.0, 5.0, 10.0, 50.0])
    weights = cosine_attention_weights(queries, keys, temperature)
    assert weights.shape == (2, 4, 9, 11)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 4, 9))
    assert torch.all(weights > 0)
    # Cosine, not dot product: rescaling a query or a key changes nothing.
    rescaled = cosine_attention_weights(queries * 7.0, keys * torch.rand(2, 4, 11, 1) * 3, temperature)
    assert torch.allclose(rescaled, weights, atol=1e-6)
    # A higher temperature sharpens the rows.
    assert weights[:, 3].amax(-1).mean() > weights[:, 0].amax(-1).mean()


def test_cosine_attention_is_permutation_equivariant_over_tokens() -> None:
    torch.manual_seed(0)
    block = CosineNonLocalAttention(channels=16, heads=4)
    with torch.no_grad():
        block.gate.fill_(0.5)
        tokens = torch.randn(2, 20, 16)
        permutation = torch.randperm(20)
        out = block.forward_tokens(tokens)
        assert torch.allclose(block.forward_tokens(tokens[:, permutation]), out[:, permutation], atol=1e-6)
        weights = block.attention_weights(tokens)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 20), atol=1e-6)
        assert not torch.allclose(out, tokens)


# ---- registry and checkpoints --------------------------------------------------------------------


def test_save_and_load_student_round_trip(tmp_path: Path) -> None:
    model = tiny_bafpn(seed=3, attention_strides=(8, 16, 32))
    open_gates(model)
    model.train()
    model(torch.randn(4, 3, 64, 64))  # move batch-norm statistics off their defaults
    model.eval()
    folder = model.save_pretrained(tmp_path / "bafpn", metadata={"image_threshold": 0.4})
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architecture"] == "BAFPNModel" and saved["image_threshold"] == 0.4

    loaded = load_student(folder)
    assert isinstance(loaded, BAFPNModel) and not loaded.training
    assert loaded.config == model.config
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.segment(images), model.segment(images))

    fpn = build_student("fpn", NUM_CLASSES, tiny=True, fpn_channels=8)
    assert isinstance(load_student(fpn.save_pretrained(tmp_path / "fpn")), FPNSegmenter)


def test_registry_errors_name_the_folder_and_the_known_students(tmp_path: Path) -> None:
    assert set(STUDENTS) >= {"fpn", "bafpn"}
    with pytest.raises(ValueError, match="known students: fpn"):
        build_student("resnet", NUM_CLASSES)
    with pytest.raises(ValueError, match="has no field"):
        build_student("bafpn", NUM_CLASSES, tiny=True, width=8)
    assert isinstance(build_student("bafpn", NUM_CLASSES, tiny=True, channels=8), BAFPNModel)

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_student(tmp_path / "nothing")
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "MysteryNet", "num_classes": 1}))
    with pytest.raises(ValueError, match=r"odd.*MysteryNet.*bafpn \(BAFPNModel\)"):
        load_student(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_student(folder)


# ---- loss ----------------------------------------------------------------------------------------


def squares(batch: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a bright square of class 1 or 2: (B, 3, S, S) and masks (B, S, S)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator) * 0.2
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for i in range(batch):
        top, left = torch.randint(0, size - 10, (2,), generator=generator).tolist()
        images[i, :, top : top + 10, left : left + 10] += 2.0 if i % 2 else -2.0
        masks[i, top : top + 10, left : left + 10] = 1 + i % 2
    return images, masks


def test_loss_decreases_on_a_tiny_overfit() -> None:
    model = tiny_bafpn(seed=0)
    model.train()
    images, masks = squares()
    teacher = (masks > 0).float() * 0.9
    teacher[0] = float("nan")  # no teacher map for this one
    loss_fn = BAFPNLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = loss_fn(model(images), masks, torch.ones(4), teacher_map=teacher, distill_weight=torch.ones(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert any(block.gate.abs().sum() > 0 for block in model.attention.values())  # the gates learn


def test_distillation_term_is_zero_at_weight_zero_and_positive_otherwise() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, NUM_CLASSES + 1, 8, 8, generator=generator)
    masks = torch.randint(0, NUM_CLASSES + 1, (3, 8, 8), generator=generator)
    masks[0, :2] = IGNORE_INDEX
    teacher = torch.rand(3, 8, 8, generator=generator)
    loss_fn = BAFPNLoss()
    base = loss_fn(logits, masks, torch.tensor([1.0, 0.5, 1.0]))

    assert distillation_loss(logits, teacher, torch.zeros(3)) == 0
    off = loss_fn(
        logits, masks, torch.tensor([1.0, 0.5, 1.0]), teacher_map=teacher, distill_weight=torch.zeros(3)
    )
    assert torch.equal(off, base)
    on = loss_fn(
        logits, masks, torch.tensor([1.0, 0.5, 1.0]), teacher_map=teacher, distill_weight=torch.ones(3)
    )
    assert on > base
    assert distillation_loss(logits, torch.full_like(teacher, float("nan"))) == 0

    # The BCE between 1 - p(background) and the map over pixels with a teacher value, per-sample weighted.
    teacher[1, :4] = float("nan")
    weights = torch.tensor([0.0, 1.0, 2.0])
    anomaly = 1 - logits.softmax(dim=1)[:, 0]
    present = ~teacher.isnan()
    bce = F.binary_cross_entropy(anomaly, teacher.nan_to_num(0.0), reduction="none")
    pixel_weights = weights.view(3, 1, 1) * present
    expected = (bce * pixel_weights).sum() / pixel_weights.sum()
    assert torch.allclose(distillation_loss(logits, teacher, weights), expected, atol=1e-5)


def test_distillation_stays_finite_for_confident_logits_and_pulls_towards_the_teacher() -> None:
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 60.0  # background with probability ~1 - 1e-26
    logits.requires_grad_(True)
    loss = distillation_loss(logits, torch.ones(1, 4, 4))
    loss.backward()
    assert torch.isfinite(loss) and loss > 50
    assert torch.all(logits.grad[:, 0] > 0)  # descending lowers the background logit


def test_loss_rejects_bad_teacher_inputs() -> None:
    logits, masks = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    loss_fn = BAFPNLoss()
    with pytest.raises(ValueError, match="teacher_map must be"):
        loss_fn(logits, masks, teacher_map=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_fn(logits, masks, teacher_map=torch.full((2, 8, 8), 3.0))
    with pytest.raises(ValueError, match="without teacher_map"):
        loss_fn(logits, masks, distill_weight=torch.ones(2))


def test_trains_with_the_shared_training_loop() -> None:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        image = rng.integers(90, 110, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        if i % 2:
            image[20:34, 20:34] = 240
            mask[20:34, 20:34] = 1
        samples.append((image, mask, 1.0))
    model = tiny_bafpn(seed=0)
    history = train_segmenter(
        model, samples, TrainConfig(epochs=2, batch_size=3, image_size=64), loss_fn=BAFPNLoss()
    )
    assert len(history) == 2 and all(np.isfinite(entry["loss"]) for entry in history)
    assert not model.training
