"""Exact k-nearest-neighbour search of patch features in a bank, and a count of the work it does.

Every bank search of the project (the backbone teacher's screening, neighbour and reference scores, the
memory bank's k-means) goes through `nearest_distances`, so one place decides how the search is done and
one counter can say how much of it a piece of work needed: `count_search_work()` sums queries x bank rows
over every search made inside it. That count, not a clock, is what tests hold linear in a frame's pixels.

The search itself is the exact Euclidean distance in chunks, ||q||^2 - 2 (q.b - ||b||^2 / 2) with one
matrix product per chunk and a top-k, so at most 2^24 distances exist at a time.

Backends. "torch" is that hand-written search. "faiss" is faiss's exact flat L2 search (`faiss.knn_L2sqr`,
the brute force behind `IndexFlatL2`, on as many threads as torch uses). "auto" (the default) takes faiss
for searches of at least `FAISS_FROM_QUERIES` queries and torch below (BENCHMARKS.md, "Line-scan"):
faiss is 1.5-1.8x faster from 16k queries (a line-scan frame, the memory bank's k-means) on a quiet
machine; at the 1k queries of a 256-pixel image it was 1.2-1.6x faster there and up to 1.3x slower in a
busy run. Searches below the threshold (one square image's patches) run exactly as before. Choose with
`set_backend(...)` or the environment variable LOOM_KNN_BACKEND (read at import). All return the same
distances up to float32 rounding (ties may then swap) and count the same work. Approximate indexes (IVF,
HNSW) are not used: the one measured (HNSW) found 97% of the exact neighbours.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

_MAX_CHUNK_ENTRIES = 2**24  # query rows x bank rows per distance chunk (64 MB in float32)

BACKENDS = ("auto", "torch", "faiss")
#: "auto" searches with faiss from this many queries on.
FAISS_FROM_QUERIES = 4096


def _checked_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"k-NN backend must be one of {BACKENDS}, got {name!r}")
    if name in ("faiss", "auto"):
        _faiss()  # fail at selection, not at the first search, when the package is missing
    return name


def _faiss():  # -> the faiss module
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the 'faiss' k-NN backend needs the faiss-cpu package (pip install faiss-cpu); "
            "or set LOOM_KNN_BACKEND=torch for the hand-written search"
        ) from error
    return faiss


_backend = _checked_backend(os.environ.get("LOOM_KNN_BACKEND", "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend `nearest_distances` uses now: "auto", "torch" or "faiss"."""
    return _backend


def set_backend(name: str) -> str:
    """Make `nearest_distances` use `name` ("auto", "torch" or "faiss") from now on, in every thread.

    Returns:
        The backend it replaces, to restore later.

    Raises:
        ValueError: for an unknown name; ImportError: for "faiss" without the faiss-cpu package.
    """
    global _backend
    previous, _backend = _backend, _checked_backend(name)
    return previous


@dataclass
class SearchWork:
    """What the searches inside one `count_search_work()` block did."""

    searches: int = 0
    queries: int = 0
    distances: int = 0  # sum over searches of queries x bank rows


_counters = threading.local()


@contextmanager
def count_search_work() -> Iterator[SearchWork]:
    """Count the searches made in this thread inside the block (nested blocks each count them all)."""
    work = SearchWork()
    stack = getattr(_counters, "stack", None)
    if stack is None:
        stack = _counters.stack = []
    stack.append(work)
    try:
        yield work
    finally:
        stack.remove(work)


def _record(queries: int, rows: int) -> None:
    for work in getattr(_counters, "stack", ()):
        work.searches += 1
        work.queries += queries
        work.distances += queries * rows


def half_sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,) 0.5 ||row||^2, what `nearest_distances` needs of a bank it searches often."""
    return 0.5 * rows.square().sum(dim=1)


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_half_sq_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of the k nearest bank rows of every query, ascending.

    Args:
        queries: (N, D) float32.
        bank: (M, D) float32, M >= k.
        k: neighbours per query.
        bank_half_sq_norms: (M,) 0.5 ||b||^2, when the caller keeps them.

    Returns:
        distances (N, k) float32 and indices (N, k) int64.
    """
    _record(queries.shape[0], bank.shape[0])
    if _backend == "faiss" or (_backend == "auto" and queries.shape[0] >= FAISS_FROM_QUERIES):
        return _faiss_nearest(queries, bank, k, bank_half_sq_norms)
    norms = half_sq_norms(bank) if bank_half_sq_norms is None else bank_half_sq_norms
    rows_per_chunk = max(1, _MAX_CHUNK_ENTRIES // max(1, bank.shape[0]))
    distances, indices = [], []
    for chunk in queries.split(rows_per_chunk):
        affinity = torch.addmm(norms, chunk, bank.T, alpha=1.0, beta=-1.0)
        best, where = affinity.topk(k, dim=1)
        sq_dist = chunk.square().sum(dim=1, keepdim=True) - 2.0 * best
        distances.append(sq_dist.clamp_(min=0.0).sqrt_())
        indices.append(where)
    return torch.cat(distances), torch.cat(indices)


def _faiss_nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_half_sq_norms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_distances` by faiss's exact flat L2 search (squared distances, so the root is taken here)."""
    faiss = _faiss()
    faiss.omp_set_num_threads(torch.get_num_threads())

    def as_numpy(rows: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)

    xq, xb = as_numpy(queries), as_numpy(bank)
    n, m = xq.shape[0], xb.shape[0]
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"queries have {xq.shape[1]} dimensions, the bank {xb.shape[1]}")
    if not 1 <= k <= m:
        raise ValueError(f"k must be in 1..{m} (the bank's rows), got {k}")
    sq_dist = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    # faiss wants the full squared norms ||b||^2; the caller may keep half of them
    sq_norms = None if bank_half_sq_norms is None else as_numpy(2.0 * bank_half_sq_norms)
    if n:
        faiss.knn_L2sqr(
            faiss.swig_ptr(xq),
            faiss.swig_ptr(xb),
            xq.shape[1],
            n,
            m,
            k,
            faiss.swig_ptr(sq_dist),
            faiss.swig_ptr(indices),
            None if sq_norms is None else faiss.swig_ptr(sq_norms),
        )
    distances = torch.from_numpy(np.sqrt(np.maximum(sq_dist, 0.0, out=sq_dist), out=sq_dist))
    return distances.to(queries.device), torch.from_numpy(indices).to(queries.device)
