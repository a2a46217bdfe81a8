"""Downstream gain of Defect-Gen against copy-paste and no augmentation, with sample quality and cost.

Embedded fabric data (the params.yaml dataset: 240 images, 256 px, defect share 0.3, frozen test split 0.25,
cached under ``--work``). Per seed of ``--seeds``: ``--shots`` human-labeled train images per class are drawn
(images whose mask holds that class, an image counting for every class it holds; all of them when a class has
fewer), plus every train image with an empty mask as normal fabric (the students learn background from them
and the synthetic defects are placed on them). Three arms train the round's student (``--student``, the
round's optimiser settings, ``--crops`` crops, the seed as training seed) and are scored on the test split
(never trained on) with tasks.train.evaluate_on:

- ``none``: the labeled images and the normals;
- ``copy_paste``: plus ``--synthetic`` pairs of ``loom.stages.augment.synthesise("copy_paste")``;
- ``defect_gen``: plus ``--synthetic`` pairs of ``synthesise("defect_gen")`` (preset ``--preset``), most
  for the rarest class as the round splits them. Defect-Gen trains from scratch on each seed's labeled set
  (``train_defect_gen(warm_start=False)``, cached under ``--work/defect-gen`` by the content hash of that
  set): the round's warm start from the newest cached model would let seed 1 start from a model that learned
  seed 0's labeled images.

Synthetic pairs weigh SOURCE_WEIGHTS["synthetic"], human ones SOURCE_WEIGHTS["human"] (tasks/train.py).

In the ``defect_gen`` arm, classes whose median labeled defect does not fit the generator's inpainting square
are copy-pasted, as in the round (``loom.stages.augment.generator_fits``; ``--generate-all``: not); the sample
quality below judges the generated pairs only.

Sample quality (first seed only): (a) mask-image consistency, the IoU of the defect pixels that an oracle
student (same config, trained on all 180 train images with their true masks, cached in ``--work``) predicts
on each generated image with the generated mask, pooled over pairs (reference: the same oracle on the test
images with defects); (b) KID x 1000 (cubic polynomial kernel, unbiased MMD^2, averaged over random subsets)
between EfficientNet-Lite0 features (its 1280-channel head, global-average-pooled) of 64 px crops centred on
generated defects and on the real defects of the test split (reference: real defects of the train split).

    python benchmarks/defect_gen.py --work /tmp/dgbench                      # 3 seeds, markdown tables
    python benchmarks/defect_gen.py --work /tmp/dgbench --json dg.json --seeds 0 1 2 3 4
    python benchmarks/defect_gen.py --work /tmp/dgbench --arms none defect_gen --skip-quality
    python benchmarks/defect_gen.py --work /tmp/dgbench --seeds 0 --arms defect_gen \\
        --override prediction_type=epsilon                                     # an ablation of one field
    python benchmarks/defect_gen.py --work /tmp/dgbench-smoke --seeds 0 --shots 2 --synthetic 4 --crops 16 \\
        --preset tiny --epochs 1 --threads 1                                   # smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: The params.yaml dataset.
DATASET = {"n_images": 240, "size": 256, "defect_fraction": 0.3, "test_fraction": 0.25, "seed": 0}
ARMS = ("none", "copy_paste", "defect_gen")
TITLES = {"none": "no augmentation", "copy_paste": "copy-paste", "defect_gen": "Defect-Gen"}
#: Side of the crops around each defect whose features KID compares.
KID_CROP = 64
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def load_data(work: Path) -> tuple:
    """(train FolderData, test images, test masks) of the embedded dataset, generated once into work."""
    import pandas as pd

    from loom.config import DEFAULT_CLASSES
    from loom.data.imageio import read_image, read_mask
    from loom.stages.augment import load_folder

    data = work / "fabric"
    if not (data / "manifest.parquet").is_file():
        from loom.datasets.fabric import generate

        progress("generating the embedded fabric dataset (once)")
        generate(data, **DATASET)
    train = load_folder(data, None, DEFAULT_CLASSES)  # the train split only
    rows = pd.read_parquet(data / "manifest.parquet")
    rows = rows[rows["split"] == "test"]
    test_images = [read_image(data / p) for p in rows["path"]]
    test_masks = [read_mask(data / "masks" / f"{Path(p).stem}.png", len(train.classes)) for p in rows["path"]]
    return train, test_images, test_masks


def draw_shots(masks: list[np.ndarray], num_classes: int, shots: int, seed: int) -> list[int]:
    """Indices of up to ``shots`` images per class (an image counts for every class its mask holds).

    Classes with the fewest candidate images are filled first, so images drawn for them also count toward
    the common classes they hold; the order of candidates is a seeded permutation.
    """
    order = np.random.default_rng(seed).permutation(len(masks))
    present = [set(np.unique(m).tolist()) for m in masks]
    have = dict.fromkeys(range(1, num_classes + 1), 0)
    available = {c: sum(c in p for p in present) for c in have}
    chosen: list[int] = []
    for class_id in sorted(have, key=lambda c: (available[c], c)):
        for index in order:
            if have[class_id] >= shots:
                break
            if class_id in present[index] and index not in chosen:
                chosen.append(int(index))
                for other in present[index]:
                    if other in have:
                        have[other] += 1
    return sorted(chosen)


def rarest(counts: dict[str, int]) -> str | None:
    """The class with the fewest labeled instances among those labeled at all (first on ties)."""
    labeled = {name: n for name, n in counts.items() if n > 0}
    return min(labeled, key=lambda name: labeled[name]) if labeled else None


# ---------------------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------------------
def generator_config(args: argparse.Namespace):
    """The Defect-Gen config of the run: ``--preset`` with ``--override`` fields."""
    from models.defect_gen.config import preset

    return preset(args.preset, **args.override)


def make_pairs(arm: str, args: argparse.Namespace, seed: int, labeled: tuple, classes, normals) -> tuple:
    """(Synthesis, info) of one augmented arm for one seed."""
    from loom.stages.augment import TRAINING_REPORT, synthesise, train_defect_gen

    images, masks = labeled
    info: dict = {}
    model_dir = None
    if arm == "defect_gen":
        started = time.perf_counter()
        model_dir = train_defect_gen(
            images,
            masks,
            classes,
            args.work / "defect-gen",
            generator_config(args),
            seed=seed,
            warm_start=False,
        )
        wall = time.perf_counter() - started
        report = json.loads((model_dir / TRAINING_REPORT).read_text())
        # training.json's total `seconds` is overwritten by train_pipeline's per-model dict (`**report`
        # comes after it): the two models' training loops, summed, are the training time.
        recorded = report["seconds"]
        train_s = float(sum(recorded.values()) if isinstance(recorded, dict) else recorded)
        cached = wall < 0.5 * train_s
        info |= {
            "model_dir": str(model_dir),
            "train_seconds": train_s,
            "train_wall_seconds": None if cached else wall,
            "train_seconds_per_model": recorded if isinstance(recorded, dict) else None,
            "train_cached": cached,
            "train_instances": report.get("instances"),
            "eval_loss": report.get("eval_loss"),
        }
        progress(
            f"seed {seed} defect_gen: generator {'cached' if info['train_cached'] else 'trained'} "
            f"({info['train_seconds']:.0f} s to train) -> {model_dir}"
        )
    made = synthesise(
        arm,
        images,
        masks,
        classes,
        normals,
        args.synthetic,
        seed=seed,
        model_dir=model_dir,
        copy_paste_misfits=not args.generate_all,
    )
    rejected: dict[str, int] = {}
    for counts in made.counts.values():
        for reason, n in counts.items():
            if reason != "accepted":
                rejected[reason] = rejected.get(reason, 0) + n
    generate_s = made.seconds.get("generate", 0.0)
    info |= {
        "plan": made.plan,
        "pairs": len(made.pairs),
        "per_class": {name: made.pair_classes.count(name) for name in made.plan if made.plan[name] > 0},
        "methods": made.methods,
        "rejected": {reason: n for reason, n in rejected.items() if n},
        "generate_seconds": generate_s,
        "pairs_per_s": len(made.pairs) / generate_s if generate_s > 0 else float("nan"),
    }
    return made, info


def train_and_evaluate(
    args: argparse.Namespace, arm: str, seed: int, samples: list, test_images, test_masks
) -> dict:
    from loom.config import load_settings
    from tasks.train import evaluate_on, fit_student

    settings = load_settings(
        args.work / "ws", train_samples=args.crops, seed=seed, epochs=args.epochs, image_size=args.image_size
    )
    model_dir = args.work / "students" / f"{args.student}-{arm}-seed{seed}"
    # fit_student builds the model before the round's seed is applied: without this, the head's
    # initialisation differs between runs and between arms.
    torch.manual_seed(seed)
    trained = fit_student(settings, args.student, samples, model_dir, {"benchmark": f"defect_gen {arm}"})
    evaluation = evaluate_on(settings, model_dir, test_images, test_masks, n_overlays=0)
    return {
        "metrics": evaluation.metrics,
        "student_seconds": trained.seconds,
        "samples": len(samples),
        "epochs": len(trained.history),
    }


# ---------------------------------------------------------------------------------------------------------
# Sample quality
# ---------------------------------------------------------------------------------------------------------
def oracle_student(args: argparse.Namespace, train) -> tuple[Path, object]:
    """A student of the same config trained on every train image's true mask (cached in work)."""
    from loom.config import load_settings
    from tasks.train import SOURCE_WEIGHTS, fit_student

    settings = load_settings(
        args.work / "ws", train_samples=args.crops, seed=0, epochs=args.epochs, image_size=args.image_size
    )
    rp = settings.round
    folder = args.work / "oracle" / f"{args.student}-c{rp.train_samples}-e{rp.epochs}-i{rp.image_size}"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        progress(f"oracle student cached: {folder}")
        return folder, settings
    progress(f"oracle student: training on all {len(train.images)} train images")
    started = time.perf_counter()
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    samples = [(i, m, SOURCE_WEIGHTS["human"]) for i, m in zip(train.images, train.masks, strict=True)]
    torch.manual_seed(0)
    fit_student(settings, args.student, samples, temp, {"benchmark": "defect_gen oracle"})
    shutil.rmtree(folder, ignore_errors=True)
    temp.rename(folder)
    progress(f"oracle student trained in {time.perf_counter() - started:.0f} s")
    return folder, settings


