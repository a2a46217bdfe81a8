"""Defect-Click model side: shapes, checkpoints, zoom, click simulation, predictor cache, NoC, baselines,
training (tiny configurations, CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.clicker import (
    Click,
    ClickerConfig,
    ClickLoss,
    ClickObject,
    ClickPredictor,
    ClickSegmenter,
    ClickTrainConfig,
    GrabCutSegmenter,
    NocObject,
    TeacherMapGrowing,
    ZoomConfig,
    defect_objects,
    degrade_mask,
    disk_maps,
    error_click,
    evaluate_noc,
    fuse_for_inference,
    image_digest,
    interior_click,
    restrict_prelabel,
    roi_crop,
    split_objects,
    train_clicker,
)
from models.clicker.noc import iou
from models.clicker.zoom import crop_image, paste

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64


def tiny_model(seed: int = 0, **overrides: object) -> ClickSegmenter:
    torch.manual_seed(seed)
    config = {"tiny": True, "width": 16, "aux_channels": 8, "image_size": SIZE, "min_crop": 32, **overrides}
    return ClickSegmenter(ClickerConfig(**config)).eval()  # type: ignore[arg-type]


def fabric(rng: np.random.Generator, height: int = 96, width: int = 96) -> np.ndarray:
    """A grey weave-like texture, (H, W, 3) uint8."""
    yy, xx = np.mgrid[:height, :width]
    weave = 90 + 15 * np.sin(xx * 1.3) * np.sin(yy * 1.3) + rng.normal(0, 4, (height, width))
    return np.repeat(np.clip(weave, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def with_blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipse at a random place: the image and its (H, W) bool mask."""
    height, width = image.shape[:2]
    cy, cx = rng.uniform(20, height - 20), rng.uniform(20, width - 20)
    ry, rx = rng.uniform(5, 12, 2)
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image = image.copy()
    image[mask] = 220
    return image, mask


# ---- model -------------------------------------------------------------------------------------------


def test_shapes_and_cached_features_broadcast() -> None:
    model = tiny_model()
    x, aux = torch.randn(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x, aux)
        assert logits.shape == (2, 1, SIZE, SIZE)
        features = model.encode_image(x[:1])
        assert [f.shape[-1] for f in features.levels] == [SIZE // s for s in (2, 4, 8, 16, 32)]
        # One cached crop serves several click sets at once.
        many = model.decode(features, aux[:1].expand(3, -1, -1, -1))
        assert many.shape == (3, 1, SIZE, SIZE)
        torch.testing.assert_close(many[0], model(x[:1], aux[:1])[0])


def test_clicks_change_the_answer() -> None:
    """The aux maps reach the output (a decoder that ignored them could not correct masks)."""
    model = tiny_model()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        features = model.encode_image(x)
        empty = model.decode(features, torch.zeros(1, 3, SIZE, SIZE))
        clicked = model.decode(features, torch.ones(1, 3, SIZE, SIZE))
    assert not torch.allclose(empty, clicked)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    folder = model.save_pretrained(tmp_path / "clicker")
    assert json.loads((folder / "config.json").read_text())["architecture"] == "ClickSegmenter"
    loaded = ClickSegmenter.from_pretrained(folder)
    assert loaded.config == model.config
    x, aux = torch.randn(1, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, aux), model(x, aux), rtol=0, atol=0)


def test_fused_batch_norm_gives_the_same_logits() -> None:
    model = tiny_model()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(2, 3, SIZE, SIZE) * 2 + 1, torch.rand(2, 3, SIZE, SIZE))
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x, aux = torch.randn(1, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, aux), model(x, aux), rtol=1e-4, atol=1e-4)


def test_loss_prefers_the_right_mask() -> None:
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    loss = ClickLoss(dice_weight=0.5)
    assert (
        loss(target * 20 - 10, target)
        < loss(torch.zeros_like(target), target)
        < loss(10 - target * 20, target)
    )


# ---- clicks and zoom ---------------------------------------------------------------------------------


def test_disk_maps_split_positive_and_negative() -> None:
    maps = disk_maps([Click(10, 10, True), Click(30, 5, False)], (40, 40), radius=3)
    assert maps.shape == (2, 40, 40)
    assert maps[0, 10, 10] == 1 and maps[1, 10, 10] == 0
    assert maps[1, 30, 5] == 1 and maps[0, 30, 5] == 0
    assert maps[0].sum() == pytest.approx(np.pi * 9, rel=0.25)


