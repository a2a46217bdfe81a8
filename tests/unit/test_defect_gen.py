"""Defect-Gen (models/defect_gen): the one-descent schedule, training, sampling and placement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.defect_gen import DefectGenPipeline, descent, generate_on_normals, preset, train_pipeline
from models.defect_gen.data import DefectCrops, decode, encode, find_instances
from models.defect_gen.pipeline import region_box
from models.defect_gen.placement import RejectionRules, place, rejection_reason, unseen_by
from models.defect_gen.schedule import LARGE, SMALL, sampling_scheduler, timestep_range
from models.defect_gen.training import evaluation_loss, train_denoiser

CLASSES = ["hole", "stain", "knot"]


def _labeled(n: int = 4, size: int = 48, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Striped fabric with a dark square (class 1) and a bright disc (class 3)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        base = 120 + 40 * np.sin(xx / 2.0 + i)[..., None] + rng.normal(0, 4, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        mask[10:16, 10:16] = 1
        mask[(yy - 32) ** 2 + (xx - 30) ** 2 < 16] = 3
        base[mask == 1] = 20
        base[mask == 3] = 240
        images.append(base.clip(0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


def _normals(n: int = 3, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(60, 200, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("name", ["tiny", "cpu", "full"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_schedule_is_one_descent(name: str, sampler: str) -> None:
    config = preset(name, sampler=sampler)
    steps = descent(config)
    ts = [s.t for s in steps]
    assert ts[0] == config.num_train_timesteps - 1  # starts from pure noise
    assert all(a > b for a, b in itertools.pairwise(ts))  # strictly falling: no restart
    assert [s.t_prev for s in steps[:-1]] == ts[1:] and steps[-1].t_prev == -1  # each lands on the next
    assert len(steps) == config.sampling_steps  # as many calls as one model alone
    switch = config.switch_timestep
    assert switch == round(0.4 * config.num_train_timesteps)
    for step in steps:
        low, high = timestep_range(step.model, config)
        assert low <= step.t < high
        assert step.model == (LARGE if step.t >= switch else SMALL)
    models = [s.model for s in steps]
    # one switch, large first: no return to the large model after the small one started
    assert models == sorted(models, key=lambda m: m != LARGE) and LARGE in models and SMALL in models
    scheduler = sampling_scheduler(config)
    assert torch.equal(scheduler.betas, sampling_scheduler(config.replace(sampler="ddpm")).betas)


def test_sampling_calls_each_network_on_its_own_range(single_thread: None) -> None:
    config = preset("tiny")
    pipeline = DefectGenPipeline.build(config, CLASSES)
    calls: list[tuple[str, int]] = []
    for name, net in (("large", pipeline.large), ("small", pipeline.small)):

        def hook(module, args, kwargs, name=name):
            calls.append((name, int(args[1][0])))

        net.register_forward_pre_hook(hook, with_kwargs=True)
    crops = np.stack(_normals(2, config.crop_size))
    images, masks = pipeline.inpaint(crops, [1, 3], torch.Generator().manual_seed(0))
    expected = [(s.model, s.t) for s in descent(config)]
    assert calls == [(m, t) for m, t in expected] and len(calls) == config.sampling_steps
    assert images.shape == crops.shape and images.dtype == np.uint8
    assert masks.shape == crops.shape[:3] and masks.max() <= len(CLASSES)
    start, stop = region_box(config)
    outside = np.ones(masks.shape[1:], bool)
    outside[start:stop, start:stop] = False
    assert not masks[:, outside].any()  # the mask exists only inside the inpainting region
    np.testing.assert_array_equal(images[:, outside], crops[:, outside])  # known pixels come back exactly


def test_resampling_jumps_repeat_each_step(single_thread: None) -> None:
    config = preset("tiny", resample_jumps=2)
    pipeline = DefectGenPipeline.build(config, CLASSES)
    seen: list[int] = []
    known = pipeline.known_sample(np.stack(_normals(1, config.crop_size)))
    region = torch.zeros(1, 1, config.crop_size, config.crop_size)
    pipeline.denoise(
        known, torch.tensor([1]), region, torch.Generator().manual_seed(0), lambda s, m: seen.append(s.t)
    )
    assert seen == [s.t for s in descent(config) for _ in range(3)]


def test_encode_decode_round_trip() -> None:
    images, masks = _labeled(1)
    image, mask = decode(encode(images[0], masks[0], len(CLASSES)))
    np.testing.assert_array_equal(image, images[0])
    np.testing.assert_array_equal(mask, masks[0])


def test_instances_and_balanced_crops(single_thread: None) -> None:
    images, masks = _labeled(3)
    instances = find_instances(masks, len(CLASSES))
    assert sorted({i.class_id for i in instances}) == [1, 3] and len(instances) == 6
    crops = DefectCrops(images, masks, len(CLASSES), crop_size=16)
    x, labels = crops.batch(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3 + len(CLASSES) + 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    counts = torch.bincount(labels, minlength=4)
    assert counts[2] == 0 and counts[0] == 0 and 16 < counts[1] < 48  # balanced over the present classes
    one_hot = x[:, 3:]
    assert torch.all((one_hot > 0).sum(dim=1) == 1)  # a valid one-hot mask at every pixel


def test_training_reduces_the_loss(single_thread: None) -> None:
    config = preset("tiny", large_steps=60, small_steps=60)
    images, masks = _labeled(4)
    crops = DefectCrops(images, masks, len(CLASSES), config.crop_size)
    pipeline = DefectGenPipeline.build(config, CLASSES)
    for which, net in ((LARGE, pipeline.large), (SMALL, pipeline.small)):
        before = evaluation_loss(net, which, crops, pipeline.scheduler, config)
        history = train_denoiser(net, which, crops, pipeline.scheduler, config, seed=0)
        after = evaluation_loss(net, which, crops, pipeline.scheduler, config)
        assert after < 0.9 * before, (which, before, after)
        assert history[-1]["step"] == 60


def test_train_save_load_generate_on_normals(single_thread: None, tmp_path) -> None:
    config = preset("tiny")
    images, masks = _labeled(3)
    pipeline, report = train_pipeline(images, masks, CLASSES, config, seed=0, device="cpu")
    assert set(report["eval_loss"]) == {"large", "small"} and report["instances"] == 6
    assert pipeline.stats["hole"]["instances"] == 3 and "stain" not in pipeline.stats
    pipeline.save_pretrained(tmp_path / "m")
    for part in ("large", "small"):
        assert (tmp_path / "m" / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "m" / "scheduler" / "scheduler_config.json").is_file()
    loaded = DefectGenPipeline.from_pretrained(tmp_path / "m", device="cpu")
    for a, b in zip(pipeline.large.state_dict().values(), loaded.large.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    normals = _normals(3)
    rules = RejectionRules(min_pixels=0, min_components_limit=10_000)  # keep whatever an untrained net makes
    pairs, report = generate_on_normals(loaded, 1, 3, normals, seed=0, rules=rules, max_attempts=3)
    assert (
        report.generated == 3
        and report.counts["accepted"] + sum(v for k, v in report.counts.items() if k != "accepted") == 3
    )
    start, stop = region_box(config)
    for image, mask in pairs:
        assert image.shape == normals[0].shape and mask.shape == normals[0].shape[:2]
        assert mask.dtype == np.uint8 and mask.max() <= len(CLASSES)
        # outside the placed inpainting square the image is one of the normals, byte for byte
        matches = []
        for normal in normals:
            changed = np.any(image != normal, axis=2)
            ys, xs = np.nonzero(changed)
            inside = (ys.ptp() < stop - start and xs.ptp() < stop - start) if len(ys) else True
            matches.append(inside and not mask[~_box_around(changed, mask, stop - start)].any())
        assert any(matches)


def _box_around(changed: np.ndarray, mask: np.ndarray, side: int) -> np.ndarray:
    """Pixels of the smallest side x side window holding every changed and mask pixel (for the test)."""
    ys, xs = np.nonzero(changed | (mask > 0))
    window = np.zeros(mask.shape, bool)
    if len(ys):
        top, left = ys.min(), xs.min()
        window[top : top + side, left : left + side] = True
    return window


def test_place_keeps_the_normal_outside_the_region() -> None:
    config = preset("tiny")
    normal = _normals(1, 40)[0]
    crop = np.full((config.crop_size, config.crop_size, 3), 7, np.uint8)
    crop_mask = np.full(crop.shape[:2], 2, np.uint8)
    start, stop = region_box(config)
    inside = np.zeros(normal.shape[:2], bool)
    inside[5 + start : 5 + stop, 9 + start : 9 + stop] = True
    for margin in (2, None):  # a defect filling the square, then the whole square written back
        image, mask = place(normal, crop, crop_mask, 5, 9, region_box(config), margin=margin)
        np.testing.assert_array_equal(image[~inside], normal[~inside])
        assert (image[inside] == 7).all() and (mask[inside] == 2).all() and not mask[~inside].any()


def test_place_writes_the_defect_and_a_rim_only() -> None:
    config = preset("tiny")
    normal = _normals(1, 40)[0]
    crop = np.full((config.crop_size, config.crop_size, 3), 7, np.uint8)
    crop_mask = np.zeros(crop.shape[:2], np.uint8)
    start, _ = region_box(config)
    crop_mask[start + 2 : start + 4, start + 2 : start + 4] = 1  # a 2 x 2 defect inside the square
    image, mask = place(normal, crop, crop_mask, 0, 0, region_box(config), margin=2)
    defect = mask > 0
    assert defect.sum() == 4 and (image[defect] == 7).all()
    square = np.ones((3, 3), bool)
    rim = ndimage.binary_dilation(defect, square, iterations=2) & ~defect
    far = ~ndimage.binary_dilation(defect, square, iterations=3)
    np.testing.assert_array_equal(image[far], normal[far])  # the generated square's background is not kept
    changed = (image[rim] != normal[rim]).any(axis=1)
    assert changed.any()  # the rim blends generated into real fabric


def test_rejection_reasons() -> None:
    side = 12
    empty = np.zeros((side, side), np.uint8)
    assert rejection_reason(empty, 1, 3) == "empty"
    wrong = empty.copy()
    wrong[2:4, 2:4] = 1
    wrong[5:10, 5:10] = 2
    assert rejection_reason(wrong, 1, 3) == "wrong_class"
    shattered = empty.copy()
    shattered[::3, ::3] = 1
    assert rejection_reason(shattered, 1, 3) == "shattered"
    leaked = np.ones((side, side), np.uint8)
    assert rejection_reason(leaked, 1, 3) == "leaked"
    good = empty.copy()
    good[3:8, 4:9] = 1
    assert rejection_reason(good, 1, 3) is None
    flat = np.random.default_rng(0).normal(0, 1, (side, side))
    assert unseen_by(flat, good, 3.0)
    seen = flat.copy()
    seen[good > 0] += 20
    assert not unseen_by(seen, good, 3.0)


def test_rejection_counts_with_a_scorer(single_thread: None) -> None:
    config = preset("tiny")
    images, masks = _labeled(2)
    pipeline, _ = train_pipeline(images, masks, CLASSES, config, seed=0, device="cpu")
    rules = RejectionRules(min_pixels=0, min_components_limit=10_000)
    # A scorer that sees nothing: every sample that passes the mask checks is counted as unseen.
    pairs, report = generate_on_normals(
        pipeline,
        1,
        4,
        _normals(2),
        seed=1,
        scorer=lambda image: np.zeros(image.shape[:2]),
        rules=rules,
        max_attempts=4,
    )
    assert pairs == [] and report.generated == 4
    assert report.counts["accepted"] == 0 and sum(report.counts.values()) == 4
    assert (
        report.counts["unseen"]
        + report.counts["empty"]
        + report.counts["wrong_class"]
        + report.counts["leaked"]
        == 4
    )
