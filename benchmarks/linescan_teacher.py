"""The backbone teacher on line-scan frames: cost against frame width, throughput, quality per defect kind.

Data: the procedural line-scan set (`loom datasets linescan`; grayscale frames across the whole cloth, with
the light falling off toward the ends, selvedges and background beyond them). Two sets:

    loom datasets linescan --out /tmp/ls/q4096 --frames 250 --width 4096 --height 256 \\
        --defect-fraction 0.3333 --seed 7
    loom datasets linescan --out /tmp/ls/c8192 --frames 100 --width 8192 --height 256 \\
        --defect-fraction 0.3333 --seed 8

Rows (each in its own process, so its peak RSS is its own; wall time of fit + predict over the pool):
- `cost`: a pool of the 100 frames of the 8192 set cut to their middle W columns, W = 1024 ... 8192,
  zero-shot, frames predicted one at a time: seconds per frame and per megapixel, peak RSS, and the
  nearest-neighbour work per pixel (queries x bank rows, counted by models/nearest.py).
- `quality`: the whole 4096 set as one pool (a third of the frames defective, no labels used), zero-shot
  and with k clean train frames as references (left out of the pool): frames/s, peak RSS by the end of fit
  + predict (frames predicted one at a time, only their scores kept, as a caller writing the maps out
  would; the maps are then predicted again, untimed, for the evaluation) and of the whole run, image AUROC and
  pixel AUPRO@0.3 per defect kind (that kind's frames against the clean ones; the kind's ground truth is
  its mask pixels inside its own boxes, other kinds' pixels in the same frame count as normal), and at the
  teacher's own threshold the share of clean frames flagged and of defective frames found.
`--knn auto torch faiss` runs every row on each search of models/nearest.py, side by side ("auto", the
default, is faiss from 4096 queries on). For comparison, the quality rows also give the shares flagged at
median + 3 MAD-sigma of the pool's image scores (a rule at image level, not the teacher's).

    python benchmarks/linescan_teacher.py --rows cost quality --knn auto torch
"""

from __future__ import annotations

import argparse
import itertools
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_backbone import cpu_model


def _frames(folder: Path) -> tuple[list[str], dict]:
    meta = json.loads((folder / "frames.json").read_text())
    return sorted(meta), meta


def _read(folder: Path, stems: list[str], width: int | None = None) -> list[np.ndarray]:
    from loom.data.imageio import read_image

    images = []
    for stem in stems:
        image = read_image(folder / "images" / f"{stem}.png")
        if width is not None and width < image.shape[1]:
            left = (image.shape[1] - width) // 2
            image = np.ascontiguousarray(image[:, left : left + width])
        images.append(image)
    return images


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fit_predict(pool: list[np.ndarray], normals: list[np.ndarray], region: bool = True) -> tuple:
    """Fit, then predict the pool one frame at a time, keeping each frame's image score only (as a caller
    that writes the maps out as they come would): (scores, seconds of fit + predict, nearest-neighbour
    distances computed, peak RSS MB by then, the teacher)."""
    from models.nearest import count_search_work
    from models.teacher.backbone import BackboneTeacher, TeacherConfig
    from models.teacher.backbone.region import RegionConfig

    teacher = BackboneTeacher(TeacherConfig(region=RegionConfig(enabled=region)))
    start = time.perf_counter()
    with count_search_work() as work:
        teacher.fit(pool, normals)
        scores = np.array([prediction.score for prediction in teacher.iter_predict(pool)])
    return scores, time.perf_counter() - start, work.distances, _peak_rss_mb(), teacher


def cost_row(folder: Path, width: int, frames: int) -> dict:
    stems, _ = _frames(folder)
    pool = _read(folder, stems[:frames], width)
    _, seconds, distances, _, _ = _fit_predict(pool, [])
    pixels = sum(image.shape[0] * image.shape[1] for image in pool)
    return {
        "width": width,
        "frames": len(pool),
        "s_per_frame": seconds / len(pool),
        "s_per_mp": seconds / (pixels / 1e6),
        "distances_per_pixel": distances / pixels,
    }


