"""Zero-shot pseudo-labeling teacher: mutual scoring of pretrained patch features over an unlabeled pool.

Defects are rare, so a patch of one image that has no close neighbour among the *other* images' patches is
anomalous. No labels and no known-good references are needed, only a pool of images from the same line.

Features. A frozen ImageNet EfficientNet-Lite0 gives two mid-level maps, stride 8 (40 channels) and stride
16 (112 channels). Each is averaged over its 3 x 3 neighbourhood (a little spatial context, robust to
one-pixel shifts), the stride-16 map is upsampled to stride 8, each level is L2-normalised on its own (so
the 112-channel level does not drown the 40-channel one) and both are concatenated, scaled to unit norm:
152 dimensions per stride-8 patch. Optionally (`feature_dim`) a PCA fitted on the memory bank keeps the
strongest directions, which makes the search cheaper for very large pools; off by default because on the
fabric data 64 dimensions cost ~0.005 pixel AUROC and ~0.03 image AUROC.

Memory bank. A uniformly random subset of all pool patches, min(bank_size, max(bank_fraction x total,
8192)) of them, sorted by the image they came from. Random, not a greedy coreset, on purpose: a coreset
picks the most unusual patches first, that is the defects, and a defect kept in the bank explains away the
same defect elsewhere; a uniform sample keeps defects as rare in the bank as they are in the pool.

Scoring. Each patch of image i is scored by the mean Euclidean distance to its k nearest bank patches
that come from images other than i (the image's own bank rows are masked out, else every patch finds
itself; exact duplicates of i count as i). The mean over k = 3 neighbours, rather than the single nearest,
keeps a defect that recurs in one or two other images visible. Distances are float32 matrix products in
chunks of at most 2^24 entries; with the fit-time feature cache a pool of 1,000 256 x 256 images needs
about 1.5 GB. Patch scores are bilinearly upsampled to the tile, tiles are blended (models/tiling.py), the
map is Gaussian-smoothed (`smoothing_sigma` pixels) and the image's own median is subtracted: a fabric
that is merely rare in the pool is raised everywhere, a defect only where it is (maps are signed, ~0 for
the typical part of each image).

Thresholds, masks and uncertainty, all from the pool itself (robust statistics, no labels):
- `pixel_threshold` = median + `threshold_mads` x MAD-sigma of the pool's pixel scores (a random sample of
  up to 10^6 pixels; MAD-sigma = 1.4826 x median absolute deviation, the standard deviation of normal
  data). Defect pixels are a tiny fraction, so median and MAD describe normal fabric; 6 MAD-sigma was
  the F1-optimal cut on the procedural fabric pool and is a conventional "far outlier" distance.
- mask = map >= pixel_threshold; image score = maximum of the map;
- `image_threshold` = `pixel_threshold`: an image is anomalous exactly when its mask is not empty, so image
  labels and masks never contradict each other;
- uncertainty = exp(-0.5 ((score - image_threshold) / sigma)^2), sigma the MAD-sigma of the pool's image
  scores: 1 at the threshold, ~0 a few sigma away, so borderline images are the ones sent to people.

Images of any size: images up to `image_size` on both sides run whole at native size; larger ones are cut
into `image_size` tiles overlapping by `tile_overlap` (never squashed).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from models.backbone.efficientnet_lite import (
    EfficientNetLite0,
    fuse_batchnorm,
    load_pretrained_lite0,
    normalize,
)
from models.teacher.backbone.memory_bank import CompressedMemoryBank, MemoryBankConfig
from models.teacher.types import TeacherPrediction
from models.tiling import stitch_tiles, tile_origins

logger = logging.getLogger(__name__)

PATCH_STRIDE = 8
PATCH_FEATURE_DIM = 40 + 112
MIN_BANK = 8192
_MAX_CHUNK_ENTRIES = 2**24  # query rows x bank rows per distance chunk (64 MB in float32)
_MAX_PIXEL_SAMPLES = 1_000_000
_MAD_TO_SIGMA = 1.4826


@dataclass
class TeacherConfig:
    """Settings of the backbone teacher (see the module docstring for what each one does)."""

    image_size: int = 256
    bank_size: int = 30000
    k: int = 3
    batch_size: int = 16
    tile_overlap: int = 32
    seed: int = 0
    pretrained: bool = True
    bank_fraction: float = 0.05
    feature_dim: int | None = None
    smoothing_sigma: float = 4.0
    threshold_mads: float = 6.0
    feature_cache_mb: int = 1024


@dataclass(frozen=True)
class _TileLayout:
    """Where the tiles of one image lie: (top, left) origins and the common tile size."""

    height: int
    width: int
    tile_height: int
    tile_width: int
    origins: tuple[tuple[int, int], ...]

    @property
    def patches_per_tile(self) -> int:
        return math.ceil(self.tile_height / PATCH_STRIDE) * math.ceil(self.tile_width / PATCH_STRIDE)

    @property
    def num_patches(self) -> int:
        return self.patches_per_tile * len(self.origins)


class PatchFeatureExtractor(nn.Module):
    """Frozen Lite0 -> (B, 152, ceil(H / 8), ceil(W / 8)) patch features (see the module docstring)."""

    def __init__(self, backbone: EfficientNetLite0):
        super().__init__()
        self.backbone = fuse_batchnorm(backbone).to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 152, ceil(H / 8), ceil(W / 8))."""
        images = images.contiguous(memory_format=torch.channels_last)
        _, _, stride8, stride16 = self.backbone.forward_features(images, max_stride=16)
        stride8 = F.avg_pool2d(stride8, 3, stride=1, padding=1, count_include_pad=False)
        stride16 = F.avg_pool2d(stride16, 3, stride=1, padding=1, count_include_pad=False)
        stride16 = F.interpolate(stride16, size=stride8.shape[-2:], mode="bilinear", align_corners=False)
        levels = [F.normalize(stride8, dim=1), F.normalize(stride16, dim=1)]
        return torch.cat(levels, dim=1).mul_(math.sqrt(0.5))


