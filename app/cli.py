"""`loom`: one entry point for the flywheel, the local stack and each stage (every verb has --help)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from loom.config import Settings, load_settings

app = typer.Typer(help="Loom: a data flywheel for fabric defect inspection.", no_args_is_help=True)
datasets_app = typer.Typer(
    help="Make or convert datasets into the Loom dataset folder layout.", no_args_is_help=True
)
app.add_typer(datasets_app, name="datasets")
clicker_app = typer.Typer(
    help="Defect-Click, the click model behind the labeling UI's smart key points.", no_args_is_help=True
)
app.add_typer(clicker_app, name="clicker")
augment_app = typer.Typer(
    help="Synthetic defect image + mask pairs for rare classes (Defect-Gen or copy-paste).",
    no_args_is_help=True,
)
app.add_typer(augment_app, name="augment")

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
    from loom.services import stack

    settings = load_settings(workspace)
    typer.echo(stack.up(settings, deploy=deploy).table())


@app.command()
def down(workspace: Path = WorkspaceOpt) -> None:
    """Stop every server of the workspace's stack."""
    from loom.services import stack

    stack.down(load_settings(workspace))
    typer.echo("stack stopped")


@app.command()
def status(workspace: Path = WorkspaceOpt) -> None:
    """Show which servers run, their health and URLs, whether the ML backend serves the project, and
    which rounds are suspended waiting for people."""
    import time

    from loom import journal
    from loom.services import stack
    from loom.services.review_relay import load_pending

    settings = load_settings(workspace)
    current = stack.status(settings)
    typer.echo(current.table())
    if current["labelstudio"].healthy and current["backend"].healthy:
        typer.echo(stack.backend_connection(settings))
    in_progress = journal.load(settings)
    if in_progress is not None:
        typer.echo(
            f"round {in_progress.round_no} in progress: reached {in_progress.reached} "
            f"({in_progress.attempts} flow runs so far; `loom round --resume` finishes it if it was stopped)"
        )
    for review in load_pending(settings):
        left = review.deadline - time.time()
        when = f"resumed in {left / 60:.0f} min at the latest" if left > 0 else "overdue: is loom backend up?"
        typer.echo(
            f"round {review.round_no} (flow run {review.flow_run_id}) is suspended for review: "
            f"{len(review.task_ids)} tasks in project {review.project_id}, {when}"
        )


@app.command()
def backend(
    workspace: Path = WorkspaceOpt,
    host: str = typer.Option(None, help="Address to listen on (default: ports.host of params.yaml)."),
    port: int = typer.Option(None, help="Port (default: ports.backend of params.yaml or LOOM_BACKEND_PORT)."),
) -> None:
    """The Label Studio ML backend: smart key points -> brush masks (Defect-Click); `loom up` starts it."""
    from loom.services.backend import serve

    settings = load_settings(workspace)
    serve(settings, host or settings.ports.host, port or settings.ports.backend)


