"""MLflow adapter: log a round's evaluation, register its student, promote a champion by alias.

Where runs go (:func:`tracking_uri`): while the workspace's MLflow server (``loom up``) answers, through
it, over its REST API, with artifacts uploaded to and served by it (``mlflow-artifacts:/``): the path a
deployed tracking server takes. With no stack (embedded mode: a test, a laptop), straight into the
workspace's sqlite store (``settings.mlflow_tracking_uri``, the server's own backend store) with artifacts
in a local folder. A workspace whose artifacts the server serves needs that server: with it down, logging
fails with :class:`TrackingError` naming it, instead of writing somewhere the server never looks.

The student is registered as a pyfunc model whose only payload is the student folder
(``config.json`` + ``model.safetensors``) under ``artifacts/``. Loom never loads it through pyfunc
(that would unpickle a Python object): ``download_student`` fetches the folder and the student code
reads the safetensors directly. Promotion uses registry aliases (stages are deprecated): ``champion`` is
the model in service, ``challenger`` the latest round's best, whether it won or not.

Cost: the first call in a workspace creates the sqlite schema (a few seconds); after that a round is
logged and registered in about half a second, because ``pip_requirements`` is given explicitly and
MLflow skips inferring the environment.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests

# Loom runs offline on loopback: keep MLflow from starting its usage telemetry (read at import time).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A server that is down should fail a call in seconds (the task retries it), not after MLflow's default
# seven retries with doubling back-off (minutes).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from loom.config import Settings
from loom.journal import fault_point

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "loom"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"  # the latest round's best model, promoted or not
STUDENT_ARTIFACT = "student"  # key of the student folder among the pyfunc model's artifacts
STUDENT_FILES = ("config.json", "model.safetensors")
# What the registered model needs to be read back; listing it skips MLflow's slow dependency inference.
PIP_REQUIREMENTS = ["safetensors", "numpy", "torch"]


@dataclass(frozen=True)
class RoundRun:
    run_id: str
    model_version: str
    experiment_id: str


class StudentArtifact(PythonModel):
    """Registry wrapper around a student folder; it carries no weights of its own and does not predict."""

    def load_context(self, context: PythonModelContext) -> None:
        self.student_dir = Path(context.artifacts[STUDENT_ARTIFACT])

    def predict(
        self, context: PythonModelContext, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[str]:
        raise TypeError(
            "this registered model only stores a Loom student (config.json + model.safetensors); "
            "run `loom predict` to use it"
        )


# ---- connection ---------------------------------------------------------------------------------


F = TypeVar("F", bound=Callable[..., Any])


class TrackingError(RuntimeError):
    """MLflow failed or is unreachable; the message names the server or store and what to do."""


def server_answers(settings: Settings) -> bool:
    """Whether this workspace's own MLflow server (started by ``loom up``, not any server on that port)
    runs and answers its health check."""
    from loom.services import stack

    if stack.service_pid(settings, "mlflow") is None:
        return False
    try:
        return requests.get(f"{settings.mlflow_ui_url}/health", timeout=5).ok
    except requests.RequestException:
        return False


def tracking_uri(settings: Settings) -> str:
    """The workspace's MLflow server while it answers, else its sqlite store (embedded mode)."""
    return settings.mlflow_ui_url if server_answers(settings) else settings.mlflow_tracking_uri


