"""open_clip teacher on a tiny random-weight CLIP: prompts, token-masked windows, aggregation, few-shot
memory, tiling, the weights error, and fit/predict end to end (no network, no real weights)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from models.teacher.openclip import (
    DEFAULT_CLASS_NAMES,
    TINY_MODEL_NAME,
    OpenClipTeacher,
    OpenClipTeacherConfig,
    OpenClipWeightsUnavailable,
    WindowEncoder,
    encode_prompt_ensembles,
    harmonic_aggregate,
    load_clip,
    openclip_weights_available,
    prompts,
    window_indices,
)
from models.teacher.openclip.weights import CONFIG_DIR
from models.teacher.types import Teacher, TeacherPrediction
from models.tiling import tile_origins

TINY = OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, pretrained=None)


@pytest.fixture(scope="module", autouse=True)
def tiny_config(single_thread: None) -> None:
    open_clip.add_model_config(CONFIG_DIR / f"{TINY_MODEL_NAME}.json")


@pytest.fixture(scope="module")
def teacher() -> OpenClipTeacher:
    return OpenClipTeacher(TINY)


def striped_fabric(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A regular woven-looking texture (diagonal stripes) with a little noise."""
    rows, cols = np.mgrid[0:height, 0:width]
    weave = 128 + 80 * np.sin((rows + cols) * 0.8)
    noise = np.random.default_rng(seed).normal(0, 4, (height, width))
    gray = np.clip(weave + noise, 0, 255)
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


