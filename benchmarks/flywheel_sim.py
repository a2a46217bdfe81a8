"""The flywheel, simulated: review selection strategies side by side over a stream of batches.

No servers: every arm runs the round's own pieces in one process, on the same data, stream and seeds:

- a stream of batches: ``--first`` train images in round 1, ``--batch`` new ones each later round, drawn in a
  seed-dependent order from the train split of ``--data`` (any folder dataset with class masks and a test
  split, ``loom dataset`` layout; default: the embedded fabric data, generated once under ``--work``);
- the teacher (the backbone teacher, zero-shot, fitted each round on the pool so far: shared by the arms,
  whose pools are the same); its regions named per arm by prototypes of that arm's human-labeled defects
  (loom.stages.teachers.name_predictions) and the arm's review uncertainty
  (tasks.pseudo_label.review_uncertainty);
- review: per round ``--budget`` images; ``--audit`` of them drawn uniformly at random among the candidates
  auto-accept may take (the calibration audit, the same for every arm), the rest by the arm's strategy
  (loom.stages.selection). The simulated annotator answers with the true mask (a review = the truth, as after
  Defect-Click and painting). Candidates that calibrated auto-accept already passes are not sent;
- calibrated auto-accept (loom.stages.calibration.accept at ``--risk``) on the arm's audits; the true error
  of what it accepted is measured against the truth;
- the student (fpn, the round's optimiser, ``--crops`` crops of ``--crop-size`` px, the seed as training seed)
  trains on human masks + accepted pseudo-labels (tasks.train weights and ignore rule) and is scored on the
  frozen test split (tasks.train.evaluate_on); its masks of the next round's pool give the disagreement;
- the ``oracle`` arm trains on every pool image's true mask;
- ``random-warm``, ``combined-warm`` and ``oracle-warm`` are those arms with each round's student starting
  from the arm's previous one (``round.warm_start``; a round starts from the champion), not from ImageNet.

Deviations from a real round, for speed: the teacher is zero-shot (a round adds up to 4 people's normal
images as references), the disagreement uses the previous round's student (a round uses the champion), and
there is no augmentation.

    python benchmarks/flywheel_sim.py --work /tmp/flysim                   # 6 rounds, 3 seeds, every arm
    python benchmarks/flywheel_sim.py --work /tmp/flysim --arms random combined oracle --seeds 0
    python benchmarks/flywheel_sim.py --work /tmp/flysim --data DIR       # a labeled sample of your fabric
    python benchmarks/flywheel_sim.py --work /tmp/flysim --seeds 1 --json s1.json   # one seed per run, then
    python benchmarks/flywheel_sim.py --work /tmp/flysim --report s0.json s1.json s2.json  # the tables
    python benchmarks/flywheel_sim.py --work /tmp/flysim-smoke --rounds 2 --first 24 --batch 8 --budget 4 \\
        --audit 1 --crops 16 --seeds 0                                       # smoke run (a minute)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARMS = (
    "random",
    "uncertainty",
    "disagreement",
    "diversity",
    "rarity",
    "combined",
    "random-warm",
    "combined-warm",
    "oracle",
    "oracle-warm",
)
WARM = "-warm"  # the arm's student starts from its previous round's student (round.warm_start)


@dataclass
class Arm:
    """One strategy's state along the stream."""

    name: str
    reviewed: dict[str, np.ndarray] = field(default_factory=dict)  # image id -> true mask
    audit_confidence: list[float] = field(default_factory=list)
    audit_wrong: list[bool] = field(default_factory=list)
    student: Path | None = None

    @property
    def strategy(self) -> str:
        return self.name.removesuffix(WARM)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="cache and model folder")
    ap.add_argument("--data", type=Path, help="folder dataset with class masks and a test split")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--first", type=int, default=180, help="train images in round 1")
    ap.add_argument("--batch", type=int, default=60, help="new train images per later round")
    ap.add_argument("--budget", type=int, default=16, help="reviews per round (audit included)")
    ap.add_argument("--audit", type=int, default=4, help="of the budget, drawn at random for calibration")
    ap.add_argument("--risk", type=float, default=0.1, help="target share of wrong auto-accepted labels")
    ap.add_argument("--crops", type=int, default=800, help="student training crops per round")
    ap.add_argument("--crop-size", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--report", type=Path, nargs="+", help="only print the tables of these --json files")
    return ap.parse_args(argv)


def dataset(args: argparse.Namespace, classes: tuple[str, ...]) -> tuple[list, list]:
    """(train items, test items) of ``--data`` (its test split, else one drawn once and frozen under
    ``--work``), else of the embedded data generated under ``--work``."""
    from loom.datasets.fabric import generate
    from loom.datasets.folder import load_labeled_folder
    from loom.datasets.stream import choose_test_split

    folder = args.data
    if folder is None:
        n_train = args.first + (args.rounds - 1) * args.batch
        n = int(np.ceil(n_train / 0.8))  # the fabric generator holds out a test split of 20 %
        folder = args.work / f"fabric-{n}"
        if not (folder / "manifest.parquet").exists():
            generate(folder, n_images=n, test_fraction=0.2, seed=0, classes=classes)
    items = load_labeled_folder(folder, classes)
    test = choose_test_split(folder, [item.stem for item in items], args.work, 0.25, seed=0)
    return [item for item in items if item.stem not in test], [item for item in items if item.stem in test]


def main(argv: list[str] | None = None) -> int:
    from loom.config import PROJECT_ROOT, load_settings

    args = parse(argv)
    if args.report:
        print(report([row for path in args.report for row in json.loads(path.read_text())], args))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # The run reads the settings of its start: edits of the project's params.yaml meanwhile do not reach it.
    (args.work / "ws").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_ROOT / "params.yaml", args.work / "ws" / "params.yaml")
    probe = load_settings(args.work / "ws")
    train, test = dataset(args, probe.classes)
    need = args.first + (args.rounds - 1) * args.batch
    if len(train) < need:
        raise SystemExit(
            f"{len(train)} train images; the stream needs {need}: lower --first/--batch/--rounds"
        )
    rows = []
    for seed in args.seeds:
        rows += run_seed(args, seed, train, test)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(report(rows, args))
    return 0


