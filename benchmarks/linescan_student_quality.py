"""A student trained on the backbone teacher's pseudo-labels of line-scan frames, against that teacher.

The round's path on a pool of frames with nobody's labels yet: the zero-shot teacher labels the train split
of the procedural line-scan set (`loom datasets linescan`), a student learns its masks (the generic
`defect` class where the teacher's mask is, background elsewhere; a distilling student also gets the
teacher's map as a probability, as the round gives it), and both then label the held-out test split. The
teacher scores a test frame against the pool it was fitted on (`predict`). Same frames, same metrics as
benchmarks/linescan_teacher.py: image AUROC, and per defect kind image AUROC and AUPRO@0.3 (that kind's
frames against the clean ones), and the shares of clean and defective frames flagged (the teacher at its
own threshold, the student where its mask is not empty). Training is over `--seeds` (mean and spread).

    loom datasets linescan --out /tmp/ls/q4096 --frames 250 --width 4096 --height 256 \\
        --defect-fraction 0.3333 --seed 7
    python benchmarks/linescan_student_quality.py --student fpn --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linescan_teacher import _frames, _read, per_kind
from teacher_backbone import cpu_model

from loom.evaluation.metrics import image_auroc
from models.student.registry import LOSSES, build_loss, build_student
from models.student.training import SegmentationSamples, TrainConfig, iter_predictions, train_segmenter
from models.teacher.backbone import BackboneTeacher, TeacherConfig
from models.teacher.types import anomaly_probability


def _splits(folder: Path, stems: list[str]) -> tuple[list[str], list[str]]:
    manifest = pd.read_parquet(folder / "manifest.parquet")
    split = {Path(path).stem: value for path, value in zip(manifest["path"], manifest["split"], strict=True)}
    return [s for s in stems if split[s] == "train"], [s for s in stems if split[s] == "test"]


def _evaluate(
    folder: Path,
    meta: dict,
    stems: list[str],
    maps: list[np.ndarray],
    scores: np.ndarray,
    flagged: np.ndarray,
) -> dict:
    is_clean = np.array([not meta[stem]["defects"] for stem in stems])
    return {
        "image_auroc": image_auroc(scores, ~is_clean),
        "clean_flagged": float(flagged[is_clean].mean()),
        "defective_found": float(flagged[~is_clean].mean()),
        "kinds": per_kind(folder, meta, stems, maps, scores, flagged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("/tmp/ls/q4096"))
    parser.add_argument("--student", default="fpn", choices=sorted(LOSSES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--crops", type=int, default=2400, help="training crops seen (the round's default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stems, meta = _frames(args.data)
    train_stems, test_stems = _splits(args.data, stems)
    train, test = _read(args.data, train_stems), _read(args.data, test_stems)
    classes = json.loads((args.data / "classes.json").read_text())
    num_classes, defect_id = len(classes), classes.index("defect") + 1  # mask values are 1-based

    start = time.perf_counter()
    teacher = BackboneTeacher(TeacherConfig())
    teacher.fit(train)
    assert teacher.pixel_threshold is not None and teacher.image_threshold is not None
    samples = []
    for image, prediction in zip(train, teacher.iter_predict(train), strict=True):
        target = np.where(prediction.mask, defect_id, 0).astype(np.uint8)
        samples.append(
            (image, target, 1.0, anomaly_probability(prediction.anomaly_map, teacher.pixel_threshold))
        )
    teacher_test = teacher.predict(test)
    teacher_seconds = time.perf_counter() - start
    distils = getattr(LOSSES[args.student], "distills", False)
    if not distils:
        samples = [sample[:3] for sample in samples]
    rows = {
        "teacher": _evaluate(
            args.data,
            meta,
            test_stems,
            [p.anomaly_map for p in teacher_test],
            np.array([p.score for p in teacher_test]),
            np.array([p.score >= teacher.image_threshold for p in teacher_test]),
        )
    }
    flagged_pseudo = np.mean([sample[1].any() for sample in samples])
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__}, {args.threads} threads. "
        f"Teacher: fitted on the {len(train)} train frames and labelled them ({100 * flagged_pseudo:.0f}% "
        f"with a mask), then the {len(test)} test frames, in {teacher_seconds:.0f} s.\n",
        flush=True,
    )
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = build_student(args.student, num_classes, image_size=256)
        config = TrainConfig(
            epochs=max(6, math.ceil(args.crops / len(samples))),
            batch_size=8,
            lr=3e-3,
            image_size=256,
            seed=seed,
        )
        began = time.perf_counter()
        train_segmenter(
            model,
            SegmentationSamples(samples, image_size=256),
            config,
            loss_fn=build_loss(args.student, model),
        )
        trained = time.perf_counter() - began
        maps, scores, flagged = [], [], []
        for anomaly_map, mask, score in iter_predictions(model, test):
            maps.append(anomaly_map)
            scores.append(score)
            flagged.append(bool(mask.any()))
        row = _evaluate(args.data, meta, test_stems, maps, np.array(scores), np.array(flagged))
        row["train_s"] = trained
        rows[f"{args.student} seed {seed}"] = row
        print(
            f"{args.student} seed {seed}: trained in {trained:.0f} s, image AUROC {row['image_auroc']:.3f}",
            flush=True,
        )
    kinds = sorted(rows["teacher"]["kinds"])
    print("\n| labeller | image AUROC | clean flagged | defective found | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for name, row in rows.items():
        cells = [f"{row['kinds'][k]['image_auroc']:.3f} / {row['kinds'][k]['aupro']:.3f}" for k in kinds]
        print(
            f"| {name} | {row['image_auroc']:.3f} | {100 * row['clean_flagged']:.0f}% "
            f"| {100 * row['defective_found']:.0f}% | " + " | ".join(cells) + " |"
        )
    students = [row for name, row in rows.items() if name != "teacher"]
    if len(students) > 1:
        values = np.array([row["image_auroc"] for row in students])
        print(
            f"\n{args.student} image AUROC over seeds {args.seeds}: mean {values.mean():.3f}, "
            f"range {values.min():.3f}-{values.max():.3f}"
        )
    print(
        "\nCells per kind: image AUROC / AUPRO@0.3 (frames per kind: "
        + ", ".join(f"{k} {rows['teacher']['kinds'][k]['frames']}" for k in kinds)
        + ")."
    )


if __name__ == "__main__":
    main()
