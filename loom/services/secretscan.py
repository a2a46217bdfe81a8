"""Looks for the workspace's secrets wherever a round leaves traces: a leak check, not a guard.

The secrets are the values of ``stack/secrets.env`` and of the ``LOOM_*`` secret environment variables
(the Label Studio admin token and password, the ML backend's password, generated annotator passwords).
Places scanned (:data:`SOURCES`; Label Studio's own database is not one: it must hold the admin token
and the backend's credentials, and only Label Studio reads it):

- ``rounds``:  every ``rounds/*/round.json``
- ``mlflow``:  every file under ``stack/mlflow`` (the sqlite store and the artifacts), and every run's params
  and tags plus the registry's model-version tags, read through ``MlflowClient``
- ``logs``:    every log or record file under ``stack/`` (``stack/logs/*``, ``*.log``, ``*.jsonl``, ...)
- ``prefect``: the flow-run logs on the stack's Prefect server (all of them; the round flow runs named by
  the round records are counted apart, and must be there), and the files under ``stack/prefect`` (its
  sqlite database: flow-run parameters, states, deployments' job variables)
- ``git``:     ``git log -p --all`` of the workspace's own repository
- ``dvc``:     every file of the DVC remote

Besides each value as it is, a secret is searched as base64 (alone, and as the ``user:password`` pair of a
basic-auth header), so a logged ``Authorization`` header is found too. A hit names the secret and the place,
never the value: the report can be printed and logged.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loom.config import SECRETS_FILE, Settings, read_workspace_secrets

logger = logging.getLogger(__name__)

#: Environment variables whose values are secrets when set (see ``Settings``).
SECRET_ENV_VARS: tuple[str, ...] = ("LOOM_LS_TOKEN", "LOOM_LS_PASSWORD", "LOOM_BACKEND_PASSWORD")
SOURCES: tuple[str, ...] = ("rounds", "mlflow", "logs", "prefect", "git", "dvc")
#: Shorter values are no secrets worth the name and would match by chance.
MIN_SECRET_CHARS = 8
#: Files under ``stack/`` that count as logs or records (besides everything in ``stack/logs``).
LOG_SUFFIXES: tuple[str, ...] = (".log", ".jsonl", ".out", ".err", ".txt")
_CHUNK = 1 << 20
_PREFECT_PAGE = 200


@dataclass(frozen=True)
class Hit:
    """A secret found somewhere: its name and the place, never its value."""

    secret: str
    where: str


@dataclass
class ScanReport:
    """What was scanned, source by source, and what was found."""

    files: int = 0
    bytes: int = 0
    log_lines: int = 0  # Prefect flow-run log lines
    round_log_lines: int = 0  # ... of them, lines of the flow runs the round records name
    params: int = 0  # MLflow params and tags (runs and model versions)
    runs: int = 0
    git_bytes: int = 0
    secrets: int = 0  # distinct secret values looked for
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # sources that could not be read, and why

    def count(self, source: str, what: str, n: int = 1) -> None:
        bucket = self.per_source.setdefault(source, {})
        bucket[what] = bucket.get(what, 0) + n

    def summary(self) -> str:
        """One line per source, then the totals; secret values never appear."""
        lines = [
            f"{source:8s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            for source, counts in self.per_source.items()
        ]
        lines.append(
            f"total    {self.secrets} secrets; {self.files} files, {self.bytes} bytes; "
            f"{self.log_lines} Prefect log lines ({self.round_log_lines} of round flow runs); "
            f"{self.params} MLflow params/tags of {self.runs} runs; git history {self.git_bytes} bytes; "
            f"{len(self.hits)} hits"
        )
        lines += [f"HIT      {hit.secret} in {hit.where}" for hit in self.hits]
        lines += [f"SKIPPED  {reason}" for reason in self.skipped]
        return "\n".join(lines)


def workspace_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Name -> value of every secret of the workspace: ``stack/secrets.env`` and the secret environment."""
    environ = os.environ if environ is None else environ
    found = dict(read_workspace_secrets(settings))
    for name in SECRET_ENV_VARS:
        if environ.get(name):
            found[f"env:{name}"] = environ[name]
    return {name: value for name, value in found.items() if len(value) >= MIN_SECRET_CHARS}


