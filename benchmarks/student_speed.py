"""CPU inference speed of the segmentation students against their bare backbone.

Images/s at batch 16 on 256 x 256 crops, ``torch.inference_mode``, channels-last tensors and weights, eval
mode, a fixed number of threads; multiply-accumulates per image (exact, from torch's FLOP counter: the one
number a noisy machine cannot change), parameters and peak resident memory.

The variants are timed in turns (one batch of each, then again, ``--iters`` rounds) and each keeps its best
batch: on a shared machine other jobs only ever slow a batch down, and taking turns spreads their load
over all variants instead of on whichever ran at a bad moment. Peak RSS comes from a separate Python
process per variant (build, one batch), so it is that variant's own; it includes torch's runtime.

    python benchmarks/student_speed.py                # all variants, prints a markdown table
    python benchmarks/student_speed.py --iters 10     # more rounds on a quiet machine

The bare Lite0 ``forward_features`` is the floor every student pays; the target is a student at >= 50% of
its images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

VARIANTS: dict[str, str] = {
    "lite0": "Lite0 forward_features (floor)",
    "fpn": "FPN (64 ch)",
    "bafpn": "BAFPN, attention at strides 16, 32 (64 ch)",
    "bafpn-no-attention": "BAFPN without attention (64 ch)",
    "bafpn-plain": "BAFPN neck as a plain FPN (no bottom-up, no attention)",
    "cfa": "CFA",
    "rd4ad": "RD4AD",
    "uninet": "UniNet",
}

Runner = Callable[[torch.Tensor], object]


def build(variant: str) -> tuple[nn.Module, Runner]:
    """A variant in eval mode with channels-last weights, and the call that runs it on a normalised batch."""
    from models.backbone.efficientnet_lite import load_pretrained_lite0
    from models.student.registry import build_student

    torch.manual_seed(0)
    if variant == "lite0":
        model = load_pretrained_lite0(True)
        model.head, model.classifier = nn.Identity(), nn.Identity()  # as the students hold it
    elif variant == "fpn":
        model = build_student("fpn", 6)
    elif variant == "bafpn":
        model = build_student("bafpn", 6)
    elif variant == "bafpn-no-attention":
        model = build_student("bafpn", 6, attention=False)
    elif variant == "bafpn-plain":
        model = build_student("bafpn", 6, attention=False, bottom_up=False)
    elif variant in VARIANTS:
        model = build_student(variant, 6)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    model = model.eval().to(memory_format=torch.channels_last)
    run = model.forward_features if variant == "lite0" else model.segment
    return model, run


def batch_of(batch: int, size: int) -> torch.Tensor:
    """(batch, 3, size, size) channels-last normalised-looking input."""
    return torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)


def footprint(variant: str, batch: int, size: int) -> dict[str, float]:
    """GMACs per image, parameters (M) and this process's peak RSS (MiB) after one batch of ``variant``."""
    model, run = build(variant)
    with torch.inference_mode():
        run(batch_of(batch, size))
        with FlopCounterMode(display=False) as counter:
            run(batch_of(1, size))
    return {
        "gmacs": counter.get_total_flops() / 2e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }


def images_per_second(batch: int, size: int, warmup: int, iters: int) -> dict[str, float]:
    """Best-batch images/s of every variant, timed in turns."""
    runners = {variant: build(variant)[1] for variant in VARIANTS}
    x = batch_of(batch, size)
    best = dict.fromkeys(VARIANTS, float("inf"))
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runners.values():
                run(x)
        for _ in range(iters):
            for variant, run in runners.items():
                started = time.perf_counter()
                run(x)
                best[variant] = min(best[variant], time.perf_counter() - started)
    return {variant: batch / seconds for variant, seconds in best.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--footprint", choices=sorted(VARIANTS), help="one variant's footprint as JSON")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.footprint:
        print(json.dumps(footprint(args.footprint, args.batch, args.size)))
        return

    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--footprint", variant]
        command += ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{completed.stderr}")
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    speeds = images_per_second(args.batch, args.size, args.warmup, args.iters)

    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; batch {args.batch} at {args.size}x{args.size}, best of {args.iters} "
        f"rounds after {args.warmup} warm-up; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| model | images/s | vs floor | GMACs/image | params (M) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for variant, label in VARIANTS.items():
        r, speed = results[variant], speeds[variant]
        print(
            f"| {label} | {speed:.1f} | {speed / speeds['lite0']:.0%} | {r['gmacs']:.3f} | "
            f"{r['params_m']:.2f} | {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
