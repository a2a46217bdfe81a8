"""FPN student: shapes, checkpoints, loss, training loop and tiled inference (tiny inputs, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.student.fpn import FPNConfig, FPNSegmenter, SegmentationLoss, SegmentationOutput
from models.student.fpn.loss import IGNORE_INDEX
from models.student.training import (
    SegmentationSamples,
    TrainConfig,
    defect_oversampler,
    predict_images,
    train_segmenter,
)

NUM_CLASSES = 2


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed: int = 0, image_size: int = 64) -> FPNSegmenter:
    torch.manual_seed(seed)
    return FPNSegmenter(FPNConfig(num_classes=NUM_CLASSES, fpn_channels=32, image_size=image_size, tiny=True))


def fabric(rng: np.random.Generator, height: int = 64, width: int = 64) -> np.ndarray:
    """A plain grey weave-like texture, (H, W, 3) uint8."""
    yy, xx = np.mgrid[:height, :width]
    weave = 100 + 12 * np.sin(xx * 1.3) * np.sin(yy * 1.3)
    noise = rng.normal(0, 4, (height, width))
    gray = np.clip(weave + noise, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def with_square(image: np.ndarray, rng: np.random.Generator, side: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Paint a bright square (class 1) at a random place; returns the image and its mask."""
    image, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    top = int(rng.integers(0, image.shape[0] - side))
    left = int(rng.integers(0, image.shape[1] - side))
    image[top : top + side, left : left + side] = 240
    mask[top : top + side, left : left + side] = 1
    return image, mask


def square_dataset(n_normal: int, n_defect: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    samples = [(fabric(rng), np.zeros((64, 64), np.uint8), 1.0) for _ in range(n_normal)]
    samples += [(*with_square(fabric(rng), rng), 1.0) for _ in range(n_defect)]
    return samples


# ---- model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "lite0"])
def test_output_shapes_in_train_and_eval(tiny: bool) -> None:
    model = FPNSegmenter(FPNConfig(num_classes=3, fpn_channels=16, pretrained=False, tiny=tiny))
    x = torch.randn(2, 3, 64, 96)  # width not a multiple of 32 on purpose

    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 4, 64, 96)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 4, 64, 96)
    assert out.anomaly_map.shape == (2, 64, 96)
    assert out.pred_mask.shape == (2, 64, 96) and out.pred_mask.max() <= 3
    assert out.score.shape == (2,)
    assert torch.all((out.anomaly_map >= 0) & (out.anomaly_map <= 1))
    assert torch.allclose(out.anomaly_map, 1 - out.logits.softmax(1)[:, 0])


def test_preprocess_gives_normalised_channels_first_tensor() -> None:
    model = tiny_model()
    images = np.full((2, 8, 10, 3), 255, np.uint8)
    x = model.preprocess(images)
    assert x.shape == (2, 3, 8, 10) and x.dtype == torch.float32
    assert x.max() < 1.5  # normalised, not 0..255
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess(images.astype(np.float32))


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FPNSegmenter(FPNConfig(num_classes=NUM_CLASSES, fpn_channels=16, pretrained=False)).eval()
    model.save_pretrained(tmp_path, metadata={"image_threshold": 0.7, "classes": ["hole", "stain"]})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == NUM_CLASSES and config["image_threshold"] == 0.7

    loaded = FPNSegmenter.from_pretrained(tmp_path)
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.score, actual.score)


def test_from_pretrained_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        FPNSegmenter.from_pretrained(tmp_path)


def test_config_round_trips_through_json_and_ignores_metadata() -> None:
    config = FPNConfig(num_classes=4, fpn_channels=32, pretrained=False, image_size=128, tiny=True)
    data = json.loads(json.dumps({**config.to_dict(), "image_threshold": 0.3}))
    assert FPNConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="num_classes"):
        FPNConfig(num_classes=0)


# ---- loss ----------------------------------------------------------------------------------------


def test_loss_is_small_for_a_confident_correct_prediction_and_large_for_a_wrong_one() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    correct = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    wrong = torch.nn.functional.one_hot(torch.zeros_like(target), 3).permute(0, 3, 1, 2).float() * 20
    loss = SegmentationLoss()
    assert loss(correct, target) < 1e-3
    assert loss(wrong, target) > 1.0


def test_zero_weight_samples_do_not_count() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    loss = SegmentationLoss()
    alone = loss(logits[:1], target[:1])
    masked = loss(logits, target, torch.tensor([1.0, 0.0]))
    assert torch.allclose(alone, masked, atol=1e-6)
    # A lower weight on a worse sample lowers the loss.
    assert loss(logits, target, torch.tensor([1.0, 0.5])) != loss(logits, target)


