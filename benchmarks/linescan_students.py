"""Line-scan throughput of a student's streaming prediction against its bare backbone over the same tiles.

Frames/s of ``models.student.training.iter_predictions`` (uint8 tiles in, normalisation, the student's
logits, softmax, the raised-cosine stitch, argmax and image score out, tiles of consecutive frames
batched together) over ``--frames`` frames of ``--width`` x ``--height``, and frames/s of the bare
EfficientNet-Lite0 ``forward_features`` (the floor every student pays, built as benchmarks/student_speed.py
builds it) on the same number of tiles in batches of the same size. The ratio says what the student's head
and the tiling cost on top of the backbone.

Frames are random uint8 (speed does not depend on content) or, with ``--procedural``, rendered by
``loom.datasets.fabric.linescan.generate_line_scan``; a pool of ``--pool`` distinct frames is cycled, so the
process holds the pool and not ``--frames`` frames and peak RSS shows what prediction itself keeps. Peak RSS
is this process's (resource.getrusage): both models, the pool and torch's runtime included.

Like student_speed.py the two are timed in turns (``--iters`` rounds) and each keeps its best round: on a
shared machine other jobs only ever slow a round down.

    python benchmarks/linescan_students.py --student fpn --frames 20
    python benchmarks/linescan_students.py --student bafpn --width 8192 --height 512 --iters 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# A sibling script: the benchmarks folder is on sys.path when this one runs.
from student_speed import VARIANTS, Runner, batch_of, build, cpu_name

from models.student.training import iter_predictions
from models.tiling import tile_origins

STUDENTS = [variant for variant in VARIANTS if variant != "lite0"]


def synthetic_frames(count: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """`count` random (height, width, 3) uint8 frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


def procedural_frames(count: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    """`count` procedural line-scan frames, (height, width, 3) uint8 (the grey image stacked to RGB)."""
    from loom.data.imageio import read_image
    from loom.datasets.fabric.linescan import generate_line_scan

    with tempfile.TemporaryDirectory(prefix="linescan-bench-") as tmp:
        out_dir = generate_line_scan(
            Path(tmp) / "frames", n_frames=count, width=width, height=height, seed=seed
        )
        # read_image gives (H, W, 3) RGB for the grey (mode L) PNGs: the channel stacked three times.
        return [read_image(path) for path in sorted((out_dir / "images").glob("*.png"))]


def frame_stream(pool: list[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """`count` frames cycling through `pool`, produced lazily as the predictor asks for them."""
    return itertools.islice(itertools.cycle(pool), count)


def tiles_per_frame(height: int, width: int, tile: int, overlap: int) -> int:
    """Tiles the tiler cuts from one frame (frames smaller than the tile are padded to it first)."""
    return len(tile_origins(max(height, tile), max(width, tile), tile, overlap))


def time_student(
    model: torch.nn.Module, pool: list[np.ndarray], frames: int, tile: int, overlap: int, batch: int
) -> float:
    """Seconds for `iter_predictions` over `frames` frames, each result dropped as it comes."""
    started = time.perf_counter()
    for result in iter_predictions(
        model, frame_stream(pool, frames), tile_overlap=overlap, tile_size=tile, batch_size=batch
    ):
        del result
    return time.perf_counter() - started


def time_backbone(run: Runner, tiles: int, tile: int, batch: int) -> float:
    """Seconds for the bare backbone on `tiles` normalised tiles in batches of `batch` (the last one short,
    as the tiler's last batch is)."""
    full, last = divmod(tiles, batch)
    inputs = [batch_of(batch, tile)] * full + ([batch_of(last, tile)] if last else [])
    started = time.perf_counter()
    with torch.inference_mode():
        for x in inputs:
            run(x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", choices=STUDENTS, default="fpn")
    parser.add_argument("--frames", type=int, default=20, help="frames predicted per round")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--pool", type=int, default=4, help="distinct frames, cycled")
    parser.add_argument("--procedural", action="store_true", help="render frames instead of random ones")
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="frames predicted once before timing")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds; each side keeps its best")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.frames < 1 or args.iters < 1:
        parser.error("--frames and --iters must be at least 1")
    torch.set_num_threads(args.threads)

    pool_size = min(args.pool, args.frames)
    make = procedural_frames if args.procedural else synthetic_frames
    pool = make(pool_size, args.height, args.width, args.seed)
    model, _ = build(args.student)  # eval mode, channels-last weights, its default (real) config
    _, backbone = build("lite0")
    tile = model.config.image_size
    tiles = args.frames * tiles_per_frame(args.height, args.width, tile, args.overlap)

    load_before = os.getloadavg()[0]
    if args.warmup:
        time_student(model, pool, args.warmup, tile, args.overlap, args.batch)
        time_backbone(backbone, min(tiles, args.batch), tile, args.batch)
    student_s = backbone_s = float("inf")
    for _ in range(args.iters):
        student_s = min(student_s, time_student(model, pool, args.frames, tile, args.overlap, args.batch))
        backbone_s = min(backbone_s, time_backbone(backbone, tiles, tile, args.batch))
    student_fps, backbone_fps = args.frames / student_s, args.frames / backbone_s
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; {args.frames} {'procedural' if args.procedural else 'random'} frames of "
        f"{args.width}x{args.height}, {tiles // args.frames} tiles of {tile} px (overlap {args.overlap}) "
        f"each, batch {args.batch}; best of {args.iters} rounds; 1-minute load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after\n"
    )
    print("| student | frames/s | backbone frames/s | ratio | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    print(
        f"| {VARIANTS[args.student]} | {student_fps:.2f} | {backbone_fps:.2f} | "
        f"{student_fps / backbone_fps:.0%} | {peak_rss_mib:.0f} |"
    )


if __name__ == "__main__":
    main()
