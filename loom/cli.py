"""`loom`: one entry point for the flywheel, the local stack and each stage (every verb has --help)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from loom.config import load_settings

app = typer.Typer(help="Loom: a data flywheel for fabric defect inspection.", no_args_is_help=True)
datasets_app = typer.Typer(
    help="Make or convert datasets into the Loom dataset folder layout.", no_args_is_help=True
)
app.add_typer(datasets_app, name="datasets")

WorkspaceOpt = typer.Option(
    None, "--workspace", "-w", help="Workspace dir (default: $LOOM_WORKSPACE or ./workspace)."
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:  # one line per HTTP request of the clients would drown the round's own log
        for noisy in ("httpx", "httpcore", "urllib3", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def up(
    workspace: Path = WorkspaceOpt,
    deploy: bool = typer.Option(False, help="Also register the prefect.yaml deployments (nightly round)."),
) -> None:
    """Start Label Studio, Prefect (server + worker), the MLflow UI and the ML backend on 127.0.0.1."""
    from loom import stack

    settings = load_settings(workspace)
    typer.echo(stack.up(settings, deploy=deploy).table())


@app.command()
def down(workspace: Path = WorkspaceOpt) -> None:
    """Stop every server of the workspace's stack."""
    from loom import stack

    stack.down(load_settings(workspace))
    typer.echo("stack stopped")


@app.command()
def status(workspace: Path = WorkspaceOpt) -> None:
    """Show which servers run, their health and URLs, and whether the ML backend serves the project."""
    from loom import stack

    settings = load_settings(workspace)
    current = stack.status(settings)
    typer.echo(current.table())
    if current["labelstudio"].healthy and current["backend"].healthy:
        typer.echo(stack.backend_connection(settings))


@app.command()
def backend(
    workspace: Path = WorkspaceOpt,
    host: str = typer.Option(None, help="Address to listen on (default: ports.host of params.yaml)."),
    port: int = typer.Option(None, help="Port (default: ports.backend of params.yaml or LOOM_BACKEND_PORT)."),
) -> None:
    """The Label Studio ML backend: smart key points -> brush masks (Defect-Click); `loom up` starts it."""
    from loom.backend import serve

    settings = load_settings(workspace)
    serve(settings, host or settings.ports.host, port or settings.ports.backend)


@app.command()
def init(workspace: Path = WorkspaceOpt) -> None:
    """Create the workspace: folders, its own git + DVC repo with a local remote."""
    from loom import versioning

    settings = load_settings(workspace)
    versioning.init_repo(settings)
    typer.echo(f"workspace ready at {settings.workspace}")


@app.command()
def ingest(
    source: Path = typer.Argument(
        ..., help="A folder of images, or a Loom dataset folder (with manifest.parquet)."
    ),
    workspace: Path = WorkspaceOpt,
    split: str = typer.Option(None, help="Split for a plain folder (default train)."),
) -> None:
    """Ingest images: content-hash ids, dedupe, quarantine of unreadable files (each with a reason)."""
    from loom.ingest import ingest_folder
    from tasks.version import next_round_number

    settings = load_settings(workspace)
    report = ingest_folder(settings, source, round_no=next_round_number(settings), split=split)
    typer.echo(report.summary())
    for path, reason in report.quarantined:
        typer.echo(f"  quarantined {path}: {reason}")


@app.command("round")
def round_(
    workspace: Path = WorkspaceOpt,
    source: Path = typer.Option(None, help="Folder of new images to ingest first."),
    review_budget: int = typer.Option(None, help="Images sent to people this round."),
    review_timeout_s: float = typer.Option(None, help="Seconds to wait for reviews before going on."),
    epochs: int = typer.Option(None, help="Student training epochs."),
) -> None:
    """Run one flywheel round now (against the stack's Prefect server when it is up)."""
    from loom.runner import run_round

    settings = load_settings(workspace)
    record = run_round(
        settings, source=source, review_budget=review_budget, review_timeout_s=review_timeout_s, epochs=epochs
    )
    typer.echo(f"round {record['round']}: {record['summary']} (tag {record['git']['tag']})")