def _image_key(image: np.ndarray) -> str:
    """Content key of an image: identical pixels give the same key (used for own-image exclusion)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def _check_images(images: Sequence[np.ndarray]) -> None:
    for index, image in enumerate(images):
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            described = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
            raise ValueError(f"image {index} must be an (H, W, 3) uint8 array, got {described}")


def _mad_sigma(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation (floored so a constant pool does not divide by zero)."""
    median = float(np.median(values))
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    return median, max(sigma, 1e-6 * abs(median) + 1e-12)


class BackboneTeacher:
    """Zero-shot mutual-scoring teacher over an unlabeled pool (see the module docstring), few-shot with a
    compressed memory bank when known-good references are given.

    Usage: `teacher.fit(pool, normals)` then `teacher.predict(images)` (the `Teacher` protocol), or
    `fit_pool(images)` then `predict_pool(images)`; after that `pixel_threshold` and `image_threshold` hold
    the thresholds chosen from the pool.
    """

    name = "backbone"
    class_names: tuple[str, ...] = ()  # cannot tell defect types apart; regions are named elsewhere

    def __init__(self, config: TeacherConfig | None = None):
        self.config = config or TeacherConfig()
        if (
            self.config.image_size < PATCH_STRIDE
            or not 0 <= self.config.tile_overlap < self.config.image_size
        ):
            raise ValueError(f"need image_size >= {PATCH_STRIDE} and 0 <= tile_overlap < image_size")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # random weights (pretrained=False) also follow the seed
            self.extractor = PatchFeatureExtractor(load_pretrained_lite0(self.config.pretrained)).eval()
        self.pixel_threshold: float | None = None
        self.image_threshold: float | None = None
        self._score_sigma: float | None = None  # spread of image scores, the uncertainty scale
        self._bank: torch.Tensor | None = None  # (N_bank, D) float32
        self._bank_half_sq_norms: torch.Tensor | None = None  # (N_bank,)
        self._bank_rows: dict[str, list[tuple[int, int]]] = {}  # image key -> [start, end) row ranges
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None  # mean (152,), basis (152, D)
        self._feature_cache: dict[str, list[torch.Tensor]] = {}
        self._normal_bank: CompressedMemoryBank | None = None  # few-shot: set by fit(pool, normals)
        self._calibration_pool: list[np.ndarray] | None = None  # the pool whose statistics set thresholds

    # ---------------------------------------------------------------- features
    def _layout(self, image: np.ndarray) -> _TileLayout:
        height, width = image.shape[:2]
        tile_h, tile_w = min(self.config.image_size, height), min(self.config.image_size, width)
        origins = tile_origins(height, width, (tile_h, tile_w), self.config.tile_overlap)
        return _TileLayout(height, width, tile_h, tile_w, tuple(origins))

    @torch.inference_mode()
    def _extract(self, images: Sequence[np.ndarray]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield (image index, per-tile patch features [(patches_per_tile, 152) float32]) in image order.

        Tiles of equal size share backbone batches, also across images.
        """
        layouts = [self._layout(image) for image in images]
        queue: list[tuple[int, np.ndarray]] = []  # (image index, tile crop) waiting for the backbone
        done: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(images))}

        def run_queue() -> None:
            features = self.extractor(normalize(np.stack([crop for _, crop in queue])))
            for (index, _), feature in zip(queue, features, strict=True):
                done[index].append(feature.flatten(1).T.contiguous())  # (patches, 152), row-major
            queue.clear()

        next_image = 0
        for index, (image, layout) in enumerate(zip(images, layouts, strict=True)):
            for top, left in layout.origins:
                crop = image[top : top + layout.tile_height, left : left + layout.tile_width]
                if queue and (len(queue) == self.config.batch_size or queue[0][1].shape != crop.shape):
                    run_queue()
                queue.append((index, crop))
            while next_image < index and len(done[next_image]) == len(layouts[next_image].origins):
                yield next_image, done.pop(next_image)
                next_image += 1
        if queue:
            run_queue()
        for index in range(next_image, len(images)):
            yield index, done.pop(index)

    def _project(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 152) -> (N, D) with the PCA fitted on the bank (identity when no projection is used)."""
        if self._projection is None:
            return patches
        mean, basis = self._projection
        return (patches - mean) @ basis

    # ---------------------------------------------------------------- fit
    def fit_pool(self, images: Sequence[np.ndarray]) -> None:
        """Extract patch features of every image (tile-wise) and build the memory bank.

        Args:
            images: the pool, each (H, W, 3) uint8; at least two images (each is scored against the others).
        """
        _check_images(images)
        keys = [_image_key(image) for image in images]
        if len(set(keys)) < 2:
            raise ValueError("mutual scoring needs a pool of at least two different images")
        patch_counts = np.array([self._layout(image).num_patches for image in images])
        total = int(patch_counts.sum())
        bank_size = min(self.config.bank_size, total, max(int(self.config.bank_fraction * total), MIN_BANK))
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.randperm(total, generator=generator)[:bank_size].sort().values
        offsets = np.concatenate([[0], np.cumsum(patch_counts)])

        bank_parts: list[torch.Tensor] = []
        self._bank_rows, self._feature_cache = {}, {}
        cache_budget = self.config.feature_cache_mb * 2**20
        for index, tile_features in self._extract(images):
            patches = torch.cat(tile_features)
            lo, hi = np.searchsorted(chosen.numpy(), [offsets[index], offsets[index + 1]])
            start = sum(part.shape[0] for part in bank_parts)
            bank_parts.append(patches[chosen[lo:hi] - int(offsets[index])])
            # Exact duplicates share a key, so all their rows count as "own": a copy cannot vouch for
            # its twin.
            self._bank_rows.setdefault(keys[index], []).append((start, start + int(hi - lo)))
            if cache_budget >= patches.numel() * 4:
                self._feature_cache[keys[index]] = tile_features
                cache_budget -= patches.numel() * 4
        self._set_bank(torch.cat(bank_parts))
        logger.info("memory bank: %d of %d patches from %d images", bank_size, total, len(images))

    def _set_bank(self, bank: torch.Tensor) -> None:
        """Fit the PCA projection on the bank (when configured) and keep the projected bank."""
        dim = self.config.feature_dim
        self._projection = None
        if dim is not None and dim < bank.shape[1] and bank.shape[0] > dim:
            mean = bank.mean(dim=0)
            centred = bank - mean
            _, eigenvectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
            basis = eigenvectors[:, -dim:].flip(1).contiguous()
            self._projection = (mean, basis)
        self._bank = self._project(bank).contiguous()
        self._bank_half_sq_norms = 0.5 * self._bank.square().sum(dim=1)

    # ---------------------------------------------------------------- predict
    @torch.inference_mode()
    def _patch_scores(self, patches: torch.Tensor, own_rows: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(N, 152) patches -> (N,) mean distance to the k nearest bank patches outside `own_rows`."""
        assert self._bank is not None and self._bank_half_sq_norms is not None
        queries = self._project(patches.float())
        bank, half_sq_norms = self._bank, self._bank_half_sq_norms
        own_count = sum(end - start for start, end in own_rows)
        k = max(1, min(self.config.k, bank.shape[0] - own_count))
        rows_per_chunk = max(1, _MAX_CHUNK_ENTRIES // bank.shape[0])
        scores = []
        for chunk in queries.split(rows_per_chunk):
            # ||q - b||^2 = ||q||^2 - 2 (q.b - ||b||^2 / 2): maximise the bracket to find the nearest b.
            affinity = torch.addmm(half_sq_norms, chunk, bank.T, alpha=1.0, beta=-1.0)
            for start, end in own_rows:
                affinity[:, start:end] = -torch.inf
            best = affinity.topk(k, dim=1).values
            sq_dist = chunk.square().sum(dim=1, keepdim=True) - 2.0 * best
            scores.append(sq_dist.clamp_(min=0.0).sqrt_().mean(dim=1))
        return torch.cat(scores)

    def _anomaly_map(self, layout: _TileLayout, tile_features: list[torch.Tensor], key: str) -> np.ndarray:
        """Score every tile's patches, upsample to the tile, blend the tiles, smooth: (H, W) float32."""
        grid = (math.ceil(layout.tile_height / PATCH_STRIDE), math.ceil(layout.tile_width / PATCH_STRIDE))
        patches = torch.cat(tile_features)
        if self._normal_bank is not None:
            scores = self._normal_bank.score(patches.float())
        else:
            scores = self._patch_scores(patches, self._bank_rows.get(key, []))
        tile_maps = F.interpolate(
            scores.view(len(tile_features), 1, *grid),
            size=(layout.tile_height, layout.tile_width),
            mode="bilinear",
            align_corners=False,
        ).numpy()
        if len(tile_maps) == 1:
            stitched = tile_maps[0, 0]
        else:
            stitched = stitch_tiles(
                list(tile_maps), layout.origins, layout.height, layout.width, self.config.tile_overlap
            )[0]
        if self.config.smoothing_sigma > 0:
            stitched = gaussian_filter(stitched, sigma=self.config.smoothing_sigma, mode="nearest")
        # Relative to the image's own typical level: a fabric that is merely rare in the pool is raised
        # everywhere, a defect only where it is.
        return (stitched - np.median(stitched)).astype(np.float32)

    def _iter_features(self, images: Sequence[np.ndarray], keys: list[str]) -> Iterator[list[torch.Tensor]]:
        """Per-image tile features in order: from the fit-time cache when present, else extracted now."""
        missing = [index for index, key in enumerate(keys) if key not in self._feature_cache]
        extracted = self._extract([images[index] for index in missing])
        for key in keys:
            if key in self._feature_cache:
                yield self._feature_cache[key]
            else:
                yield next(extracted)[1]

    def predict_pool(
        self, images: Sequence[np.ndarray], update_thresholds: bool = True
    ) -> list[TeacherPrediction]:
        """Anomaly maps, scores, masks and uncertainties for `images`.

        An image that was in the fitted pool is scored without its own bank patches; a new image is scored
        against the whole bank.

        Args:
            images: (H, W, 3) uint8 each, any sizes.
            update_thresholds: choose `pixel_threshold` / `image_threshold` (and the uncertainty scale)
                from these images; False keeps those of the previous call, e.g. to score a few new images
                against thresholds calibrated on the whole pool.
        """
        if self._bank is None and self._normal_bank is None:
            raise RuntimeError("call fit(pool) or fit_pool(images) before predicting")
        if not update_thresholds and self._score_sigma is None:
            raise RuntimeError(
                "no thresholds yet: call predict_pool(pool_images) with update_thresholds=True"
            )
        _check_images(images)
        keys = [_image_key(image) for image in images]
        maps = [
            self._anomaly_map(self._layout(image), features, key)
            for image, key, features in zip(images, keys, self._iter_features(images, keys), strict=True)
        ]
        scores = np.array([float(anomaly_map.max()) for anomaly_map in maps])
        if update_thresholds:
            self._choose_thresholds(maps)
            self._score_sigma = _mad_sigma(scores)[1]
        assert self.image_threshold is not None and self.pixel_threshold is not None
        assert self._score_sigma is not None
        predictions = []
        for anomaly_map, score in zip(maps, scores, strict=True):
            mask = anomaly_map >= self.pixel_threshold
            uncertainty = math.exp(-0.5 * ((score - self.image_threshold) / self._score_sigma) ** 2)
            predictions.append(TeacherPrediction(anomaly_map, float(score), mask, float(uncertainty)))
        return predictions

    # ---------------------------------------------------------------- the Teacher protocol
    def fit(self, pool: Sequence[np.ndarray], normals: Sequence[np.ndarray] = ()) -> None:
        """Zero-shot (no normals): `fit_pool(pool)`. Few-shot: a compressed memory bank of the normals'
        patches (memory_bank.py) replaces mutual scoring; `pool` is kept only to choose the thresholds.

        With references, every patch is scored against known-good fabric only, so a defect that recurs
        across the pool (where mutual scoring finds it a neighbour) still stands out. Thresholds stay the
        pool's robust statistics (see `predict`): normals scored against a bank built from themselves
        would look better than unseen normal images and give too low a threshold.
        """
        _check_images(pool)
        if not normals:
            self._normal_bank = None
            self.fit_pool(pool)
            return
        _check_images(normals)
        patches = torch.cat([torch.cat(tiles) for _, tiles in self._extract(normals)])
        self._normal_bank = CompressedMemoryBank(MemoryBankConfig(seed=self.config.seed)).fit(patches)
        self._bank, self._bank_rows, self._feature_cache = None, {}, {}
        self._calibration_pool = list(pool)
        logger.info("few-shot bank: %d centroids from %d normal images", self._normal_bank.size, len(normals))

    def predict(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """Predictions for `images`; thresholds are chosen from the fitted pool (the images themselves when
        they are that pool)."""
        if self._normal_bank is None:
            return self.predict_pool(images)
        pool, self._calibration_pool = self._calibration_pool, None
        if pool is None:  # thresholds were chosen by an earlier call
            return self.predict_pool(images, update_thresholds=self._score_sigma is None)
        if len(pool) == len(images) and all(a is b for a, b in zip(pool, images, strict=True)):
            return self.predict_pool(images, update_thresholds=True)
        self.predict_pool(pool, update_thresholds=True)
        return self.predict_pool(images, update_thresholds=False)

    def fit_predict_pool(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """`fit_pool(images)` then `predict_pool(images)`."""
        self.fit_pool(images)
        return self.predict_pool(images)

    def _choose_thresholds(self, maps: list[np.ndarray]) -> None:
        """Set `pixel_threshold` (robust statistics of this pool's pixel scores) and `image_threshold`."""
        total_pixels = sum(anomaly_map.size for anomaly_map in maps)
        rng = np.random.default_rng(self.config.seed)
        sample = np.concatenate(
            [
                rng.choice(anomaly_map.ravel(), size=min(anomaly_map.size, max(1, n)), replace=False)
                for anomaly_map in maps
                for n in [round(_MAX_PIXEL_SAMPLES * anomaly_map.size / total_pixels)]
            ]
        )
        pixel_median, pixel_sigma = _mad_sigma(sample)
        self.pixel_threshold = pixel_median + self.config.threshold_mads * pixel_sigma
        # The image score is the map's maximum, so this makes "anomalous" mean "has a non-empty mask".
        self.image_threshold = self.pixel_threshold
