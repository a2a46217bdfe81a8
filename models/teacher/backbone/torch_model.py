"""Backbone teacher: pretrained patch features scored against the pool itself and against normal references.

Zero-shot (a pool, no labels): defects are rare, so a patch of one image that has no close counterpart in
the *other* images is anomalous. Few-shot (k known-good images, k = 1..16): a compressed memory bank of
the normals' patches (memory_bank.py) says what good fabric looks like.

Features. A frozen ImageNet EfficientNet-Lite0 gives maps at strides 2, 4, 8 and 16 (16, 24, 40 and 112
channels). The stride-2 and stride-4 maps are average-pooled to the stride-8 grid, the stride-16 map is
upsampled to it; each level is L2-normalised on its own (so the 112-channel level does not drown the
others) and the levels are concatenated, scaled to unit norm: 192 dimensions per stride-8 patch. The
fine levels see small high-frequency defects (pin-holes, speckle) that the stride-8/16 features average
away; no neighbourhood pooling on top (it blurs exactly those).

Scoring, for every image of the pool (fit) and any new image (predict), in three steps:
1. Screening: each pool image against a random bank of `screen_bank_size` pool patches, its own patches
   (and those of exact duplicates) masked out, k nearest (pool_index.py). The map's maximum ranks images.
2. Neighbour score (a): each patch's mean distance to its `k` nearest rows among the samples of the
   `neighbour_images` images most similar to it (mean patch feature), taken from the *clean* part of the
   pool only (the `clean_fraction` of images the screening ranks lowest) plus the normals. Looking only at
   similar images keeps a multi-fabric pool apart; looking only at clean ones keeps a defect that recurs in
   many images from explaining itself away.
3. Reference score (b): the softmin score of a compressed memory bank (CFA-style, memory_bank.py) fitted
   on the normals' patches, or, without normals, on `reference_patches` sampled from the
   `reference_fraction` of images the screening ranks lowest (pseudo-normals).
Combination: patch score = mean of a and b after each is standardised by the median and MAD-sigma of its
pool patches. Chosen by measurement against a alone, b alone and their minimum (BENCHMARKS.md); b alone is
weaker on a pool of many fabrics, which a pseudo-normal bank covers only thinly.

Maps. Patch scores (one stride-8 grid per image, see "Images of any size") are bilinearly upsampled to the
image, the map is
Gaussian-smoothed (`smoothing_sigma` pixels) and the image's own median is subtracted: a fabric that is
merely rare in the pool is raised everywhere, a defect only where it is.

Whole-image (global) defects. A fabric woven at a slightly wrong angle or density differs from good fabric
everywhere, so no patch stands out in its own image. The teacher also scores each image as a whole by its
descriptor (the mean of its coarse patch features, features.py): with normals, the distance to the nearest
normal; without, the mean distance to its nearest other pool images, `global_neighbour_fraction` of the pool
and at least `global_neighbours` (a k-NN density at image level). A whole-image defect is found while it is
rarer than that fraction: then its nearest neighbours must include good fabric. With fewer neighbours than
there are alike defects they vouch for each other; a defect that makes up a third of the pool cannot be
found this way (BENCHMARKS.md). That gap is standardised by its
median and MAD-sigma over the pool and mapped onto the pixel scale (floor = pixel median + z x pixel sigma);
the image score is max(map maximum, floor). When the floor passes the pixel threshold and exceeds the map's
own maximum, the map is raised to it and the mask covers the image; a large local defect also moves the
descriptor, but then its own region stands out more and stays the mask. Judged against the pool rather than
against the normals alone, a pool of many fabrics (where most images are far from a handful of normals) is
not flagged wholesale.

Defaults (k = 2 nearest rows, 16 neighbour images) were chosen by measurement on conformal-clip local
defects and the embedded fabric pool together, then kept for every dataset (BENCHMARKS.md).

Pixel-scale texture. Speckle-sized defects that the pooled features miss show in the local energy of the
image's Laplacian (texture.py). Each image's maximum of that energy is standardised by the median and
MAD-sigma of those maxima over the pool, like the global term, and the energy map is put on the pixel scale
the same way (pixel median + z x pixel sigma); the map is the maximum of the two. A typical image's texture
then sits at z ~ 0, below its own map maximum (~3 pixel sigmas), and adds nothing; only fine texture far
stronger than the pool's usual maximum marks a place. The energy is judged against the pool's image maxima,
not its pixels: against the pixels, nominal images' ordinary texture peaks rise above their maps and swamp
the global term (BENCHMARKS.md).

Thresholds, masks and uncertainty (robust statistics, no labels):
- without normals: `pixel_threshold` = median + `threshold_mads` x MAD-sigma of the pool's pixel scores
  (a random sample of up to 10^6 pixels; MAD-sigma = 1.4826 x median absolute deviation). Defect pixels
  are a tiny fraction, so median and MAD describe normal fabric; 6 MAD-sigma is a conventional "far
  outlier" distance;
- with normals: the same rule on the normals' held-out maps: each normal is scored by a memory bank fitted
  without it (normals split into two folds; a single normal is split into its top and bottom halves, each
  half scored by a bank of the other). Held-out scores are what an unseen good image gets;
- mask = map >= pixel_threshold; image score = max(map maximum, floor of the whole-image term);
  `image_threshold` = `pixel_threshold`, so an image is anomalous exactly when its mask is not empty;
- uncertainty = exp(-0.5 ((score - image_threshold) / sigma)^2), sigma the MAD-sigma of the pool's image
  scores: 1 at the threshold, ~0 a few sigma away, so borderline images are the ones sent to people.

Images of any size, at a cost linear in their pixels. Images up to `crop_size` on both sides run whole at
native size (never squashed); larger ones (line-scan frames, 8192 x 512 and up) are cut into cores of
`crop_size` that run with `crop_margin` pixels of context, and only the cores' features are kept
(crops.py): one seamless patch grid per image, no tile borders in the map. A side longer than `image_size`
also gets that context, mirrored, beyond its own ends, so a frame's ends do not meet zero padding. What an
image is scored against never grows with its size: its share of the screening bank is proportional to
its patches out of a pool-wide `screen_bank_size`, it keeps `patches_per_neighbour` samples however long
it is (so the neighbour bank is at most `neighbour_images` x `patches_per_neighbour` rows), and the
reference bank has `memory_bank.size` centroids. Scoring a frame thus costs its patches times a fixed
number of rows.
The fabric of a line-scan frame (region.py): where a frame ends in background beyond the selvedge, the
patches there enter no bank, no statistic and no threshold sample, the map there is 0 (the fabric's typical
level, never a defect), and the texture and whole-image terms act on the fabric's columns only.

Memory is bounded: the fit-time feature cache holds at most `feature_cache_mb` (float16, 6 MB a 4096 x 256
frame; images beyond it are re-extracted by each of the passes that need them), distances are computed in
chunks (models/nearest.py), and `iter_predict` yields one image's prediction at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from models.backbone.efficientnet_lite import load_pretrained_lite0, normalize
from models.progress import track
from models.robust_stats import median_and_sigma
from models.teacher.backbone.crops import ALIGN, Crop, CropLayout, crop_layout, crop_pixels
from models.teacher.backbone.features import PATCH_STRIDE, TEACHER_STRIDES, PatchFeatureExtractor
from models.teacher.backbone.memory_bank import CompressedMemoryBank, MemoryBankConfig
from models.teacher.backbone.pool_index import (
    PoolIndex,
    PoolIndexBuilder,
    neighbour_scores,
    screen_scores,
)
from models.teacher.backbone.region import RegionConfig, fabric_columns
from models.teacher.backbone.texture import texture_energy
from models.teacher.types import TeacherPrediction

logger = logging.getLogger(__name__)

__all__ = ["PATCH_STRIDE", "BackboneTeacher", "PatchFeatureExtractor", "TeacherConfig"]
_MAX_PIXEL_SAMPLES = 1_000_000
_HELDOUT_FOLDS = 2


@dataclass
class TeacherConfig:
    """Settings of the backbone teacher (see the module docstring for what each one does)."""

    image_size: int = 256
    batch_size: int = 16
    crop_size: int = 2048
    crop_margin: int = 128
    seed: int = 0
    pretrained: bool = True
    k: int = 2
    screen_bank_size: int = 4096
    clean_fraction: float = 0.5
    neighbour_images: int = 16
    patches_per_neighbour: int = 512
    reference_fraction: float = 0.25
    reference_patches: int = 32768
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    smoothing_sigma: float = 4.0
    threshold_mads: float = 6.0
    global_neighbours: int = 20
    global_neighbour_fraction: float = 0.1
    fine_texture: bool = True
    feature_cache_mb: int = 2048
    region: RegionConfig = field(default_factory=RegionConfig)


def _image_key(image: np.ndarray) -> str:
    """Content key of an image: identical pixels give the same key (used for own-image exclusion)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def _check_images(images: Sequence[np.ndarray], what: str = "image") -> None:
    for index, image in enumerate(images):
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            described = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
            raise ValueError(f"{what} {index} must be an (H, W, 3) uint8 array, got {described}")


