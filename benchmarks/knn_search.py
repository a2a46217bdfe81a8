"""Exact k-nearest-neighbour search: the hand-written torch search against faiss, side by side.

Measures `models.nearest.nearest_distances` with its two backends, "torch" (one matmul + top-k per
chunk) and "faiss" (faiss-cpu's exact flat L2 search, `knn_L2sqr`), at the shapes the
backbone teacher searches (D = 192): queries of 1,024 (one 256 x 256 image), 16,384 and 65,536 patches
(line-scan frames) against banks of 1,024 (memory-bank centroids), 4,096 (screening bank) and 8,192 rows
(neighbour bank), k = 2; and the memory bank's k-means assignment, 32,768 x 1,024, k = 1. Features are
seeded, clustered, unit-norm rows (64 random centres plus noise, normalised), so nearest neighbours are
distinct but ties are rare; two more rows use real teacher features of generated fabric images
(`--no-real` skips them). The bank's half squared norms are passed in, as the teacher does, except in the
k-means row (`_lloyd_step` passes none).

Timing: both backends at `--threads` threads (faiss follows torch's thread count), a warm-up call each
on 256 of the queries, then `--repeats` rounds of torch, faiss, torch, faiss, ... (interleaved, so a busy
machine slows both alike); the table gives the best and the median of the repeats, in ms, and
faiss/torch of the medians. Agreement: max |distance difference| over all k columns, the share of
queries whose top-1 index is the same, and how many top-1 mismatches are not ties: the two picks' float64
distances differ by more than `TIE`, 3e-5 (both backends form ||q||^2 - 2 q.b + ||b||^2 in float32, whose
rounding, ~1e-6 on the squared distance, is ~1e-5 on a distance near 0.06, the nearest distances here).
One approximate row (faiss IndexHNSWFlat, M = 32, efSearch = 64; search time only, build time in the
notes) is shown for information with its recall@k against the exact search; `--no-hnsw` skips it. Only
the exact search is wired into the project.

    .venv/bin/python benchmarks/knn_search.py                  # full run, about 3 minutes on 2 busy cores
    .venv/bin/python benchmarks/knn_search.py --quick          # small shapes, 3 repeats, seconds
    .venv/bin/python benchmarks/knn_search.py --threads 1 --repeats 9 --no-real --no-hnsw
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_backbone import cpu_model

from models import nearest

DIM = 192
SYNTHETIC = [  # (queries, bank rows, k, pass the bank's half squared norms)
    *((n, m, 2, True) for n in (1024, 16384, 65536) for m in (1024, 4096, 8192)),
    (32768, 1024, 1, False),  # the memory bank's k-means assignment
]
QUICK = [(1024, 1024, 2, True), (4096, 4096, 2, True), (8192, 1024, 1, False)]
TIE = 3e-5  # float64 distances of two picks closer than this: a tie within float32 rounding

#: The two searches compared ("auto", the default, picks between them by size).
COMPARED = ("torch", "faiss")


def clustered(rows: int, generator: torch.Generator, centres: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows: a random centre plus noise, normalised."""
    pick = torch.randint(len(centres), (rows,), generator=generator)
    points = centres[pick] + 0.6 * torch.randn(rows, DIM, generator=generator) / DIM**0.5
    return torch.nn.functional.normalize(points, dim=1).contiguous()


def teacher_features(images: int) -> list[torch.Tensor]:
    """(1024, 192) patch features of each of `images` generated 256 x 256 fabric images."""
    from loom.datasets.fabric.dataset import render_sample
    from models.teacher.backbone import BackboneTeacher, TeacherConfig

    pixels = [render_sample(seed).image for seed in range(images)]
    return [features for _, features in BackboneTeacher(TeacherConfig())._extract(pixels)]


@dataclass
class Case:
    label: str
    queries: torch.Tensor
    bank: torch.Tensor
    k: int
    with_norms: bool


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3


def agreement(case: Case, exact: tuple, other: tuple) -> tuple[float, float, int]:
    """Max |distance difference|, share of identical top-1 indices, top-1 mismatches that are no tie."""
    (d_torch, i_torch), (d_faiss, i_faiss) = exact, other
    max_dd = float((d_torch - d_faiss).abs().max()) if d_torch.numel() else 0.0
    same = i_torch[:, 0] == i_faiss[:, 0]
    rows = torch.nonzero(~same).flatten()
    q = case.queries[rows].double()
    a = (q - case.bank[i_torch[rows, 0]].double()).norm(dim=1)
    b = (q - case.bank[i_faiss[rows, 0]].double()).norm(dim=1)
    return max_dd, float(same.float().mean()), int(((a - b).abs() > TIE).sum())


