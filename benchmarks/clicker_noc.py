"""Defect-Click against GrabCut and the teacher map on the same clicks (NoC protocol), and its latency.

NoC mode (default): the embedded fabric data of params.yaml (240 images, 256 px, defect share 0.3, frozen
test split 0.25); pre-annotations from the backbone teacher zero-shot over all 240 images, as a round
pre-annotates; the defect objects (8-connected regions, those 2 px apart merged) of the 60 test images.
Side by side, from nothing and from the pre-annotation (restricted to its components near each object),
every method on the same simulated clicks (models/clicker/noc.py):

- GrabCut with the clicks in the clicker's zoom crop,
- the teacher's anomaly map grown from the clicks,
- the pre-trained clicker (``loom.stages.clicking.pretrain_clicker``, cached under ``--work``),
- that clicker fine-tuned on the true masks of the first 24 train images with defects (one round's
  reviews), with the teacher's pre-annotations as the masks people corrected.

Latency mode (``--latency``): a first click on an image (the backbone runs) and a follow-up click inside
its crop (cached features, the decoder only), p50 / p95 at 256 x 256, 512 x 512 and 4096 x 256 on rendered
fabric; with ``--http``, measured as Label Studio sees it: ``POST /predict`` of a real ``loom backend``
process (its own workspace, basic auth, keep-alive), the request as Label Studio forwards a smart key point.

    python benchmarks/clicker_noc.py --work /tmp/clicker-bench            # NoC table (markdown)
    python benchmarks/clicker_noc.py --work /tmp/clicker-bench --latency  # latency table, in-process
    python benchmarks/clicker_noc.py --work /tmp/clicker-bench --latency --http  # through HTTP /predict
    python benchmarks/clicker_noc.py --work /tmp/clicker-bench --steps 160 --methods pretrained
    python benchmarks/clicker_noc.py --work /tmp/clicker-bench --methods pretrained --steps 320 \
        --train backbone_lr_factor=0.1 --model-config image_size=128   # a recipe variant
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

#: The params.yaml dataset.
DATASET = {"n_images": 240, "size": 256, "defect_fraction": 0.3, "test_fraction": 0.25, "seed": 0}
#: Train images with defects whose true masks the fine-tuned row learns from (one round's reviews).
FINE_TUNE_IMAGES = 24
METHODS = ("grabcut", "teacher_grow", "pretrained", "fine-tuned")
TITLES = {
    "grabcut": "GrabCut",
    "teacher_grow": "teacher map grown",
    "pretrained": "Defect-Click pre-trained",
    "fine-tuned": "Defect-Click fine-tuned",
}
#: (height, width) of the latency frames.
LATENCY_SHAPES = ((256, 256), (512, 512), (256, 4096))


def load_split(data: Path, split: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Stems, images and class masks of one split (manifest order)."""
    import pandas as pd

    from loom.data.imageio import read_image, read_mask

    classes = json.loads((data / "classes.json").read_text())
    rows = pd.read_parquet(data / "manifest.parquet")
    rows = rows[rows["split"] == split]
    stems = [Path(p).stem for p in rows["path"]]
    images = [read_image(data / p) for p in rows["path"]]
    masks = [read_mask(data / "masks" / f"{s}.png", len(classes)) for s in stems]
    return stems, images, masks