def _kind_masks(meta: dict, stem: str, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per defect kind in the frame: its mask pixels inside its own boxes."""
    out: dict[str, np.ndarray] = {}
    for defect in meta[stem]["defects"]:
        x0, y0, x1, y1 = defect["bbox"]
        box = np.zeros(mask.shape, bool)
        box[y0:y1, x0:x1] = True
        out[defect["kind"]] = out.get(defect["kind"], np.zeros(mask.shape, bool)) | (box & (mask > 0))
    return out


def per_kind(
    folder: Path,
    meta: dict,
    stems: list[str],
    maps: list[np.ndarray],
    scores: np.ndarray,
    flagged: np.ndarray,
) -> dict[str, dict]:
    """Per defect kind among `stems` (whose `maps`, image `scores` and `flagged` are given, in order): its
    frames, image AUROC and AUPRO@0.3 against the clean frames, and the share of its frames flagged."""
    from loom.data.imageio import read_mask
    from loom.evaluation.metrics import aupro, image_auroc

    classes = len(json.loads((folder / "classes.json").read_text()))
    is_clean = np.array([not meta[stem]["defects"] for stem in stems])
    kinds: dict[str, list[tuple[int, np.ndarray]]] = {}
    for index, stem in enumerate(stems):
        if is_clean[index]:
            continue
        mask = read_mask(folder / "masks" / f"{stem}.png", classes)
        for kind, truth in _kind_masks(meta, stem, mask).items():
            kinds.setdefault(kind, []).append((index, truth))
    clean_indices = list(np.flatnonzero(is_clean))
    rows = {}
    for kind, items in sorted(kinds.items()):
        indices = [index for index, _ in items] + clean_indices
        labels = np.array([1] * len(items) + [0] * len(clean_indices))
        truths = [truth for _, truth in items] + [np.zeros(maps[0].shape, bool)] * len(clean_indices)
        rows[kind] = {
            "frames": len(items),
            "image_auroc": image_auroc(scores[indices], labels),
            "aupro": aupro([maps[index] for index in indices], truths, fpr_limit=0.3),
            "found": float(flagged[[index for index, _ in items]].mean()),
        }
    return rows


def quality_row(folder: Path, shots: int, limit: int | None, region: bool) -> dict:
    from loom.evaluation.metrics import image_auroc
    from models.robust_stats import median_and_sigma

    stems, meta = _frames(folder)
    stems = stems[:limit]
    clean = [stem for stem in stems if not meta[stem]["defects"]]
    normals_stems = clean[:shots]
    pool_stems = [stem for stem in stems if stem not in normals_stems]
    pool, normals = _read(folder, pool_stems), _read(folder, normals_stems)
    scores, seconds, _, teacher_rss, teacher = _fit_predict(pool, normals, region)
    row: dict = {"shots": shots, "frames": len(pool), "frames_per_s": len(pool) / seconds}
    row["teacher_peak_rss_mb"] = teacher_rss
    # The maps, for the evaluation only (not timed): pool members are predicted again from their fit-time
    # scores, identically.
    predictions = teacher.predict(pool)
    del pool
    is_clean = np.array([not meta[stem]["defects"] for stem in pool_stems])
    flagged = np.array([p.score >= teacher.image_threshold for p in predictions])
    row["clean_flagged"] = float(flagged[is_clean].mean())
    row["defective_found"] = float(flagged[~is_clean].mean())
    assert np.array_equal(scores, [p.score for p in predictions]), "a second predict changed the scores"
    row["image_auroc"] = image_auroc(scores, ~is_clean)
    median, sigma = median_and_sigma(scores)
    at_image_level = scores >= median + 3 * sigma
    row["clean_flagged_image_rule"] = float(at_image_level[is_clean].mean())
    row["defective_found_image_rule"] = float(at_image_level[~is_clean].mean())
    maps = [prediction.anomaly_map for prediction in predictions]
    row["kinds"] = per_kind(folder, meta, pool_stems, maps, scores, flagged)
    return row


def _child(spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    if spec["row"] == "cost":
        row = cost_row(Path(spec["data"]), spec["width"], spec["frames"])
    else:
        row = quality_row(Path(spec["data"]), spec["shots"], spec["limit"], spec["region"])
    row["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(row))


def _run_child(spec: dict, knn: str) -> dict:
    env = {**os.environ, "LOOM_KNN_BACKEND": knn}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"row {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", choices=["cost", "quality"], default=["cost", "quality"])
    parser.add_argument("--cost-data", type=Path, default=Path("/tmp/ls/c8192"))
    parser.add_argument("--quality-data", type=Path, default=Path("/tmp/ls/q4096"))
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--limit", type=int, help="quality: the first N frames of the set only")
    parser.add_argument(
        "--region",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="quality: fabric region found or not",
    )
    parser.add_argument("--knn", nargs="+", choices=["auto", "torch", "faiss"], default=["auto"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    print(f"Command: `python {shlex.join(sys.argv)}`  ")
    print(
        f"Machine: {cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__} with {args.threads} "
        f"threads, load average before the run {os.getloadavg()[0]:.1f}\n"
    )
    if "cost" in args.rows:
        print("| width | search | frames | s / frame | s / MP | distances / pixel | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        for width in args.widths:
            for knn in args.knn:
                spec = {"row": "cost", "data": str(args.cost_data), "width": width, "frames": args.frames}
                row = _run_child({**spec, "threads": args.threads}, knn)
                print(
                    f"| {width} | {knn} | {row['frames']} | {row['s_per_frame']:.3f} | {row['s_per_mp']:.3f} "
                    f"| {row['distances_per_pixel']:.0f} | {row['peak_rss_mb']:.0f} |",
                    flush=True,
                )
        print()
    if "quality" in args.rows:
        for shots, region, knn in itertools.product(args.shots, args.region, args.knn):
            spec = {"row": "quality", "data": str(args.quality_data), "shots": shots, "threads": args.threads}
            row = _run_child({**spec, "limit": args.limit, "region": region == "on"}, knn)
            mode = "zero-shot" if shots == 0 else f"{shots} normals"
            print(
                f"**{mode}, fabric region {region}, {knn} search**: {row['frames']} frames, "
                f"{row['frames_per_s']:.2f} frames/s, "
                f"peak RSS {row['teacher_peak_rss_mb']:.0f} MB by the end of fit + predict "
                f"({row['peak_rss_mb']:.0f} MB with the evaluation); "
                f"image AUROC {row['image_auroc']:.3f}; at the "
                f"teacher's threshold {100 * row['clean_flagged']:.1f}% of clean frames flagged, "
                f"{100 * row['defective_found']:.1f}% of defective frames found (at median + 3 MAD-sigma of "
                f"the image scores: {100 * row['clean_flagged_image_rule']:.1f}% and "
                f"{100 * row['defective_found_image_rule']:.1f}%)\n"
            )
            print("| defect kind | frames | image AUROC | AUPRO@0.3 | found |")
            print("|---|---|---|---|---|")
            for kind, cells in row["kinds"].items():
                print(
                    f"| {kind} | {cells['frames']} | {cells['image_auroc']:.3f} | {cells['aupro']:.3f} "
                    f"| {100 * cells['found']:.0f}% |"
                )
            print(flush=True)


if __name__ == "__main__":
    main()