def with_hole(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    damaged = image.copy()
    damaged[top : top + size, left : left + size] = (20, 20, 200)
    return damaged


# ------------------------------------------------------------------------------------------ prompts
def test_prompt_ensembles_cover_every_state_and_class_with_fabric_words() -> None:
    states = prompts.state_prompts()
    assert list(states) == ["normal", "anomalous"]
    assert len(states["normal"]) == len(prompts.NORMAL_STATES) * len(prompts.TEMPLATES) == 36
    assert len(states["anomalous"]) == len(prompts.ANOMALOUS_STATES) * len(prompts.TEMPLATES) == 48
    material = ("fabric", "textile", "cloth")
    for prompt in states["normal"] + states["anomalous"]:
        assert any(word in prompt for word in material), prompt
    assert "a close-up photo of flawless fabric." in states["normal"]
    assert "a photo of woven textile with a hole." in states["anomalous"]
    per_class = prompts.class_prompts((*DEFAULT_CLASS_NAMES, "oil_spot"))
    assert list(per_class) == [*DEFAULT_CLASS_NAMES, "oil_spot"]
    for name, ensemble in per_class.items():
        assert len(ensemble) >= len(prompts.TEMPLATES) and len(set(ensemble)) == len(ensemble), name
    assert "a photo of fabric with oil spot." in per_class["oil_spot"]
    assert any("broken yarn" in prompt for prompt in per_class["broken_yarn"])
    # Pure functions: the same arguments give the same lists.
    assert prompts.state_prompts() == states and prompts.class_prompts(DEFAULT_CLASS_NAMES) == {
        name: per_class[name] for name in DEFAULT_CLASS_NAMES
    }
    with pytest.raises(ValueError, match="unique"):
        prompts.class_prompts(("hole", "hole"))


def test_trimmed_prompt_encoding_equals_open_clip_encode_text(teacher: OpenClipTeacher) -> None:
    ensembles = [["a photo of flawless fabric.", "clean cloth"], ["a photo of fabric with a knot."]]
    tokenizer = open_clip.get_tokenizer(TINY_MODEL_NAME)
    with torch.inference_mode():
        full = [F.normalize(teacher.model.encode_text(tokenizer(e)), dim=-1).mean(0) for e in ensembles]
    expected = F.normalize(torch.stack(full), dim=-1)
    torch.testing.assert_close(encode_prompt_ensembles(teacher.model, tokenizer, ensembles), expected)


# ------------------------------------------------------------------------------------------ windows
def test_window_indices_cover_each_patch_at_both_scales() -> None:
    assert window_indices((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    small, large = window_indices((7, 7), 2), window_indices((7, 7), 3)
    assert small.shape == (36, 4) and large.shape == (25, 9)
    assert large[0].tolist() == [0, 1, 2, 7, 8, 9, 14, 15, 16]
    assert large[-1].tolist() == [32, 33, 34, 39, 40, 41, 46, 47, 48]
    for windows, corner_count, centre_count in ((small, 1, 4), (large, 1, 9)):
        counts = torch.bincount(windows.flatten(), minlength=49)
        assert counts.min() >= 1 and counts[0] == corner_count and counts[24] == centre_count
    # A stride that does not divide the grid still reaches the last row and column.
    strided = window_indices((7, 7), 2, stride=2)
    assert strided.shape == (16, 4) and torch.bincount(strided.flatten(), minlength=49).min() >= 1
    with pytest.raises(ValueError, match="window size"):
        window_indices((2, 5), 3)


def test_harmonic_aggregation_by_hand() -> None:
    windows = window_indices((3, 3), 2)
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    aggregated = harmonic_aggregate(scores, windows, 9).view(3, 3)
    # Patch 1 lies in windows 0 and 1: 2 / (1/1 + 1/0.75); the centre in all four: 4 / (1 + 4/3 + 2 + 4).
    expected = torch.tensor(
        [
            [1.0, 2 / (1 + 4 / 3), 0.75],
            [2 / (1 + 2), 4 / (1 + 4 / 3 + 2 + 4), 2 / (4 / 3 + 4)],
            [0.5, 2 / 6, 0.25],
        ]
    )
    torch.testing.assert_close(aggregated, expected)
    # Extra dimensions (classes) are aggregated independently.
    per_class = harmonic_aggregate(torch.stack([scores, scores.flip(1)], dim=-1), windows, 9)
    torch.testing.assert_close(per_class[0, :, 0].view(3, 3), expected)
    torch.testing.assert_close(per_class[0, :, 1].view(3, 3), expected.flip(0).flip(1))


def reference_window(model: torch.nn.Module, tokens: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """One window, one forward: class token + the window's patch tokens through every block."""
    visual = model.visual
    subset = tokens[:, torch.cat([torch.zeros(1, dtype=torch.long), window + 1])]
    out = visual.transformer(subset)[:, 0]
    return F.normalize(visual.ln_post(out) @ visual.proj, dim=-1)


def test_batched_window_embeddings_equal_one_window_at_a_time(teacher: OpenClipTeacher) -> None:
    model = teacher.model
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    encoder = WindowEncoder(model.visual, (2, 3), max_windows_per_call=7)  # several chunks per scale
    with torch.inference_mode():
        embedded = encoder(pixels)
        tokens = model.visual._embeds(pixels)
        image = F.normalize(model.encode_image(pixels), dim=-1)
        for scale, windows in enumerate(encoder.windows):
            assert embedded.windows[scale].shape == (2, len(windows), 64)
            for index in (0, 5, len(windows) - 1):
                expected = reference_window(model, tokens, windows[index])
                torch.testing.assert_close(embedded.windows[scale][:, index], expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(embedded.image, image, atol=2e-5, rtol=1e-4)
    assert embedded.patches.shape == (2, 49, 64)


def test_shared_blocks_then_masked_last_block(teacher: OpenClipTeacher) -> None:
    model = teacher.model
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    encoder = WindowEncoder(model.visual, (3,), window_layers=1)
    window = encoder.windows[0][7]
    with torch.inference_mode():
        shared = model.visual.transformer.resblocks[0](model.visual._embeds(pixels))
        subset = shared[:, torch.cat([torch.zeros(1, dtype=torch.long), window + 1])]
        last = model.visual.transformer.resblocks[1](subset)[:, 0]
        expected = F.normalize(model.visual.ln_post(last) @ model.visual.proj, dim=-1)
        torch.testing.assert_close(encoder(pixels).windows[0][:, 7], expected, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="window_layers"):
        WindowEncoder(model.visual, window_layers=3)


# ------------------------------------------------------------------------------------------ teacher
def test_fit_predict_end_to_end(teacher: OpenClipTeacher) -> None:
    assert isinstance(teacher, Teacher) and teacher.name == "openclip"
    assert teacher.class_names == DEFAULT_CLASS_NAMES
    pool = [striped_fabric(48, 80, seed) for seed in range(5)] + [
        with_hole(striped_fabric(48, 80, 9), 10, 30, 14)
    ]
    normals = [striped_fabric(48, 80, seed) for seed in (20, 21)]
    fresh = OpenClipTeacher(TINY)
    with pytest.raises(RuntimeError, match="fit"):
        fresh.predict(pool)
    with pytest.raises(ValueError, match="pool image 1"):
        fresh.fit([pool[0], pool[1][..., 0]])
    for given_normals in ((), normals):
        teacher.fit(pool, given_normals)
        assert isinstance(teacher.pixel_threshold, float) and isinstance(teacher.image_threshold, float)
        predictions = teacher.predict(pool)
        assert len(predictions) == len(pool)
        for prediction in predictions:
            assert isinstance(prediction, TeacherPrediction)
            assert prediction.anomaly_map.shape == (48, 80) and prediction.anomaly_map.dtype == np.float32
            assert prediction.mask.shape == (48, 80) and prediction.mask.dtype == bool
            assert isinstance(prediction.score, float) and 0.0 <= prediction.score <= 1.0
            assert 0.0 <= prediction.uncertainty <= 1.0
            assert prediction.class_probs is not None and prediction.class_probs.dtype == np.float32
            assert prediction.class_probs.shape == (len(DEFAULT_CLASS_NAMES), 48, 80)
            np.testing.assert_allclose(prediction.class_probs.sum(axis=0), 1.0, atol=1e-5)
            if prediction.score >= teacher.image_threshold:
                np.testing.assert_array_equal(
                    prediction.mask, prediction.anomaly_map >= teacher.pixel_threshold
                )
            else:
                assert not prediction.mask.any()
        # Cached pool scores and a fresh computation agree (a new image is scored the same way).
        again = teacher.predict([pool[0].copy()])[0]
        np.testing.assert_allclose(again.anomaly_map, predictions[0].anomaly_map, atol=1e-6)
    with pytest.raises(ValueError, match="pool, or two or more normals"):
        teacher.fit([], normals[:1])


def test_a_fitted_normal_scores_lower_than_a_modified_copy(teacher: OpenClipTeacher) -> None:
    normal = striped_fabric(64, 64, seed=3)
    damaged = with_hole(normal, 20, 24, 16)
    teacher.fit([normal, damaged])
    zero_shot = [p.anomaly_map for p in teacher.predict([normal, damaged])]
    teacher.fit([normal, damaged], [normal])
    few_shot = [p.anomaly_map for p in teacher.predict([normal, damaged])]
    # few-shot map = (language + visual) / 2 and zero-shot map = language: the visual part is exact.
    visual_normal, visual_damaged = (2 * f - z for f, z in zip(few_shot, zero_shot, strict=True))
    assert np.abs(visual_normal).max() < 1e-4  # the reference matches itself
    assert visual_damaged.max() > 0.05
    hole = np.zeros((64, 64), bool)
    hole[20:36, 24:40] = True
    assert visual_damaged[hole].mean() > 2 * visual_damaged[~hole].mean()


def test_wide_frames_are_tiled_at_native_resolution(teacher: OpenClipTeacher) -> None:
    frame = np.concatenate([striped_fabric(256, 1024, seed) for seed in range(4)], axis=1)  # 256 x 4096
    teacher.fit([frame[:, :256], frame[:, 256:512]])
    tile, origins = teacher._tile_layout(256, 4096)
    assert tile == (256, 256) and origins == tile_origins(256, 4096, 256, TINY.tile_overlap)
    assert len(origins) == 19
    prediction = teacher.predict([frame])[0]
    assert prediction.anomaly_map.shape == prediction.mask.shape == (256, 4096)
    assert prediction.class_probs is not None and prediction.class_probs.shape == (5, 256, 4096)
    # Left of the second tile only the first tile counts: the frame's map there is the first tile's own.
    first_tile = teacher.predict([np.ascontiguousarray(frame[:, :256])])[0]
    np.testing.assert_allclose(prediction.anomaly_map[:, :200], first_tile.anomaly_map[:, :200], atol=1e-5)


# ------------------------------------------------------------------------------------------ weights
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    yield


def test_pretrained_tag_offline_names_both_ways_to_get_weights(offline: None) -> None:
    config = OpenClipTeacherConfig(model_name="ViT-B-16-plus-240", pretrained="laion400m_e32")
    if openclip_weights_available(config):  # a machine with the weights cached loads them offline
        assert isinstance(load_clip(config), torch.nn.Module)
        return
    with pytest.raises(OpenClipWeightsUnavailable) as caught:
        load_clip(config)
    message = str(caught.value)
    assert "pretrained tag" in message and "~/.cache/" in message and "--clip-checkpoint PATH" in message
    assert isinstance(caught.value, RuntimeError)
    with pytest.raises(ValueError, match="no pretrained tag 'no-such-tag'"):
        load_clip(OpenClipTeacherConfig(model_name="ViT-B-16-plus-240", pretrained="no-such-tag"))


def test_local_checkpoint_loads_the_same_weights(teacher: OpenClipTeacher, tmp_path: Path) -> None:
    missing = OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, checkpoint=str(tmp_path / "none.pt"))
    assert not openclip_weights_available(missing)
    with pytest.raises(OpenClipWeightsUnavailable, match=r"none\.pt does not exist.*--clip-checkpoint PATH"):
        load_clip(missing)
    path = tmp_path / "tiny.pt"
    torch.save(teacher.model.state_dict(), path)
    config = OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, pretrained="ignored", checkpoint=str(path))
    assert openclip_weights_available(config)
    loaded = load_clip(config)
    for key, value in teacher.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert not openclip_weights_available(OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, pretrained=None))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.pt into loom-tiny-clip"):
        load_clip(OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, checkpoint=str(tmp_path / "broken.pt")))


def test_no_class_names_means_no_class_probabilities() -> None:
    teacher = OpenClipTeacher(
        OpenClipTeacherConfig(model_name=TINY_MODEL_NAME, pretrained=None, class_names=())
    )
    images = [striped_fabric(40, 40, seed) for seed in range(3)]
    teacher.fit(images)
    assert teacher.class_names == () and all(p.class_probs is None for p in teacher.predict(images))