def _pixel_sample(maps: Iterable[np.ndarray], sizes: Sequence[int], seed: int) -> np.ndarray:
    """About 10^6 pixels drawn from `maps`, one at a time (a generator: none is kept).

    Each map is the fabric part of an image of `sizes[i]` pixels and gives pixels in proportion to that
    size (fewer where less of the image is fabric).
    """
    total_pixels = sum(sizes)
    rng = np.random.default_rng(seed)
    parts = []
    for anomaly_map, size in zip(maps, sizes, strict=True):
        n = round(_MAX_PIXEL_SAMPLES * size / total_pixels)
        parts.append(rng.choice(anomaly_map.ravel(), size=min(anomaly_map.size, max(1, n)), replace=False))
    return np.concatenate(parts)


@dataclass
class _Scored:
    """Both patch scores of one image, (P,) float32 each: neighbours (a) and reference bank (b)."""

    neighbour: torch.Tensor
    reference: torch.Tensor


class BackboneTeacher:
    """Pseudo-labeling teacher on frozen backbone features (see the module docstring).

    Implements `models.teacher.types.Teacher`: `fit(pool, normals)` then `predict(images)`. The older
    names stay: `fit_pool(images)` (= `fit(images)`), `predict_pool(images, update_thresholds)` and
    `fit_predict_pool(images)`.
    """

    name = "backbone"
    class_names: tuple[str, ...] = ()

    def __init__(self, config: TeacherConfig | None = None):
        self.config = config or TeacherConfig()
        if self.config.image_size < PATCH_STRIDE or self.config.batch_size < 1:
            raise ValueError(f"need image_size >= {PATCH_STRIDE} and batch_size >= 1")
        if self.config.crop_size < ALIGN or self.config.crop_size % ALIGN or self.config.crop_margin % ALIGN:
            raise ValueError(f"crop_size and crop_margin must be multiples of {ALIGN} (crop_size >= {ALIGN})")
        if not 0 < self.config.clean_fraction <= 1 or not 0 < self.config.reference_fraction <= 1:
            raise ValueError("clean_fraction and reference_fraction must lie in (0, 1]")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # random weights (pretrained=False) also follow the seed
            backbone = load_pretrained_lite0(self.config.pretrained)
        # `extractor` keeps the stride-8/16 features with 3 x 3 context that region naming describes
        # regions with (models/teacher/naming.py, loom/stages/teachers.py); scoring uses the finer levels on
        # the same network.
        self.extractor = PatchFeatureExtractor(backbone).eval()
        self._patch_features = self.extractor.sharing_backbone(TEACHER_STRIDES, context=1)
        self.pixel_threshold: float | None = None
        self.image_threshold: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._score_sigma: float | None = None  # spread of image scores, the uncertainty scale
        self._pixel_stats: tuple[float, float] | None = None  # median, sigma behind pixel_threshold
        self._index: PoolIndex | None = None
        self._candidates: tuple[list[str], list[torch.Tensor], torch.Tensor] | None = None
        self._bank: CompressedMemoryBank | None = None
        self._standardise: tuple[float, float, float, float] | None = None
        self._global_reference: tuple[list[str], torch.Tensor] | None = None
        self._global_stats: tuple[float, float] | None = None
        self._texture_stats: tuple[float, float] | None = None  # median, sigma of images' texture maxima
        self._pool_scores: dict[str, _Scored] = {}
        self._pool_descriptors: dict[str, torch.Tensor] = {}
        self._few_shot = False
        self._feature_cache: dict[str, torch.Tensor] = {}
        # image key -> (first, last, columns): the fabric's patch columns, for images that are not all fabric
        self._fabric: dict[str, tuple[int, int, int]] = {}
        # Pool members' local-map and texture maxima, kept so that scoring the pool at fit needs no second
        # map of each image; and the pool whose maps chose the thresholds (None: the normals' maps did).
        self._local_max: dict[str, float] = {}
        self._texture_max: dict[str, float] = {}
        self._thresholds_from: tuple[str, ...] | None = None

    # ---------------------------------------------------------------- features
    def _layout(self, image: np.ndarray) -> CropLayout:
        height, width = image.shape[:2]
        return crop_layout(
            height, width, self.config.crop_size, self.config.crop_margin, self.config.image_size
        )

    @torch.inference_mode()
    def _extract(self, images: Sequence[np.ndarray]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (image index, (num_patches, D) float32 patch features, row-major) in image order.

        Crops of equal shape share backbone batches, also across images, up to `batch_size` x
        `image_size`^2 pixels a batch (at least one crop). Features are rounded through float16, the
        precision of the cache, so cached and re-extracted features are identical.
        """
        layouts = [self._layout(image) for image in images]
        budget = self.config.batch_size * self.config.image_size**2
        queue: list[tuple[int, Crop, np.ndarray]] = []  # crops waiting for the backbone
        grids: dict[int, torch.Tensor] = {}  # image index -> (rows, cols, D) features being filled
        missing = [len(layout.crops) for layout in layouts]

        def run_queue() -> None:
            features = self._patch_features(normalize(np.stack([pixels for _, _, pixels in queue])))
            for (index, crop, _), feature in zip(queue, features, strict=True):
                if index not in grids:
                    grids[index] = torch.empty(*layouts[index].grid, feature.shape[0])
                row, col = crop.top // PATCH_STRIDE, crop.left // PATCH_STRIDE  # negative: mirrored context
                core = feature[:, crop.row0 - row : crop.row1 - row, crop.col0 - col : crop.col1 - col]
                grids[index][crop.row0 : crop.row1, crop.col0 : crop.col1] = core.permute(1, 2, 0)
                missing[index] -= 1
            queue.clear()

        def finished(index: int) -> torch.Tensor:
            return grids.pop(index).flatten(0, 1).half().float()

        next_image = 0
        for index, (image, layout) in enumerate(zip(images, layouts, strict=True)):
            for crop in layout.crops:
                if queue and (queue[0][1].shape != crop.shape or (len(queue) + 1) * crop.pixels > budget):
                    run_queue()
                queue.append((index, crop, crop_pixels(image, crop)))
            while next_image < index and missing[next_image] == 0:
                yield next_image, finished(next_image)
                next_image += 1
        if queue:
            run_queue()
        for index in range(next_image, len(images)):
            yield index, finished(index)

    def _iter_features(self, images: Sequence[np.ndarray], keys: list[str]) -> Iterator[torch.Tensor]:
        """Per-image patch features in order: from the fit-time cache when present, else extracted now."""
        missing = [index for index, key in enumerate(keys) if key not in self._feature_cache]
        extracted = self._extract([images[index] for index in missing])
        for key in keys:
            if key in self._feature_cache:
                yield self._feature_cache[key].float()
            else:
                yield next(extracted)[1]

    # ---------------------------------------------------------------- the fabric in a frame
    def _find_fabric(self, key: str, layout: CropLayout, patches: torch.Tensor) -> None:
        """Record where the fabric of a newly extracted image lies (region.py); nothing if all of it is."""
        if key in self._fabric:
            return
        first, last = fabric_columns(patches, layout.grid, self.config.region)
        if (first, last) != (0, layout.grid[1]):
            self._fabric[key] = (first, last, layout.grid[1])

    def _fabric_rows(self, key: str, count: int) -> torch.Tensor:
        """(count,) bool: which of the image's `count` patches (row-major) lie on its fabric."""
        if key not in self._fabric:
            return torch.ones(count, dtype=torch.bool)
        first, last, columns = self._fabric[key]
        column = torch.arange(count) % columns
        return (column >= first) & (column < last)

    def _inside(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """(P, ...) per-patch rows of an image -> those on its fabric (all of them for most images)."""
        return rows if key not in self._fabric else rows[self._fabric_rows(key, rows.shape[0])]

    def _fabric_pixels(self, key: str, width: int) -> slice:
        """The image's pixel columns of fabric."""
        if key not in self._fabric:
            return slice(0, width)
        first, last, _ = self._fabric[key]
        return slice(first * PATCH_STRIDE, min(last * PATCH_STRIDE, width))

    def _describe(self, key: str, patches: torch.Tensor) -> torch.Tensor:
        """The image's descriptor (features.py) over its fabric only."""
        return self._patch_features.descriptor(self._inside(key, patches))

    def _extract_new(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> Iterator[torch.Tensor]:
        """Patch features of images met for the first time, in order, their fabric recorded."""
        for index, patches in self._extract(images):
            self._find_fabric(keys[index], self._layout(images[index]), patches)
            yield patches

    # ---------------------------------------------------------------- fit
    def fit(self, pool: Sequence[np.ndarray], normals: Sequence[np.ndarray] = ()) -> None:
        """Index the pool, build the reference bank and choose the thresholds.

        Args:
            pool: the images to label, (H, W, 3) uint8 each.
            normals: known-good images of the same line (few-shot references), possibly also in `pool`.
        """
        _check_images(pool)
        _check_images(normals, "normal image")
        if not pool:
            raise ValueError("fit needs a non-empty pool of images to label")
        keys = [_image_key(image) for image in pool]
        normal_keys = [_image_key(image) for image in normals]
        if len(set(keys) | set(normal_keys)) < 2:
            raise ValueError(
                "mutual scoring needs a pool of at least two different images (or normal references)"
            )
        self._reset()
        self._few_shot = bool(normals)
        self._index_pool(pool, keys)
        screening = self._screen(pool, keys)
        order = np.argsort(screening, kind="stable")
        clean = order[: max(1, round(self.config.clean_fraction * len(pool)))]
        normal_features = list(self._extract_new(normals, normal_keys))
        self._set_candidates(clean, normal_keys, normal_features)
        if normals:
            self._bank = self._fit_bank(
                [self._inside(key, f) for key, f in zip(normal_keys, normal_features, strict=True)]
            )
        else:
            references = order[: max(1, round(self.config.reference_fraction * len(pool)))]
            self._bank = self._fit_bank([self._index.samples[int(i)].float() for i in references])
        self._score_pool(pool, keys)
        self._global_stats = self._fit_global_term(normal_keys, normal_features)
        self._texture_stats = self._fit_texture_term(pool, keys)
        if normals:
            maps = self._heldout_normal_maps(normals, normal_keys, normal_features)
            self._choose_thresholds(maps, [image.shape[0] * image.shape[1] for image in normals])
        else:
            self._choose_thresholds(
                self._maps(pool, keys), [image.shape[0] * image.shape[1] for image in pool]
            )
        self._thresholds_from = None if normals else tuple(keys)
        pool_scores = [
            self._pool_image_score(image, key)
            for image, key in track(zip(pool, keys, strict=True), "teacher image scores", len(pool))
        ]
        self._score_sigma = median_and_sigma(np.array(pool_scores))[1]
        logger.info(
            "backbone teacher: pool of %d, %d normals, %d clean neighbours, bank of %d, pixel threshold %.4f",
            len(pool),
            len(normals),
            len(clean),
            self._bank.size,
            self.pixel_threshold,
        )

    def fit_pool(self, images: Sequence[np.ndarray]) -> None:
        """Zero-shot fit on an unlabeled pool: `fit(images)`. At least two different images."""
        self.fit(images)

    def _index_pool(self, pool: Sequence[np.ndarray], keys: list[str]) -> None:
        """One pass over the pool: screening bank, per-image samples, descriptors, bounded feature cache."""
        layouts = [self._layout(image) for image in pool]
        builder = PoolIndexBuilder(
            patch_counts=[layout.num_patches for layout in layouts],
            keys=keys,
            samples_per_image=[self.config.patches_per_neighbour] * len(pool),
            screen_bank_size=self.config.screen_bank_size,
            seed=self.config.seed,
        )
        cache_budget = self.config.feature_cache_mb * 2**20
        for index, patches in track(self._extract(pool), "teacher features", len(pool)):
            self._find_fabric(keys[index], layouts[index], patches)
            builder.add(index, patches, self._describe(keys[index], patches), self._fabric.get(keys[index]))
            if keys[index] not in self._feature_cache and cache_budget >= patches.numel() * 2:
                self._feature_cache[keys[index]] = patches.half()
                cache_budget -= patches.numel() * 2
        self._index = builder.build()
        self._pool_descriptors = dict(zip(keys, self._index.descriptors, strict=True))

    def _screen(self, pool: Sequence[np.ndarray], keys: list[str]) -> np.ndarray:
        """(N,) screening score of every pool image: the maximum of its map against the screening bank."""
        assert self._index is not None
        scores = []
        features = zip(pool, keys, self._iter_features(pool, keys), strict=True)
        for image, key, patches in track(features, "teacher screening", len(pool)):
            patch_scores = screen_scores(self._index, patches, key, self.config.k)
            anomaly_map = self._to_map(self._layout(image), patch_scores, key)
            scores.append(float(anomaly_map[:, self._fabric_pixels(key, image.shape[1])].max()))
        return np.array(scores)

    def _set_candidates(
        self, clean: np.ndarray, normal_keys: list[str], normal_features: list[torch.Tensor]
    ) -> None:
        """Images a patch may be matched against: the clean part of the pool and the normals."""
        assert self._index is not None
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        keys = [self._index.keys[int(i)] for i in clean]
        samples = [self._index.samples[int(i)] for i in clean]
        descriptors = [self._index.descriptors[int(i)] for i in clean]
        for key, features in zip(normal_keys, normal_features, strict=True):
            fabric = self._inside(key, features)
            keep = torch.randperm(fabric.shape[0], generator=generator)[: self.config.patches_per_neighbour]
            keys.append(key)
            samples.append(fabric[keep.sort().values].half())
            descriptors.append(self._patch_features.descriptor(fabric))
        self._candidates = (keys, samples, torch.stack(descriptors))

    def _fit_bank(self, parts: Sequence[torch.Tensor]) -> CompressedMemoryBank:
        """A compressed memory bank on at most `reference_patches` rows drawn from `parts` ((P_i, D) each)."""
        patches = torch.cat(list(parts))
        if patches.shape[0] > self.config.reference_patches:
            generator = torch.Generator().manual_seed(self.config.seed + 2)
            keep = torch.randperm(patches.shape[0], generator=generator)[: self.config.reference_patches]
            patches = patches[keep.sort().values]
        return CompressedMemoryBank(self.config.memory_bank).fit(patches)

    def _score_pool(self, pool: Sequence[np.ndarray], keys: list[str]) -> None:
        """Both patch scores of every pool image, and the statistics that standardise them."""
        features = zip(keys, self._iter_features(pool, keys), strict=True)
        for key, patches in track(features, "teacher scoring", len(pool)):
            if key not in self._pool_scores:
                self._pool_scores[key] = self._raw_scores(patches, key)
        # over the fabric only: background beyond the selvedge is not what fabric scores are measured by
        pooled = [(key, self._pool_scores[key]) for key in dict.fromkeys(keys)]
        neighbour = torch.cat([self._inside(key, s.neighbour) for key, s in pooled])
        reference = torch.cat([self._inside(key, s.reference) for key, s in pooled])
        neighbour_stats = median_and_sigma(neighbour.numpy())
        reference_stats = median_and_sigma(reference.numpy())
        self._standardise = (*neighbour_stats, *reference_stats)

    @torch.inference_mode()
    def _raw_scores(
        self, patches: torch.Tensor, key: str, bank: CompressedMemoryBank | None = None
    ) -> _Scored:
        """Neighbour and reference-bank scores of one image's (P, D) patches (own image excluded)."""
        assert self._candidates is not None and self._bank is not None and self._index is not None
        keys, samples, descriptors = self._candidates
        others = [j for j, candidate in enumerate(keys) if candidate != key]
        if others:
            chosen = (
                samples if len(others) == len(keys) else [samples[j] for j in others],
                descriptors[others],
            )
        else:  # the clean set is this image alone (tiny pools): match against the rest of the pool
            rest = [j for j, candidate in enumerate(self._index.keys) if candidate != key]
            chosen = ([self._index.samples[j] for j in rest], self._index.descriptors[rest])
        neighbour = neighbour_scores(
            patches,
            self._describe(key, patches),
            *chosen,
            self.config.neighbour_images,
            self.config.k,
        )
        return _Scored(neighbour, (bank or self._bank).score(patches))

    def _combine(self, scored: _Scored) -> torch.Tensor:
        """(P,) patch score: mean of the two standardised scores."""
        assert self._standardise is not None
        n_median, n_sigma, r_median, r_sigma = self._standardise
        return 0.5 * ((scored.neighbour - n_median) / n_sigma + (scored.reference - r_median) / r_sigma)

    # ---------------------------------------------------------------- global term and thresholds
    def _fit_global_term(
        self, normal_keys: list[str], normal_features: list[torch.Tensor]
    ) -> tuple[float, float] | None:
        """Median and MAD-sigma over the pool of each image's gap (see `_image_gap`)."""
        if normal_features:
            self._global_reference = (
                normal_keys,
                torch.stack(
                    [self._describe(key, f) for key, f in zip(normal_keys, normal_features, strict=True)]
                ),
            )
        else:
            keys = list(self._pool_descriptors)
            self._global_reference = (keys, torch.stack([self._pool_descriptors[key] for key in keys]))
        gaps = [self._image_gap(descriptor, key) for key, descriptor in self._pool_descriptors.items()]
        finite = np.array([gap for gap in gaps if gap is not None])
        return median_and_sigma(finite) if finite.size else None

    def _image_gap(self, descriptor: torch.Tensor, key: str) -> float | None:
        """How far an image's descriptor lies from the reference images that are not this very image.

        With normals: the distance to the nearest normal. Without: the mean distance to the nearest
        pool images (see the module docstring for how many), a k-NN density at image level (None: no
        other image).
        """
        assert self._global_reference is not None
        keys, descriptors = self._global_reference
        others = [j for j, reference_key in enumerate(keys) if reference_key != key]
        if not others:
            return None
        distances = torch.cdist(descriptor[None], descriptors[others])[0]
        if self._few_shot:
            return float(distances.min())
        share = round(self.config.global_neighbour_fraction * len(others))
        nearest = min(max(self.config.global_neighbours, share), len(others))
        return float(distances.topk(nearest, largest=False).values.mean())

    def _global_z(self, descriptor: torch.Tensor, key: str) -> float | None:
        """How far (in pool MAD-sigmas) the image as a whole lies from the references; None if unknown."""
        if self._global_stats is None:
            return None
        gap = self._image_gap(descriptor, key)
        median, sigma = self._global_stats
        return None if gap is None else (gap - median) / sigma

    def _fit_texture_term(self, images: Sequence[np.ndarray], keys: list[str]) -> tuple[float, float] | None:
        """Median and MAD-sigma of the images' texture-energy maxima on their fabric (None: switched off)."""
        if not self.config.fine_texture:
            return None
        for image, key in zip(images, keys, strict=True):
            if key not in self._texture_max:
                energy = texture_energy(image)[:, self._fabric_pixels(key, image.shape[1])]
                self._texture_max[key] = energy.max()
        return median_and_sigma(np.array([self._texture_max[key] for key in keys]))

    def _heldout_normal_maps(
        self, normals: Sequence[np.ndarray], normal_keys: list[str], normal_features: list[torch.Tensor]
    ) -> list[np.ndarray]:
        """Fabric part of the normals' maps, each patch scored by a memory bank fitted without it (see the
        docstring)."""
        layouts = [self._layout(image) for image in normals]
        if len(normals) == 1:
            features, layout = normal_features[0], layouts[0]
            rows = torch.arange(features.shape[0]) % (layout.grid[0] * layout.grid[1]) // layout.grid[1]
            top = rows < layout.grid[0] // 2
            key = normal_keys[0]
            if top.all() or not top.any():  # a single patch row cannot be split: score it against itself
                return [self._fabric_map(layout, self._combine(self._raw_scores(features, key)), key)]
            reference = torch.empty(features.shape[0])
            for held_out in (top, ~top):
                bank = self._fit_bank([features[~held_out & self._fabric_rows(key, features.shape[0])]])
                reference[held_out] = bank.score(features[held_out])
            neighbour = self._raw_scores(features, key).neighbour
            return [self._fabric_map(layout, self._combine(_Scored(neighbour, reference)), key)]
        maps = []
        folds = [list(range(fold, len(normals), _HELDOUT_FOLDS)) for fold in range(_HELDOUT_FOLDS)]
        for fold in folds:
            bank = self._fit_bank(
                [
                    self._inside(normal_keys[j], normal_features[j])
                    for j in range(len(normals))
                    if j not in fold
                ]
            )
            for j in fold:
                scored = self._raw_scores(normal_features[j], normal_keys[j], bank)
                maps.append(self._fabric_map(layouts[j], self._combine(scored), normal_keys[j]))
        return maps

    def _choose_thresholds(self, maps: Iterable[np.ndarray], sizes: Sequence[int]) -> None:
        """`pixel_threshold` = median + threshold_mads x MAD-sigma of these maps' pixels (the fabric of
        images of `sizes` pixels, see `_pixel_sample`); image one equal."""
        median, sigma = median_and_sigma(_pixel_sample(maps, sizes, self.config.seed))
        self._pixel_stats = (median, sigma)
        self.pixel_threshold = median + self.config.threshold_mads * sigma
        # The image score is the map's maximum, so this makes "anomalous" mean "has a non-empty mask".
        self.image_threshold = self.pixel_threshold

    # ---------------------------------------------------------------- predict
    def _to_map(self, layout: CropLayout, patch_scores: torch.Tensor, key: str | None = None) -> np.ndarray:
        """(num_patches,) scores -> upsampled to the image, smoothed, own median subtracted: (H, W).

        For an image with background beyond its fabric (`key` given), the scores there are replaced by the
        fabric's median before upsampling (none bleeds into the fabric), the median is the fabric's, and
        the map beyond it is 0: the fabric's typical level, never a defect.
        """
        fabric = key is not None and key in self._fabric
        if fabric:
            inside = self._fabric_rows(key, patch_scores.shape[0])
            patch_scores = torch.where(inside, patch_scores, patch_scores[inside].median())
        stitched = F.interpolate(
            patch_scores.float().view(1, 1, *layout.grid),
            size=(layout.height, layout.width),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        if self.config.smoothing_sigma > 0:
            stitched = gaussian_filter(stitched, sigma=self.config.smoothing_sigma, mode="nearest")
        # Relative to the image's own typical level: a fabric that is merely rare in the pool is raised
        # everywhere, a defect only where it is.
        if not fabric:
            return (stitched - np.median(stitched)).astype(np.float32)
        columns = self._fabric_pixels(key, layout.width)
        anomaly_map = np.zeros_like(stitched, dtype=np.float32)
        anomaly_map[:, columns] = stitched[:, columns] - np.median(stitched[:, columns])
        return anomaly_map

    def _fabric_map(self, layout: CropLayout, patch_scores: torch.Tensor, key: str) -> np.ndarray:
        """The fabric columns of `_to_map`'s map."""
        return self._to_map(layout, patch_scores, key)[:, self._fabric_pixels(key, layout.width)]

    def _new_features(self, images: Sequence[np.ndarray], keys: list[str]) -> Iterator[torch.Tensor | None]:
        """Per image in order: None for pool members (scored at fit), else its patch features, extracted
        now (one image at a time) with its fabric recorded."""
        new = [index for index, key in enumerate(keys) if key not in self._pool_scores]
        extracted = self._iter_features([images[i] for i in new], [keys[i] for i in new])
        for image, key in zip(images, keys, strict=True):
            if key in self._pool_scores:
                yield None
                continue
            patches = next(extracted)
            self._find_fabric(key, self._layout(image), patches)
            yield patches

    def _maps(self, images: Sequence[np.ndarray], keys: list[str]) -> Iterator[np.ndarray]:
        """Fabric part of the local anomaly maps (no global term) of `images`, one at a time; pool members
        reuse their fit-time scores."""
        features = self._new_features(images, keys)
        for image, key, patches in zip(images, keys, features, strict=True):
            scored = self._pool_scores[key] if patches is None else self._raw_scores(patches, key)
            fabric_map = self._fabric_map(self._layout(image), self._combine(scored), key)
            if patches is None:
                self._local_max[key] = float(fabric_map.max())
            yield fabric_map

    def predict(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """Maps, scores, masks and uncertainties for `images` against the thresholds chosen by `fit`."""
        return list(self.iter_predict(images))

    def iter_predict(self, images: Sequence[np.ndarray]) -> Iterator[TeacherPrediction]:
        """`predict`, one image at a time: each prediction is yielded as soon as it is made, so a caller
        that writes them out holds one map (4 MB for a 4096 x 256 frame), not one per image."""
        for anomaly_map, score in self._scored(images, self._checked_keys(images)):
            yield self._prediction(anomaly_map, score)

    def predict_pool(
        self, images: Sequence[np.ndarray], update_thresholds: bool = True
    ) -> list[TeacherPrediction]:
        """Anomaly maps, scores, masks and uncertainties for `images`.

        Args:
            images: (H, W, 3) uint8 each, any sizes; pool members reuse their fit-time scores (their own
                patches never vouch for them), other images are scored now.
            update_thresholds: without normals, choose the thresholds (and the uncertainty scale) again
                from these images' maps; with normals, only the uncertainty scale (the thresholds come
                from the normals). False keeps those chosen by `fit`.
        """
        if not update_thresholds:
            return self.predict(images)
        keys = self._checked_keys(images)
        # The pool that chose the thresholds at fit would choose the same ones again.
        if not self._few_shot and tuple(keys) != self._thresholds_from:
            self._choose_thresholds(
                self._maps(images, keys), [image.shape[0] * image.shape[1] for image in images]
            )
            self._texture_stats = self._fit_texture_term(images, keys)
        results = list(self._scored(images, keys))
        self._score_sigma = median_and_sigma(np.array([score for _, score in results]))[1]
        return [self._prediction(anomaly_map, score) for anomaly_map, score in results]

    def _checked_keys(self, images: Sequence[np.ndarray]) -> list[str]:
        """Content keys of images to predict, once the teacher is fitted and the images are valid."""
        if self._bank is None:
            raise RuntimeError("call fit(pool) (or fit_pool(images)) before predict(images)")
        _check_images(images)
        return [_image_key(image) for image in images]

    def _scored(self, images: Sequence[np.ndarray], keys: list[str]) -> Iterator[tuple[np.ndarray, float]]:
        """`_predict_one`'s map and image score of each image, in order, one at a time."""
        features = self._new_features(images, keys)
        pairs = zip(images, keys, features, strict=True)
        for image, key, patches in track(pairs, "teacher predict", len(images)):
            yield self._predict_one(image, key, patches)

    def _predict_one(
        self, image: np.ndarray, key: str, patches: torch.Tensor | None
    ) -> tuple[np.ndarray, float]:
        """Map (with the texture and global terms) and image score of one image; `patches` None for pool
        members."""
        assert self._pixel_stats is not None and self.pixel_threshold is not None
        if patches is None:
            scored, descriptor = self._pool_scores[key], self._pool_descriptors[key]
        else:
            scored, descriptor = self._raw_scores(patches, key), self._describe(key, patches)
        anomaly_map = self._to_map(self._layout(image), self._combine(scored), key)
        fabric = anomaly_map[:, self._fabric_pixels(key, image.shape[1])]  # a view: changed in place
        pixel_median, pixel_sigma = self._pixel_stats
        if self._texture_stats is not None:
            texture_median, texture_sigma = self._texture_stats
            texture = texture_energy(image)[:, self._fabric_pixels(key, image.shape[1])]
            texture_z = (texture - texture_median) / texture_sigma
            np.maximum(fabric, (pixel_median + texture_z * pixel_sigma).astype(np.float32), out=fabric)
        score = float(fabric.max())
        global_z = self._global_z(descriptor, key)
        if global_z is not None:
            floor = pixel_median + global_z * pixel_sigma
            # Anomalous as a whole, more than any local region: the mask covers the fabric. A large local
            # defect also moves the descriptor, but then its own region stands out more and is the mask.
            if floor >= self.pixel_threshold and floor > score:
                np.maximum(fabric, np.float32(floor), out=fabric)
            score = max(score, floor)
        return anomaly_map, score

    def _pool_image_score(self, image: np.ndarray, key: str) -> float:
        """`_predict_one`'s image score of a pool member, from the maxima of its terms (the maximum of an
        element-wise maximum is the maximum of the maxima), without a second map where one was made."""
        assert self._pixel_stats is not None and self.pixel_threshold is not None
        if key not in self._local_max:
            fabric_map = self._fabric_map(self._layout(image), self._combine(self._pool_scores[key]), key)
            self._local_max[key] = float(fabric_map.max())
        score = self._local_max[key]
        pixel_median, pixel_sigma = self._pixel_stats
        if self._texture_stats is not None:
            texture_median, texture_sigma = self._texture_stats
            # in float32, as the map is: the same number `_predict_one` finds
            texture_z = (np.float32(self._texture_max[key]) - texture_median) / texture_sigma
            score = max(score, float(np.float32(pixel_median + texture_z * pixel_sigma)))
        global_z = self._global_z(self._pool_descriptors[key], key)
        if global_z is not None:
            score = max(score, pixel_median + global_z * pixel_sigma)
        return score

    def _prediction(self, anomaly_map: np.ndarray, score: float) -> TeacherPrediction:
        assert self.image_threshold is not None and self._score_sigma is not None
        mask = anomaly_map >= self.pixel_threshold
        uncertainty = math.exp(-0.5 * ((score - self.image_threshold) / self._score_sigma) ** 2)
        return TeacherPrediction(anomaly_map, score, mask, float(uncertainty))

    def fit_predict_pool(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """`fit_pool(images)` then `predict_pool(images)`."""
        self.fit_pool(images)
        return self.predict_pool(images)