def consistency(
    outputs: list, masks: list[np.ndarray], groups: list[str] | None = None
) -> dict[str, float | dict[str, float]]:
    """Pooled IoU of predicted defect pixels with mask defect pixels (and class-aware), per group too."""

    def pooled(indices: list[int]) -> tuple[float, float]:
        inter = union = same = 0
        for i in indices:
            pred, mask = outputs[i][1], masks[i]
            inter += int(((pred > 0) & (mask > 0)).sum())
            same += int(((pred == mask) & (mask > 0)).sum())
            union += int(((pred > 0) | (mask > 0)).sum())
        return (inter / union, same / union) if union else (float("nan"), float("nan"))

    everything = list(range(len(masks)))
    iou, class_iou = pooled(everything)
    result: dict = {"defect_iou": iou, "class_iou": class_iou, "images": len(masks)}
    if groups is not None:
        result["per_class"] = {
            name: pooled([i for i, g in enumerate(groups) if g == name]) for name in dict.fromkeys(groups)
        }
    return result


def defect_crops(images: list[np.ndarray], masks: list[np.ndarray], size: int = KID_CROP) -> np.ndarray:
    """One ``size`` crop per defect region (close fragments merged, classes ignored), centred on its box."""
    from scipy import ndimage

    from models.defect_gen.data import instance_labels

    crops = []
    for image, mask in zip(images, masks, strict=True):
        labels, count = instance_labels((mask > 0).astype(np.uint8), 1)
        height, width = mask.shape
        for box in ndimage.find_objects(labels, count):
            if box is None:
                continue
            cy, cx = (box[0].start + box[0].stop) // 2, (box[1].start + box[1].stop) // 2
            top = int(np.clip(cy - size // 2, 0, max(0, height - size)))
            left = int(np.clip(cx - size // 2, 0, max(0, width - size)))
            crops.append(image[top : top + size, left : left + size])
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


@torch.no_grad()
def lite0_features(crops: np.ndarray, batch: int = 32) -> np.ndarray:
    """(N, 1280) EfficientNet-Lite0 features (ImageNet weights): the last level (the 1280-channel head
    after stride 32, ReLU6), global-average-pooled: the classifier's input, as Inception's pool3 is KID's."""
    from models.backbone import load_pretrained_lite0, normalize

    model = load_pretrained_lite0()
    out = [
        model.head(model.forward_features(normalize(crops[i : i + batch]))[-1]).mean(dim=(2, 3)).double()
        for i in range(0, len(crops), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 1280))


def kid(x: np.ndarray, y: np.ndarray, subsets: int = KID_SUBSETS, size: int = KID_SUBSET_SIZE, seed: int = 0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, mean and std over
    ``subsets`` random subsets of min(size, len(x), len(y)) rows of each set (drawn without replacement)."""
    m = min(size, len(x), len(y))
    if m < 2:
        return float("nan"), float("nan")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def sample_quality(args: argparse.Namespace, train, test_images, test_masks, made: dict) -> dict:
    from loom.data.imageio import write_png
    from loom.stages.augment import sample_grid
    from models.student.registry import load_student
    from models.student.training import predict_images

    classes = train.classes
    oracle_dir, _ = oracle_student(args, train)
    oracle = load_student(oracle_dir)
    defective = [i for i, m in enumerate(test_masks) if m.any()]
    real_outputs = predict_images(oracle, [test_images[i] for i in defective])
    result: dict = {
        "oracle": str(oracle_dir),
        "reference": consistency(real_outputs, [test_masks[i] for i in defective]),
        "arms": {},
    }
    started = time.perf_counter()
    test_features = lite0_features(defect_crops(test_images, test_masks))
    train_features = lite0_features(defect_crops(train.images, train.masks))
    result["kid_reference"] = dict(
        zip(("kid", "kid_std"), kid(train_features, test_features), strict=True),
        crops=len(train_features),
        test_crops=len(test_features),
    )
    for arm, synthesis in made.items():
        # Only the arm's own pairs: the Defect-Gen arm copy-pastes the classes its generator cannot hold.
        own = [k for k, method in enumerate(synthesis.pair_methods) if method == arm]
        pairs = [synthesis.pairs[k] for k in own]
        if not pairs:
            result["arms"][arm] = {"pairs": 0}
            continue
        outputs = predict_images(oracle, [image for image, _ in pairs])
        row = consistency(outputs, [mask for _, mask in pairs], [synthesis.pair_classes[k] for k in own])
        features = lite0_features(defect_crops([i for i, _ in pairs], [m for _, m in pairs]))
        row["kid"], row["kid_std"] = kid(features, test_features)
        row["crops"] = len(features)
        row["pairs"] = len(pairs)
        result["arms"][arm] = row
        grid = args.work / "samples" / f"{arm}-seed{args.seeds[0]}.png"
        write_png(grid, sample_grid(pairs, columns=4, max_pairs=16, zoom=KID_CROP))
        row["grid"] = str(grid)
    result["test_crops"] = len(test_features)
    result["seconds"] = time.perf_counter() - started
    result["classes"] = list(classes)
    return result


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f} to {max(values):.{digits}f})"


def summarise(result: dict, arms: list[str], classes: list[str], shown: list[str]) -> dict:
    seeds = result["seeds"]
    counts = {name: sum(s["instances"].get(name, 0) for s in seeds.values()) for name in classes}
    worst = rarest(counts)
    summary: dict = {"rarest": worst}
    for arm in arms:
        runs = {seed: s["arms"][arm] for seed, s in seeds.items() if arm in s["arms"]}
        if not runs:
            continue
        row = {
            "miou": [r["metrics"].get("miou") for r in runs.values()],
            "pixel_auroc": [r["metrics"].get("pixel_auroc") for r in runs.values()],
            "student_seconds": [r["student_seconds"] for r in runs.values()],
            "pairs": [r.get("synthetic", {}).get("pairs", 0) for r in runs.values()],
            "iou": {name: [r["metrics"].get(f"iou_{name}") for r in runs.values()] for name in shown},
        }
        if "none" in arms:
            base = {seed: seeds[seed]["arms"].get("none") for seed in runs}
            row["gain_points"] = [
                100 * (r["metrics"]["miou"] - base[seed]["metrics"]["miou"])
                for seed, r in runs.items()
                if base[seed] is not None
            ]
            if worst is not None:
                key = f"iou_{worst}"
                row["rarest_gain_points"] = [
                    100 * (r["metrics"][key] - base[seed]["metrics"][key])
                    for seed, r in runs.items()
                    if base[seed] is not None and key in r["metrics"] and key in base[seed]["metrics"]
                ]
        summary[arm] = row
    return summary


def format_downstream(summary: dict, arms: list[str], shown: list[str]) -> str:
    worst = summary["rarest"]
    header = (
        ["arm", "synthetic pairs", "mIoU (min to max)", "gain vs none (mIoU pts)"]
        + [f"IoU {name}" for name in shown]
        + [f"gain on rarest ({worst}) IoU pts", "pixel AUROC", "student train s"]
    )
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for arm in arms:
        if arm not in summary:
            continue
        row = summary[arm]
        cells = [
            TITLES[arm],
            _spread(row["pairs"], digits=0),
            _spread(row["miou"]),
            _spread(row.get("gain_points", []), digits=1) if arm != "none" else "-",
            *[_spread(row["iou"][name]) for name in shown],
            _spread(row.get("rarest_gain_points", []), digits=1) if arm != "none" else "-",
            _spread(row["pixel_auroc"]),
            _spread(row["student_seconds"], digits=0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_quality(quality: dict) -> str:
    names = list(dict.fromkeys(n for row in quality["arms"].values() for n in row.get("per_class", {})))
    header = (
        ["samples", "pairs", "defect IoU (oracle)", "class-aware IoU"]
        + [f"defect IoU {n}" for n in names]
        + ["defect crops", "KID x 1000 (std)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    ref, kid_ref = quality["reference"], quality["kid_reference"]
    lines.append(
        "| real defects (IoU: test images; KID: train split) | "
        f"{ref['images']} | {ref['defect_iou']:.3f} | {ref['class_iou']:.3f} | "
        + " | ".join("-" for _ in names)
        + (" | " if names else "")
        + f"{kid_ref['crops']} | {1000 * kid_ref['kid']:.2f} ({1000 * kid_ref['kid_std']:.2f}) |"
    )
    for arm, row in quality["arms"].items():
        if not row.get("pairs"):
            lines.append(f"| {TITLES[arm]} | 0 |" + " - |" * (len(header) - 2))
            continue
        per_class = [f"{row['per_class'][n][0]:.3f}" if n in row["per_class"] else "-" for n in names]
        lines.append(
            f"| {TITLES[arm]} | {row['pairs']} | {row['defect_iou']:.3f} | {row['class_iou']:.3f} | "
            + " | ".join(per_class)
            + (" | " if names else "")
            + f"{row['crops']} | {1000 * row['kid']:.2f} ({1000 * row['kid_std']:.2f}) |"
        )
    return "\n".join(lines)


def format_cost(result: dict, arms: list[str]) -> str:
    lines = [
        "| arm | seed | pairs made / asked | rejected | generator train s | generation s | pairs/s "
        "| student train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, s in result["seeds"].items():
        for arm in arms:
            run = s["arms"].get(arm)
            if run is None:
                continue
            syn = run.get("synthetic")
            if syn is None:
                lines.append(f"| {TITLES[arm]} | {seed} | - | - | - | - | - | {run['student_seconds']:.0f} |")
                continue
            rejected = ", ".join(f"{k} {v}" for k, v in syn["rejected"].items()) or "none"
            train_s = (
                f"{syn['train_seconds']:.0f}{' (cached)' if syn['train_cached'] else ''}"
                if "train_seconds" in syn
                else "-"
            )
            lines.append(
                f"| {TITLES[arm]} | {seed} | {syn['pairs']} / {result['settings']['synthetic']} | {rejected} "
                f"| {train_s} | {syn['generate_seconds']:.1f} | {syn['pairs_per_s']:.2f} "
                f"| {run['student_seconds']:.0f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from loom.config import load_settings
    from loom.stages.augment import instance_counts
    from tasks.train import SOURCE_WEIGHTS

    train, test_images, test_masks = load_data(args.work)
    classes = list(train.classes)
    settings_classes = list(load_settings(args.work / "ws").classes)
    if settings_classes != classes:
        raise SystemExit(f"params.yaml classes {settings_classes} differ from the dataset's {classes}")
    normals = [image for image, mask in zip(train.images, train.masks, strict=True) if not mask.any()]
    defect_rows = [i for i, mask in enumerate(train.masks) if mask.any()]
    result: dict = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json",)
        },
        "classes": classes,
        "train_images": len(train.images),
        "normals": len(normals),
        "test_images": len(test_images),
        "test_classes": [
            name for k, name in enumerate(classes, start=1) if any((m == k).any() for m in test_masks)
        ],
        "seeds": {},
    }
    made_first: dict = {}
    for seed in args.seeds:
        drawn = draw_shots([train.masks[i] for i in defect_rows], len(classes), args.shots, seed)
        picked = [defect_rows[i] for i in drawn]
        images = [train.images[i] for i in picked]
        masks = [train.masks[i] for i in picked]
        counts = instance_counts(masks, classes)
        seed_result = {
            "labeled": [train.stems[i] for i in picked],
            "images_per_class": {
                name: sum(bool((m == k).any()) for m in masks) for k, name in enumerate(classes, start=1)
            },
            "instances": counts,
            "rarest": rarest(counts),
            "arms": {},
        }
        result["seeds"][seed] = seed_result
        progress(
            f"seed {seed}: {len(picked)} labeled images {seed_result['images_per_class']}, "
            f"instances {counts}, rarest {seed_result['rarest']}"
        )
        human = [(i, m, SOURCE_WEIGHTS["human"]) for i, m in zip(images, masks, strict=True)]
        human += [(i, np.zeros(i.shape[:2], np.uint8), SOURCE_WEIGHTS["human"]) for i in normals]
        for arm in args.arms:
            progress(f"seed {seed} {arm}: start")
            started = time.perf_counter()
            samples, synthetic = list(human), None
            if arm != "none":
                made, synthetic = make_pairs(arm, args, seed, (images, masks), classes, normals)
                samples += [(i, m, SOURCE_WEIGHTS["synthetic"]) for i, m in made.pairs]
                if seed == args.seeds[0]:
                    made_first[arm] = made
                progress(
                    f"seed {seed} {arm}: {synthetic['pairs']} pairs {synthetic['per_class']} "
                    f"({synthetic['methods']}) in "
                    f"{synthetic['generate_seconds']:.1f} s, rejected {synthetic['rejected'] or 'none'}"
                )
            run = train_and_evaluate(args, arm, seed, samples, test_images, test_masks)
            if synthetic is not None:
                run["synthetic"] = synthetic
            run["seconds"] = time.perf_counter() - started
            run["peak_rss_mb"] = peak_rss_mb()
            seed_result["arms"][arm] = run
            progress(
                f"seed {seed} {arm}: done in {run['seconds']:.0f} s "
                f"(student {run['student_seconds']:.0f} s), "
                f"mIoU {run['metrics'].get('miou', float('nan')):.3f}"
            )
            if args.json:  # a long run leaves what it has so far
                args.json.write_text(json.dumps(result, indent=2, default=str))
    if not args.skip_quality and made_first:
        progress(f"sample quality (seed {args.seeds[0]}): start")
        result["quality"] = sample_quality(args, train, test_images, test_masks, made_first)
        progress(f"sample quality: done in {result['quality']['seconds']:.0f} s")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="data, generators, oracle (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=5, help="labeled train images per class")
    parser.add_argument("--synthetic", type=int, default=40, help="synthetic pairs per augmented arm")
    parser.add_argument("--crops", type=int, default=2400, help="student training crops (the round's)")
    parser.add_argument("--student", default="fpn")
    parser.add_argument("--preset", default="cpu", choices=["tiny", "cpu", "full", "auto"])
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="DefectGenConfig fields (ablations)"
    )
    parser.add_argument(
        "--generate-all",
        action="store_true",
        help="Defect-Gen makes every class, also those its square cannot hold (an ablation)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--epochs", type=int, help="least passes over the training set (default: the round's; smoke runs: 1)"
    )
    parser.add_argument("--image-size", type=int, help="student crop size (default: the round's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    args.arms = [arm for arm in ARMS if arm in args.arms]
    from clicker_noc import parse_overrides  # sibling scripts: the benchmarks folder is on sys.path

    args.override = parse_overrides(args.override)
    torch.set_num_threads(args.threads)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    from student_speed import cpu_name

    started = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    shown = result["test_classes"]
    summary = summarise(result, args.arms, result["classes"], shown)
    result["summary"] = summary
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, "
        f"Defect-Gen on {device}, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    per_seed = "; ".join(
        f"seed {seed}: {len(s['labeled'])} images, instances "
        + ", ".join(f"{k} {v}" for k, v in s["instances"].items() if v)
        for seed, s in result["seeds"].items()
    )
    print(
        f"Embedded fabric, {result['test_images']} test images. Per seed: {args.shots} labeled train images "
        f"per class + {result['normals']} normal train images; {args.synthetic} synthetic pairs per "
        f"augmented arm (Defect-Gen preset {args.preset}"
        f"{''.join(f', {k}={v}' for k, v in args.override.items())}"
        f"{', every class generated' if args.generate_all else ''}); "
        f"student {args.student}, {args.crops} crops"
        f"{f', at least {args.epochs} epochs' if args.epochs else ''}. Seeds {args.seeds} ({per_seed}). "
        f"Rarest labeled class over the seeds: {summary['rarest']}. Mean over seeds (min to max):\n"
    )
    print(format_downstream(summary, args.arms, shown))
    if "quality" in result:
        q = result["quality"]
        print(
            f"\nSample quality, seed {args.seeds[0]}: oracle {args.student} trained on all "
            f"{result['train_images']} train masks predicts the defect pixels of each generated image "
            f"(IoU pooled over pairs, pred > 0 vs mask > 0; class-aware: same class); KID between "
            f"Lite0 features of {KID_CROP} px crops around the defects and around the {q['test_crops']} real "
            "defects of the test split:\n"
        )
        print(format_quality(q))
    print(f"\nCost (peak RSS {result['peak_rss_mb']:.0f} MB, whole run {result['seconds']:.0f} s):\n")
    print(format_cost(result, args.arms))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
