"""Does the promotion gate promote training noise? Same data, another seed, judged by the gate.

The round's student (``--student``, the round's optimiser settings and ``--crops``) is trained on the train
split of the embedded fabric data (params.yaml dataset, true masks) once per seed of ``--seeds``; every
ordered pair of seeds is then judged by loom.evaluation.promotion.decide on the frozen test split, at
``min_gain`` 0 and at the round's ``promote_min_gain``. A gate that is right about noise promotes none of
them.

    python benchmarks/promotion_noise.py --work /tmp/gate-noise                 # 3 seeds, 2,400 crops
    python benchmarks/promotion_noise.py --work /tmp/gate-noise --crops 1200 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from loom.config import load_settings
    from loom.datasets.fabric import generate
    from loom.datasets.folder import load_labeled_folder
    from loom.evaluation import promotion
    from tasks.train import SOURCE_WEIGHTS, evaluate_on, fit_student

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--student", default="fpn")
    ap.add_argument("--crops", type=int, default=2400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)

    settings = load_settings(args.work / "ws", train_samples=args.crops)
    data = args.work / "fabric"
    if not (data / "manifest.parquet").exists():
        generate(data, n_images=240, seed=0, classes=settings.classes)
    train = load_labeled_folder(data, settings.classes, split="train")
    test = load_labeled_folder(data, settings.classes, split="test")
    samples = [(item.image, item.mask, SOURCE_WEIGHTS["human"]) for item in train]
    stats = {}
    for seed in args.seeds:
        seeded = load_settings(args.work / "ws", train_samples=args.crops, seed=seed)
        model_dir = args.work / "models" / f"{args.student}-{args.crops}-seed{seed}"
        if not (model_dir / "model.safetensors").exists():
            fit_student(seeded, args.student, samples, model_dir)
        evaluation = evaluate_on(settings, model_dir, [t.image for t in test], [t.mask for t in test])
        stats[seed] = evaluation.stats
        print(f"seed {seed}: mIoU {evaluation.metrics['miou']:.3f}", flush=True)

    rp = settings.round
    guard = {"class_tolerance": rp.promote_class_tolerance, "min_class_pixels": rp.promote_min_class_pixels}
    margin = rp.promote_min_gain
    print(
        f"\n| challenger | champion | gain | 95% interval | classes regressed | promoted at 0 | at {margin} |"
    )
    print("|---|---|---|---|---|---|---|")
    for new, old in itertools.permutations(args.seeds, 2):
        at_zero = promotion.decide(stats[new], stats[old], min_gain=0.0, **guard)
        at_margin = promotion.decide(stats[new], stats[old], min_gain=margin, **guard)
        print(
            f"| seed {new} | seed {old} | {at_zero.delta:+.3f} | "
            f"[{at_zero.ci_low:+.3f}, {at_zero.ci_high:+.3f}] | "
            f"{', '.join(at_zero.regressed) or '-'} | {'yes' if at_zero.promoted else 'no'} | "
            f"{'yes' if at_margin.promoted else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