def test_next_click_is_in_the_larger_error_region() -> None:
    target = np.zeros((60, 60), bool)
    target[10:40, 10:40] = True
    # A miss: the prediction covers a corner only -> positive click inside the missed part, at its centre.
    prediction = np.zeros_like(target)
    prediction[10:15, 10:15] = True
    click = error_click(target, prediction)
    assert click is not None and click.is_positive
    assert (target & ~prediction)[int(click.y), int(click.x)]
    # A false alarm bigger than the miss -> negative click inside the false alarm.
    prediction = target.copy()
    prediction[10:12, 10:12] = False  # a small miss
    prediction[45:58, 45:58] = True  # a large false alarm
    click = error_click(target, prediction)
    assert click is not None and not click.is_positive
    assert 48 <= click.y <= 54 and 48 <= click.x <= 54  # the centre of the false alarm
    assert error_click(target, target) is None


def test_error_click_treats_the_image_border_as_region_border() -> None:
    target = np.zeros((40, 40), bool)
    target[:, :10] = True  # touches the left border
    click = error_click(target, np.zeros_like(target))
    assert click is not None and 4 <= click.x <= 5  # farthest from the region's border incl. the image edge


def test_interior_click_stays_away_from_the_border() -> None:
    target = np.zeros((50, 50), bool)
    target[10:40, 10:40] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        click = interior_click(target, rng)
        assert 17 <= click.y <= 32 and 17 <= click.x <= 32 and click.is_positive


def test_crop_size_does_not_grow_with_the_frame() -> None:
    zoom = ZoomConfig(size=SIZE, min_crop=32)
    click = [Click(120.0, 130.0, True)]
    small = roi_crop(click, None, (256, 256), zoom)
    frame = roi_crop([Click(120.0, 3000.0, True)], None, (256, 4096), zoom)
    assert small.side == frame.side == 32
    top, left, bottom, right = frame.box
    assert top <= 120 < bottom and left <= 3000 < right and bottom - top == right - left == 32
    # A previous-mask component next to the click widens the crop; a far one does not.
    prev = np.zeros((256, 4096), bool)
    prev[100:160, 2990:3050] = True
    prev[10:20, 100:110] = True
    grown = roi_crop([Click(120.0, 3000.0, True)], prev, (256, 4096), zoom)
    assert grown.side >= 60 * zoom.expand - 1 and grown.box[1] <= 2990 and grown.box[3] >= 3050


def test_crop_wider_than_the_image_is_mirrored_and_pasted_back_inside() -> None:
    zoom = ZoomConfig(size=SIZE, min_crop=32)
    prev = np.zeros((40, 400), bool)
    prev[5:35, 50:150] = True  # 100 wide: the crop side exceeds the image height
    crop = roi_crop([Click(20.0, 100.0, True)], prev, prev.shape, zoom)
    assert crop.side > 40 and crop.box[0] == 0 and crop.box[2] == 40
    image = np.random.default_rng(0).integers(0, 255, (40, 400, 3), dtype=np.uint8)
    assert crop_image(image, crop, SIZE).shape == (SIZE, SIZE, 3)
    old = np.zeros((40, 400), bool)
    old[:, 390:] = True  # outside the crop: kept
    pasted = paste(np.ones((SIZE, SIZE), np.float32), crop, old, 0.5)
    top, left, bottom, right = crop.box
    assert pasted[top:bottom, left:right].all() and pasted[:, 390:].all() and not pasted[:, :left].any()


# ---- predictor ---------------------------------------------------------------------------------------


def test_follow_up_clicks_reuse_the_cached_backbone() -> None:
    predictor = ClickPredictor(tiny_model(), cache_size=4)
    calls = []
    encode = predictor.model.encode_image
    predictor.model.encode_image = lambda x: calls.append(x.shape) or encode(x)  # type: ignore[method-assign]
    image = fabric(np.random.default_rng(0), 128, 128)
    first = predictor.predict(image, [Click(60.0, 60.0, True)], image_key="a")
    assert first.encoded and first.mask.shape == (128, 128) and 0.0 <= first.score <= 1.0
    clicks = [Click(60.0, 60.0, True), Click(62.0, 58.0, False)]
    second = predictor.predict(image, clicks, prev_mask=first.mask, image_key="a")
    assert not second.encoded and second.box == first.box
    assert len(calls) == 1 and predictor.encode_calls == 1
    # A click far outside the crop re-crops, and so runs the backbone again.
    third = predictor.predict(image, [*clicks, Click(5.0, 120.0, True)], prev_mask=second.mask, image_key="a")
    assert third.encoded and len(calls) == 2
    # Without a key, the image's digest keys the cache: the same pixels hit it.
    assert predictor.predict(image, [Click(60.0, 60.0, True)]).encoded
    assert not predictor.predict(image.copy(), [Click(61.0, 60.0, True)]).encoded


