"""Run flows and stages from the CLI: pick the Prefect API, resolve model references, expand image paths.

The CLI is the top layer, so this module imports flows and tasks lazily; nothing below it imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loom.config import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@contextmanager
def prefect_api(settings: Settings) -> Iterator[str]:
    """Use the stack's Prefect server when it is up (runs show in its UI), else Prefect's ephemeral mode."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from loom import stack

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
    from loom.tracking import download_student

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


def teacher_predict_paths(
    settings: Settings, paths: Sequence[Path], out: Path, on_progress: Callable[[int], None] | None = None
) -> Path:
    """Backbone teacher over a pool of image files -> the prediction layout (unreadable files are skipped)."""
    import numpy as np

    from loom.imageio import ImageReadError, read_image
    from loom.predict import write_predictions
    from models.teacher.backbone import BackboneTeacher, TeacherConfig

    images, stems = [], []
    for p in paths:
        try:
            images.append(read_image(p))
            stems.append(p.stem)
        except ImageReadError as err:
            log.warning("%s", err)
    if len(images) < 2:
        raise ValueError(
            "the backbone teacher scores images against each other: give it at least 2 readable images"
        )
    teacher = BackboneTeacher(TeacherConfig(image_size=settings.round.image_size, seed=settings.round.seed))
    teacher.fit_pool(images)
    preds = teacher.predict_pool(images)
    defect_id = settings.class_index("defect")
    results = (
        (stem, p.anomaly_map, np.where(p.mask, defect_id, 0).astype(np.uint8), p.score, img)
        for stem, p, img in zip(stems, preds, images, strict=True)
    )
    return write_predictions(out, results, settings.classes, image_threshold=teacher.image_threshold)
