"""Backbone teacher: shapes, own-image exclusion, few-shot references, whole-image defects, determinism,
tiled line-scan frames, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.teacher.backbone import BackboneTeacher, TeacherConfig, TeacherPrediction
from models.teacher.backbone.texture import texture_energy


def woven(height: int, width: int, seed: int, noise: float = 3.0, period: float = 8.0) -> np.ndarray:
    """A periodic weave-like texture with a little per-image sensor noise: (H, W, 3) uint8."""
    rows, cols = np.mgrid[0:height, 0:width]
    pattern = 110.0 + 40.0 * np.sin(2 * np.pi * rows / period) * np.sin(2 * np.pi * cols / period)
    rgb = np.stack([pattern, pattern * 0.9, pattern * 0.7], axis=-1)
    rgb += np.random.default_rng(seed).normal(0.0, noise, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def pool_with_square(count: int = 12, size: int = 64, defective: int = 5) -> list[np.ndarray]:
    images = [woven(size, size, seed) for seed in range(count)]
    images[defective][24:40, 28:44] = 250  # a bright 16 x 16 square
    return images


@pytest.fixture(scope="module")
def pretrained_teacher() -> BackboneTeacher:
    return BackboneTeacher(TeacherConfig(image_size=128, crop_size=128, crop_margin=32, batch_size=8))


def test_prediction_shapes_and_types() -> None:
    teacher = BackboneTeacher(TeacherConfig(pretrained=False, image_size=64))
    images = [woven(64, 64, seed) for seed in range(10)] + [woven(48, 40, 99)]
    predictions = teacher.fit_predict_pool(images)
    assert len(predictions) == len(images)
    for image, prediction in zip(images, predictions, strict=True):
        assert isinstance(prediction, TeacherPrediction)
        assert prediction.anomaly_map.shape == image.shape[:2]
        assert prediction.anomaly_map.dtype == np.float32
        assert prediction.mask.shape == image.shape[:2] and prediction.mask.dtype == bool
        assert 0.0 <= prediction.uncertainty <= 1.0
        # The image score is the map's maximum or, for an image unlike the rest as a whole, higher.
        assert prediction.score >= float(prediction.anomaly_map.max()) - 1e-6
        assert prediction.mask.any() == (prediction.score >= teacher.image_threshold)
    assert teacher.pixel_threshold is not None and teacher.image_threshold is not None


def test_defect_found_in_its_own_image_and_nowhere_else(pretrained_teacher: BackboneTeacher) -> None:
    images = pool_with_square()
    predictions = pretrained_teacher.fit_predict_pool(images)
    scores = [prediction.score for prediction in predictions]
    assert int(np.argmax(scores)) == 5
    assert scores[5] > 2 * sorted(scores)[-2]
    defect_map = predictions[5].anomaly_map
    peak_row, peak_col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    assert 20 <= peak_row < 44 and 24 <= peak_col < 48  # the square, give or take a few pixels
    assert predictions[5].mask[28:36, 32:40].all()
    assert predictions[5].uncertainty < 0.05  # far above the threshold: a confident pseudo-label
    # Elsewhere at most sensor-noise specks, tiny next to the defect.
    stray = sum(int(prediction.mask.sum()) for index, prediction in enumerate(predictions) if index != 5)
    assert stray < 0.05 * predictions[5].mask.sum()


def test_pool_members_never_vouch_for_themselves_and_newcomers_meet_clean_references(
    pretrained_teacher: BackboneTeacher,
) -> None:
    """A newcomer carrying the pool's defect is not excused by it: a defect image is no clean reference."""
    images = pool_with_square()
    pretrained_teacher.fit_pool(images)
    almost_twin = images[5].copy()
    almost_twin[0, 0] += 1  # different bytes, so not recognised as a pool member
    own, twin, clean = pretrained_teacher.predict([images[5], almost_twin, woven(64, 64, seed=321)])
    assert own.mask[28:36, 32:40].all() and twin.mask[28:36, 32:40].all()
    assert twin.score == pytest.approx(own.score, rel=0.1)
    assert not clean.mask.any() and clean.score < pretrained_teacher.image_threshold