def test_ignore_index_pixels_do_not_count() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 3, (1, 8, 8))
    noisy = target.clone()
    noisy[:, :4] = IGNORE_INDEX
    per_pixel = torch.ones(1, 8, 8)
    per_pixel[:, :4] = 0
    loss = SegmentationLoss()
    assert torch.allclose(loss(logits, noisy), loss(logits, target, per_pixel), atol=1e-6)


def test_dice_skips_classes_absent_from_the_targets() -> None:
    # All-background target: only cross-entropy acts, so CE-only and CE+Dice agree.
    logits = torch.randn(2, 3, 8, 8)
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    assert torch.allclose(SegmentationLoss()(logits, target), SegmentationLoss(dice_weight=0)(logits, target))


def test_loss_decreases_over_a_few_steps_on_a_trivial_dataset() -> None:
    samples = square_dataset(n_normal=2, n_defect=2)
    images = torch.stack([SegmentationSamples(samples, 64, augment=False)[i][0] for i in range(4)])
    masks = torch.stack([torch.from_numpy(m).long() for _, m, _ in samples])
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = SegmentationLoss()
    losses = []
    for _ in range(15):
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- data and training loop ----------------------------------------------------------------------


def test_samples_crop_pad_and_keep_masks_aligned() -> None:
    rng = np.random.default_rng(1)
    big_image, big_mask = with_square(fabric(rng, 96, 160), rng, side=20)
    small_image, small_mask = with_square(fabric(rng, 40, 50), rng, side=8)
    dataset = SegmentationSamples([(big_image, big_mask, 1.0), (small_image, small_mask, 0.5)], image_size=64)
    torch.manual_seed(0)
    for index in [0, 1] * 10:
        x, mask, weight = dataset[index]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        assert weight.item() == (1.0 if index == 0 else 0.5)
        if mask.any():  # the bright square and its label moved together
            brightness = x.mean(0)
            assert brightness[mask == 1].min() > brightness[mask == 0].max()


def test_teacher_maps_are_cropped_and_turned_with_the_masks_and_reach_the_loss() -> None:
    rng = np.random.default_rng(2)
    image, mask = with_square(fabric(rng, 96, 160), rng, side=20)
    teacher_map = (mask > 0).astype(np.float32)  # the teacher agrees with the mask exactly
    samples = [(image, mask, 0.5, teacher_map), (image, mask, 1.0, None)]
    dataset = SegmentationSamples(samples, image_size=64)
    torch.manual_seed(0)
    for index in [0, 1] * 10:
        _, crop_mask, _, crop_map = dataset[index]
        assert crop_map.shape == (64, 64)
        if index == 0:
            assert torch.equal(crop_map > 0.5, crop_mask > 0)
        else:
            assert torch.isnan(crop_map).all()  # no teacher map: nothing to distil from

    seen: list[torch.Tensor] = []

    def loss_fn(logits, target, weights, teacher_map=None):
        seen.append(teacher_map)
        return logits.square().mean()

    model = FPNSegmenter(FPNConfig(num_classes=1, tiny=True, image_size=64))
    train_segmenter(model, dataset, TrainConfig(epochs=1, batch_size=2, image_size=64), loss_fn=loss_fn)
    assert seen and all(t is not None and t.shape == (2, 64, 64) for t in seen)


def test_samples_reject_a_mask_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="sample 0"):
        SegmentationSamples([(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.uint8), 1.0)])


def test_oversampler_draws_defect_images_about_half_the_time() -> None:
    dataset = SegmentationSamples(square_dataset(n_normal=18, n_defect=2), image_size=64)
    sampler = defect_oversampler(dataset, torch.Generator().manual_seed(0))
    draws = [i for _ in range(50) for i in sampler]
    defect_share = np.mean([i >= 18 for i in draws])
    assert 0.4 < defect_share < 0.6


def test_training_is_deterministic_with_a_seed() -> None:
    samples = square_dataset(n_normal=4, n_defect=4)
    config = TrainConfig(epochs=1, batch_size=4, image_size=64, freeze_backbone_epochs=0)
    first = train_segmenter(tiny_model(seed=1), samples, config)
    second = train_segmenter(tiny_model(seed=1), samples, config)
    assert first[0]["loss"] == second[0]["loss"]


