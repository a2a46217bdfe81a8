"""Load: one round that ingests 5,000 images and sends 1,000 of them to review, on a real stack.

Starts the workspace's stack (Label Studio, Prefect, MLflow, the ML backend) on free ports, a simulated
annotator that answers every task with the true mask, then `loom round --source DIR --review-budget N` in
its own process, and prints the round's wall time, its process's peak resident memory and the seconds of
each step (from the round record). Pushing is batched (100 tasks a request) and pulling is one JSON export,
so neither grows by a request per task; the annotator's own time (one request per answer, as people work)
is the review wait.

    python benchmarks/reliability_load.py --work /tmp/loom-load
    python benchmarks/reliability_load.py --work /tmp/loom-load --images 500 --reviews 100   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PORT_VARIABLES = ("LOOM_LS_PORT", "LOOM_PREFECT_PORT", "LOOM_MLFLOW_PORT", "LOOM_BACKEND_PORT")
#: The smallest student set-up: the load is in ingest, labeling, review and versioning, not in training.
ROUND = {
    "image_size": 64,
    "epochs": 1,
    "train_samples": 0,
    "students": ["fpn"],
    "teacher_shots": 2,
    "clicker_fine_tune_steps": 0,
    "augment": "copy_paste",
    "synthetic_per_round": 0,
    "review_timeout_s": 3600,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    from app.demo import GroundTruth
    from loom.config import load_settings, workspace_secret
    from loom.datasets.fabric import generate
    from loom.services import labelstudio, stack
    from loom.services.annotator import SimulatedAnnotator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--reviews", type=int, default=1000, help="the round's review budget")
    ap.add_argument("--size", type=int, default=64, help="side of the generated images, px")
    args = ap.parse_args(argv)

    shutil.rmtree(args.work, ignore_errors=True)
    started = time.perf_counter()
    src = generate(args.work / "camera", n_images=args.images, size=args.size, test_fraction=0.05, seed=0)
    print(f"generated {args.images} images in {time.perf_counter() - started:.0f} s", flush=True)

    os.environ.update({name: str(free_port()) for name in PORT_VARIABLES})
    ws = args.work / "ws"
    ws.mkdir(parents=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"].update(ROUND, review_budget=args.reviews)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(ws)
    stack.up(settings)
    stop = None
    try:
        token = labelstudio.invite_annotator(
            settings, "load@loom.local", workspace_secret(settings, "LOAD_PW")
        )
        project_id = labelstudio.ensure_project(settings)
        truth = GroundTruth([src], len(settings.classes))
        stop = SimulatedAnnotator(settings, token, truth, settings.classes).run_in_background(project_id, 2.0)

        command = [
            str(Path(sys.executable).parent / "loom"),
            "round",
            "--workspace",
            str(ws),
            "--source",
            str(src),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-4000:])
            return 1
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        record = json.loads((settings.round_dir(1) / "round.json").read_text())
    finally:
        if stop is not None:
            stop.set()
        stack.down(settings)

    counts, steps = record["counts"], record["step_seconds"]
    print(f"round 1: {wall:.0f} s wall, peak resident memory {peak_mib:.0f} MiB (the round's process)")
    print(
        f"ingested {counts['ingested']} (quarantined {counts['quarantined']}), "
        f"sent to review {counts['sent_to_review']}, reviewed {counts['reviewed']}"
    )
    for step, seconds in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"  {step:22s} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