@app.command()
def init(workspace: Path = WorkspaceOpt) -> None:
    """Create the workspace: folders, its own git + DVC repo with a local remote."""
    from loom.services import versioning

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
    from loom.data.ingest import ingest_folder
    from loom.services.versioning import next_round_number

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
    resume: bool = typer.Option(
        False, help="Finish the round in progress (interrupted, or suspended for review); fail if none is."
    ),
) -> None:
    """Run one flywheel round now (against the stack's Prefect server when it is up).

    A round that was interrupted is finished first, under its own number, whether or not --resume is given.
    """
    from app.runner import resume_suspended_round, run_round
    from loom.journal import RoundBusy
    from loom.services.tracking import TrackingError
    from loom.services.versioning import VersioningError

    settings = load_settings(workspace)
    try:
        if resume and resume_suspended_round(settings):
            typer.echo("the round suspended for review was resumed: the worker finishes it (`loom status`)")
            return
        record = run_round(
            settings,
            source=source,
            review_budget=review_budget,
            review_timeout_s=review_timeout_s,
            epochs=epochs,
        )
    except RoundBusy as err:
        typer.echo(f"round not started: {err}", err=True)
        raise typer.Exit(2) from None
    except (TrackingError, VersioningError) as err:  # MLflow or DVC/git: the round stops, nothing half-done
        typer.echo(f"round failed: {err}\nFix that, then `loom round --resume` finishes the round.", err=True)
        raise typer.Exit(1) from None
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
    from app.runner import run_task
    from loom.services.versioning import next_round_number
    from tasks.train import fit_student, folder_samples, train_student

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

    from app.runner import resolve_model, run_task
    from loom.datasets.folder import load_labeled_folder
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
def reproduce(
    tag: str = typer.Argument(..., help="The round to reproduce, e.g. round-0002."),
    workspace: Path = WorkspaceOpt,
    force: bool = typer.Option(False, help="Discard changes no round has versioned (else refuse)."),
) -> None:
    """Retrain a versioned round's students from its data and params; show its metrics beside the record."""
    from flows.reproduce import COMPARED, TOLERANCE, reproduce_round

    results = reproduce_round(load_settings(workspace), tag, force=force)
    typer.echo(f"{'student':10} {'metric':12} {'recorded':>9} {'reproduced':>10} {'|diff|':>8}")
    for result in results:
        for key in COMPARED:
            if key in result.recorded and key in result.reproduced:
                diff = abs(result.reproduced[key] - result.recorded[key])
                typer.echo(
                    f"{result.student:10} {key:12} {result.recorded[key]:9.4f} "
                    f"{result.reproduced[key]:10.4f} {diff:8.4f}"
                )
    if all(result.within_tolerance for result in results):
        typer.echo(f"{tag}: every metric within {TOLERANCE} of the record")
    else:
        typer.echo(f"{tag}: some metrics differ from the record by more than {TOLERANCE}", err=True)
        raise typer.Exit(1)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(..., "--out", help="Output folder (scores.csv, maps/, masks/, overlays/)."),
    model: str = typer.Option("champion", help="'champion', a registry version number, or a model folder."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Segment images with a student; large frames (e.g. 4096x256 line-scan) are tiled and stitched."""
    from app.runner import expand_images, resolve_model
    from loom.data.predict import predict_paths

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
    from app.runner import resolve_model
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
    from app.runner import expand_images, teacher_predict_paths

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
    data: Path = typer.Option(
        None,
        help="Rehearse on your own labeled sample: a folder dataset with class masks (images/ + masks/); "
        "its test split is frozen, its train images arrive in one batch per round.",
    ),
) -> None:
    """The whole flywheel with a simulated annotator on loopback: the embedded fabric dataset, or --data."""
    from app.demo import run_demo

    settings = load_settings(workspace or os.environ.get("LOOM_WORKSPACE") or "workspace")
    run_demo(settings, rounds=rounds, n_images=images, keep_running=keep_running, data=data)


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


@datasets_app.command("linescan")
def datasets_linescan(
    out: Path = typer.Option(..., "--out", help="Output dataset folder."),
    frames: int = typer.Option(100, min=1, help="Number of line-scan frames."),
    width: int = typer.Option(4096, help="Frame width (across the cloth), px."),
    height: int = typer.Option(256, help="Frame height (along the cloth), px."),
    size: list[str] = typer.Option(
        None, help="WIDTHxHEIGHT, repeatable (e.g. --size 4096x256 --size 8192x512); frames cycle sizes."
    ),
    defect_fraction: float = typer.Option(2 / 3),
    test_fraction: float = typer.Option(0.25),
    seed: int = typer.Option(0),
    workers: int = typer.Option(2, min=1, help="Render processes."),
) -> None:
    """Write the procedural line-scan set (grayscale frames across the whole cloth; for benchmarks, tests)."""
    from loom.datasets.fabric.linescan import generate_line_scan

    sizes = []
    for item in size or []:
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError as err:
            raise typer.BadParameter(f"--size {item!r}: expected WIDTHxHEIGHT, e.g. 4096x256") from err
        sizes.append((w, h))
    path = generate_line_scan(
        out,
        n_frames=frames,
        width=width,
        height=height,
        defect_fraction=defect_fraction,
        test_fraction=test_fraction,
        seed=seed,
        sizes=sizes or None,
        workers=workers,
    )
    typer.echo(f"line-scan set written to {path} (fabric regions in frames.json)")


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


#: Start names in `loom clicker evaluate --json` (the core calls the empty start "empty"; the table and
#: the JSON say "nothing", as people reading it do).
_START_NAMES = {"empty": "nothing", "prelabel": "prelabel"}


@clicker_app.command("evaluate")
def clicker_evaluate(
    images: Path = typer.Option(..., "--images", help="Folder of images."),
    masks: Path = typer.Option(
        ..., "--masks", help="Folder of masks <stem>.png (0 background, >0 defect; binary or class ids)."
    ),
    prelabels: Path = typer.Option(
        None,
        "--prelabels",
        help="Pre-annotations in the prediction layout (masks/<stem>.png, optional maps/<stem>.npy).",
    ),
    teacher: str = typer.Option(
        "backbone",
        "--teacher",
        help="Teacher run zero-shot over the folder for the pre-annotations when --prelabels is not given "
        "(backbone, openclip, auto), or none: no pre-annotation start and no teacher-map baseline.",
    ),
    model: Path = typer.Option(
        None,
        "--model",
        help="Clicker folder (default: the workspace's champion clicker, else the pre-trained one).",
    ),
    methods: list[str] = typer.Option(
        None,
        "--methods",
        help="Methods to compare, comma-separated or repeated: clicker, grabcut, teacher_grow (default all).",
    ),
    max_clicks: int = typer.Option(20, "--max-clicks", min=1, help="Clicks per object at most."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: {method: {start: {noc85, noc90, fail20, ...}}, ...}."
    ),
    workspace: Path = WorkspaceOpt,
) -> None:
    """NoC (clicks to IoU 85 / 90 %) of the clicker beside GrabCut and the teacher map grown from clicks,
    on a folder of images + masks, from nothing and from the pre-annotation."""
    import json

    from loom.stages.clicking import METHODS, clicker_choice, evaluate_folder, format_table

    settings = load_settings(workspace)
    names = [name.strip() for item in methods or [] for name in item.split(",") if name.strip()]
    names = names or list(METHODS)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}", param_hint="'--methods'"
        )
    # Only the clicker needs a model; a given one also sets the baselines' zoom crop and click radius.
    # Without the clicker in the comparison, the pre-trained one is not trained just to be ignored.
    model_dir = None
    if model is not None or "clicker" in names:
        model_dir, why = clicker_choice(settings, model)
        typer.echo(f"clicker: {why}", err=True)
    result = evaluate_folder(
        images,
        masks,
        model_dir=model_dir,
        prelabels_dir=prelabels,
        teacher=teacher,
        methods=names,
        max_clicks=max_clicks,
        settings=settings,
    )
    if not as_json:
        typer.echo(format_table(result))
        return
    summary = {
        **result,
        "methods": {
            method: {_START_NAMES.get(start, start): row for start, row in rows.items()}
            for method, rows in result["methods"].items()
        },
    }
    typer.echo(json.dumps(summary, default=float))


@clicker_app.command("pretrain")
def clicker_pretrain(
    config: str = typer.Option(None, "--config", help="Recipe: default or tiny (default: params.yaml's)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the rendered images, the sampling and the weights."),
    retrain: bool = typer.Option(
        False,
        "--retrain",
        help="Train even when a cached or shipped copy exists (reproduces the shipped).",
    ),
    ship: bool = typer.Option(
        False, "--ship", help="Then write its decoder into models/clicker/shipped/ (commit it with the code)."
    ),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Pre-train the click model on rendered fabric (cached in the workspace; a shipped copy is unpacked
    instead of training when its recipe key matches)."""
    import tempfile

    from loom.stages.clicking import pretrain_clicker, pretrained_clicker_root, ship_clicker

    settings = load_settings(workspace)
    config = config or settings.round.clicker_preset
    if retrain:  # a fresh cache folder, and no shipped copy to unpack
        settings.stack_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(tempfile.mkdtemp(prefix="clicker-retrain-", dir=settings.stack_dir))
        model_dir = pretrain_clicker(cache, config, seed, use_shipped=False)
    else:
        model_dir = pretrain_clicker(pretrained_clicker_root(settings), config, seed)
    typer.echo(f"pre-trained clicker: {model_dir}")
    if ship:
        try:
            typer.echo(f"shipped decoder: {ship_clicker(model_dir)}")
        except ValueError as error:
            typer.echo(f"not shipped: {error}", err=True)
            raise typer.Exit(1) from error


def _defect_gen_cache(settings: Settings) -> Path:
    """Where Defect-Gen models are cached: the same root as the round's augment step (tasks/augment.py),
    so a model trained here is reused by the rounds and the other way round."""
    return settings.stack_dir / "defect-gen"


def _check_class(name: str, classes: list[str], learned: dict[str, int], what: str) -> None:
    """A typer.BadParameter naming the valid classes when ``name`` is unknown or has nothing to learn from."""
    usable = [c for c in classes if learned.get(c, 0) > 0]
    if name not in classes:
        raise typer.BadParameter(
            f"unknown class {name!r}; valid classes: {', '.join(classes)}", param_hint="'--class'"
        )
    if name not in usable:
        raise typer.BadParameter(
            f"{what} has no {name!r} defect to learn from; classes it has: {', '.join(usable) or 'none'}",
            param_hint="'--class'",
        )


@augment_app.command("train")
def augment_train(
    images: Path = typer.Option(..., "--images", help="Folder of labeled images, or a Loom dataset folder."),
    masks: Path = typer.Option(
        None, "--masks", help="Class masks <stem>.png (default: masks/ beside or inside --images)."
    ),
    preset: str = typer.Option(
        None, "--preset", help="auto (full on a GPU, else cpu), cpu, full or tiny (default params.yaml)."
    ),
    seed: int = typer.Option(0, "--seed"),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Train Defect-Gen on labeled defects (or find it cached) and print its model folder."""
    from loom.stages.augment import instance_counts, load_folder, train_defect_gen
    from models.defect_gen.config import PRESETS

    settings = load_settings(workspace)
    name = preset or settings.round.augment_preset
    if name not in (*PRESETS, "auto"):
        raise typer.BadParameter(
            f"unknown preset {name!r}; choose from auto, {', '.join(PRESETS)}", param_hint="'--preset'"
        )
    data = load_folder(images, masks, settings.classes)
    instances = {c: n for c, n in instance_counts(data.masks, data.classes).items() if n}
    typer.echo(f"defect-gen ({name}): {len(data.images)} images, defect instances {instances}", err=True)
    model_dir = train_defect_gen(
        data.images,
        data.masks,
        data.classes,
        _defect_gen_cache(settings),
        config=None if name == "auto" else name,
        seed=seed,
    )
    typer.echo(str(model_dir))  # alone on stdout: MODEL=$(loom augment train ...)


@augment_app.command("generate")
def augment_generate(
    class_name: str = typer.Option(..., "--class", help="The defect class to add."),
    n: int = typer.Option(..., "--n", "-n", min=1, help="Pairs wanted."),
    normals: Path = typer.Option(
        ..., "--normals", help="Defect-free images to add defects to (a folder, or a Loom dataset folder)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (images/, masks/, classes.json)."),
    model: Path = typer.Option(
        None, "--model", help="Defect-Gen folder (default: the newest one `loom augment train` made)."
    ),
    mode: str = typer.Option("defect_gen", "--mode", help="defect_gen or copy_paste."),
    images: Path = typer.Option(None, "--images", help="copy_paste: labeled images to cut defects from."),
    masks: Path = typer.Option(None, "--masks", help="copy_paste: their class masks <stem>.png."),
    seed: int = typer.Option(0, "--seed"),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Add N defects of one class to normal images (Defect-Gen or copy-paste) and write the pairs."""
    from functools import partial

    from loom.stages.augment import (
        MODES,
        copy_paste_pairs,
        generate_pairs,
        generator_fits,
        instance_counts,
        load_folder,
        load_normals,
        load_pipeline,
        newest_model,
        write_pairs,
    )

    settings = load_settings(workspace)
    if mode not in MODES:
        raise typer.BadParameter(
            f"unknown mode {mode!r}; choose from {', '.join(MODES)}", param_hint="'--mode'"
        )
    # The class is checked against what the model / the labeled set knows before any normal image is read.
    if mode == "defect_gen":
        cache = _defect_gen_cache(settings)
        model_dir = model or newest_model(cache)
        if model_dir is None:
            raise FileNotFoundError(
                f"no Defect-Gen model under {cache}: run `loom augment train` or pass --model"
            )
        pipeline = load_pipeline(model_dir)  # cached: generate_pairs below reuses it
        classes = list(pipeline.class_names)
        learned = {c: int(pipeline.stats.get(c, {}).get("instances", 0)) for c in classes}
        _check_class(class_name, classes, learned, f"the model {model_dir}")
        typer.echo(f"defect-gen model: {model_dir}", err=True)
        if not generator_fits(model_dir).get(class_name, True):
            typer.echo(
                f"note: most {class_name} defects are larger than the generator's square; they come out "
                "shorter than they are (the round copy-pastes such classes: --mode copy_paste)",
                err=True,
            )
        make = partial(generate_pairs, model_dir, class_name, n, seed=seed)
    else:
        if images is None:
            raise typer.BadParameter("copy_paste needs labeled defects to cut", param_hint="'--images'")
        data = load_folder(images, masks, settings.classes)
        classes = data.classes
        _check_class(class_name, classes, instance_counts(data.masks, classes), f"the labeled set {images}")
        class_id = classes.index(class_name) + 1
        make = partial(copy_paste_pairs, data.images, data.masks, class_id, n, seed=seed)
    normal_images = load_normals(normals, settings.classes)
    if not normal_images:
        raise FileNotFoundError(f"no defect-free images in {normals} to add defects to")
    pairs, counts = make(normals=normal_images)
    names = [f"{mode}-{class_name}-s{seed}-{k:04d}" for k in range(len(pairs))]
    write_pairs(out, pairs, names, classes)
    rejected = ", ".join(f"{reason} {count}" for reason, count in counts.items() if reason != "accepted")
    typer.echo(f"{len(pairs)} of {n} {class_name} pairs ({mode}) written to {out}")
    typer.echo(f"accepted {counts.get('accepted', len(pairs))}; rejected: {rejected or 'none'}")


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