@app.command()
def train(
    workspace: Path = WorkspaceOpt,
    model: str = typer.Option(
        None,
        "--model",
        help="Student: fpn, bafpn, cfa, rd4ad or uninet (default: the first of round.students).",
    ),
    epochs: int = typer.Option(None),
    data: Path = typer.Option(
        None, "--data", help="A folder dataset (images/ + masks/ class masks) instead of the workspace."
    ),
    out: Path = typer.Option(None, "--out", help="Where to save the student (with --data)."),
) -> None:
    """Train a student on the workspace's current human + auto-accepted labels, or on a folder dataset."""
    from loom.runner import run_task
    from tasks.train import fit_student, folder_samples, train_student
    from tasks.version import next_round_number

    settings = load_settings(workspace, epochs=epochs)
    if data is None:
        student = run_task(train_student, settings, max(next_round_number(settings) - 1, 1), model)
    else:
        name = model or settings.round.students[0]
        model_dir = out or settings.models_dir / "folder" / f"{data.resolve().name}-{name}"
        student = fit_student(settings, name, folder_samples(settings, data), model_dir, {"data": str(data)})
    typer.echo(f"{student.name} saved to {student.model_dir}")


@app.command()
def evaluate(
    model: str = typer.Option("champion", help="'champion', a registry version number, or a model folder."),
    workspace: Path = WorkspaceOpt,
    data: Path = typer.Option(
        None, "--data", help="A folder dataset (its test split, or every image of a plain folder)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (miou, per_class_iou, ...)."),
) -> None:
    """Evaluate a student on the workspace's frozen test split, or a folder dataset; print the metrics."""
    import json

    from loom.datasets.folder import load_labeled_folder
    from loom.runner import resolve_model, run_task
    from tasks.train import TrainedStudent, evaluate_on, evaluate_student

    settings = load_settings(workspace)
    model_dir = resolve_model(settings, model)
    if data is None:
        student = TrainedStudent(model_dir.name, str(model_dir), 0, 0, 0.0, [])
        metrics = run_task(evaluate_student, settings, student).metrics
    else:
        items = load_labeled_folder(data, settings.classes, split="test")
        metrics = evaluate_on(settings, model_dir, [i.image for i in items], [i.mask for i in items]).metrics
    if as_json:
        per_class = {c: metrics[f"iou_{c}"] for c in settings.classes if f"iou_{c}" in metrics}
        summary = {
            "miou": metrics.get("miou"),
            "per_class_iou": per_class,
            "pixel_auroc": metrics.get("pixel_auroc"),
            "metrics": metrics,
        }
        typer.echo(json.dumps(summary, default=float))
        return
    for name, value in sorted(metrics.items()):
        typer.echo(f"{name:>24s}  {value:.4f}")


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(..., "--out", help="Output folder (scores.csv, maps/, masks/, overlays/)."),
    model: str = typer.Option("champion", help="'champion', a registry version number, or a model folder."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Segment images with a student; large frames (e.g. 4096x256 line-scan) are tiled and stitched."""
    from loom.predict import predict_paths
    from loom.runner import expand_images, resolve_model

    settings = load_settings(workspace)
    out_dir = predict_paths(resolve_model(settings, model), expand_images(images), out, settings.classes)
    typer.echo(f"predictions written to {out_dir}")


@app.command()
def export(
    out: Path = typer.Option(..., "--out", help="ONNX file to write."),
    model: str = typer.Option("champion", help="'champion', a registry version number, or a model folder."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Export a student to ONNX for the line: uint8 RGB tiles in, class logits out (onnxruntime only)."""
    from loom.runner import resolve_model
    from models.student.export import export_onnx
    from models.student.registry import load_student

    settings = load_settings(workspace)
    path = export_onnx(load_student(resolve_model(settings, model)), out)
    typer.echo(f"ONNX model written to {path}")


@app.command("pseudo-label")
def pseudo_label(
    images: list[Path] = typer.Argument(..., help="Image files or folders (an unlabeled pool)."),
    out: Path = typer.Option(..., "--out", help="Output folder in the prediction layout."),
    normals: Path = typer.Option(
        None, "--normals", help="Folder of known-good images (few-shot references)."
    ),
    teacher: str = typer.Option(
        "auto",
        "--teacher",
        help="auto (open_clip when its weights are here, else backbone), openclip, backbone.",
    ),
    shots: int = typer.Option(None, "--shots", min=0, help="Normal references to use (default params.yaml)."),
    clip_checkpoint: Path = typer.Option(None, "--clip-checkpoint", help="Local open_clip checkpoint file."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Pseudo-labels (maps, named masks, scores) over a pool, zero-shot or from a few normal images."""
    from loom.runner import expand_images, teacher_predict_paths

    settings = load_settings(workspace)
    normal_paths = expand_images([normals]) if normals else []
    out_dir, why = teacher_predict_paths(
        settings, expand_images(images), out, normal_paths, teacher, shots, clip_checkpoint
    )
    typer.echo(f"teacher: {why}")
    typer.echo(f"pseudo-labels written to {out_dir}")


@app.command()
def demo(
    workspace: Path = WorkspaceOpt,
    rounds: int = typer.Option(2, min=1, help="Flywheel rounds to run."),
    images: int = typer.Option(None, help="Embedded dataset size (default params.yaml dataset.n_images)."),
    keep_running: bool = typer.Option(
        True, help="Leave the servers up afterwards so the UIs can be browsed."
    ),
) -> None:
    """The whole flywheel on the embedded fabric dataset with a simulated annotator, on loopback."""
    from loom.demo import run_demo

    settings = load_settings(workspace or os.environ.get("LOOM_WORKSPACE") or "workspace")
    run_demo(settings, rounds=rounds, n_images=images, keep_running=keep_running)


@datasets_app.command("generate")
def datasets_generate(
    out: Path = typer.Option(..., "--out", help="Output dataset folder."),
    n_images: int = typer.Option(240),
    size: int = typer.Option(256),
    defect_fraction: float = typer.Option(0.3),
    test_fraction: float = typer.Option(0.25),
    line_scan: int = typer.Option(0, help="Extra 4096x256 line-scan frames."),
    seed: int = typer.Option(0),
) -> None:
    """Write the embedded procedural fabric dataset (deterministic by seed)."""
    from loom.datasets.fabric import generate

    path = generate(
        out,
        n_images=n_images,
        size=size,
        defect_fraction=defect_fraction,
        test_fraction=test_fraction,
        seed=seed,
        line_scan=line_scan,
    )
    typer.echo(f"dataset written to {path}")


@datasets_app.command("import")
def datasets_import(
    src: Path = typer.Argument(..., help="Source folder."),
    out: Path = typer.Option(..., "--out", help="Output Loom dataset folder."),
    layout: str = typer.Option("mvtec", help="mvtec (MVTec-AD style) or folder (plain images)."),
    category: str = typer.Option(None, help="MVTec category when SRC holds several."),
) -> None:
    """Convert an MVTec-AD style tree or a plain image folder into a Loom dataset folder."""
    from loom.datasets.importers import import_mvtec, import_plain

    if layout == "mvtec":
        path = import_mvtec(src, out, category=category)
    elif layout == "folder":
        path = import_plain(src, out)
    else:
        raise typer.BadParameter(f"unknown layout {layout!r}; use 'mvtec' or 'folder'")
    typer.echo(f"dataset written to {path}")


#: Errors whose message already says what went wrong and what to do: shown without a traceback
#: (set LOOM_DEBUG=1 to see it). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def main() -> None:
    """The `loom` console script."""
    try:
        app()
    except USER_ERRORS as err:
        if os.environ.get("LOOM_DEBUG"):
            raise
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