def run_seed(args: argparse.Namespace, seed: int, train: list, test: list) -> list[dict]:
    from loom.config import load_settings
    from loom.stages.embeddings import image_embeddings
    from loom.stages.teachers import build_teacher

    settings = load_settings(
        args.work / "ws", image_size=args.crop_size, train_samples=args.crops, epochs=1, seed=seed
    )
    order = np.random.default_rng(seed).permutation(len(train))
    stream = [train[i] for i in order[: args.first + (args.rounds - 1) * args.batch]]
    embeddings = image_embeddings([item.image for item in stream])
    arms = [Arm(name) for name in args.arms]
    # The teacher tiles at the round's image size, not at the student's crop size.
    teacher, _ = build_teacher(load_settings(args.work / "ws", seed=seed), "backbone")
    rows = []
    for round_no in range(1, args.rounds + 1):
        n_pool = args.first + (round_no - 1) * args.batch
        pool = stream[:n_pool]
        started = time.perf_counter()
        teacher.fit([item.image for item in pool])
        predictions = teacher.predict([item.image for item in pool])
        teacher_s = time.perf_counter() - started
        for arm in arms:
            started = time.perf_counter()
            row = sim_round(args, settings, seed, round_no, arm, pool, predictions, embeddings, teacher, test)
            row.update(seconds=time.perf_counter() - started, teacher_seconds=teacher_s)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sim_round(args, settings, seed, round_no, arm, pool, predictions, embeddings, teacher, test) -> dict:
    """One round of one arm: select, review, calibrate, accept, train, evaluate."""
    from loom.stages import calibration, selection
    from loom.stages.teachers import build_prototypes, name_predictions
    from tasks.pseudo_label import review_uncertainty
    from tasks.train import SOURCE_WEIGHTS, evaluate_on, fit_student, pseudo_training_mask

    defect_id = settings.class_index("defect")
    ids = [item.stem for item in pool]
    model_dir = args.work / "models" / f"seed{seed}" / arm.name / f"round-{round_no:02d}"
    warm_from = arm.student if arm.name.endswith(WARM) else None
    if arm.strategy == "oracle":
        samples = [(item.image, item.mask, SOURCE_WEIGHTS["human"]) for item in pool]
        fit_student(settings, "fpn", samples, model_dir, init_from=warm_from)
        arm.student = model_dir
        metrics = evaluate_on(settings, model_dir, [t.image for t in test], [t.mask for t in test]).metrics
        return base_row(seed, round_no, arm.name, len(pool), len(pool), len(pool), metrics)

    human = [item for item in pool if item.stem in arm.reviewed and item.mask.any()]
    prototypes = build_prototypes(settings, [h.image for h in human], [h.mask for h in human], teacher)
    labeled = name_predictions(settings, teacher, [item.image for item in pool], predictions, prototypes)
    uncertainty = review_uncertainty(labeled, defect_id)
    open_ = [i for i, image_id in enumerate(ids) if image_id not in arm.reviewed]
    open_uncertainty = uncertainty[open_]
    confidence = 1.0 - open_uncertainty
    candidates = selection.Candidates(
        uncertainty=open_uncertainty,
        score=np.array([predictions[i].score for i in open_]),
        classes=[_class_names(labeled[i].class_mask, settings.classes) for i in open_],
        disagreement=_disagreement(arm, pool, open_, labeled),
        embeddings=embeddings[open_],
        labeled_embeddings=embeddings[[i for i, image_id in enumerate(ids) if image_id in arm.reviewed]],
        labeled_counts=_counts(arm, settings.classes),
    )
    flagged = np.array([labeled[i].class_mask.any() for i in open_])
    acceptable = calibration.acceptable(open_uncertainty, flagged)
    provisional = calibration.passed_labels(
        arm.audit_confidence, arm.audit_wrong, open_uncertainty, flagged, args.risk
    )
    plan = selection.plan_review(
        arm.strategy, candidates, args.budget, args.audit, acceptable, provisional, seed * 1000 + round_no
    )
    for k in plan.audit:
        truth = pool[open_[k]].mask
        arm.audit_confidence.append(float(confidence[k]))
        arm.audit_wrong.append(calibration.pseudo_label_wrong(labeled[open_[k]].class_mask, truth, defect_id))
    for k in plan.audit + plan.picks:
        arm.reviewed[ids[open_[k]]] = pool[open_[k]].mask

    rest = [k for k in range(len(open_)) if k not in set(plan.review)]
    passed = calibration.passed_labels(
        arm.audit_confidence, arm.audit_wrong, open_uncertainty[rest], flagged[rest], args.risk
    )
    accepted = [open_[rest[j]] for j in np.flatnonzero(passed)]
    wrong = [calibration.pseudo_label_wrong(labeled[i].class_mask, pool[i].mask, defect_id) for i in accepted]

    samples = [(item.image, item.mask, SOURCE_WEIGHTS["human"]) for item in pool if item.stem in arm.reviewed]
    samples += [
        (pool[i].image, pseudo_training_mask(labeled[i].class_mask, defect_id), SOURCE_WEIGHTS["pseudo"])
        for i in accepted
    ]
    fit_student(settings, "fpn", samples, model_dir, init_from=warm_from)
    arm.student = model_dir
    metrics = evaluate_on(settings, model_dir, [t.image for t in test], [t.mask for t in test]).metrics
    row = base_row(seed, round_no, arm.name, len(pool), len(arm.reviewed), len(accepted), metrics)
    row.update(
        reviews=len(plan.review),
        audits=len(arm.audit_wrong),
        audit_error=float(np.mean(arm.audit_wrong)) if arm.audit_wrong else float("nan"),
        acceptable=int(acceptable.sum()),
        accepted_true_error=float(np.mean(wrong)) if wrong else float("nan"),
        open_after=len(rest) - len(accepted),
    )
    return row


