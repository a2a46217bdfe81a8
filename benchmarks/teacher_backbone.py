"""Quality, speed and memory of the backbone teacher, zero-shot and few-shot, on the same images.

Embedded fabric data (the params.yaml dataset: 240 images, 256 px, defect share 0.3, seed 0): the teacher
labels the whole pool (train + test images, no labels used); the test split's 60 images are scored against
their true masks. Few-shot rows take k defect-free train images as references. conformal-clip-data
(250 x 250 simulated textile surfaces, image labels only): a pool of nominal images plus one defect kind,
image AUROC of the teacher's scores, local and global defects reported separately; few-shot references
come from nominal images left out of the pool.

    python benchmarks/teacher_backbone.py --data /tmp/fabric              # needs `make bench-setup`
    python benchmarks/teacher_backbone.py --data /tmp/fabric --nominal 200 --defects 20   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _run(pool: list, normals: list) -> tuple[list, float]:
    from models.teacher.backbone import BackboneTeacher, TeacherConfig

    teacher = BackboneTeacher(TeacherConfig())
    started = time.perf_counter()
    teacher.fit(pool, normals)
    predictions = teacher.predict(pool)
    return predictions, len(pool) / (time.perf_counter() - started)


def fabric(data: Path, shots: int) -> dict[str, float]:
    import pandas as pd

    from loom.imageio import read_image, read_mask
    from loom.metrics import aupro, binary_iou, image_auroc, pixel_auroc

    manifest = pd.read_parquet(data / "manifest.parquet")
    images = [read_image(data / path) for path in manifest["path"]]
    masks = [read_mask(data / "masks" / f"{Path(path).stem}.png", 6) for path in manifest["path"]]
    test = np.flatnonzero(manifest["split"].to_numpy() == "test")
    normal_train = [i for i in np.flatnonzero(manifest["split"].to_numpy() == "train") if not masks[i].any()]
    normals = [images[i] for i in normal_train[:shots]]
    predictions, speed = _run(images, normals)
    maps = [predictions[i].anomaly_map for i in test]
    truth = [masks[i] for i in test]
    labels = np.array([int(m.any()) for m in truth])
    return {
        "pixel_auroc": pixel_auroc(maps, truth),
        "aupro": aupro(maps, truth, fpr_limit=0.3),
        "mask_iou": binary_iou([predictions[i].mask.astype(np.uint8) for i in test], truth),
        "image_auroc": image_auroc(np.array([predictions[i].score for i in test]), labels),
        "images_per_s": speed,
    }


def conformal(kind: str, nominal: int, defects: int, shots: int) -> dict[str, float]:
    import conformal_clip_data as ccd

    from loom.imageio import read_image
    from loom.metrics import image_auroc

    rng = np.random.default_rng(0)
    nominal_files = sorted(ccd.nominal_dir().glob("*.jpg"))
    order = rng.permutation(len(nominal_files))
    references = [read_image(nominal_files[i]) for i in order[:shots]]
    normal_pool = [read_image(nominal_files[i]) for i in order[shots : shots + nominal]]
    folder = ccd.local_dir() if kind == "local" else ccd.global_dir()
    defect_files = sorted(folder.glob("*.jpg"))
    defect_pool = [read_image(defect_files[i]) for i in rng.permutation(len(defect_files))[:defects]]
    predictions, speed = _run(normal_pool + defect_pool, references)
    labels = np.array([0] * len(normal_pool) + [1] * len(defect_pool))
    return {
        "image_auroc": image_auroc(np.array([p.score for p in predictions]), labels),
        "images_per_s": speed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="embedded dataset folder (generated if missing)"
    )
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--nominal", type=int, default=1000, help="nominal images in a conformal pool")
    parser.add_argument("--defects", type=int, default=50, help="defect images in a conformal pool")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:  # one row in its own process, so its peak RSS is its own
        what, shots = args.child.split(":")
        if what == "fabric":
            row = fabric(args.data, int(shots))
        else:
            row = conformal(what, args.nominal, args.defects, int(shots))
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(row))
        return
    if not (args.data / "manifest.parquet").exists():
        from loom.datasets.fabric import generate

        generate(args.data, n_images=240, size=256, defect_fraction=0.3, test_fraction=0.25, seed=0)

    def child(spec: str) -> dict[str, float]:
        command = [sys.executable, __file__, "--data", str(args.data), "--child", spec]
        command += [
            "--nominal",
            str(args.nominal),
            "--defects",
            str(args.defects),
            "--threads",
            str(args.threads),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{spec} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    from student_speed import cpu_name  # a sibling script: the benchmarks folder is on sys.path

    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads\n"
    )
    print("Embedded fabric, pool of 240 images at 256 px, scored on the 60 test images:\n")
    print("| mode | pixel AUROC | AUPRO@0.3 | mask IoU | image AUROC | images/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for shots in args.shots:
        r = child(f"fabric:{shots}")
        mode = "zero-shot (mutual scoring)" if shots == 0 else f"few-shot, {shots} normal(s)"
        print(
            f"| {mode} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['mask_iou']:.3f} | "
            f"{r['image_auroc']:.3f} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} |",
            flush=True,
        )
    print(
        f"\nconformal-clip-data, pools of {args.nominal} nominal + {args.defects} defect images, "
        "image AUROC:\n"
    )
    print("| defects | mode | image AUROC | images/s | peak RSS MB |\n|---|---|---|---|---|", flush=True)
    for kind in ("local", "global"):
        for shots in args.shots:
            r = child(f"{kind}:{shots}")
            mode = "zero-shot" if shots == 0 else f"few-shot, {shots}"
            print(
                f"| {kind} | {mode} | {r['image_auroc']:.3f} | {r['images_per_s']:.1f} | "
                f"{r['peak_rss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
