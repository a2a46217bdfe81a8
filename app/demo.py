"""`loom demo`: the whole flywheel on the embedded fabric dataset, with a simulated annotator, on loopback.

Each round a new batch of "camera" images arrives in ``workspace/incoming/batch-NN``; the first batch
also carries the frozen, human-verified test split. The simulated annotator (a second Label Studio
user) corrects the teacher's pre-annotations from the generator's ground truth, as a person with
Defect-Click would: smart key points through Label Studio to the ML backend, painting only what 20
clicks cannot fix.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import requests
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

from app.runner import run_round
from loom.config import PROJECT_ROOT, Settings, workspace_secret
from loom.data.imageio import read_mask
from loom.datasets.fabric import generate
from loom.datasets.stream import batches_from_folder
from loom.evaluation.plots import curve_points, round_curve
from loom.services import labelstudio, stack
from loom.services.annotator import ClickPolicy, SimulatedAnnotator

log = logging.getLogger(__name__)

ANNOTATOR_EMAIL = "annotator@loom.local"


def dataset_params() -> dict[str, Any]:
    return (yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()) or {}).get("dataset", {})


def make_batches(settings: Settings, rounds: int, n_images: int | None = None) -> list[Path]:
    """Batch 1: the dataset with its frozen test split; later batches: new unlabeled train images."""
    p = dataset_params()
    n = n_images or int(p.get("n_images", 240))
    size, seed = int(p.get("size", 256)), int(p.get("seed", 0))
    batches = []
    for r in range(1, rounds + 1):
        out = settings.workspace / "incoming" / f"batch-{r:02d}"
        if not (out / "manifest.parquet").exists():
            generate(
                out,
                n_images=n if r == 1 else max(n // 2, 8),
                size=size,
                defect_fraction=float(p.get("defect_fraction", 0.3)),
                test_fraction=float(p.get("test_fraction", 0.25)) if r == 1 else 0.0,
                seed=seed + 1000 * (r - 1),
            )
        batches.append(out)
    return batches


class GroundTruth:
    """image_id -> ground-truth class mask, read from the generated batches (the annotator's "eyes")."""

    def __init__(self, batches: list[Path], n_classes: int) -> None:
        self.paths: dict[str, Path] = {}
        self.n_classes = n_classes
        for b in batches:
            m = pd.read_parquet(b / "manifest.parquet")
            for image_id, path in zip(m["image_id"], m["path"], strict=True):
                self.paths[image_id] = b / "masks" / (Path(path).stem + ".png")

    def __call__(self, image_id: str) -> np.ndarray | None:
        path = self.paths.get(image_id)
        return read_mask(path, self.n_classes) if path and path.exists() else None


def round_row(record: dict[str, Any], seconds: float) -> dict[str, Any]:
    c, m = record["counts"], record["metrics"]
    return {
        "round": record["round"],
        "ingested": c["ingested"],
        "quarantined": c["quarantined"],
        "reviewed": c["reviewed"],
        "clicks_per_reviewed": c.get("clicks_per_reviewed", float("nan")),
        "painted_images": c.get("painted_images", 0),
        "synthetic": c.get("synthetic", 0),
        "auto_accepted": c["auto_accepted"],
        "miou": m.get("miou", float("nan")),
        "pixel_auroc": m.get("pixel_auroc", float("nan")),
        "promoted": record["mlflow"]["promoted"],
        "wall_s": seconds,
    }


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="Loom flywheel")
    for col in (
        "round",
        "ingested",
        "reviewed",
        "clicks/image",
        "painted",
        "synthetic",
        "auto-accepted",
        "student mIoU",
        "pixel AUROC",
        "pre-label IoU",
        "champion",
        "wall time",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["round"]),
            str(r["ingested"]),
            str(r["reviewed"]),
            f"{r['clicks_per_reviewed']:.2f}",
            str(r["painted_images"]),
            str(r["synthetic"]),
            str(r["auto_accepted"]),
            f"{r['miou']:.3f}",
            f"{r['pixel_auroc']:.3f}",
            f"{r.get('prelabel_iou', float('nan')):.3f}",
            "yes" if r["promoted"] else "no",
            f"{r['wall_s']:.0f} s",
        )
    console.print(table)