def test_clicked_pixels_take_their_clicks_label() -> None:
    predictor = ClickPredictor(tiny_model())
    image = fabric(np.random.default_rng(2), 96, 96)
    everything = np.ones((96, 96), bool)
    # The network's answer is whatever a random model says; the clicked pixels are not up to it.
    clicks = [Click(40.0, 40.0, True), Click(50.2, 61.7, False), Click(30.0, 30.0, True)]
    answer = predictor.predict(image, clicks, prev_mask=everything).mask
    assert answer[40, 40] and not answer[50, 62] and answer[30, 30]
    # A later click on the same pixel wins.
    again = predictor.predict(image, [*clicks, Click(40.4, 39.6, False)], prev_mask=answer).mask
    assert not again[40, 40] and again[30, 30]


def test_predictor_on_a_line_scan_frame_runs_on_a_small_crop() -> None:
    predictor = ClickPredictor(tiny_model())
    frame = fabric(np.random.default_rng(1), 256, 4096)
    prev = np.zeros((256, 4096), bool)
    prev[:, :50] = True  # far from the click: must survive the paste-back
    answer = predictor.predict(frame, [Click(128.0, 2500.0, True)], prev_mask=prev)
    top, left, bottom, right = answer.box
    assert bottom - top == right - left == predictor.config.min_crop
    assert answer.mask.shape == (256, 4096) and answer.mask[:, :50].all()
    assert not answer.mask[:, 60:left].any() and not answer.mask[:, right:].any()


def test_predictor_rejects_bad_input() -> None:
    predictor = ClickPredictor(tiny_model())
    image = fabric(np.random.default_rng(0), 64, 64)
    with pytest.raises(ValueError, match="at least one click"):
        predictor.predict(image, [])
    with pytest.raises(ValueError, match="prev_mask"):
        predictor.predict(image, [Click(3, 3, True)], prev_mask=np.zeros((10, 10), bool))


# ---- NoC protocol ------------------------------------------------------------------------------------


def _objects(n: int = 4, seed: int = 0) -> list[NocObject]:
    rng = np.random.default_rng(seed)
    objects = []
    for _ in range(n):
        image, mask = with_blob(fabric(rng), rng)
        objects.extend(split_objects(image, mask))
    return objects


def test_noc_of_an_oracle_is_one_click_and_of_a_stuck_method_is_the_maximum() -> None:
    objects = _objects()
    truth = {id(o.image): o.mask for o in objects}
    oracle = evaluate_noc(lambda image, clicks, prev: truth[id(image)], objects)
    assert oracle["noc85"] == oracle["noc90"] == 1.0 and oracle["fail20"] == 0.0
    assert oracle["clicks"] == len(objects)
    stuck = evaluate_noc(lambda image, clicks, prev: prev, objects)
    assert stuck["noc85"] == stuck["noc90"] == 20.0 and stuck["fail20"] == 1.0
    assert stuck["clicks"] == 20 * len(objects)


def test_noc_from_a_good_pre_annotation_is_zero_clicks() -> None:
    objects = [NocObject(o.image, o.mask, o.mask.copy()) for o in _objects(2)]
    result = evaluate_noc(lambda image, clicks, prev: prev, objects, start="prelabel")
    assert result["noc85"] == 0.0 and result["start_iou"] == 1.0 and result["clicks"] == 0


def test_split_objects_uses_8_connectivity_and_restricts_the_pre_annotation() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[5, 5] = mask[6, 6] = 1  # diagonal neighbours: one object
    mask[20:25, 20:25] = 3
    prelabel = np.zeros((40, 40), bool)
    prelabel[18:27, 18:22] = True  # touches the square
    prelabel[35:38, 2:5] = True  # far from both
    objects = split_objects(np.zeros((40, 40, 3), np.uint8), mask, prelabel)
    assert len(objects) == 2
    square = next(o for o in objects if o.mask[22, 22])
    assert square.prelabel is not None and square.prelabel[20, 19] and not square.prelabel[36, 3]
    dots = next(o for o in objects if o.mask[5, 5])
    assert dots.mask[6, 6] and dots.prelabel is not None and not dots.prelabel.any()
    assert np.array_equal(restrict_prelabel(prelabel, square.mask), square.prelabel)


