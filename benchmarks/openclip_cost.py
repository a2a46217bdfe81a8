"""Cost per image of the open_clip teacher against one plain CLIP image pass and anomalib's WinCLIP.

Every row runs on the same random-weight open_clip model (saved once as a checkpoint file and loaded by
each contender: the cost does not depend on the weights' values) and the same images, one image per call,
on CPU with a fixed number of threads:
- `encode_image`: one plain image-tower pass, the unit;
- the Loom teacher's `predict` on an image it has not seen (embedding, window scores, maps, stitching),
  zero-shot and k=1 few-shot, with the default `window_layers=1` and with exact token masking in every block;
- anomalib 2.7.0 `WinClipModel` (zero-shot and k=1), when importable (`make bench-setup`, then run with
  `.venv-bench/bin/python`).

Timing: the contenders take turns on each image, `--rounds` times, and each keeps its best call per
image (other jobs on a shared machine only ever slow a call down); seconds/image is the mean over images.
GFLOP/image comes from torch's FLOP counter on one call: it is what a busy machine cannot change.

anomalib 2.7.0 was written for open_clip < 2.26, whose transformer took (L, N, D); open_clip 3.3 is batch-
first, so anomalib's window pass as shipped would attend across windows instead of within them. The
benchmark runs it with the transformer told to take (L, N, D) during that pass (same cost, the real
WinCLIP windows) and checks that its window embeddings equal ours.

    python benchmarks/openclip_cost.py                         # ViT-B-16-plus-240, 4 images, 2 threads
    .venv-bench/bin/python benchmarks/openclip_cost.py --images 8 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, also for .venv-bench

from models.teacher.openclip import OpenClipTeacher, OpenClipTeacherConfig, load_clip

Call = Callable[[int], object]


def fabric_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Woven-looking uint8 textures (a different weave angle and noise per image), count + 2 of them."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(count + 2):  # + one pool image to fit on, + one few-shot reference
        angle = rng.uniform(0, np.pi)
        weave = 128 + 70 * np.sin((rows * np.cos(angle) + cols * np.sin(angle)) * rng.uniform(0.5, 1.2))
        rgb = weave[..., None] * rng.uniform(0.7, 1.0, 3) + rng.normal(0, 6, (size, size, 3))
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return images


def machine() -> str:
    """Cores, CPU model, load average and torch version of this machine."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), load average {load}, torch {torch.__version__}"


def anomalib_contenders(
    model_name: str, checkpoint: Path, pixels: list[torch.Tensor], reference: torch.Tensor
):
    """anomalib's WinClipModel zero-shot and k=1 on our checkpoint, or None when anomalib is missing."""
    try:
        import anomalib
        from anomalib.models.image.winclip import torch_model as winclip
    except ImportError:
        return None
    winclip.BACKBONE = model_name
    winclip.PRETRAINED = str(checkpoint)  # open_clip takes a file path where a tag would go
    zero_shot = winclip.WinClipModel(class_name="fabric").eval()
    few_shot = copy.deepcopy(zero_shot)
    for model in (zero_shot, few_shot):
        original = model._get_window_embeddings
        transformer = model.clip.visual.transformer

        def windows(feature_map, masks, original=original, transformer=transformer):
            transformer.batch_first = False  # anomalib hands the blocks (L, N, D): transpose it back
            try:
                return original(feature_map, masks)
            finally:
                transformer.batch_first = True

        model._get_window_embeddings = windows
    few_shot.setup(reference_images=reference[None])
    calls = {
        "anomalib WinClipModel, zero-shot": lambda i: zero_shot(pixels[i][None]),
        "anomalib WinClipModel, k=1": lambda i: few_shot(pixels[i][None]),
    }
    return anomalib.__version__, zero_shot, calls


