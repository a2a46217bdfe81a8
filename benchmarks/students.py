"""Quality of every student on the same data and the same metrics, trained as the round trains them.

Embedded fabric data (the params.yaml dataset: 240 images, 256 px, defect share 0.3, frozen test split
0.25): each student is trained on all train images with their true masks (what people would have labeled
after enough rounds; anomaly scorers use the defect-free ones), with the round's optimiser settings and
`--crops` random crops, then evaluated on the test split with loom.evaluation.metrics.evaluate_segmentation.
conformal-clip-data (2,000 simulated 250 x 250 textile surfaces, image labels only): the anomaly scorers
learn from `--nominal-train` nominal images and are scored on held-out nominal images against local and
against global defects (image AUROC); supervised students need masks this data does not have.

Every model trains in its own process, so its peak RSS is its own. Inference speed:
benchmarks/student_speed.py.

    python benchmarks/students.py --data /tmp/fabric          # all models, markdown tables
    python benchmarks/students.py --data /tmp/fabric --models bafpn cfa --crops 600   # a quicker look
    python benchmarks/students.py --data /tmp/fabric --models rd4ad uninet --before HEAD --seeds 0 1 2

`--before REV` exports the tree at git revision REV (`git archive`, the working tree is not touched) and
runs every row a second time with that tree's own benchmarks/students.py as the child, its folder first
on PYTHONPATH: same data, crops and seed; those rows are labelled `<model>@<short REV>`. `--seeds` runs
each row once per seed and adds a mean row.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: Row name -> (student, model config overrides, training config overrides).
MODELS: dict[str, tuple[str, dict, dict]] = {
    "fpn": ("fpn", {}, {}),
    "bafpn": ("bafpn", {}, {}),
    "bafpn-no-attention": ("bafpn", {"attention": False}, {}),
    "bafpn-plain": ("bafpn", {"attention": False, "bottom_up": False}, {}),
    "cfa": ("cfa", {}, {}),
    "cfa-plain-crops": ("cfa", {}, {"turns_and_jitter": False}),
    "rd4ad": ("rd4ad", {}, {}),
    "rd4ad-plain-crops": ("rd4ad", {}, {"turns_and_jitter": False}),
    "rd4ad-lr5e-3": ("rd4ad", {}, {"lr": 5e-3}),  # the paper's learning rate (Adam 0.005)
    "uninet": ("uninet", {}, {}),
    "uninet-plain-crops": ("uninet", {}, {"turns_and_jitter": False}),
    "uninet-supervised": ("uninet", {"supervised": True}, {}),
}


def _train(variant: str, samples: list, num_classes: int, crops: int, seed: int = 0) -> torch.nn.Module:
    from models.student.anomaly_training import AnomalyTrainConfig, normal_samples, train_anomaly_model
    from models.student.registry import build_loss, build_student, is_anomaly_scorer
    from models.student.training import TrainConfig, train_segmenter

    name, overrides, train_overrides = MODELS[variant]
    model = build_student(name, num_classes, **overrides)
    loss_fn = build_loss(name, model)
    if not getattr(loss_fn, "distills", False):  # as in the round: teacher maps only for students that distil
        samples = [sample[:3] for sample in samples]
    if is_anomaly_scorer(model):
        used = samples if model.supervised else normal_samples(samples)
        epochs = max(1, math.ceil(crops / len(used)))
        train_anomaly_model(
            model,
            loss_fn,
            samples,
            AnomalyTrainConfig(epochs=epochs, batch_size=8, seed=seed, **train_overrides),
        )
    else:
        epochs = max(1, math.ceil(crops / len(samples)))
        config = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, seed=seed)
        train_segmenter(model, samples, config, loss_fn=loss_fn)
    return model.eval()


def fabric(variant: str, data: Path, crops: int, seed: int = 0) -> dict[str, float]:
    """Train on the embedded train split, evaluate on its test split."""
    import pandas as pd

    from loom.data.imageio import read_image, read_mask
    from loom.evaluation.metrics import evaluate_segmentation
    from models.student.training import predict_images

    classes = json.loads((data / "classes.json").read_text())
    manifest = pd.read_parquet(data / "manifest.parquet")

    def load(split: str) -> tuple[list, list]:
        rows = manifest[manifest["split"] == split]
        images = [read_image(data / path) for path in rows["path"]]
        masks = [read_mask(data / "masks" / f"{Path(path).stem}.png", len(classes)) for path in rows["path"]]
        return images, masks

    train_images, train_masks = load("train")
    test_images, test_masks = load("test")
    started = time.perf_counter()
    samples = [(i, m, 1.0) for i, m in zip(train_images, train_masks, strict=True)]
    model = _train(variant, samples, len(classes), crops, seed)
    train_seconds = time.perf_counter() - started
    outputs = predict_images(model, test_images)
    metrics = evaluate_segmentation(
        [o[0] for o in outputs],
        [o[1] for o in outputs],
        test_masks,
        np.array([o[2] for o in outputs]),
        classes,
    )
    metrics["train_seconds"] = train_seconds
    metrics["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return metrics


def _pseudo_labeled(images: list[np.ndarray], defect_index: int) -> list[tuple]:
    """The flywheel's path for data without masks: the backbone teacher labels the pool zero-shot.

    Each sample carries the teacher's mask as the generic `defect` class and its map as a probability
    (for students that distil from it), as auto-accepted pseudo labels do in a round.
    """
    from models.teacher.backbone import BackboneTeacher
    from models.teacher.types import anomaly_probability

    teacher = BackboneTeacher()
    teacher.fit(images)
    return [
        (
            image,
            np.where(p.mask, defect_index, 0).astype(np.uint8),
            1.0,
            anomaly_probability(p.anomaly_map, teacher.pixel_threshold),
        )
        for image, p in zip(images, teacher.predict(images), strict=True)
    ]


def conformal(variant: str, nominal_train: int, per_kind: int, crops: int) -> dict[str, float]:
    """Image AUROC on conformal-clip-data: nominal vs local, nominal vs global.

    Anomaly scorers learn from `nominal_train` nominal images. Supervised students need masks, which
    this data does not have: they learn from the backbone teacher's zero-shot pseudo labels of those
    nominal images plus `per_kind // 10` unlabeled images of each defect kind (kept apart from the
    evaluated ones), the round's path for a new line.
    """
    import conformal_clip_data as ccd

    from loom.data.imageio import read_image
    from loom.evaluation.metrics import image_auroc
    from models.student.training import predict_images

    rng = np.random.default_rng(0)
    nominal = sorted(ccd.nominal_dir().glob("*.jpg"))
    order = rng.permutation(len(nominal))
    train = [read_image(nominal[i]) for i in order[:nominal_train]]
    held_out = [read_image(nominal[i]) for i in order[nominal_train : nominal_train + per_kind]]
    defects = {}
    for kind, folder in (("local", ccd.local_dir()), ("global", ccd.global_dir())):
        files = sorted(folder.glob("*.jpg"))
        defects[kind] = [files[i] for i in rng.permutation(len(files))]
    defect_index = 6  # the generic `defect` of the fabric classes (1-based, after the five named ones)
    name, overrides, _ = MODELS[variant]
    if name in ("fpn", "bafpn") or overrides.get("supervised", False):
        extra = per_kind // 10
        unlabeled = [read_image(f) for files in defects.values() for f in files[per_kind : per_kind + extra]]
        samples = _pseudo_labeled(train + unlabeled, defect_index)
    else:
        samples = [(image, np.zeros(image.shape[:2], np.uint8), 1.0) for image in train]
    model = _train(variant, samples, 6, crops)
    normal_scores = [score for _, _, score in predict_images(model, held_out)]
    results = {}
    for kind, files in defects.items():
        picked = [read_image(f) for f in files[:per_kind]]
        scores = normal_scores + [score for _, _, score in predict_images(model, picked)]
        labels = [0] * len(normal_scores) + [1] * len(picked)
        results[f"image_auroc_{kind}"] = image_auroc(np.array(scores), np.array(labels))
    return results


def run_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "fabric":
        result = fabric(args.model, args.data, args.crops, args.seed)
    else:
        result = conformal(args.model, args.nominal_train, args.per_kind, args.crops)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def export_revision(rev: str, into: Path) -> tuple[str, Path]:
    """The tree at git revision ``rev`` of this repository, unpacked under ``into``: (short rev, root)."""
    repo = Path(__file__).resolve().parents[1]
    short = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    root = into / short
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return short, root


def mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every numeric key present in all rows."""
    keys = set.intersection(*(set(r) for r in rows))
    return {k: float(np.mean([r[k] for r in rows])) for k in keys if isinstance(rows[0][k], int | float)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="embedded dataset folder (generated if missing)"
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--crops", type=int, default=2400, help="training crops per model (the round's default)"
    )
    parser.add_argument("--nominal-train", type=int, default=200)
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="training seed of the embedded-data rows")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="several training seeds: one row per seed plus a mean row"
    )
    parser.add_argument(
        "--before", metavar="REV", help="also run every row on the code at git revision REV (`<model>@REV`)"
    )
    parser.add_argument("--skip-conformal", action="store_true")
    parser.add_argument("--skip-fabric", action="store_true", help="only the conformal-clip-data rows")
    parser.add_argument("--child", choices=["fabric", "conformal"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    if not (args.data / "manifest.parquet").exists():
        from loom.datasets.fabric import generate

        generate(args.data, n_images=240, size=256, defect_fraction=0.3, test_fraction=0.25, seed=0)

    seeds = args.seeds or [args.seed]
    # (label, model, tree): the current code, then the same model at --before REV.
    versions: list[tuple[str, Path | None]] = [("", None)]
    workdir = tempfile.TemporaryDirectory(prefix="students-before-") if args.before else None
    if workdir is not None:
        short, root = export_revision(args.before, Path(workdir.name))
        versions.append((f"@{short}", root))
    rows = [(f"{model}{suffix}", model, tree) for model in args.models for suffix, tree in versions]

    def child(kind: str, model: str, tree: Path | None = None, seed: int = args.seed) -> dict[str, float]:
        """One row in a fresh process; ``tree``: an exported old tree whose own script runs the row."""
        script = Path(__file__) if tree is None else tree / "benchmarks" / "students.py"
        command = [sys.executable, str(script), "--child", kind, "--model", model, "--data", str(args.data)]
        command += ["--crops", str(args.crops), "--threads", str(args.threads), "--seed", str(seed)]
        command += ["--nominal-train", str(args.nominal_train), "--per-kind", str(args.per_kind)]
        env, cwd = None, None
        if tree is not None:  # the old tree's packages first; the venv's editable install comes after
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
            cwd = tree
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
        if done.returncode != 0:
            raise SystemExit(f"{model} ({kind}, {tree or 'current tree'}) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    from student_speed import cpu_name  # a sibling script: the benchmarks folder is on sys.path

    classes = json.loads((args.data / "classes.json").read_text())
    names = [c for c in classes if c != "defect"]
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads\n"
    )
    if args.before:
        print(f"Rows `<model>@{versions[-1][0][1:]}` run the code of git revision `{args.before}`.\n")
    print(
        f"Embedded fabric test split (60 images), trained on the 180 train images' true masks, {args.crops} "
        f"crops each, seed {' '.join(map(str, seeds))} (defect IoU: any-defect pixels, the class ignored; "
        "anomaly scorers only mark `defect`):\n"
    )
    header = ["model", "seed", "pixel AUROC", "AUPRO@0.3", "defect IoU", "mIoU", *(f"IoU {c}" for c in names)]
    print("| " + " | ".join([*header, "image AUROC", "params (M)", "train s", "peak RSS MB"]) + " |")
    print("|---" * (10 + len(names)) + "|", flush=True)

    def fabric_line(label: str, seed: str, r: dict[str, float]) -> str:
        ious = " | ".join(f"{r[f'iou_{c}']:.3f}" if f"iou_{c}" in r else "-" for c in names)
        return (
            f"| {label} | {seed} | {r['pixel_auroc']:.3f} | {r['aupro_0.3']:.3f} | {r['binary_iou']:.3f} | "
            f"{r['miou']:.3f} | {ious} | {r['image_auroc']:.3f} | {r['params_m']:.2f} | "
            f"{r['train_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )

    for label, model, tree in [] if args.skip_fabric else rows:  # one row per run as soon as it is done
        results = []
        for seed in seeds:
            results.append(child("fabric", model, tree, seed))
            print(fabric_line(label, str(seed), results[-1]), flush=True)
        if len(seeds) > 1:
            print(fabric_line(f"**{label}, mean**", "", mean_row(results)), flush=True)
    if args.skip_conformal:
        return
    print(
        f"\nconformal-clip-data, image AUROC, scored on {args.per_kind} held-out nominal vs {args.per_kind} "
        f"of each defect kind. Anomaly scorers trained on {args.nominal_train} nominal images; supervised "
        f"students on the backbone teacher's zero-shot pseudo labels of those plus {args.per_kind // 10} "
        "unlabeled images of each defect kind:\n"
    )
    print("| model | local vs nominal | global vs nominal | peak RSS MB |\n|---|---|---|---|")
    for label, model, tree in rows:  # conformal rows train with the round's default seed (no --seed)
        r = child("conformal", model, tree)
        print(
            f"| {label} | {r['image_auroc_local']:.3f} | {r['image_auroc_global']:.3f} | "
            f"{r['peak_rss_mb']:.0f} |",
            flush=True,
        )
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