def teacher_annotations(data: Path, work: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """stem -> (pre-annotation mask, anomaly map) of the backbone teacher zero-shot over all images, and
    a line saying what ran (cached in ``work/teacher.npz``)."""
    from loom.config import Settings
    from loom.stages.clicking import teacher_prelabels

    cache = work / "teacher.npz"
    if cache.is_file():
        stored = np.load(cache)
        stems = sorted({k.split("/", 1)[1] for k in stored.files if "/" in k})
        source = str(stored["source"])
        return {s: (stored[f"mask/{s}"], stored[f"map/{s}"]) for s in stems}, source
    stems, images = [], []
    for split in ("train", "test"):
        split_stems, split_images, _ = load_split(data, split)
        stems += split_stems
        images += split_images
    started = time.perf_counter()
    prelabels = teacher_prelabels(images, Settings(workspace=work / "workspace"), "backbone")
    source = f"{prelabels.source} ({time.perf_counter() - started:.0f} s)"
    out = {s: (m, a) for s, m, a in zip(stems, prelabels.masks, prelabels.maps, strict=True)}
    arrays = {f"mask/{s}": m for s, (m, _) in out.items()} | {f"map/{s}": a for s, (_, a) in out.items()}
    np.savez_compressed(cache, source=np.array(source), **arrays)
    return out, source


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=0.002", "tiny=false"]`` -> ``{"lr": 0.002, "tiny": False}`` (values read as YAML scalars)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def recipe_for(config: str, steps: int | None, train: dict | None = None, model: dict | None = None):
    """The named pre-training recipe; with ``steps``, the same one with that many optimiser steps in all;
    ``train`` / ``model`` override ClickTrainConfig / ClickerConfig fields (recipe sweeps)."""
    from loom.stages.clicking import RECIPES

    recipe = RECIPES[config]
    recipe = replace(recipe, train={**recipe.train, **(train or {})}, model={**recipe.model, **(model or {})})
    if steps is None:
        return recipe
    train = dict(recipe.train)
    per_epoch = train.get("steps_per_epoch", 50)
    epochs = max(1, round(steps / per_epoch))
    return replace(recipe, train={**train, "epochs": epochs, "steps_per_epoch": max(1, steps // epochs)})


def noc(args: argparse.Namespace) -> dict:
    from loom.stages.clicking import (
        build_methods,
        evaluate_objects,
        fine_tune_clicker,
        objects_from_masks,
        pretrain_clicker,
    )
    from models.clicker import ClickPredictor, image_digest
    from models.student.checkpoint import read_model_metadata

    work = args.work
    data = work / "fabric"
    if not (data / "manifest.parquet").is_file():
        from loom.datasets.fabric import generate

        generate(data, **DATASET)
    teacher, teacher_source = teacher_annotations(data, work)
    stems, images, masks = load_split(data, "test")
    objects = objects_from_masks(images, masks, [teacher[s][0] for s in stems], stems, gap=args.object_gap)
    maps = {image_digest(image): teacher[s][1] for s, image in zip(stems, images, strict=True)}

    started = time.perf_counter()
    recipe = recipe_for(args.config, args.steps, args.train, args.model_config)
    pretrained = pretrain_clicker(work / "cache", config=args.config, seed=args.seed, recipe=recipe)
    meta = read_model_metadata(pretrained)
    info = {
        "pretrained": str(pretrained),
        "pretrain_seconds": meta.get("pretrain_seconds"),
        "pretrain_steps": meta.get("steps"),
        "pretrain_cached": time.perf_counter() - started < 0.5 * float(meta.get("pretrain_seconds", 0)),
        "teacher": teacher_source,
        "objects": len(objects),
        "test_images": len(images),
        "images_with_objects": sum(bool(m.any()) for m in masks),
    }
    segmenters = {}
    tuned_dirs: dict[str, Path] = {}
    baselines = [m for m in ("grabcut", "teacher_grow") if m in args.methods]
    segmenters |= build_methods(baselines, pretrained, maps)
    if "pretrained" in args.methods:
        segmenters["pretrained"] = ClickPredictor.from_pretrained(pretrained).segmenter()
    if "fine-tuned" in args.methods:
        train_stems, train_images, train_masks = load_split(data, "train")
        picked = [i for i, m in enumerate(train_masks) if m.any()][:FINE_TUNE_IMAGES]
        reviewed = objects_from_masks(
            [train_images[i] for i in picked],
            [train_masks[i] for i in picked],
            [teacher[train_stems[i]][0] for i in picked],
        )
        seeds = args.fine_tune_seeds or [args.seed]
        started = time.perf_counter()
        for seed in seeds:
            tuned, _ = fine_tune_clicker(
                pretrained,
                reviewed,
                work / f"fine-tuned-{pretrained.name}{'' if seed == args.seed else f'-s{seed}'}",
                epochs=max(1, args.fine_tune_steps // 25),
                steps_per_epoch=25,
                seed=seed,
                lr=args.fine_tune_lr,
                rehearsal_images=args.rehearsal,
            )
            name = "fine-tuned" if len(seeds) == 1 else f"fine-tuned, seed {seed}"
            segmenters[name] = ClickPredictor.from_pretrained(tuned).segmenter()
            tuned_dirs[name] = tuned
        info["fine_tune_steps"] = 25 * max(1, args.fine_tune_steps // 25)
        info["fine_tune_seconds"] = round((time.perf_counter() - started) / len(seeds), 1)
        info["fine_tune_objects"] = len(reviewed)
    ordered = {name: segmenters[name] for name in [*METHODS, *tuned_dirs] if name in segmenters}
    runs: dict[str, dict[str, list]] = {}

    def keep_clicker_runs(name: str, start: str, object_runs: list) -> None:
        if name == "pretrained" or name in tuned_dirs:
            runs.setdefault(name, {})[start] = object_runs

    table = evaluate_objects(ordered, objects, on_runs=keep_clicker_runs if args.per_object else None)
    result = {"methods": table, **info}
    if len(tuned_dirs) > 1:
        result["fine_tune_spread"] = seed_spread([table[name] for name in tuned_dirs])
    if args.per_object:
        result["per_object"] = {
            name: {start: per_object(object_runs, objects) for start, object_runs in starts.items()}
            for name, starts in runs.items()
        }
    return result


def seed_spread(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{start: {metric: [mean, min, max]}} over the fine-tuning seeds' rows."""
    out: dict[str, dict[str, list[float]]] = {}
    for start in rows[0]:
        out[start] = {}
        for metric in ("noc85", "noc90", "fail20"):
            values = [row[start][metric] for row in rows]
            out[start][metric] = [float(np.mean(values)), float(min(values)), float(max(values))]
    return out


def per_object(runs: list, objects: list) -> list[dict]:
    """One row per object of the table's own runs (``runs[i]`` is ``objects[i]``'s)."""
    out = []
    for run, obj in zip(runs, objects, strict=True):
        rows, cols = np.nonzero(obj.mask)
        out.append(
            {
                "object": obj.name,
                "area": int(obj.mask.sum()),
                "box": f"{np.ptp(rows) + 1}x{np.ptp(cols) + 1}",
                "noc85": run.clicks_to(0.85, 20),
                "noc90": run.clicks_to(0.9, 20),
                "best_iou": round(max(run.ious), 3),
            }
        )
    return out


def format_per_object(rows: list[dict]) -> str:
    lines = ["| object | area px | box | NoC@85 | NoC@90 | best IoU |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['object']} | {row['area']} | {row['box']} | {row['noc85']} | {row['noc90']} "
            f"| {row['best_iou']:.3f} |"
        )
    return "\n".join(lines)


def latency_row(first: list[float], follow: list[float]) -> dict:
    """p50 / p95 of first and follow-up click times (ms) of one frame size."""
    return {
        "first_p50": float(np.percentile(first, 50)),
        "first_p95": float(np.percentile(first, 95)),
        "follow_p50": float(np.percentile(follow, 50)),
        "follow_p95": float(np.percentile(follow, 95)),
        "calls": len(first),
    }


def latency(args: argparse.Namespace) -> dict:
    """p50 / p95 of first and follow-up clicks per frame shape."""
    from loom.datasets.fabric import render_sample
    from loom.stages.clicking import pretrain_clicker
    from models.clicker import Click, ClickPredictor

    model_dir = args.model or pretrain_clicker(
        args.work / "cache",
        config=args.config,
        seed=args.seed,
        recipe=recipe_for(args.config, args.steps, args.train, args.model_config),
    )
    predictor = ClickPredictor.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    out: dict = {"model": str(model_dir), "shapes": {}}
    for height, width in LATENCY_SHAPES:
        first, follow = [], []
        frames = [render_sample(1000 + k, height, width, defect_prob=1.0).image for k in range(args.frames)]
        for repeat in range(args.repeats + 1):  # the first pass warms up allocators, not counted
            for k, image in enumerate(frames):
                y, x = float(rng.uniform(0.2, 0.8) * height), float(rng.uniform(0.2, 0.8) * width)
                key = f"{height}x{width}-{k}-{repeat}"
                started = time.perf_counter()
                answer = predictor.predict(image, [Click(y, x, True)], image_key=key)
                first_ms = 1000 * (time.perf_counter() - started)
                clicks = [Click(y, x, True), Click(y + 3, x - 3, False)]
                started = time.perf_counter()
                again = predictor.predict(image, clicks, prev_mask=answer.mask, image_key=key)
                follow_ms = 1000 * (time.perf_counter() - started)
                if not answer.encoded or again.encoded:
                    raise RuntimeError("a follow-up click inside the crop ran the backbone")
                if repeat:
                    first.append(first_ms)
                    follow.append(follow_ms)
        out["shapes"][f"{height}x{width}"] = latency_row(first, follow)
    return out


def http_latency(args: argparse.Namespace) -> dict:
    """p50 / p95 of first and follow-up clicks through ``POST /predict`` of a ``loom backend`` process."""
    import shutil
    import socket
    import subprocess

    import requests
    import yaml

    from loom.config import PROJECT_ROOT, load_settings
    from loom.data.imageio import write_png
    from loom.datasets.fabric import render_sample
    from loom.services import labelstudio as ls
    from loom.stages.clicking import pretrain_clicker, pretrained_clicker_root

    model_dir = args.model or pretrain_clicker(
        args.work / "cache",
        config=args.config,
        seed=args.seed,
        recipe=recipe_for(args.config, args.steps, args.train, args.model_config),
    )
    workspace = args.work / "http-workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"]["clicker_preset"] = args.config
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(workspace)
    # The backend answers with the workspace's champion; point it at the model measured here.
    settings.clicker_dir.mkdir(parents=True, exist_ok=True)
    (settings.clicker_dir / "champion.json").write_text(
        json.dumps({"version": "bench", "model_dir": str(Path(model_dir).resolve())})
    )
    pretrained_clicker_root(settings).mkdir(parents=True, exist_ok=True)
    if args.model is None:  # its warm-up finds the pre-trained one cached instead of training it again
        shutil.copytree(model_dir, pretrained_clicker_root(settings) / Path(model_dir).name)
    env = {**os.environ, "LOOM_WORKSPACE": str(workspace), "OMP_NUM_THREADS": str(args.threads)}
    loom = Path(sys.executable).parent / "loom"
    server = subprocess.Popen(
        [str(loom), "backend", "--workspace", str(workspace), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    http = requests.Session()
    http.auth = (settings.backend_user, settings.backend_password)
    config = ls.label_config(settings.classes)
    rng = np.random.default_rng(0)
    out: dict = {"model": str(model_dir), "shapes": {}, "transport": "HTTP /predict"}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=2).json().get("clicker") == "ready":
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the backend's click model did not become ready in 10 minutes")
        task_id = 0
        for height, width in LATENCY_SHAPES:
            first, follow = [], []
            names = []
            for k in range(args.frames):
                name = f"bench-{height}x{width}-{k}"
                write_png(
                    settings.images_dir / f"{name}.png", render_sample(1000 + k, height, width, 1.0).image
                )
                names.append(name)
            for repeat in range(args.repeats + 1):  # the first pass warms up, not counted
                for name in names:
                    task_id += 1
                    y, x = float(rng.uniform(0.2, 0.8) * height), float(rng.uniform(0.2, 0.8) * width)
                    click = ls.keypoint_result(x, y, width, height, "hole", True)
                    body = {
                        "tasks": [{"id": task_id, "data": {"image_id": name}}],
                        "label_config": config,
                        "params": {"context": {"result": [click]}},
                    }
                    started = time.perf_counter()
                    answer = http.post(f"{url}/predict", json=body, timeout=60)
                    first_ms = 1000 * (time.perf_counter() - started)
                    second = ls.keypoint_result(x - 3, y + 3, width, height, "hole", False)
                    body["params"]["context"]["result"] = [click, second]
                    started = time.perf_counter()
                    again = http.post(f"{url}/predict", json=body, timeout=60)
                    follow_ms = 1000 * (time.perf_counter() - started)
                    if answer.status_code != 200 or again.status_code != 200:
                        raise RuntimeError(f"/predict answered {answer.status_code} / {again.status_code}")
                    if repeat:
                        first.append(first_ms)
                        follow.append(follow_ms)
            out["shapes"][f"{height}x{width}"] = latency_row(first, follow)
        encoded = [
            json.loads(line)["encoded"] for line in (settings.backend_dir / "interactions.jsonl").open()
        ]
        # Every first click ran the backbone and no follow-up did: the cache works through the real path.
        out["backbone_runs"] = {"first": sum(encoded[0::2]), "follow_up": sum(encoded[1::2])}
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def format_latency(result: dict) -> str:
    lines = [
        "| frame (H x W) | first click p50 ms | p95 | follow-up p50 ms | p95 | calls |",
        "|---|---|---|---|---|---|",
    ]
    for shape, row in result["shapes"].items():
        lines.append(
            f"| {shape.replace('x', ' x ')} | {row['first_p50']:.1f} | {row['first_p95']:.1f} "
            f"| {row['follow_p50']:.1f} | {row['follow_p95']:.1f} | {row['calls']} |"
        )
    return "\n".join(lines)


def main() -> None:
    from loom.stages.clicking import FINE_TUNE_LR

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="data, teacher maps and models (reused)")
    parser.add_argument("--config", default="default", help="pre-training recipe of loom.stages.clicking")
    parser.add_argument("--steps", type=int, help="pre-training steps instead of the recipe's")
    parser.add_argument(
        "--train", nargs="*", default=[], metavar="KEY=VALUE", help="ClickTrainConfig overrides (sweeps)"
    )
    parser.add_argument(
        "--model-config", nargs="*", default=[], metavar="KEY=VALUE", help="ClickerConfig overrides"
    )
    parser.add_argument(
        "--object-gap", type=int, default=2, help="defect components this close are one object (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fine-tune-steps", type=int, default=200, help="a multiple of 25")
    parser.add_argument("--fine-tune-lr", type=float, default=FINE_TUNE_LR)
    parser.add_argument(
        "--rehearsal", type=int, default=0, help="rendered images mixed into fine-tuning (forgetting)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency", action="store_true", help="predictor latency instead of NoC")
    parser.add_argument("--http", action="store_true", help="latency: through a `loom backend` process")
    parser.add_argument("--model", type=Path, help="latency: this clicker folder instead of the pre-trained")
    parser.add_argument("--frames", type=int, default=10, help="latency: frames per shape")
    parser.add_argument("--repeats", type=int, default=3, help="latency: passes over the frames")
    parser.add_argument(
        "--fine-tune-seeds", type=int, nargs="+", help="fine-tune once per seed (default: --seed); spread"
    )
    parser.add_argument("--per-object", action="store_true", help="also each object's NoC per start")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    args.train, args.model_config = parse_overrides(args.train), parse_overrides(args.model_config)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from student_speed import cpu_name  # a sibling script: the benchmarks folder is on sys.path

    started = time.perf_counter()
    run = noc if not args.latency else http_latency if args.http else latency
    result = run(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    if args.latency:
        print(format_latency(result))
        if "backbone_runs" in result:
            runs = result["backbone_runs"]
            print(f"\nbackbone runs: {runs['first']} first clicks, {runs['follow_up']} follow-ups")
    else:
        print(
            f"{result['objects']} objects in {result['images_with_objects']} of the {result['test_images']} "
            f"test images; pre-annotations: {result['teacher']}; pre-training "
            f"{result['pretrain_steps']} steps, {result['pretrain_seconds']} s"
            f"{' (cached)' if result['pretrain_cached'] else ''}"
            + (
                f"; fine-tuning {result['fine_tune_steps']} steps on {result['fine_tune_objects']} objects, "
                f"{result['fine_tune_seconds']} s"
                if "fine_tune_seconds" in result
                else ""
            )
            + "\n"
        )
        from loom.stages.clicking import format_table

        titles = TITLES | {name: f"Defect-Click {name}" for name in result["methods"] if "seed" in name}
        print(format_table(result, titles))
        for start, metrics in result.get("fine_tune_spread", {}).items():
            spread = ", ".join(f"{k} {m:.2f} ({lo:.2f} to {hi:.2f})" for k, (m, lo, hi) in metrics.items())
            print(f"\nfine-tuned over seeds, from {'nothing' if start == 'empty' else start}: {spread}")
        for name, starts in result.get("per_object", {}).items():
            for start, rows in starts.items():
                print(f"\nPer object, {name}, from {'nothing' if start == 'empty' else start}:\n")
                print(format_per_object(rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