def flops(call: Callable[[], object]) -> float:
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel hides its matmuls from the counter
    try:
        with FlopCounterMode(display=False) as counter:
            call()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip ViT model name")
    parser.add_argument("--images", type=int, default=4, help="images per contender")
    parser.add_argument("--rounds", type=int, default=1, help="turns per image (best call kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    workdir = Path(tempfile.mkdtemp(prefix="openclip-cost-"))
    checkpoint = workdir / f"{args.model}-random.pt"
    torch.save(
        load_clip(OpenClipTeacherConfig(model_name=args.model, pretrained=None)).state_dict(), checkpoint
    )
    config = OpenClipTeacherConfig(
        model_name=args.model, pretrained=None, checkpoint=str(checkpoint), window_layers=None
    )
    exact = OpenClipTeacher(config)
    few = OpenClipTeacher(config)
    fast = OpenClipTeacher(OpenClipTeacherConfig(**{**vars(config), "window_layers": 1}))
    few_fast = OpenClipTeacher(OpenClipTeacherConfig(**{**vars(config), "window_layers": 1}))
    size = exact.input_size[0]
    *images, pool_image, reference_image = fabric_images(args.images, size)
    exact.fit([pool_image])
    fast.fit([pool_image])
    few.fit([pool_image], [reference_image])
    few_fast.fit([pool_image], [reference_image])
    pixels = [exact._pixels(image[None])[0] for image in images]

    contenders: dict[str, Call] = {
        "open_clip `encode_image` (the unit)": lambda i: exact.model.encode_image(pixels[i][None]),
        "Loom teacher, zero-shot, exact token masking": lambda i: exact.predict([images[i]]),
        "Loom teacher, k=1, exact token masking": lambda i: few.predict([images[i]]),
        "Loom teacher, zero-shot, `window_layers=1` (default)": lambda i: fast.predict([images[i]]),
        "Loom teacher, k=1, `window_layers=1` (default)": lambda i: few_fast.predict([images[i]]),
    }
    check = ""
    found = anomalib_contenders(args.model, checkpoint, pixels, exact._pixels(reference_image[None])[0])
    if found is not None:
        version, reference_model, calls = found
        contenders.update(calls)
        with torch.inference_mode():
            theirs = reference_model.encode_image(pixels[0][None])[1]
            ours = exact.encoder(pixels[0][None]).windows
        gap = max(float((F.normalize(t, dim=-1) - o).abs().max()) for t, o in zip(theirs, ours, strict=True))
        check = f"anomalib {version}: window embeddings equal ours within {gap:.1e} (max abs, unit vectors)."
    else:
        check = "anomalib not importable here: `make bench-setup`, then run with `.venv-bench/bin/python`."

    best = {name: [float("inf")] * len(images) for name in contenders}
    with torch.inference_mode():
        for call in contenders.values():  # warm-up (allocator, lazy inits)
            call(0)
        for _ in range(args.rounds):
            for index in range(len(images)):
                for name, call in contenders.items():
                    start = time.perf_counter()
                    call(index)
                    best[name][index] = min(best[name][index], time.perf_counter() - start)
        gflops = {name: flops(lambda call=call: call(0)) for name, call in contenders.items()}

    unit_name = next(iter(contenders))
    unit_time, unit_flops = float(np.mean(best[unit_name])), gflops[unit_name]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    setting = f"{args.threads} threads, {args.model} at {size} px, {len(images)} images"
    print(f"`{command}` on {machine()}, {setting}\n")
    print("| contender | s/image | x encode_image | GFLOP/image | x encode_image (FLOPs) |")
    print("|---|---:|---:|---:|---:|")
    for name in contenders:
        seconds = float(np.mean(best[name]))
        print(
            f"| {name} | {seconds:.3f} | {seconds / unit_time:.2f} | {gflops[name]:.2f} | "
            f"{gflops[name] / unit_flops:.2f} |"
        )
    if found is not None:
        for ours, theirs in (
            ("Loom teacher, zero-shot, exact token masking", "anomalib WinClipModel, zero-shot"),
            ("Loom teacher, k=1, exact token masking", "anomalib WinClipModel, k=1"),
        ):
            ratio = np.mean(best[theirs]) / np.mean(best[ours])
            print(
                f"\n{theirs} / {ours}: {ratio:.2f}x time, {gflops[theirs] / gflops[ours]:.2f}x FLOPs", end=""
            )
        print()
    print(f"\n{check}")


if __name__ == "__main__":
    main()