def base_row(seed, round_no, arm, pool, reviewed, accepted, metrics) -> dict:
    per_class = {k: v for k, v in metrics.items() if k.startswith("iou_")}
    return {
        "seed": seed,
        "round": round_no,
        "arm": arm,
        "pool": pool,
        "reviewed_cum": reviewed,
        "accepted": accepted,
        "miou": metrics.get("miou", float("nan")),
        "pixel_auroc": metrics.get("pixel_auroc", float("nan")),
        **per_class,
    }


def _class_names(mask: np.ndarray, classes: tuple[str, ...]) -> tuple[str, ...]:
    from tasks.common import class_names

    return tuple(filter(None, class_names(mask, classes).split(",")))


def _counts(arm: Arm, classes: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for mask in arm.reviewed.values():
        for name in _class_names(mask, classes):
            counts[name] = counts.get(name, 0) + 1
    return counts


def _disagreement(arm: Arm, pool: list, open_: list[int], labeled: list) -> np.ndarray | None:
    """1 - IoU of the teacher's and the arm's previous student's defect masks on the open images."""
    if arm.student is None or arm.strategy not in ("disagreement", "combined"):
        return None
    from models.student.registry import load_student
    from models.student.training import predict_images
    from tasks.pseudo_label import mask_agreement

    model = load_student(arm.student)
    masks = [mask for _, mask, _ in predict_images(model, [pool[i].image for i in open_])]
    return np.array(
        [1.0 - mask_agreement(labeled[i].class_mask, m) for i, m in zip(open_, masks, strict=True)]
    )


def report(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown: mIoU per round and arm (mean, min-max over seeds), reviews, accept share and error."""
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    rounds = sorted({r["round"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"`{' '.join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])}`", ""]
    lines += ["| round | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for rn in rounds:
        cells = []
        for arm in arms:
            values = [r["miou"] for r in rows if r["arm"] == arm and r["round"] == rn]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-")
        lines.append(f"| {rn} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arm | reviewed after the last round (share of pool) | mIoU - random, per seed |",
        "|---|---|---|",
    ]
    last = max(rounds)
    for arm in arms:
        final = {r["seed"]: r for r in rows if r["arm"] == arm and r["round"] == last}
        base = {r["seed"]: r for r in rows if r["arm"] == "random" and r["round"] == last}
        share = np.mean([r["reviewed_cum"] / r["pool"] for r in final.values()])
        gains = ", ".join(
            f"{final[s]['miou'] - base[s]['miou']:+.3f}" for s in seeds if s in final and s in base
        )
        reviewed = np.mean([r["reviewed_cum"] for r in final.values()])
        lines.append(f"| {arm} | {reviewed:.0f} ({share:.0%}) | {gains or '-'} |")
    lines += [
        "",
        "| arm | round | reviews | auto-accepted (share of pool) | audits | true error of accepted |",
    ]
    lines += ["|---|---|---|---|---|---|"]
    for arm in arms:
        if arm.startswith("oracle"):
            continue
        for rn in rounds:
            rs = [r for r in rows if r["arm"] == arm and r["round"] == rn]
            errors = [r["accepted_true_error"] for r in rs if np.isfinite(r["accepted_true_error"])]
            accepted = np.mean([r["accepted"] for r in rs])
            share = np.mean([r["accepted"] / r["pool"] for r in rs])
            error = f"{np.mean(errors):.3f} (max {max(errors):.3f})" if errors else "-"
            reviews = np.mean([r["reviews"] for r in rs])
            audits = np.mean([r["audits"] for r in rs])
            lines.append(
                f"| {arm} | {rn} | {reviews:.1f} | {accepted:.1f} ({share:.0%}) | {audits:.0f} | {error} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