def test_defect_objects_merge_components_a_few_pixels_apart() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[10:14, 10:14] = 2
    mask[10:14, 17] = 2  # 3 background columns away: the same stain's speckle
    mask[30:34, 10:14] = 1  # 16 rows away: another object
    objects = defect_objects(mask)
    assert len(objects) == 2
    stain = next(o for o in objects if o[10, 10])
    assert stain[12, 17] and not stain[12, 15]  # the speckle joins; the gap stays background
    assert stain.sum() == 20 and not stain[31, 11]
    assert len(defect_objects(mask, gap=0)) == 3  # plain 8-connected components


# ---- baselines ---------------------------------------------------------------------------------------


def test_grabcut_finds_a_synthetic_disc() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(60, 8, (128, 128, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:128, :128]
    disc = (yy - 64) ** 2 + (xx - 70) ** 2 <= 15**2
    image[disc] = np.clip(rng.normal(200, 8, (int(disc.sum()), 3)), 0, 255).astype(np.uint8)
    grabcut = GrabCutSegmenter(ZoomConfig(size=64, min_crop=48), click_radius=5)
    mask = grabcut(image, [Click(64.0, 70.0, True)], np.zeros((128, 128), bool))
    assert iou(mask, disc) > 0.85


def test_teacher_map_growing_follows_the_map_and_negative_clicks_cut() -> None:
    yy, xx = np.mgrid[:100, :100]
    teacher_map = np.exp(-((yy - 50) ** 2 + (xx - 40) ** 2) / (2 * 8.0**2)).astype(np.float32)
    teacher_map += 0.8 * np.exp(-((yy - 50) ** 2 + (xx - 62) ** 2) / (2 * 6.0**2)).astype(np.float32)
    image = np.zeros((100, 100, 3), np.uint8)
    grow = TeacherMapGrowing({image_digest(image): teacher_map}, ZoomConfig(size=64, min_crop=64))
    first = grow(image, [Click(50.0, 40.0, True)], None)
    assert first[50, 40] and first[50, 47] and not first[5, 5]
    # A negative click on the second bump removes it while the first stays.
    both = grow(image, [Click(50.0, 40.0, True)], None) | (teacher_map > 0.4)
    cut = grow(image, [Click(50.0, 40.0, True), Click(50.0, 62.0, False)], both)
    assert cut[50, 40] and not cut[50, 62]


# ---- training ----------------------------------------------------------------------------------------


def test_degraded_masks_stay_near_the_object_and_differ_from_it() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((200, 200), bool)
    mask[90:110, 80:130] = True
    outcomes = [degrade_mask(mask, rng) for _ in range(30)]
    assert any(not np.array_equal(o, mask) for o in outcomes)
    for out in outcomes:
        ys, xs = np.nonzero(out)
        assert not ys.size or (ys.min() >= 50 and ys.max() < 150 and xs.min() >= 40 and xs.max() < 170)


def _blob_objects(n: int, seed: int) -> list[ClickObject]:
    rng = np.random.default_rng(seed)
    return [ClickObject(*with_blob(fabric(rng), rng)) for _ in range(n)]


def _one_click_iou(model: ClickSegmenter, objects: list[ClickObject]) -> float:
    predictor = ClickPredictor(model)
    rng = np.random.default_rng(1)
    scores = []
    for obj in objects:
        answer = predictor.predict(obj.image, [interior_click(obj.mask, rng)])
        scores.append(iou(answer.mask, obj.mask))
    return float(np.mean(scores))


def test_tiny_training_lowers_the_loss_and_learns_to_segment_a_clicked_blob() -> None:
    train, test = _blob_objects(24, seed=0), _blob_objects(8, seed=99)
    model = tiny_model(seed=0)
    untrained = _one_click_iou(model, test)
    config = ClickTrainConfig(epochs=4, steps_per_epoch=15, batch_size=8, lr=5e-3, recalibrate_batches=2)
    history = train_clicker(model, train, config)
    assert len(history) == 4 and history[-1]["loss"] < 0.7 * history[0]["loss"]
    trained = _one_click_iou(model, test)
    # The bar sits between what an untrained model reaches and what training gives.
    assert untrained < 0.5 < trained, (untrained, trained)


def test_training_rejects_objects_without_pixels() -> None:
    obj = ClickObject(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="non-empty"):
        train_clicker(tiny_model(), [obj], ClickTrainConfig(epochs=1, steps_per_epoch=1))
