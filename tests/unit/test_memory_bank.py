"""The compressed memory bank of the few-shot backbone teacher: fixed size, k-means + EMA, softmin score."""

from __future__ import annotations

import torch

from models.teacher.backbone.memory_bank import CompressedMemoryBank, MemoryBankConfig


def clusters(count: int, seed: int = 0) -> torch.Tensor:
    """(count, 8) points around four well-separated centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:4] * 10.0
    return centres[torch.arange(count) % 4] + 0.1 * torch.randn(count, 8, generator=generator)


def test_bank_size_does_not_grow_with_the_data() -> None:
    config = MemoryBankConfig(size=16)
    assert CompressedMemoryBank(config).fit(clusters(200)).size == 16
    assert CompressedMemoryBank(config).fit(clusters(5000)).size == 16
    assert CompressedMemoryBank(config).fit(clusters(10)).size == 10  # fewer patches than centroids


def test_kmeans_and_ema_put_centroids_on_the_data() -> None:
    data = clusters(2000)
    refined = CompressedMemoryBank(MemoryBankConfig(size=4, ema_passes=2)).fit(data)
    nearest = torch.cdist(refined.centroids, torch.eye(8)[:4] * 10.0).min(dim=1).values
    assert (nearest < 0.1).all()  # each centroid sits on one of the true centres
    assert refined.scale is not None and refined.scale < 0.5


def test_a_far_patch_scores_higher_than_a_near_one() -> None:
    bank = CompressedMemoryBank(MemoryBankConfig(size=8)).fit(clusters(400))
    near = torch.eye(8)[:1] * 10.0
    far = torch.full((1, 8), 5.0)
    near_score, far_score = bank.score(torch.cat([near, far]))
    assert far_score > 10 * near_score


def test_fit_is_deterministic_by_seed() -> None:
    data = clusters(500)
    first = CompressedMemoryBank(MemoryBankConfig(size=12, seed=3)).fit(data).centroids
    second = CompressedMemoryBank(MemoryBankConfig(size=12, seed=3)).fit(data).centroids
    assert torch.equal(first, second)