def server_memory_mb(settings: Settings) -> dict[str, float]:
    """Resident memory of each running server with its child processes."""
    out = {}
    for service in stack.status(settings).services:
        if service.pid:
            try:
                proc = psutil.Process(service.pid)
                procs = [proc, *proc.children(recursive=True)]
                out[service.name] = sum(p.memory_info().rss for p in procs) / 2**20
            except psutil.Error:
                continue
    return out


def wait_for_clicker(settings: Settings, console: Console, timeout_s: float = 1200) -> None:
    """Wait until the ML backend has its click model (it pre-trains one the first time, cached after)."""
    deadline, said = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            state = requests.get(f"{settings.backend_url}/health", timeout=5).json().get("clicker", "")
        except (requests.RequestException, ValueError):
            state = "unreachable"
        if state == "ready":
            return
        if state.startswith("error"):
            raise RuntimeError(f"the ML backend could not prepare its click model: {state}")
        if state != said:
            console.print(f"ML backend: click model {state} ...")
            said = state
        time.sleep(2)
    raise RuntimeError(f"the ML backend's click model was not ready within {timeout_s:.0f} s")


def run_demo(
    settings: Settings,
    rounds: int = 2,
    n_images: int | None = None,
    keep_running: bool = True,
    data: Path | None = None,
) -> list[dict]:
    """The demo's rounds on the embedded data, or with ``data`` on a labeled sample of the user's fabric
    (loom/datasets/stream.py: its test split frozen, its train images in ``rounds`` batches)."""
    # On a terminal the table fits its width; into a file or a pipe it is written whole, never cut.
    console = Console(width=max(Console().width, 125) if sys.stdout.isatty() else 1000)
    start = time.perf_counter()
    console.print(f"[bold]Loom demo[/bold] in {settings.workspace}: {rounds} rounds")
    if data is None:
        batches = make_batches(settings, rounds, n_images)
        what = "embedded fabric dataset"
    else:
        seed = int(dataset_params().get("seed", 0))
        batches = batches_from_folder(
            data, settings.workspace / "incoming", rounds, settings.classes, seed=seed
        )
        what = f"your dataset {data}"
    console.print(f"{what}: {len(batches)} batches in {settings.workspace / 'incoming'}")
    status = stack.up(settings)
    console.print(status.table())

    token = labelstudio.invite_annotator(
        settings, ANNOTATOR_EMAIL, workspace_secret(settings, "LOOM_DEMO_ANNOTATOR_PASSWORD")
    )
    project_id = labelstudio.ensure_project(settings)
    ml_backend = labelstudio.ml_backend_id(settings, project_id)
    wait_for_clicker(settings, console)
    annotator = SimulatedAnnotator(
        settings,
        token,
        GroundTruth(batches, len(settings.classes)),
        settings.classes,
        clicks=ClickPolicy(ml_backend) if ml_backend is not None else None,
    )
    stop = annotator.run_in_background(project_id)

    rows, records = [], []
    try:
        for batch in batches:
            t0, seen = time.perf_counter(), len(annotator.corrections)
            record = run_round(settings, source=batch, review_timeout_s=900)
            row = round_row(record, time.perf_counter() - t0)
            # How good the pre-annotations people saw were: the teacher's side of the flywheel.
            made = annotator.corrections[seen:]
            row["prelabel_iou"] = float(np.mean([c.region_iou for c in made])) if made else float("nan")
            rows.append(row)
            records.append(record)
            print_table(rows, console)
    finally:
        stop.set()

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "rounds": rows,
        "step_seconds": [r["step_seconds"] for r in records],
        "peak_rss_mb": peak_mb,
        "server_rss_mb": server_memory_mb(settings),
        "total_s": time.perf_counter() - start,
        "corrections": [asdict(c) for c in annotator.corrections],
    }
    (settings.workspace / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    curve = settings.workspace / "demo_curve.png"
    Image.fromarray(round_curve({"demo": curve_points(records)})).save(curve)
    console.print(f"round curve (test mIoU against reviews, reviews per round): {curve}")
    console.print(f"peak memory of the demo process: {peak_mb:.0f} MB; total {summary['total_s']:.0f} s")
    console.print(
        f"Label Studio: {labelstudio.task_url(settings, project_id)}  (admin {settings.label_studio_admin})"
    )
    console.print(f"Prefect UI:   http://{settings.ports.host}:{settings.ports.prefect}")
    console.print(f"MLflow UI:    {settings.mlflow_ui_url}")
    if not keep_running:
        stack.down(settings)
    else:
        console.print("servers keep running: `loom down` stops them")
    return rows