def needles(secrets: Mapping[str, str], basic_auth_user: str | None = None) -> dict[bytes, str]:
    """The byte strings to look for, each mapped to the name of its secret.

    Each value as it is and in base64; with ``basic_auth_user``, also the base64 of ``user:value``, the
    body of an ``Authorization: Basic`` header carrying that secret.
    """
    found: dict[bytes, str] = {}
    for name, value in secrets.items():
        raw = value.encode()
        found[raw] = name
        found[base64.b64encode(raw).rstrip(b"=")] = name
        if basic_auth_user:
            found[base64.b64encode(f"{basic_auth_user}:{value}".encode()).rstrip(b"=")] = name
    return found


class _Matcher:
    """Finds any of the needles in a stream of chunks (a needle split over two chunks included)."""

    def __init__(self, wanted: Mapping[bytes, str]) -> None:
        self.wanted = dict(wanted)
        self.overlap = max((len(n) for n in self.wanted), default=1) - 1

    def names_in(self, chunks: Iterable[bytes]) -> set[str]:
        names: set[str] = set()
        tail = b""
        for chunk in chunks:
            window = tail + chunk
            names.update(name for needle, name in self.wanted.items() if needle in window)
            tail = window[-self.overlap :] if self.overlap else b""
        return names


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _scan_files(
    report: ScanReport, matcher: _Matcher, source: str, paths: Iterable[Path], root: Path
) -> None:
    for path in sorted(set(paths)):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            names = matcher.names_in(_file_chunks(path))
            size = path.stat().st_size
        except OSError as exc:
            report.skipped.append(f"{source}: {path} unreadable ({type(exc).__name__})")
            continue
        report.files += 1
        report.bytes += size
        report.count(source, "files")
        report.count(source, "bytes", size)
        where = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        report.hits += [Hit(name, f"{source}: {where}") for name in sorted(names)]


def _scan_texts(report: ScanReport, matcher: _Matcher, source: str, texts: Iterable[tuple[str, str]]) -> int:
    """Scan (place, text) pairs; returns how many there were."""
    n = 0
    for where, text in texts:
        n += 1
        report.hits += [Hit(name, f"{source}: {where}") for name in sorted(matcher.names_in([text.encode()]))]
    return n


# ---- sources ------------------------------------------------------------------------------------


def _round_files(settings: Settings) -> list[Path]:
    return sorted(settings.rounds_dir.glob("*/round.json"))


def _log_files(settings: Settings) -> list[Path]:
    stack = settings.stack_dir
    if not stack.is_dir():
        return []
    found = [p for p in (stack / "logs").rglob("*") if p.is_file()]
    for path in stack.rglob("*"):
        if path.is_file() and path.suffix in LOG_SUFFIXES and path.name != SECRETS_FILE:
            found.append(path)
    return found


def _mlflow_texts(settings: Settings, report: ScanReport) -> Iterator[tuple[str, str]]:
    """Params and tags of every run of every experiment, and every model version's tags."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        yield f"experiment {experiment.experiment_id} name", experiment.name
        for key, value in (experiment.tags or {}).items():
            yield f"experiment {experiment.experiment_id} tag {key}", f"{key}={value}"
    ids = [e.experiment_id for e in experiments]
    token = None
    while ids:
        page = client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        for run in page:
            report.runs += 1
            run_id = run.info.run_id
            for key, value in run.data.params.items():
                yield f"run {run_id} param {key}", f"{key}={value}"
            for key, value in run.data.tags.items():
                yield f"run {run_id} tag {key}", f"{key}={value}"
        token = page.token
        if not token:
            break
    for model in client.search_registered_models():
        for key, value in (model.tags or {}).items():
            yield f"model {model.name} tag {key}", f"{key}={value}"
        for version in client.search_model_versions(f"name='{model.name}'"):
            for key, value in (version.tags or {}).items():
                yield f"model {model.name} v{version.version} tag {key}", f"{key}={value}"


def _round_flow_run_ids(settings: Settings) -> set[str]:
    import json

    ids = set()
    for path in _round_files(settings):
        try:
            run_id = json.loads(path.read_text()).get("prefect_flow_run_id")
        except (OSError, ValueError):
            continue
        if run_id:
            ids.add(str(run_id))
    return ids


def _prefect_texts(settings: Settings, report: ScanReport, round_runs: set[str]) -> Iterator[tuple[str, str]]:
    """Every flow-run log line the stack's Prefect server holds, page by page."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}),
        get_client(sync_client=True) as client,
    ):
        offset = 0
        while True:
            page = client.read_logs(limit=_PREFECT_PAGE, offset=offset)
            for log in page:
                run = str(log.flow_run_id) if log.flow_run_id else "-"
                report.log_lines += 1
                if run in round_runs:
                    report.round_log_lines += 1
                yield f"flow run {run} log {log.id}", log.message
            if len(page) < _PREFECT_PAGE:
                return
            offset += len(page)


