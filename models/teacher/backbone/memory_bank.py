"""A compressed memory bank of normal patch features with a softmin certainty score (after CFA).

A plain memory bank keeps every normal patch, so its size and the cost of a query grow with the number of
reference images. Here the bank is a fixed number of centroids, `size` (fewer when there are fewer
patches), so scoring costs the same for 1 or 16 references:

1. Initialisation: k-means on the normal patches. Seeds are `size` distinct patches drawn at random
   (a `torch.Generator` seeded with `seed`: the same patches give the same bank), then a few Lloyd
   iterations (assign every patch to its nearest centroid, move each centroid to the mean of its patches).
   A centroid left without patches is re-seeded at the patch that is worst explained by the current bank.
2. Refinement: `ema_passes` passes over the patches in shuffled mini-batches; each centroid moves toward
   the mean of the batch patches assigned to it, `c <- momentum * c + (1 - momentum) * mean`. Lloyd steps
   jump to the mean of a whole partition; the EMA passes smooth the bank over many small partitions, which
   leaves fewer centroids sitting on a single unusual patch.

Scoring a query patch q. Let d_1 <= ... <= d_K be its Euclidean distances to the K nearest centroids
(`k`, default 3). The score is the softmin-weighted distance

    score(q) = sum_j w_j d_j,   w = softmax(-d / T),   T = temperature x scale,

where `scale` is the median distance of the bank's own patches to their nearest centroid (measured at fit
time). Tying T to that scale makes `temperature` unit-free: at 1 a distance one typical normal spread
further than the nearest neighbour gets e^-1 of its weight. A patch that sits clearly closer to one
centroid than to the others (a certain match) scores its nearest distance; a patch lying between centroids
(on an ambiguous border) is scored nearer to the mean of the K distances, that is, higher. This is the
certainty term of CFA, without the learned patch descriptor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from models.nearest import half_sq_norms, nearest_distances

logger = logging.getLogger(__name__)


@dataclass
class MemoryBankConfig:
    """Settings of `CompressedMemoryBank` (see the module docstring)."""

    size: int = 1024
    kmeans_iterations: int = 8
    ema_passes: int = 2
    momentum: float = 0.9
    ema_batch: int = 4096
    k: int = 3
    temperature: float = 1.0
    seed: int = 0


class CompressedMemoryBank:
    """`size` centroids of normal patch features: k-means init, EMA refinement, softmin score.

    Usage: `bank.fit(features)` with (N, D) normal patches, then `bank.score(queries)` -> (N_q,).
    """

    def __init__(self, config: MemoryBankConfig | None = None):
        self.config = config or MemoryBankConfig()
        if self.config.size < 1 or self.config.k < 1 or not 0.0 <= self.config.momentum < 1.0:
            raise ValueError("memory bank needs size >= 1, k >= 1 and 0 <= momentum < 1")
        if self.config.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.config.temperature}")
        self.centroids: torch.Tensor | None = None  # (M, D) float32
        self.scale: float | None = None  # median distance of the fit patches to their nearest centroid
        self._half_sq_norms: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of centroids (0 before `fit`)."""
        return 0 if self.centroids is None else int(self.centroids.shape[0])

    @torch.inference_mode()
    def fit(self, features: torch.Tensor) -> CompressedMemoryBank:
        """Build the bank from normal patch features.

        Args:
            features: (N, D) float patches of known-good images, N >= 1.

        Returns:
            self, with `centroids` (min(size, N), D) and `scale` set.
        """
        if features.ndim != 2 or features.shape[0] < 1:
            raise ValueError(
                f"memory bank: expected (N, D) features with N >= 1, got {tuple(features.shape)}"
            )
        features = features.float().contiguous()
        generator = torch.Generator().manual_seed(self.config.seed)
        size = min(self.config.size, features.shape[0])
        centroids = features[torch.randperm(features.shape[0], generator=generator)[:size]].clone()
        if size < features.shape[0]:
            for _ in range(self.config.kmeans_iterations):
                centroids = self._lloyd_step(features, centroids)
            for _ in range(self.config.ema_passes):
                centroids = self._ema_pass(features, centroids, generator)
        self._set_centroids(centroids)
        nearest, _ = nearest_distances(features, centroids, 1, self._half_sq_norms)
        self.scale = max(float(nearest.median()), 1e-6)
        logger.debug("memory bank: %d centroids from %d patches, scale %.4f", size, len(features), self.scale)
        return self

    def _set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids.contiguous()
        self._half_sq_norms = half_sq_norms(self.centroids)

    @staticmethod
    def _cluster_sums(
        features: torch.Tensor, assignment: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-centroid sums (size, D) and counts (size,) of the patches assigned to it."""
        sums = torch.zeros(size, features.shape[1]).index_add_(0, assignment, features)
        counts = torch.bincount(assignment, minlength=size).to(features.dtype)
        return sums, counts

    def _lloyd_step(self, features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """One k-means iteration; empty clusters are re-seeded at the worst-explained patches."""
        distances, nearest = nearest_distances(features, centroids, 1)
        sums, counts = self._cluster_sums(features, nearest[:, 0], centroids.shape[0])
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            worst = distances[:, 0].topk(len(empty)).indices
            updated[empty] = features[worst]
        return updated

    def _ema_pass(
        self, features: torch.Tensor, centroids: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """One shuffled pass in mini-batches: c <- momentum * c + (1 - momentum) * batch mean."""
        momentum = self.config.momentum
        order = torch.randperm(features.shape[0], generator=generator)
        for batch_rows in order.split(self.config.ema_batch):
            batch = features[batch_rows]
            _, nearest = nearest_distances(batch, centroids, 1)
            sums, counts = self._cluster_sums(batch, nearest[:, 0], centroids.shape[0])
            hit = counts > 0
            means = sums[hit] / counts[hit, None]
            centroids[hit] = momentum * centroids[hit] + (1.0 - momentum) * means
        return centroids

    @torch.inference_mode()
    def score(self, queries: torch.Tensor) -> torch.Tensor:
        """Softmin-weighted distance of each query to its K nearest centroids.

        Args:
            queries: (N, D) float patches.

        Returns:
            (N,) float32, higher = less like the normal patches.
        """
        if self.centroids is None or self.scale is None:
            raise RuntimeError("call fit(features) before score(queries)")
        if queries.ndim != 2 or queries.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"memory bank: queries must be (N, {self.centroids.shape[1]}), got {tuple(queries.shape)}"
            )
        k = min(self.config.k, self.size)
        distances, _ = nearest_distances(queries.float(), self.centroids, k, self._half_sq_norms)
        weights = torch.softmax(-distances / (self.config.temperature * self.scale), dim=1)
        return (weights * distances).sum(dim=1)