def _names_the_server(fn: F) -> F:
    """Turn MLflow's own failures in ``fn`` (first argument: the settings) into a :class:`TrackingError`
    that names where the runs go and what to do."""

    @functools.wraps(fn)
    def wrapper(settings: Settings, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(settings, *args, **kwargs)
        except (MlflowException, requests.RequestException) as err:
            where = f"the MLflow server at {settings.mlflow_ui_url}"
            if not server_answers(settings):
                where = f"{where} (not answering) / the store {settings.mlflow_tracking_uri}"
            cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise TrackingError(
                f"MLflow failed in {fn.__name__} ({where}): {cause}. Check the server with `loom status` and "
                "start it with `loom up`; an interrupted round finishes with `loom round --resume`"
            ) from err

    return wrapper  # type: ignore[return-value]


def _connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the workspace's tracking server or store (process-wide: MLflow's fluent API needs
    it); return a client."""
    (settings.stack_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        served = experiment.artifact_location.startswith("mlflow-artifacts:")
        if served and not client.tracking_uri.startswith("http"):
            raise TrackingError(
                f"the MLflow server at {settings.mlflow_ui_url} does not answer, and it serves this "
                f"workspace's artifacts ({experiment.artifact_location}); start it with `loom up`, then "
                "rerun (`loom round --resume` finishes an interrupted round)"
            )
        return experiment.experiment_id
    if client.tracking_uri.startswith("http"):  # the server's default: artifacts it serves
        return client.create_experiment(EXPERIMENT_NAME)
    settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT_NAME, artifact_location=settings.mlflow_artifacts_dir.as_uri())


def _check_student_dir(model_dir: Path, required: tuple[str, ...] = STUDENT_FILES) -> None:
    missing = [name for name in required if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"student folder {model_dir} lacks {', '.join(missing)}; "
            "save the trained student (config.json + model.safetensors) there before logging the round"
        )


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    kept = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if len(kept) < len(metrics):
        logger.warning("not logging undefined metrics: %s", ", ".join(sorted(set(metrics) - set(kept))))
    return kept


# ---- logging a round ---------------------------------------------------------------------------------


@_names_the_server
def log_round(
    settings: Settings,
    round_no: int,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    model_dir: Path,
    images: Mapping[str, np.ndarray] | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    registered: str | None = None,
    required: tuple[str, ...] = STUDENT_FILES,
    version_tags: Mapping[str, str] | None = None,
) -> RoundRun:
    """Log one round as an MLflow run and register its student as a new model version.

    Args:
        settings: the workspace's settings.
        round_no: the round number (tag ``loom.round`` and run name ``round-NNNN``).
        params: hyper-parameters; values are logged as strings.
        metrics: evaluation metrics; NaN/inf values are left out with a warning.
        model_dir: folder holding the student as ``config.json`` + ``model.safetensors``.
        images: named ``(H, W, 3)`` uint8 pictures (mask overlays), logged as ``overlays/<name>.png``.
        tags: extra run tags.
        run_name: defaults to ``round-NNNN``.
        registered: the registered model's name (default ``settings.registered_model``, the student;
            the click model is ``settings.registered_clicker``, Defect-Gen ``settings.registered_generator``).
        required: files ``model_dir`` must hold (a student's or the click model's by default).
        version_tags: tags of the registered version besides ``loom.round`` (to find it again on a retry).

    Returns:
        The run id, the registered model version and the experiment id.
    """
    model_dir = Path(model_dir)
    _check_student_dir(model_dir, required)
    name = registered or settings.registered_model
    client = _connect(settings)
    experiment_id = _experiment_id(client, settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"round-{round_no:04d}") as run:
        mlflow.set_tags({"loom.round": str(round_no), **(tags or {})})
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.log_metrics(_finite_metrics(metrics))
        for image_name, image in (images or {}).items():
            mlflow.log_image(np.asarray(image), artifact_file=f"overlays/{image_name}.png")
        info = mlflow.pyfunc.log_model(
            name=STUDENT_ARTIFACT,
            python_model=StudentArtifact(),
            artifacts={STUDENT_ARTIFACT: str(model_dir)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    fault_point(f"mlflow:registered:{name}")
    for key, value in {"loom.round": str(round_no), **(version_tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    logger.info(
        "round %d logged: run %s, %s version %s",
        round_no,
        run.info.run_id,
        name,
        version,
    )
    return RoundRun(run_id=run.info.run_id, model_version=version, experiment_id=experiment_id)


@_names_the_server
def log_figure(settings: Settings, run_id: str, image: np.ndarray, artifact_file: str) -> None:
    """Add an (H, W, 3) uint8 picture to a finished run (e.g. the round curve, drawn after the run)."""
    _connect(settings).log_image(run_id, np.asarray(image), artifact_file=artifact_file)


@_names_the_server
def version_tagged(settings: Settings, registered: str, key: str, value: str) -> str | None:
    """The registered version of ``registered`` whose tag ``key`` is ``value`` (a model logged before)."""
    client = _connect(settings)
    try:
        versions = client.search_model_versions(f"name='{registered}'")
    except MlflowException:
        return None
    found = [v for v in versions if (v.tags or {}).get(key) == value]
    return str(found[0].version) if found else None


@_names_the_server
def tag_version(settings: Settings, registered: str, version: str, key: str, value: str) -> None:
    _connect(settings).set_model_version_tag(registered, str(version), key, value)


@_names_the_server
def logged_version(
    settings: Settings, tags: Mapping[str, str], registered: str | None = None
) -> RoundRun | None:
    """The latest registered version carrying all of ``tags`` and its run, None if none does.

    A retried task uses this to find what its first try already logged instead of logging it twice.
    """
    client = _connect(settings)
    name = registered or settings.registered_model
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    found = [v for v in versions if tags.items() <= (v.tags or {}).items() and v.run_id]
    if not found:
        return None
    latest = max(found, key=lambda v: int(v.version))
    experiment_id = client.get_run(latest.run_id).info.experiment_id
    return RoundRun(run_id=latest.run_id, model_version=str(latest.version), experiment_id=experiment_id)


@_names_the_server
def recover_run(
    settings: Settings, tags: Mapping[str, str], registered: str | None = None
) -> RoundRun | None:
    """What an interrupted :func:`log_round` left with run tags ``tags``: a run whose model version was
    registered is finished (version tags set, run marked done) and returned; runs without a version are
    deleted. None when nothing usable was left.
    """
    client = _connect(settings)
    name = registered or settings.registered_model
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    kept: RoundRun | None = None
    for run in client.search_runs([experiment.experiment_id], filter_string=query):
        versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
        ours = [v for v in versions if v.name == name]
        if ours and kept is None:
            version = str(ours[0].version)
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "FINISHED")
            kept = RoundRun(run.info.run_id, version, experiment.experiment_id)
            logger.warning("recovered run %s (version %s) of an interrupted try", run.info.run_id, version)
        else:
            client.delete_run(run.info.run_id)
            logger.warning("deleted run %s left half-logged by an interrupted try", run.info.run_id)
    return kept


@_names_the_server
def version_tags(settings: Settings, version: str, registered: str | None = None) -> dict[str, str]:
    """The tags of one registered version."""
    client = _connect(settings)
    return dict(client.get_model_version(registered or settings.registered_model, str(version)).tags or {})


# ---- champion ------------------------------------------------------------------------------------------


def _champion_version(client: MlflowClient, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as err:
        # No registered model yet, or no version holds the alias (reported as an invalid parameter).
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(
            err
        ):
            return None
        raise


@_names_the_server
def champion(settings: Settings, registered: str | None = None) -> tuple[str, dict[str, float]] | None:
    """The version holding the ``champion`` alias and the metrics of the run that logged it; None if none."""
    client = _connect(settings)
    current = _champion_version(client, registered or settings.registered_model)
    if current is None:
        return None
    run_metrics = dict(client.get_run(current.run_id).data.metrics) if current.run_id else {}
    return str(current.version), run_metrics


@_names_the_server
def promote_if_better(
    settings: Settings,
    version: str,
    metrics: Mapping[str, float],
    metric: str = "miou",
    higher_is_better: bool = True,
    registered: str | None = None,
) -> bool:
    """Give ``version`` the ``champion`` alias if there is no champion or it strictly beats it on ``metric``.

    This compares stored metrics only; a round uses the promotion gate instead (``tasks.track``, which
    predicts the champion again on the round's test split and records through :func:`decide_champion`).
    The decision is recorded on the new version as tags ``promoted`` (true/false) and ``promotion_reason``.
    """
    client = _connect(settings)
    name = registered or settings.registered_model
    version = str(version)
    new_value = metrics.get(metric)
    current = _champion_version(client, name)
    old_value = None
    if current is not None and current.run_id:
        old_value = client.get_run(current.run_id).data.metrics.get(metric)

    if current is not None and str(current.version) == version:
        return True  # asked again (a retried task): keep the tags of the first decision
    if new_value is None or not math.isfinite(float(new_value)):
        promoted, reason = False, f"{metric} is undefined for this model"
    elif current is None:
        promoted, reason = True, "first model: no champion yet"
    elif old_value is None or not math.isfinite(old_value):
        promoted, reason = True, f"champion v{current.version} has no {metric}"
    else:
        better = new_value > old_value if higher_is_better else new_value < old_value
        relation = "beats" if better else "does not beat"
        promoted = better
        reason = f"{metric} {float(new_value):.4f} {relation} champion v{current.version} ({old_value:.4f})"

    return _record_decision(client, name, version, promoted, reason)


@_names_the_server
def decide_champion(
    settings: Settings,
    version: str,
    promoted: bool,
    reason: str,
    registered: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    challenger: bool = False,
    publish: bool = True,
) -> bool:
    """Record on ``version`` a decision the caller took (having measured both models in the same run):
    the ``champion`` alias when ``promoted``, the tags ``promoted`` and ``promotion_reason`` either way.

    Args:
        tags: more tags of the decision (``loom.promotion.*``), set on the version and on ``run_id``.
        run_id: the run that logged ``version``, to carry the same tags.
        challenger: also give ``version`` the ``challenger`` alias (the round's best, promoted or not).
        publish: move the ``champion`` alias now; a round passes False and calls :func:`set_champion`
            once its data is versioned, so no champion ever comes from an unversioned round.
    """
    return _record_decision(
        _connect(settings),
        registered or settings.registered_model,
        str(version),
        promoted,
        reason,
        tags=tags,
        run_id=run_id,
        challenger=challenger,
        publish=publish,
    )


@_names_the_server
def set_champion(settings: Settings, version: str, registered: str | None = None) -> None:
    """Give ``version`` the ``champion`` alias (idempotent: setting it again changes nothing)."""
    name = registered or settings.registered_model
    _connect(settings).set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    logger.info("%s version %s is the champion", name, version)


def _record_decision(
    client: MlflowClient,
    name: str,
    version: str,
    promoted: bool,
    reason: str,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    challenger: bool = False,
    publish: bool = True,
) -> bool:
    # Tags first, aliases last: a task that fails in between and is retried finds the decision in the tags
    # and repeats it (setting an alias to the version that holds it changes nothing). The caller's tags go
    # last, in their order, so the one it writes last can mark a complete record.
    all_tags = {"promotion_reason": reason, "promoted": str(promoted).lower(), **(tags or {})}
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, value)
    if run_id:
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
    if challenger:
        client.set_registered_model_alias(name, CHALLENGER_ALIAS, version)
    if promoted and publish:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    logger.info("%s version %s %s: %s", name, version, "promoted" if promoted else "not promoted", reason)
    return promoted


# ---- reading a student back ---------------------------------------------------------------------------


def _resolve_version(client: MlflowClient, settings: Settings, ref: str, name: str) -> str:
    if ref == CHAMPION_ALIAS:
        current = _champion_version(client, name)
        if current is None:
            raise LookupError(
                f"no champion for model '{name}' in the MLflow registry at {settings.mlflow_tracking_uri}; "
                "run a round first (`loom round`) so a student gets trained and promoted"
            )
        return str(current.version)
    if not str(ref).isdigit():
        raise ValueError(f"model reference must be 'champion' or a version number, got {ref!r}")
    try:
        client.get_model_version(name, str(ref))
    except MlflowException as err:
        raise LookupError(
            f"model '{name}' has no version {ref} in the MLflow registry at {settings.mlflow_tracking_uri}"
        ) from err
    return str(ref)


@_names_the_server
def download_student(
    settings: Settings, ref: str = CHAMPION_ALIAS, dst: Path | None = None, registered: str | None = None
) -> Path:
    """Fetch a registered student into a local folder holding ``config.json`` + ``model.safetensors``.

    Args:
        ref: ``"champion"`` or a version number.
        dst: where to download the model; by default a cache folder under ``<stack>/mlflow/downloads``
            named after the version and the run that logged it, reused while it exists (registered
            versions never change) and filled atomically, so concurrent readers never see half a model.

    Returns:
        The student folder inside the downloaded model.
    """
    client = _connect(settings)
    name = registered or settings.registered_model
    version = _resolve_version(client, settings, str(ref), name)
    model_uri = f"models:/{name}/{version}"
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return _student_folder(
            Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst))), name, version
        )

    run_id = client.get_model_version(name, version).run_id or "norun"
    cache = settings.stack_dir / "mlflow" / "downloads" / f"{name}-v{version}-{run_id[:12]}"
    if cache.is_dir():
        return _student_folder(cache, name, version)
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        mlflow.artifacts.download_artifacts(model_uri, dst_path=str(staging))
        _student_folder(staging, name, version)  # check before publishing
        try:
            staging.rename(cache)
        except OSError:
            if not cache.is_dir():  # another process published it first, else a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _student_folder(cache, name, version)


def _student_folder(root: Path, name: str, version: str) -> Path:
    for config in sorted(root.rglob(STUDENT_FILES[0])):
        if (config.parent / STUDENT_FILES[1]).is_file():
            return config.parent
    raise FileNotFoundError(
        f"model '{name}' version {version} (downloaded to {root}) holds no "
        f"{' + '.join(STUDENT_FILES)}; it was not logged by Loom's log_round"
    )