def _git_history(workspace: Path) -> bytes:
    result = subprocess.run(
        ["git", "-C", str(workspace), "log", "-p", "--all", "--binary"],
        capture_output=True,
        timeout=600,
        check=True,
    )
    return result.stdout


def scan_workspace(
    settings: Settings,
    secrets: Mapping[str, str] | None = None,
    sources: Sequence[str] = SOURCES,
) -> ScanReport:
    """Scan ``sources`` of the workspace for ``secrets`` (default: :func:`workspace_secrets`).

    A source that cannot be read (Prefect down, no git repository) is named in ``report.skipped``, so a
    caller that wants the whole picture can insist on an empty list.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; choose from {list(SOURCES)}")
    secrets = workspace_secrets(settings) if secrets is None else secrets
    report = ScanReport(secrets=len(set(secrets.values())))
    matcher = _Matcher(needles(secrets, settings.backend_user))
    ws = settings.workspace

    if "rounds" in sources:
        _scan_files(report, matcher, "rounds", _round_files(settings), ws)
    if "mlflow" in sources:
        mlflow_dir = settings.stack_dir / "mlflow"
        _scan_files(report, matcher, "mlflow", (p for p in mlflow_dir.rglob("*") if p.is_file()), ws)
        try:
            n = _scan_texts(report, matcher, "mlflow", _mlflow_texts(settings, report))
            report.params += n
            report.count("mlflow", "params/tags", n)
            report.count("mlflow", "runs", report.runs)
        except Exception as exc:  # any store error: say so, the caller decides
            report.skipped.append(f"mlflow: the store did not answer ({type(exc).__name__}: {exc})")
    if "logs" in sources:
        _scan_files(report, matcher, "logs", _log_files(settings), ws)
    if "prefect" in sources:
        prefect_dir = settings.stack_dir / "prefect"
        _scan_files(report, matcher, "prefect", (p for p in prefect_dir.rglob("*") if p.is_file()), ws)
        try:
            n = _scan_texts(
                report, matcher, "prefect", _prefect_texts(settings, report, _round_flow_run_ids(settings))
            )
            report.count("prefect", "log lines", n)
            report.count("prefect", "round log lines", report.round_log_lines)
        except Exception as exc:  # unreachable server, HTTP error: say so, the caller decides
            report.skipped.append(
                f"prefect: {settings.prefect_api_url} did not answer ({type(exc).__name__})"
            )
    if "git" in sources:
        try:
            history = _git_history(ws)
        except (OSError, subprocess.SubprocessError) as exc:
            report.skipped.append(f"git: no history of {ws} ({type(exc).__name__})")
        else:
            report.git_bytes = len(history)
            report.count("git", "bytes", len(history))
            report.hits += [Hit(name, "git: log -p --all") for name in sorted(matcher.names_in([history]))]
    if "dvc" in sources:
        remote = settings.dvc_remote_dir
        _scan_files(report, matcher, "dvc", (p for p in remote.rglob("*") if p.is_file()), ws)
    return report


__all__ = [
    "SECRET_ENV_VARS",
    "SOURCES",
    "Hit",
    "ScanReport",
    "needles",
    "scan_workspace",
    "workspace_secrets",
]
