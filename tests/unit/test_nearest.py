"""models/nearest.py: the exact k-NN search against brute force, its work counter and its backends."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
import torch

from models import nearest
from models.nearest import count_search_work, half_sq_norms, nearest_distances


@pytest.fixture(autouse=True)
def torch_backend() -> Iterator[None]:
    """Every test starts on the hand-written search (whatever LOOM_KNN_BACKEND says) and leaves it so."""
    previous = nearest.set_backend("torch")
    yield
    nearest.set_backend(previous)


def features(rows: int, dim: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64: every distance by torch.cdist, then the k smallest."""
    distances = torch.cdist(queries.double(), bank.double())
    best, where = distances.topk(k, dim=1, largest=False)
    return best.float(), where


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("pass_norms", [False, True])
def test_matches_brute_force_across_chunks(monkeypatch, k: int, pass_norms: bool) -> None:
    queries, bank = features(300), features(1000, seed=1)
    # 1000 bank rows x 40 query rows a chunk: 8 chunks, the last one short
    monkeypatch.setattr(nearest, "_MAX_CHUNK_ENTRIES", 40 * 1000)
    chunks = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **kw: chunks.append(a[1].shape[0]) or real_addmm(*a, **kw))

    norms = half_sq_norms(bank) if pass_norms else None
    distances, indices = nearest_distances(queries, bank, k, norms)

    assert chunks == [40] * 7 + [20]
    expected_distances, expected_indices = reference(queries, bank, k)
    assert distances.shape == (300, k) and distances.dtype == torch.float32
    assert indices.shape == (300, k) and indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, atol=1e-4, rtol=1e-5)
    assert bool((distances[:, 1:] >= distances[:, :-1]).all())  # ascending


def test_one_query_row_per_chunk_and_whole_bank(monkeypatch) -> None:
    """A bank wider than a chunk still searches one query row at a time; k may be the whole bank."""
    queries, bank = features(5), features(50, seed=2)
    monkeypatch.setattr(nearest, "_MAX_CHUNK_ENTRIES", 10)
    distances, indices = nearest_distances(queries, bank, 50)
    expected_distances, expected_indices = reference(queries, bank, 50)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, atol=1e-4, rtol=1e-5)


def test_a_query_in_the_bank_is_at_distance_zero() -> None:
    bank = features(64)
    distances, indices = nearest_distances(bank[10:20], bank, 1)
    assert torch.equal(indices[:, 0], torch.arange(10, 20))
    # ||q||^2 - 2 q.b + ||b||^2 with ||q||^2 ~ 24 leaves a float32 rounding of ~1e-5, clamped at 0 and rooted
    assert float(distances.abs().max()) < 1e-2


def test_work_counter_counts_queries_times_rows() -> None:
    queries, bank = features(12), features(30, seed=1)
    nearest_distances(queries, bank, 2)  # outside any block: counted nowhere
    with count_search_work() as outer:
        nearest_distances(queries, bank, 2)
        with count_search_work() as inner:
            nearest_distances(queries[:5], bank[:7], 1)
        nearest_distances(queries[:3], bank, 1)
    nearest_distances(queries, bank, 2)  # after the block: not counted in it

    assert (inner.searches, inner.queries, inner.distances) == (1, 5, 5 * 7)
    assert (outer.searches, outer.queries, outer.distances) == (3, 12 + 5 + 3, 12 * 30 + 5 * 7 + 3 * 30)
    with count_search_work() as empty:
        pass
    assert (empty.searches, empty.queries, empty.distances) == (0, 0, 0)


def test_work_counter_counts_only_its_own_thread() -> None:
    queries, bank = features(8), features(16, seed=1)
    with count_search_work() as work:
        other = threading.Thread(target=nearest_distances, args=(queries, bank, 1))
        other.start()
        other.join()
        nearest_distances(queries[:2], bank, 1)
    assert (work.searches, work.distances) == (1, 2 * 16)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="torch"):
        nearest.set_backend("annoy")
    assert nearest.get_backend() == "torch"


def test_faiss_backend_without_faiss_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="faiss-cpu"):
        nearest.set_backend("faiss")
    assert nearest.get_backend() == "torch"


@pytest.fixture
def faiss_backend() -> Iterator[object]:
    import faiss

    nearest.set_backend("faiss")
    yield faiss
    nearest.set_backend("torch")


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pass_norms", [False, True])
def test_faiss_agrees_with_the_hand_written_search(faiss_backend, k: int, pass_norms: bool) -> None:
    queries, bank = features(500, dim=192), features(2000, dim=192, seed=1)
    norms = half_sq_norms(bank) if pass_norms else None

    distances, indices = nearest_distances(queries, bank, k, norms)
    nearest.set_backend("torch")
    expected_distances, expected_indices = nearest_distances(queries, bank, k, norms)

    assert distances.shape == (500, k) and distances.dtype == torch.float32
    assert indices.shape == (500, k) and indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, atol=1e-4, rtol=1e-5)


def test_faiss_follows_torch_threads_and_counts_the_same_work(faiss_backend) -> None:
    threads = torch.get_num_threads()
    queries, bank = features(20), features(40, seed=1)
    try:
        torch.set_num_threads(1)
        with count_search_work() as work:
            nearest_distances(queries, bank, 2)
            nearest_distances(queries[:4], bank[:10], 1, half_sq_norms(bank[:10]))
        assert faiss_backend.omp_get_max_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (work.searches, work.queries, work.distances) == (2, 24, 20 * 40 + 4 * 10)
    empty_distances, empty_indices = nearest_distances(queries[:0], bank, 2)
    assert empty_distances.shape == (0, 2) and empty_indices.shape == (0, 2)


def test_auto_takes_faiss_for_large_searches_only(monkeypatch) -> None:
    nearest.set_backend("auto")
    used = []
    real = nearest._faiss_nearest
    monkeypatch.setattr(nearest, "_faiss_nearest", lambda *a, **kw: used.append(len(a[0])) or real(*a, **kw))
    bank = features(64, seed=3)
    nearest_distances(features(nearest.FAISS_FROM_QUERIES - 1), bank, 2)
    large, _ = nearest_distances(features(nearest.FAISS_FROM_QUERIES), bank, 2)
    assert used == [nearest.FAISS_FROM_QUERIES]
    nearest.set_backend("torch")
    expected, _ = nearest_distances(features(nearest.FAISS_FROM_QUERIES), bank, 2)
    torch.testing.assert_close(large, expected, atol=1e-4, rtol=1e-5)