def test_fit_chooses_the_thresholds_that_predicting_the_pool_would(
    pretrained_teacher: BackboneTeacher,
) -> None:
    images = pool_with_square()
    pretrained_teacher.fit(images)
    chosen_by_fit = (pretrained_teacher.pixel_threshold, pretrained_teacher.image_threshold)
    newcomer = woven(64, 64, seed=1234)
    newcomer[8:20, 8:20] = 250
    (prediction,) = pretrained_teacher.predict([newcomer])
    assert (pretrained_teacher.pixel_threshold, pretrained_teacher.image_threshold) == chosen_by_fit
    assert prediction.mask[10:18, 10:18].all() and not prediction.mask[40:, 40:].any()
    pretrained_teacher.predict_pool(images, update_thresholds=True)
    assert pretrained_teacher.pixel_threshold == pytest.approx(chosen_by_fit[0])


def test_exact_duplicates_cannot_vouch_for_each_other(pretrained_teacher: BackboneTeacher) -> None:
    images = pool_with_square()
    images.append(images[5].copy())  # the same defective frame delivered twice
    predictions = pretrained_teacher.fit_predict_pool(images)
    assert predictions[5].score == pytest.approx(predictions[-1].score)
    assert predictions[5].mask[28:36, 32:40].all()


def test_same_seed_same_maps_other_seed_other_bank() -> None:
    images = [woven(64, 64, seed, noise=12.0) for seed in range(8)]

    def maps(seed: int) -> list[np.ndarray]:
        # screening bank below the pool's 512 patches, so the seed decides which patches are kept
        teacher = BackboneTeacher(TeacherConfig(pretrained=False, screen_bank_size=100, seed=seed))
        return [prediction.anomaly_map for prediction in teacher.fit_predict_pool(images)]

    first, again, other = maps(0), maps(0), maps(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_line_scan_frames_are_cut_not_squashed(pretrained_teacher: BackboneTeacher) -> None:
    frames = [woven(128, 1024, seed) for seed in range(4)]
    frames[2][50:66, 700:716] = 250
    layout = pretrained_teacher._layout(frames[0])
    assert layout.grid == (16, 128) and layout.num_patches == 16 * 128
    assert [(crop.left, crop.right) for crop in layout.crops][:2] == [(-32, 160), (96, 288)]
    assert [(crop.col0, crop.col1) for crop in layout.crops] == [(16 * i, 16 * i + 16) for i in range(8)]
    predictions = pretrained_teacher.fit_predict_pool(frames)
    assert all(prediction.anomaly_map.shape == (128, 1024) for prediction in predictions)
    assert int(np.argmax([prediction.score for prediction in predictions])) == 2
    peak_row, peak_col = np.unravel_index(np.argmax(predictions[2].anomaly_map), (128, 1024))
    assert 44 <= peak_row < 72 and 694 <= peak_col < 722


def test_predictions_stream_one_image_at_a_time(pretrained_teacher: BackboneTeacher) -> None:
    """`iter_predict` yields each prediction as it is made (a caller writing them out holds one map) and
    gives exactly what `predict` and `predict_pool` give, for pool members and newcomers alike."""
    images = pool_with_square()
    pretrained_teacher.fit(images)
    newcomer = woven(64, 64, seed=4321)
    newcomer[8:20, 8:20] = 250
    images = [*images, newcomer]
    made = []
    original = pretrained_teacher._predict_one

    def counting(*args: object) -> tuple[np.ndarray, float]:
        made.append(1)
        return original(*args)

    pretrained_teacher._predict_one = counting  # type: ignore[method-assign]
    try:
        stream = pretrained_teacher.iter_predict(images)
        first = next(stream)
        assert len(made) == 1  # nothing is scored ahead of the caller
        streamed = [first, *stream]
    finally:
        del pretrained_teacher._predict_one
    for predictions in (pretrained_teacher.predict(images), pretrained_teacher.predict_pool(images[:-1])):
        for a, b in zip(streamed, predictions, strict=False):
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
            np.testing.assert_array_equal(a.mask, b.mask)
            assert (a.score, a.uncertainty) == (b.score, b.uncertainty)
    assert streamed[-1].mask[10:18, 10:18].all()


def test_cached_and_recomputed_features_agree() -> None:
    images = [woven(64, 64, seed, noise=8.0) for seed in range(6)]
    cached = BackboneTeacher(TeacherConfig(pretrained=False))
    uncached = BackboneTeacher(TeacherConfig(pretrained=False, feature_cache_mb=0))
    for a, b in zip(cached.fit_predict_pool(images), uncached.fit_predict_pool(images), strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_bad_input_is_reported_clearly() -> None:
    teacher = BackboneTeacher(TeacherConfig(pretrained=False))
    with pytest.raises(RuntimeError, match="fit_pool"):
        teacher.predict_pool([woven(32, 32, 0)])
    with pytest.raises(ValueError, match="image 1 must be an"):
        teacher.fit_pool([woven(32, 32, 0), np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="at least two different images"):
        teacher.fit_pool([woven(32, 32, 0), woven(32, 32, 0)])
    with pytest.raises(ValueError, match="crop_size and crop_margin"):
        BackboneTeacher(TeacherConfig(pretrained=False, crop_size=100))
    with pytest.raises(ValueError, match="normal image 0 must be an"):
        teacher.fit([woven(32, 32, 0), woven(32, 32, 1)], [np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="non-empty pool"):
        teacher.fit([], [woven(32, 32, 0)])


def test_few_shot_references_find_a_defect_that_recurs_across_the_pool(
    pretrained_teacher: BackboneTeacher,
) -> None:
    """The same square in a third of the pool: known-good references still single out those images."""
    from models.teacher.types import Teacher

    assert isinstance(pretrained_teacher, Teacher)
    images = pool_with_square()
    for index in (1, 2, 7, 9):
        images[index][24:40, 28:44] = 250  # the same square in five of twelve images
    recurring = (1, 2, 5, 7, 9)
    pretrained_teacher.fit(images, [woven(64, 64, 100), woven(64, 64, 101)])
    predictions = pretrained_teacher.predict(images)
    for index, prediction in enumerate(predictions):
        if index in recurring:
            assert prediction.mask[28:36, 32:40].all()
        else:
            assert prediction.mask.sum() < 0.05 * predictions[5].mask.sum()
    # A new image is scored against the thresholds chosen from the normals.
    (unseen,) = pretrained_teacher.predict([woven(64, 64, 200)])
    assert unseen.score < pretrained_teacher.image_threshold and not unseen.mask.any()


@pytest.mark.parametrize("shots", [0, 1, 3])
def test_a_whole_image_unlike_the_others_is_flagged_as_a_whole(
    pretrained_teacher: BackboneTeacher, shots: int
) -> None:
    """A weave of another period everywhere: no patch stands out in its own image, the image does,
    against the normals (few-shot) or, zero-shot, against its nearest images in the pool."""
    images = [woven(64, 64, seed) for seed in range(14)]
    images[3] = woven(64, 64, 3, period=6.0)
    pretrained_teacher.fit(images, [woven(64, 64, 100 + j) for j in range(shots)])
    predictions = pretrained_teacher.predict(images)
    assert int(np.argmax([prediction.score for prediction in predictions])) == 3
    assert predictions[3].mask.mean() > 0.9
    assert all(prediction.mask.mean() < 0.01 for index, prediction in enumerate(predictions) if index != 3)


@pytest.mark.parametrize(("fraction", "found"), [(0.0, False), (0.2, True)])
def test_recurring_whole_image_defects_need_more_neighbours_than_there_are_of_them(
    fraction: float, found: bool
) -> None:
    """Three images of another weave in a pool of 30: judged against their 2 nearest images they vouch
    for each other; against 20% of the pool (6 images) good weaves are among those, and they stand out."""
    images = [woven(64, 64, seed) for seed in range(30)]
    odd = (4, 11, 23)
    for index in odd:
        images[index] = woven(64, 64, index, period=6.0)
    config = TeacherConfig(image_size=128, global_neighbours=2, global_neighbour_fraction=fraction)
    predictions = BackboneTeacher(config).fit_predict_pool(images)
    flagged = {index for index, prediction in enumerate(predictions) if prediction.mask.mean() > 0.9}
    assert flagged == (set(odd) if found else set())


def faint_speckle(image: np.ndarray, amplitude: float, seed: int = 7) -> np.ndarray:
    """`image` with pixel noise of `amplitude` grey levels added to its 8 x 8 block at (20, 36)."""
    noisy = image.copy()
    block = noisy[20:28, 36:44].astype(np.float64)
    block += np.random.default_rng(seed).normal(0.0, amplitude, (8, 8, 1))
    noisy[20:28, 36:44] = np.clip(block, 0, 255).astype(np.uint8)
    return noisy


def test_texture_energy_peaks_at_pixel_noise_and_is_relative_to_the_image() -> None:
    image = faint_speckle(woven(64, 64, 0), amplitude=10)
    energy = texture_energy(image)
    assert energy.shape == (64, 64) and energy.dtype == np.float32
    assert np.median(energy) == pytest.approx(0.0, abs=1e-6)
    top, left = np.unravel_index(np.argmax(energy), energy.shape)
    assert 16 <= top < 32 and 32 <= left < 48
    # Sharper noise everywhere moves the whole image, not one place in it.
    assert texture_energy(woven(64, 64, 0, noise=12.0)).max() < 0.5 * energy.max()


def test_texture_term_masks_more_of_a_faint_speckle_and_nothing_elsewhere() -> None:
    """Pixel-scale noise the pooled features only half see: the texture term covers more of it and adds
    no mask pixel to any other image."""
    images = [woven(64, 64, seed) for seed in range(12)]
    images[5] = faint_speckle(images[5], amplitude=10)
    with_term, without = (
        BackboneTeacher(TeacherConfig(image_size=128, fine_texture=on)).fit_predict_pool(images)
        for on in (True, False)
    )
    assert with_term[5].mask[20:28, 36:44].mean() > without[5].mask[20:28, 36:44].mean() + 0.1
    for index in set(range(12)) - {5}:
        np.testing.assert_array_equal(with_term[index].mask, without[index].mask)


def test_fit_without_normals_is_fit_pool() -> None:
    images = pool_with_square(count=8)
    a, b = BackboneTeacher(TeacherConfig(pretrained=False)), BackboneTeacher(TeacherConfig(pretrained=False))
    a.fit(images)
    b.fit_pool(images)
    for first, second in zip(a.predict(images), b.predict(images), strict=True):
        np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)
    assert a.pixel_threshold == b.pixel_threshold


def test_the_work_of_scoring_a_frame_grows_linearly_with_its_pixels() -> None:
    """Rows searched x patches scored, counted: a frame twice as long costs twice the work, not four times."""
    from models.nearest import count_search_work
    from models.teacher.backbone.memory_bank import MemoryBankConfig

    config = TeacherConfig(
        pretrained=False,
        image_size=64,
        crop_size=128,
        crop_margin=32,
        patches_per_neighbour=64,
        screen_bank_size=256,
        memory_bank=MemoryBankConfig(size=64, kmeans_iterations=1, ema_passes=0),
    )
    fit_work, predict_work = [], []
    for width in (256, 512, 1024):
        frames = [woven(64, width, seed) for seed in range(6)]
        teacher = BackboneTeacher(config)
        with count_search_work() as fitting:
            teacher.fit(frames[:5])
        with count_search_work() as scoring:
            teacher.predict(frames[5:])
        fit_work.append(fitting.distances / (5 * 64 * width))
        predict_work.append(scoring.distances / (64 * width))
    # per pixel: the same for a new frame of any length; for the pool's fit, never growing with length
    assert max(predict_work) <= 1.01 * min(predict_work), predict_work
    assert fit_work[1] <= 1.01 * fit_work[0] and fit_work[2] <= 1.01 * fit_work[1], fit_work


def test_a_long_frame_has_no_seam_where_its_crops_meet(pretrained_teacher: BackboneTeacher) -> None:
    frames = [woven(128, 512, seed) for seed in range(6)]
    frames[3][56:72, 120:136] = 250  # a square across the border of the first two 128-pixel cores
    predictions = pretrained_teacher.fit_predict_pool(frames)
    labels, _ = ndimage.label(predictions[3].mask)
    on_square = set(np.unique(labels[56:72, 120:136])) - {0}
    assert len(on_square) == 1 and labels[64, 121] == labels[64, 134] > 0
    # Clean frames: the columns at the cores' borders stray from the map's level no more than others do
    # (cut without context, crop_margin=0, they stray 2.6 times as much; with 32 pixels 0.65 times).
    profile = np.stack([p.anomaly_map.mean(axis=0) for i, p in enumerate(predictions) if i != 3]).mean(axis=0)
    deviation = np.abs(profile - np.median(profile))
    at_borders = np.concatenate([np.arange(b - 4, b + 4) for b in (128, 256, 384)])
    away = np.setdiff1d(
        np.arange(16, 496), np.concatenate([np.arange(b - 16, b + 16) for b in (128, 256, 384)])
    )
    assert deviation[at_borders].mean() < 1.5 * deviation[away].mean()