def test_short_training_scores_squares_above_plain_fabric() -> None:
    samples = square_dataset(n_normal=16, n_defect=16)
    config = TrainConfig(epochs=6, batch_size=8, lr=1e-2, image_size=64, freeze_backbone_epochs=0)
    epochs_seen: list[int] = []
    model = tiny_model()
    history = train_segmenter(model, samples, config, on_epoch=lambda epoch, _: epochs_seen.append(epoch))
    assert epochs_seen == list(range(6))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert all(h["images_per_s"] > 0 and h["seconds"] > 0 for h in history)

    rng = np.random.default_rng(99)  # new images, unseen in training
    squares = [with_square(fabric(rng), rng) for _ in range(3)]
    plains = [fabric(rng) for _ in range(3)]
    results = predict_images(model, [image for image, _ in squares] + plains)
    square_scores, plain_scores = [r[2] for r in results[:3]], [r[2] for r in results[3:]]
    assert min(square_scores) > max(plain_scores) + 0.3
    for (anomaly_map, mask, _), (_, truth) in zip(results[:3], squares, strict=True):
        assert anomaly_map[truth == 1].mean() > anomaly_map[truth == 0].mean() + 0.5
        assert (mask[truth == 1] == 1).mean() > 0.5  # named as class 1, not only "not background"


class BrightnessSegmenter(torch.nn.Module):
    """Per-pixel rule (bright = class 1) with no spatial context: tiled output must equal the rule exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = x.mean(dim=1, keepdim=True)  # (B, 1, H, W), about -1..1
        return torch.cat([torch.zeros_like(brightness), self.gain * brightness], dim=1)


def test_predict_images_tiles_a_long_line_scan_frame() -> None:
    rng = np.random.default_rng(0)
    frame, square = with_square(fabric(rng, 64, 512), rng, side=10)
    ((anomaly_map, mask, score),) = predict_images(
        BrightnessSegmenter(), [frame], tile_overlap=16, tile_size=64
    )
    assert anomaly_map.shape == (64, 512) and anomaly_map.dtype == np.float32
    assert mask.shape == (64, 512) and mask.dtype == np.uint8
    assert isinstance(score, float) and score > 0.9
    np.testing.assert_array_equal(mask, square)  # stitched back in the right place, no seams

    ((untiled_map, _, _),) = predict_images(BrightnessSegmenter(), [frame], tile_size=512)
    np.testing.assert_allclose(anomaly_map, untiled_map, atol=1e-5)


def test_predict_images_runs_the_fpn_on_small_and_long_images() -> None:
    rng = np.random.default_rng(0)
    results = predict_images(tiny_model(image_size=64), [fabric(rng, 64, 512), fabric(rng, 40, 48)])
    assert [r[0].shape for r in results] == [(64, 512), (40, 48)]
    assert [r[1].shape for r in results] == [(64, 512), (40, 48)]


def test_small_images_are_predicted_with_the_borders_training_crops_have() -> None:
    """A 40 x 48 image is mirror-padded to the 64 px tile for prediction, exactly as a training crop is."""
    from models.backbone.efficientnet_lite import normalize

    rng = np.random.default_rng(0)
    image = fabric(rng, 40, 48)
    padded = np.pad(image, ((0, 24), (0, 16), (0, 0)), mode="symmetric")
    crop, _, _ = SegmentationSamples(
        [(image, np.zeros((40, 48), np.uint8), 1.0)], image_size=64, turns_and_jitter=False
    )[0]
    torch.testing.assert_close(crop, normalize(torch.tensor(padded[None]))[0])

    model = tiny_model(image_size=64)
    ((small_map, _, _),) = predict_images(model, [image])
    ((padded_map, _, _),) = predict_images(model, [padded])
    np.testing.assert_allclose(small_map, padded_map[:40, :48], atol=1e-6)


def test_predict_images_batches_same_size_images_without_changing_results() -> None:
    model = tiny_model(image_size=64)
    rng = np.random.default_rng(0)
    images = [fabric(rng, 64, 64), fabric(rng, 40, 48), fabric(rng, 64, 200), fabric(rng, 64, 64)]
    together = predict_images(model, images, batch_size=4)
    one_by_one = [predict_images(model, [image])[0] for image in images]
    for (map_a, mask_a, score_a), (map_b, mask_b, score_b) in zip(together, one_by_one, strict=True):
        np.testing.assert_allclose(map_a, map_b, atol=1e-5)
        assert (mask_a != mask_b).mean() < 0.01 and score_a == pytest.approx(score_b, abs=1e-5)


def test_a_trained_model_round_trips_through_save_and_load(tmp_path: Path) -> None:
    model = tiny_model()
    train_segmenter(model, square_dataset(4, 4), TrainConfig(epochs=1, batch_size=4, image_size=64))
    model.save_pretrained(tmp_path)
    image = fabric(np.random.default_rng(3))
    ((expected_map, expected_mask, _),) = predict_images(model, [image])
    ((loaded_map, loaded_mask, _),) = predict_images(FPNSegmenter.from_pretrained(tmp_path), [image])
    np.testing.assert_array_equal(loaded_mask, expected_mask)
    np.testing.assert_allclose(loaded_map, expected_map, atol=1e-6)
