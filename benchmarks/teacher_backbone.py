"""Quality, speed and memory of the backbone teacher, zero-shot and few-shot.

Embedded fabric data (the params.yaml dataset: 240 images, 256 px, defect share 0.3, test share 0.25,
seed 0): the teacher labels the whole pool (train + test images, no labels used) and the 60 test images are
scored against their true masks: pixel AUROC, AUPRO@0.3, IoU and F1 of the thresholded masks (defect vs
background over the split), image AUROC. Few-shot rows take the first k defect-free train images (by file
name) as references and leave them out of the pool.

conformal-clip-data (250 x 250 simulated textile surfaces, image labels only; `pip install -e ".[bench]"`):
a pool of nominal images plus local or global defects, at two ratios (all 1,000 nominal + all 500 defects,
and 1,000 nominal + 50 defects, a realistic rare-defect share); image AUROC of the teacher's image scores.
Few-shot references are nominal images drawn with a fixed seed and left out of the pool.

Memory: a zero-shot run over 1,000 generated 256 x 256 fabric images. Every row runs in its own process, so
its peak RSS (which includes the decoded images it holds) is its own; images/s is the pool size over the
wall time of fit + predict.

    python benchmarks/teacher_backbone.py              # full run
    python benchmarks/teacher_backbone.py --quick      # smaller pools, a few minutes
    python benchmarks/teacher_backbone.py --datasets fabric local --bank-sizes 1024 4096   # A/B per row
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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fit_predict(
    pool: list[np.ndarray], normals: list[np.ndarray], bank_size: int | None
) -> tuple[list, float]:
    from models.teacher.backbone import BackboneTeacher, TeacherConfig
    from models.teacher.backbone.memory_bank import MemoryBankConfig

    config = TeacherConfig()
    if bank_size is not None:
        config.memory_bank = MemoryBankConfig(size=bank_size)
    teacher = BackboneTeacher(config)
    started = time.perf_counter()
    teacher.fit(pool, normals)
    predictions = teacher.predict(pool)
    return predictions, len(pool) / (time.perf_counter() - started)


def _fabric_dataset(root: Path, n_images: int) -> Path:
    from loom.datasets.fabric import generate

    folder = root / f"fabric-{n_images}"
    if not (folder / "manifest.parquet").exists():
        generate(folder, n_images=n_images, size=256, defect_fraction=0.3, test_fraction=0.25, seed=0)
    return folder


def fabric_row(data: Path, shots: int, bank_size: int | None = None) -> dict[str, float]:
    """Fit on the pool (minus the references), score the test split against its masks."""
    import pandas as pd

    from loom.data.imageio import read_image, read_mask
    from loom.evaluation.metrics import aupro, binary_iou, image_auroc, pixel_auroc

    manifest = pd.read_parquet(data / "manifest.parquet").sort_values("path").reset_index(drop=True)
    classes = json.loads((data / "classes.json").read_text())
    images = [read_image(data / path) for path in manifest["path"]]
    masks = [read_mask(data / "masks" / f"{Path(path).stem}.png", len(classes)) for path in manifest["path"]]
    split = manifest["split"].to_numpy()
    references = [i for i in np.flatnonzero(split == "train") if not masks[i].any()][:shots]
    pool = [i for i in range(len(images)) if i not in set(references)]
    predictions, speed = _fit_predict([images[i] for i in pool], [images[i] for i in references], bank_size)
    by_index = dict(zip(pool, predictions, strict=True))
    test = [i for i in np.flatnonzero(split == "test") if i in by_index]
    maps = [by_index[i].anomaly_map for i in test]
    truth = [masks[i] for i in test]
    iou = binary_iou([by_index[i].mask.astype(np.uint8) for i in test], truth)
    return {
        "pool": len(pool),
        "pixel_auroc": pixel_auroc(maps, truth),
        "aupro": aupro(maps, truth, fpr_limit=0.3),
        "mask_iou": iou,
        "mask_f1": 2 * iou / (1 + iou),
        "image_auroc": image_auroc([by_index[i].score for i in test], [int(m.any()) for m in truth]),
        "images_per_s": speed,
    }


def conformal_row(
    kind: str, nominal: int, defects: int, shots: int, bank_size: int | None = None
) -> dict[str, float]:
    """Pool of `nominal` - `shots` nominal + `defects` images of one kind; image AUROC."""
    import conformal_clip_data as ccd

    from loom.data.imageio import read_image
    from loom.evaluation.metrics import image_auroc

    rng = np.random.default_rng(0)
    nominal_files = sorted(Path(ccd.nominal_dir()).glob("*.jpg"))[:nominal]
    order = rng.permutation(len(nominal_files))
    references = [read_image(nominal_files[i]) for i in order[:shots]]
    normal_pool = [read_image(nominal_files[i]) for i in order[shots:]]
    folder = ccd.local_dir() if kind == "local" else ccd.global_dir()
    defect_files = sorted(Path(folder).glob("*.jpg"))
    defect_pool = [read_image(defect_files[i]) for i in np.sort(rng.permutation(len(defect_files))[:defects])]
    predictions, speed = _fit_predict(normal_pool + defect_pool, references, bank_size)
    labels = [0] * len(normal_pool) + [1] * len(defect_pool)
    return {
        "pool": len(labels),
        "image_auroc": image_auroc([p.score for p in predictions], labels),
        "images_per_s": speed,
    }


def _child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    if spec["dataset"] == "fabric":
        row = fabric_row(Path(spec["data"]), spec["shots"], spec.get("bank_size"))
    else:
        row = conformal_row(
            spec["dataset"], spec["nominal"], spec["defects"], spec["shots"], spec.get("bank_size")
        )
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


def _run_child(spec: dict) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"row {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def _mode(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"few-shot, {shots} normal{'s' if shots > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller pools (200 nominal, 300 fabric images)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "loom-teacher-bench")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=["fabric", "memory", "local", "global"],
        default=["fabric", "memory", "local", "global"],
        help="rows to run: fabric 240, the fabric memory pool, conformal local, conformal global",
    )
    parser.add_argument(
        "--bank-sizes",
        type=int,
        nargs="+",
        default=[None],
        help="reference bank sizes to compare, one row each (default: the teacher's own)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one row in its own process, so its peak RSS is its own
        _child(json.loads(args.child))
        return

    nominal, defect_counts, memory_images = (200, (100, 10), 300) if args.quick else (1000, (500, 50), 1000)
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__} with {args.threads} "
        f"threads, load average before the run {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| dataset | mode | pool | pixel AUROC | AUPRO@0.3 | mask IoU | mask F1 | image AUROC | images/s "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def report(dataset: str, shots: int, bank_size: int | None, row: dict[str, float]) -> None:
        cells = [_cell(row, key) for key in ("pixel_auroc", "aupro", "mask_iou", "mask_f1", "image_auroc")]
        mode = _mode(shots) + ("" if bank_size is None else f", bank {bank_size}")
        print(
            f"| {dataset} | {mode} | {row['pool']} | {' | '.join(cells)} | {row['images_per_s']:.1f} "
            f"| {row['peak_rss_mb']:.0f} |",
            flush=True,
        )

    # (dataset label, child spec without shots, modes to run); datasets are generated only when asked for.
    rows: list[tuple[str, dict, list[int]]] = []
    if "fabric" in args.datasets:
        spec = {"dataset": "fabric", "data": str(_fabric_dataset(args.data, 240))}
        rows.append(("fabric 240 (test split)", spec, args.shots))
    if "memory" in args.datasets:  # the memory row is a zero-shot run only
        spec = {"dataset": "fabric", "data": str(_fabric_dataset(args.data, memory_images))}
        rows.append((f"fabric {memory_images} (test split)", spec, [0]))
    for kind in ("local", "global"):
        for defects in defect_counts if kind in args.datasets else ():
            label = f"conformal {kind}, {nominal} nominal + {defects}"
            rows.append((label, {"dataset": kind, "nominal": nominal, "defects": defects}, args.shots))
    for label, spec, modes in rows:
        for shots in modes:
            for bank_size in args.bank_sizes:
                row = _run_child({**spec, "threads": args.threads, "shots": shots, "bank_size": bank_size})
                report(label, shots, bank_size, row)


if __name__ == "__main__":
    main()