def run_case(case: Case, repeats: int) -> dict:
    # the bank norms belong to the bank (callers keep them), so they are computed outside the clock
    norms = nearest.half_sq_norms(case.bank) if case.with_norms else None

    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def call(backend: str, queries: torch.Tensor) -> Callable[[], object]:
        def search() -> None:
            nearest.set_backend(backend)
            results[backend] = nearest.nearest_distances(queries, case.bank, case.k, norms)

        return search

    for backend in COMPARED:  # warm-up on a few queries (threads, caches), not timed
        call(backend, case.queries[:256])()
    times: dict[str, list[float]] = {backend: [] for backend in COMPARED}
    for _ in range(repeats):
        for backend in COMPARED:  # torch, faiss, torch, faiss, ...
            times[backend].append(timed(call(backend, case.queries)))
    max_dd, top1, mismatches = agreement(case, results["torch"], results["faiss"])
    return {
        "torch": (min(times["torch"]), statistics.median(times["torch"])),
        "faiss": (min(times["faiss"]), statistics.median(times["faiss"])),
        "max_dd": max_dd,
        "top1": top1,
        "mismatches": mismatches,
    }


def hnsw_row(case: Case, repeats: int, threads: int) -> tuple[str, str]:
    """An approximate row: IndexHNSWFlat search time and recall@k against the exact neighbours."""
    import faiss

    faiss.omp_set_num_threads(threads)
    xb = np.ascontiguousarray(case.bank.numpy(), dtype=np.float32)
    xq = np.ascontiguousarray(case.queries.numpy(), dtype=np.float32)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, 32)
    index.hnsw.efConstruction = 64
    index.add(xb)
    build = time.perf_counter() - started
    index.hnsw.efSearch = 64
    index.search(xq, case.k)  # warm-up
    times = [timed(lambda: index.search(xq, case.k)) for _ in range(repeats)]
    _, approx = index.search(xq, case.k)
    nearest.set_backend("torch")
    _, exact = nearest.nearest_distances(case.queries, case.bank, case.k)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    recall = hits / exact.numel()
    row = (
        f"| {case.label}, **approximate** HNSW (M 32, efSearch 64) | - | "
        f"{min(times):.1f} / {statistics.median(times):.1f} | - | - | recall@{case.k} {recall:.4f} |"
    )
    return row, f"HNSW build of the {len(xb)}-row bank: {build:.2f} s."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per backend (>= 5 for reports)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and so faiss) threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="three small shapes, 3 repeats, no real features"
    )
    parser.add_argument("--no-real", action="store_true", help="skip the rows on real teacher features")
    parser.add_argument("--no-hnsw", action="store_true", help="skip the approximate HNSW row")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.no_real = min(args.repeats, 3), True

    torch.set_num_threads(args.threads)
    nearest.set_backend("faiss")  # fails here, naming the package, when faiss-cpu is missing
    import faiss

    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(64, DIM, generator=generator)
    cases = [
        Case(
            f"{n} x {m}, k {k}" + ("" if norms else " (k-means, no norms)"),
            clustered(n, generator, centres),
            clustered(m, generator, centres),
            k,
            norms,
        )
        for n, m, k, norms in (QUICK if args.quick else SYNTHETIC)
    ]
    notes = []
    if not args.no_real:
        started = time.perf_counter()
        features = teacher_features(24)  # 8 bank images, 16 query images
        bank, queries = torch.cat(features[:8]), torch.cat(features[8:])
        notes.append(f"Real features: 24 generated fabric images in {time.perf_counter() - started:.1f} s.")
        pick = torch.randperm(len(bank), generator=generator)[:1024]
        cases.append(Case(f"real {len(queries)} x {len(bank)}, k 2", queries, bank, 2, True))
        cases.append(Case(f"real {len(queries)} x 1024, k 3", queries, bank[pick].contiguous(), 3, True))

    print(
        f"CPU: {cpu_model()}; threads {torch.get_num_threads()}; torch {torch.__version__}; "
        f"faiss {faiss.__version__}; repeats {args.repeats}; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| shape (queries x bank, D 192) | torch ms best / median | faiss ms best / median "
        "| faiss/torch (median) | max abs dd | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|")
    started = time.perf_counter()
    for case in cases:
        r = run_case(case, args.repeats)
        (t_best, t_med), (f_best, f_med) = r["torch"], r["faiss"]
        agree = f"{r['top1']:.4f}" + (f" ({r['mismatches']} not ties)" if r["mismatches"] else "")
        print(
            f"| {case.label} | {t_best:.1f} / {t_med:.1f} | {f_best:.1f} / {f_med:.1f} | "
            f"{f_med / t_med:.2f} | {r['max_dd']:.1e} | {agree} |",
            flush=True,
        )
    if not args.no_hnsw:
        big = next((c for c in cases if c.label.startswith("real 16384 x 8192")), cases[-1])
        row, note = hnsw_row(big, args.repeats, args.threads)
        print(row)
        notes.append(note)
    nearest.set_backend("torch")
    print()
    notes.append(
        f"Timed in {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end."
    )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
