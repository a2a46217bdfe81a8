"""Run flows and stages from the CLI: pick the Prefect API, resolve model references, expand image paths.

The CLI is the top layer, so this module imports flows and tasks lazily; nothing below it imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from loom.config import Settings
from loom.data.imageio import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Use the stack's Prefect server when it is up (runs show in its UI), else Prefect's ephemeral mode."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from loom.services import stack

    home = settings.stack_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    if stack.status(settings, services=("prefect",))["prefect"].healthy:
        with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url, PREFECT_HOME: str(home)}):
            yield settings.prefect_api_url
    else:
        log.info("Prefect server of %s is not up: using Prefect's ephemeral mode", settings.workspace)
        with temporary_settings(updates={PREFECT_HOME: str(home)}, set_defaults={PREFECT_API_URL: None}):
            yield "ephemeral"


def run_round(settings: Settings, **params: Any) -> dict[str, Any]:
    """One flywheel round in this process, as a Prefect flow run."""
    from flows.flywheel import flywheel_round

    with prefect_api(settings):
        clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()}
        return flywheel_round(workspace=str(settings.workspace), **clean)


def resume_suspended_round(settings: Settings) -> bool:
    """For ``loom round --resume``: resume the round in progress through Prefect if it is suspended for
    review (True; the worker finishes it), False when it was interrupted (the caller runs it again here).

    Raises:
        RoundBusy: no round is in progress, so there is nothing to resume.
    """
    from prefect.flow_runs import resume_flow_run

    from loom import journal
    from loom.services.review_relay import ReviewResumed, drop_pending
    from tasks.version import suspended_run

    current = journal.load(settings)
    if current is None:
        raise journal.RoundBusy(f"no round is in progress in {settings.workspace}: nothing to resume")
    with prefect_api(settings):
        waiting = suspended_run(settings)
        if waiting is None:
            log.info("round %d was interrupted at %s: finishing it here", current.round_no, current.reached)
            return False
        resume_flow_run(UUID(waiting), run_input=ReviewResumed(reason="manual", trigger="cli").model_dump())
    drop_pending(settings, waiting)
    log.info("round %d (flow run %s) resumed: the worker finishes it", current.round_no, waiting)
    return True


def run_task(task: Any, *args: Any) -> Any:
    """A single stage outside any flow run (plain function call, logging to the standard logger)."""
    return task.fn(*args)


def resolve_model(settings: Settings, ref: str | Path) -> Path:
    """A model folder as given, or 'champion' / a version number from the MLflow registry."""
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: pass a student folder saved by Loom")
        return path
    from loom.services.tracking import download_student

    return download_student(settings, str(ref))


def expand_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not out:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    return out


def _read_images(paths: Sequence[Path]) -> tuple[list, list[str]]:
    """Readable images and their stems; unreadable files are reported and skipped."""
    from loom.data.imageio import ImageReadError, read_image

    images, stems = [], []
    for p in paths:
        try:
            images.append(read_image(p))
            stems.append(p.stem)
        except ImageReadError as err:
            log.warning("%s", err)
    return images, stems


def teacher_predict_paths(
    settings: Settings,
    paths: Sequence[Path],
    out: Path,
    normals: Sequence[Path] = (),
    kind: str = "auto",
    shots: int | None = None,
    clip_checkpoint: Path | None = None,
) -> tuple[Path, str]:
    """A teacher over a pool of image files -> the prediction layout; returns (folder, which teacher and why).

    Up to `shots` of `normals` serve as known-good references (few-shot); the workspace's human labels, when
    it has any, name the regions (prototypes).
    """
    from loom.data import manifest
    from loom.data.human import human_references
    from loom.data.predict import write_predictions
    from loom.stages.teachers import build_prototypes, build_teacher, label_images
    from models.progress import track

    images, stems = _read_images(paths)
    if not images:
        raise ValueError("pseudo-label: none of the given images could be read (see the warnings above)")
    shots = settings.round.teacher_shots if shots is None else shots
    normal_images, _ = _read_images(list(normals)[:shots]) if shots > 0 else ([], [])
    teacher, why = build_teacher(settings, kind, clip_checkpoint)
    log.info("%s; %d normal references", why, len(normal_images))
    labeled_images, labeled_masks = [], []
    if settings.manifest_path.exists():
        _, labeled_images, labeled_masks = human_references(
            settings, manifest.usable(manifest.load(settings.manifest_path))
        )
    prototypes = build_prototypes(settings, labeled_images, labeled_masks, teacher)
    labeled = label_images(settings, teacher, images, normal_images, prototypes)
    results = (
        (stem, item.prediction.anomaly_map, item.class_mask, item.prediction.score, image)
        for stem, item, image in track(
            zip(stems, labeled, images, strict=True), "pseudo-label writing", len(stems)
        )
    )
    folder = write_predictions(out, results, settings.classes, image_threshold=teacher.image_threshold)
    return folder, why
