"""The local stack: Label Studio, Prefect (server + process work pool + worker), the MLflow UI and
Loom's Label Studio ML backend (Defect-Click, ``loom backend``).

Every server runs on ``settings.ports.host`` (loopback) with all of its state under ``settings.stack_dir``:

```
stack/
  labelstudio/   LABEL_STUDIO_BASE_DATA_DIR (sqlite, media)
  prefect/       PREFECT_HOME (sqlite, profiles, result storage)
  mlflow/        mlflow.db + artifacts/ (rounds log through the server while it is up:
                 loom/services/tracking.py)
  backend/       the ML backend's records (interactions.jsonl, webhook events)
  pids/<name>.pid   "<pid>\\n<process start time>\\n" of the process-group leader
  logs/<name>.log   stdout + stderr, appended across starts
```
Each server is started in its own session (process group), detached from the caller, so ``loom up`` returns
while the servers keep running and ``loom down`` can signal a server together with all of its children.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import requests

from loom.config import PROJECT_ROOT, Settings

logger = logging.getLogger(__name__)

#: Services ``up`` knows; "prefect" brings its worker along.
SERVICES: tuple[str, ...] = ("labelstudio", "prefect", "mlflow", "backend")
#: The Prefect work pool the worker polls and prefect.yaml deploys to.
WORK_POOL = "loom-process"
WORKER = "prefect-worker"
#: Seconds a stopping Prefect worker gets before SIGKILL (see ``down``).
WORKER_STOP_S = 5.0

_LOG_TAIL_LINES = 30
_POLL_S = 0.5
_HTTP_TIMEOUT_S = 2.0
# Port settings per service: (field of Ports, environment variable that overrides it).
_PORT_KNOBS = {
    "labelstudio": ("label_studio", "LOOM_LS_PORT"),
    "prefect": ("prefect", "LOOM_PREFECT_PORT"),
    "mlflow": ("mlflow", "LOOM_MLFLOW_PORT"),
    "backend": ("backend", "LOOM_BACKEND_PORT"),
}
# Popen objects of servers this interpreter started: polling them reaps exited children (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """A server of the local stack cannot be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    """One process of the stack as ``status`` found it."""

    name: str
    running: bool  # the recorded process is alive
    healthy: bool  # ... and answers its health check
    url: str
    pid: int | None
    log_path: Path


@dataclass(frozen=True)
class StackStatus:
    """The processes of the stack, in start order; ``status["mlflow"]`` picks one by name."""

    services: tuple[ServiceStatus, ...]

    @property
    def all_healthy(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services)

    def __getitem__(self, name: str) -> ServiceStatus:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service {name!r}; known: {[s.name for s in self.services]}")

    def table(self) -> str:
        """A plain-text table (one row per process) for the CLI."""
        rows = [("SERVICE", "RUNNING", "HEALTHY", "PID", "URL", "LOG")]
        for s in self.services:
            yes_no = ("yes" if s.running else "no", "yes" if s.healthy else "no")
            rows.append((s.name, *yes_no, str(s.pid or "-"), s.url, str(s.log_path)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
            for row in rows
        )


# ---- environments ------------------------------------------------------------------------------------


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment variables a client process needs to talk to this stack's Prefect server."""
    return {
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_HOME": str(settings.stack_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def loom_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make another Loom process see the same workspace and ports."""
    return {
        "LOOM_WORKSPACE": str(settings.workspace),
        "LOOM_LS_PORT": str(settings.ports.label_studio),
        "LOOM_PREFECT_PORT": str(settings.ports.prefect),
        "LOOM_MLFLOW_PORT": str(settings.ports.mlflow),
        "LOOM_BACKEND_PORT": str(settings.ports.backend),
    }


def _venv_bin(name: str) -> Path:
    """A console script of the running interpreter's venv (prefect, mlflow)."""
    return Path(sys.executable).parent / name


def _label_studio_bin() -> Path:
    path = Path(os.environ.get("LOOM_LS_BIN") or PROJECT_ROOT / ".venv-ls" / "bin" / "label-studio")
    if not path.exists():
        raise StackError(
            f"labelstudio: no Label Studio executable at {path}. Run `make setup` (it builds .venv-ls) "
            "or point LOOM_LS_BIN at a label-studio executable."
        )
    return path


# ---- what each process runs -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


#: Addresses Label Studio must never send a request to: the special-purpose ranges of the IANA IPv4 and
#: IPv6 registries (RFC 6890 and successors), a superset of the list Label Studio 1.23 bans by default
#: (``validate_ip`` in label_studio/core/utils/io.py).
RESERVED_SUBNETS: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services live here)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.31.196.0/24",  # AS112
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",  # former 6to4 relay anycast
    "192.168.0.0/16",  # private
    "192.175.48.0/24",  # AS112 direct delegation
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved
    "255.255.255.255/32",  # limited broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated
    "64:ff9b::/96",  # IPv4/IPv6 translation
    "64:ff9b:1::/48",  # local IPv4/IPv6 translation
    "100::/64",  # discard
    "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)


def label_studio_banned_subnets(allowed_host: str) -> list[str]:
    """``RESERVED_SUBNETS`` with the single address ``allowed_host`` cut out of the ranges holding it.

    Label Studio's SSRF guard only bans (``USER_ADDITIONAL_BANNED_SUBNETS``, checked on every connection of
    ML backends and webhooks and on import URLs); it has no allow list. Its default list would refuse the
    ML backend on 127.0.0.1, so Loom turns the default off and passes this list instead: 127.0.0.0/8 becomes
    the 24 subnets that cover it all but 127.0.0.1. What stays open is that one address, on every port:
    the stack's own servers (Label Studio, Prefect's API, the MLflow UI, the backend).
    """
    try:
        allowed = ipaddress.ip_network(allowed_host)
    except ValueError:  # a host name: Label Studio checks the address it resolves to
        allowed = ipaddress.ip_network(socket.gethostbyname(allowed_host))
    banned: list[str] = []
    for subnet in map(ipaddress.ip_network, RESERVED_SUBNETS):
        if subnet.version == allowed.version and allowed.subnet_of(subnet):
            banned += [str(n) for n in sorted(subnet.address_exclude(allowed))]
        else:
            banned.append(str(subnet))
    return banned


def _labelstudio_launch(settings: Settings) -> _Launch:
    data_dir = settings.stack_dir / "labelstudio"
    env = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": settings.label_studio_admin,
        "LABEL_STUDIO_PASSWORD": settings.label_studio_password,
        "LABEL_STUDIO_USER_TOKEN": settings.label_studio_token,
        # Without the legacy token the bootstrapped token gets 401.
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        # Task data "/data/local-files/?d=images/<id>.png": the document root holds only the link to the
        # images folder, so the rest of the workspace (secrets, databases) is out of any storage's reach.
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(settings.label_studio_files_root),
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        # Empty DSNs switch off error reports to Label Studio's Sentry (they would carry request data).
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        # SSRF guard: Label Studio refuses URLs (ML backends, webhooks, imports) that resolve to a banned
        # subnet. Its default list bans all of loopback, the backend on 127.0.0.1 included, and it has no
        # allow list; so its default is swapped for the same reserved ranges with only the stack's host cut
        # out (see ``label_studio_banned_subnets``): private, link-local and the rest of loopback stay banned.
        "LABEL_STUDIO_USE_DEFAULT_BANNED_SUBNETS": "false",
        "LABEL_STUDIO_USER_ADDITIONAL_BANNED_SUBNETS": ",".join(
            label_studio_banned_subnets(settings.ports.host)
        ),
    }
    from loom.services.labelstudio import link_images

    link_images(settings)
    argv = [str(_label_studio_bin()), "start", "--no-browser"]
    argv += ["--internal-host", settings.ports.host, "--port", str(settings.ports.label_studio)]
    return _Launch(argv, env, data_dir)


def _prefect_server_launch(settings: Settings) -> _Launch:
    home = settings.stack_dir / "prefect"
    env = {
        **prefect_env(settings),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    }
    argv = [str(_venv_bin("prefect")), "server", "start"]
    argv += ["--host", settings.ports.host, "--port", str(settings.ports.prefect)]
    return _Launch(argv, env, home)


def _prefect_worker_launch(settings: Settings) -> _Launch:
    # Flow runs inherit this environment and cwd: they import the project and see the same workspace.
    env = {**prefect_env(settings), **loom_env(settings)}
    argv = [str(_venv_bin("prefect")), "--no-prompt", "worker", "start", "--pool", WORK_POOL]
    argv += ["--type", "process", "--name", f"loom-worker-{settings.ports.prefect}"]
    return _Launch(argv, env, PROJECT_ROOT)


def _mlflow_launch(settings: Settings) -> _Launch:
    mlflow_dir = settings.stack_dir / "mlflow"
    argv = [str(_venv_bin("mlflow")), "server", "--backend-store-uri", settings.mlflow_tracking_uri]
    # Rounds log through this server while it is up (loom/services/tracking.py): it takes their artifacts and
    # serves them (mlflow-artifacts:/), as a deployed tracking server does.
    argv += ["--serve-artifacts", "--artifacts-destination", str(settings.mlflow_artifacts_dir)]
    argv += ["--workers", "1"]
    argv += ["--host", settings.ports.host, "--port", str(settings.ports.mlflow)]
    # The job runner (GenAI scorers, ~7 extra processes, ~1.5 GB) is of no use to a UI-only server.
    return _Launch(argv, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_dir)


def _backend_launch(settings: Settings) -> _Launch:
    # The backend starts Prefect deployment runs (clicker fine-tuning) and reads the workspace's models.
    env = {**prefect_env(settings), **loom_env(settings)}
    argv = [str(_venv_bin("loom")), "backend", "--workspace", str(settings.workspace)]
    argv += ["--host", settings.ports.host, "--port", str(settings.ports.backend)]
    return _Launch(argv, env, settings.backend_dir)


# ---- health checks -----------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = _HTTP_TIMEOUT_S) -> object | None:
    try:
        response = requests.get(url, timeout=timeout)
        return response.json() if response.ok else None
    except (requests.RequestException, ValueError):
        return None


def _labelstudio_healthy(settings: Settings) -> bool:
    body = _get_json(f"{settings.label_studio_url}/health")
    return isinstance(body, dict) and body.get("status") == "UP"


def _prefect_healthy(settings: Settings) -> bool:
    return _get_json(f"{settings.prefect_api_url}/health") is True


def _mlflow_healthy(settings: Settings) -> bool:
    try:
        return requests.get(f"{settings.mlflow_ui_url}/health", timeout=_HTTP_TIMEOUT_S).ok
    except requests.RequestException:
        return False


def _backend_healthy(settings: Settings) -> bool:
    body = _get_json(f"{settings.backend_url}/health")
    return isinstance(body, dict) and body.get("status") == "UP"


def _worker_healthy(settings: Settings) -> bool:
    """The worker has sent a heartbeat to the pool since its process started."""
    record = _read_pid_file(settings, WORKER)
    if record is None:
        return False
    try:
        url = f"{settings.prefect_api_url}/work_pools/{WORK_POOL}/workers/filter"
        response = requests.post(url, json={}, timeout=_HTTP_TIMEOUT_S)
        workers = response.json() if response.ok else []
    except (requests.RequestException, ValueError):
        return False
    started_at = record[1] or 0.0
    for worker in workers:
        beat = worker.get("last_heartbeat_time")
        # A record left by an earlier worker of the same name may still read ONLINE: require a fresh beat.
        if beat and datetime.fromisoformat(beat).timestamp() >= started_at - 1.0:
            return True
    return False


@dataclass(frozen=True)
class _Process:
    name: str  # pid / log file stem and status row
    service: str  # the `up` service it belongs to
    port_field: str | None
    launch: Callable[[Settings], _Launch]
    healthy: Callable[[Settings], bool]
    url: Callable[[Settings], str]


_PROCESSES: dict[str, _Process] = {
    p.name: p
    for p in (
        _Process(
            "labelstudio",
            "labelstudio",
            "label_studio",
            _labelstudio_launch,
            _labelstudio_healthy,
            lambda s: s.label_studio_url,
        ),
        _Process(
            "prefect",
            "prefect",
            "prefect",
            _prefect_server_launch,
            _prefect_healthy,
            lambda s: f"http://{s.ports.host}:{s.ports.prefect}",
        ),
        _Process(
            WORKER,
            "prefect",
            None,
            _prefect_worker_launch,
            _worker_healthy,
            lambda s: f"http://{s.ports.host}:{s.ports.prefect}/work-pools/work-pool/{WORK_POOL}",
        ),
        _Process("mlflow", "mlflow", "mlflow", _mlflow_launch, _mlflow_healthy, lambda s: s.mlflow_ui_url),
        _Process("backend", "backend", "backend", _backend_launch, _backend_healthy, lambda s: s.backend_url),
    )
}


# ---- pid files and processes -------------------------------------------------------------------------


def _pid_path(settings: Settings, name: str) -> Path:
    return settings.stack_dir / "pids" / f"{name}.pid"


def _log_path(settings: Settings, name: str) -> Path:
    return settings.stack_dir / "logs" / f"{name}.log"


def _read_pid_file(settings: Settings, name: str) -> tuple[int, float | None] | None:
    """(pid, start time) recorded for a process, or None when there is no readable pid file."""
    try:
        lines = _pid_path(settings, name).read_text().split()
        return int(lines[0]), float(lines[1]) if len(lines) > 1 else None
    except (OSError, ValueError, IndexError):
        return None


def _is_alive(pid: int, started_at: float | None) -> bool:
    """True when ``pid`` runs and is the process we recorded (not a recycled pid, not a zombie)."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_at is None or abs(process.create_time() - started_at) < 1.0
    except psutil.Error:
        return False


def service_pid(settings: Settings, name: str) -> int | None:
    """The pid of a running service of this workspace's stack (a name of ``SERVICES`` or ``WORKER``)."""
    return _live_pid(settings, name)


def _live_pid(settings: Settings, name: str) -> int | None:
    """The pid of a running process of ours; a stale pid file is removed."""
    record = _read_pid_file(settings, name)
    if record is None:
        return None
    if _is_alive(*record):
        return record[0]
    logger.info("Removing stale pid file of %s (pid %d is gone)", name, record[0])
    _pid_path(settings, name).unlink(missing_ok=True)
    return None


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port held only by TIME_WAIT sockets of a stopped server counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _check_port_free(settings: Settings, process: _Process) -> None:
    if process.port_field is None:
        return
    port = getattr(settings.ports, process.port_field)
    if _port_in_use(settings.ports.host, port):
        field_name, env_var = _PORT_KNOBS[process.service]
        raise StackError(
            f"{process.name}: port {port} on {settings.ports.host} is already in use by another program. "
            f"Stop that program, or choose another port with the environment variable {env_var}=<port> "
            f"or `ports: {{{field_name}: <port>}}` in params.yaml."
        )


def _log_tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _launch(settings: Settings, process: _Process) -> int:
    """Start one process detached in its own session; returns the log offset where its output begins."""
    launch = process.launch(settings)
    log_path = _log_path(settings, process.name)
    launch.cwd.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        offset = log.tell()
        # argv carries no secrets (those travel in the environment), so it is safe to record.
        log.write(f"\n==== {datetime.now().isoformat(timespec='seconds')} {' '.join(launch.argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env={**os.environ, **launch.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: survives us, and down() signals the whole group
        )
    _children[popen.pid] = popen
    started_at = psutil.Process(popen.pid).create_time()
    _pid_path(settings, process.name).write_text(f"{popen.pid}\n{started_at}\n")
    logger.info("Started %s (pid %d) on %s, log %s", process.name, popen.pid, process.url(settings), log_path)
    return offset


def _group_members(pid: int, started_at: float | None) -> list[psutil.Process]:
    """The leader (if still ours), its descendants, and anything else left in its process group."""
    members: dict[int, psutil.Process] = {}
    if _is_alive(pid, started_at):
        leader = psutil.Process(pid)
        members[pid] = leader
        # Descendants that opened their own session would escape killpg: collect them explicitly.
        members.update({c.pid: c for c in leader.children(recursive=True)})
    for process in psutil.process_iter():
        try:
            if process.pid not in members and os.getpgid(process.pid) == pid:
                members[process.pid] = process
        except (OSError, psutil.Error):
            continue
    return list(members.values())


def _stop_processes(settings: Settings, names: Sequence[str], timeout_s: float) -> None:
    """SIGTERM the groups of ``names`` together, SIGKILL what is left after ``timeout_s``."""
    members: list[psutil.Process] = []
    for name in names:
        record = _read_pid_file(settings, name)
        if record is None:
            continue
        group = _group_members(*record)
        if group:
            logger.info("Stopping %s (pid %d, %d processes)", name, record[0], len(group))
        members += group
    for process in members:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    for process in alive:
        logger.warning("pid %d ignored SIGTERM for %.0f s: killing it", process.pid, timeout_s)
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)
    for name in names:
        record = _read_pid_file(settings, name)
        if record is not None and (popen := _children.pop(record[0], None)) is not None:
            popen.poll()  # reap
        _pid_path(settings, name).unlink(missing_ok=True)


# ---- Prefect work pool and deployments ---------------------------------------------------------------


def _run_prefect_cli(settings: Settings, args: list[str], what: str, timeout_s: float = 300) -> None:
    env = {**os.environ, **prefect_env(settings), **loom_env(settings)}
    argv = [str(_venv_bin("prefect")), "--no-prompt", *args]
    result = subprocess.run(
        argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
        command = " ".join(args)
        raise StackError(f"prefect: {what} failed (`prefect {command}`, exit {result.returncode}):\n{tail}")


def _ensure_work_pool(settings: Settings) -> None:
    """Create the process work pool unless the server already has it."""
    response = requests.get(f"{settings.prefect_api_url}/work_pools/{WORK_POOL}", timeout=10)
    if response.status_code == 404:
        logger.info("Creating Prefect work pool %s", WORK_POOL)
        args = ["work-pool", "create", WORK_POOL, "--type", "process"]
        _run_prefect_cli(settings, args, "creating the work pool")
    elif not response.ok:
        raise StackError(f"prefect: reading work pool {WORK_POOL} failed with HTTP {response.status_code}")


def deploy(settings: Settings) -> None:
    """Register the deployments of the project's prefect.yaml with this stack's Prefect server."""
    _register_deployments(settings)


def _register_deployments(settings: Settings) -> None:
    prefect_yaml = PROJECT_ROOT / "prefect.yaml"
    if not prefect_yaml.exists():
        raise StackError(f"prefect: no deployments to register: {prefect_yaml} does not exist.")
    if not _prefect_healthy(settings):
        raise StackError(
            f"prefect: the server at {settings.prefect_api_url} does not answer: start it with `loom up`."
        )
    logger.info("Deploying the flows of %s to %s", prefect_yaml, settings.prefect_api_url)
    _run_prefect_cli(settings, ["deploy", "--all"], "deploying prefect.yaml")


def connect_backend(settings: Settings) -> tuple[int, int]:
    """Connect the ML backend to the workspace's Label Studio project (created if missing) as its
    interactive model; returns (project id, ML backend id)."""
    from loom.services import labelstudio

    settings.images_dir.mkdir(parents=True, exist_ok=True)
    try:
        project_id = labelstudio.ensure_project(settings)
        return project_id, labelstudio.connect_ml_backend(settings, project_id)
    except labelstudio.LabelStudioError as err:
        raise StackError(f"backend: could not connect it to Label Studio: {err}") from err


def backend_connection(settings: Settings) -> str:
    """One line for `loom status`: which Label Studio project the backend serves, or why none."""
    from loom.services import labelstudio

    try:
        client = labelstudio.connect(settings)
        projects = [p for p in client.projects.list() if p.title == settings.project_title]
        if not projects:
            return f"backend: no Label Studio project {settings.project_title!r} yet (`loom up` creates it)"
        backend_id = labelstudio.ml_backend_id(settings, int(projects[0].id), client)
    except labelstudio.LabelStudioError as err:
        return f"backend: Label Studio not reachable ({err})"
    if backend_id is None:
        return f"backend: not connected to project {projects[0].id} (`loom up` connects it)"
    return f"backend: connected to Label Studio project {projects[0].id} as interactive model {backend_id}"


# ---- up / down / status ------------------------------------------------------------------------------


def _failure(settings: Settings, name: str, reason: str, log_offset: int = 0) -> StackError:
    log_path = _log_path(settings, name)
    tail = _log_tail(log_path, log_offset)
    return StackError(
        f"{name} {reason}. Log: {log_path}\n--- last {_LOG_TAIL_LINES} lines of the log ---\n{tail}"
    )


def _verify_label_studio_token(settings: Settings) -> None:
    data_dir = settings.stack_dir / "labelstudio"
    try:
        response = requests.get(
            f"{settings.label_studio_url}/api/current-user/whoami",
            headers={"Authorization": f"Token {settings.label_studio_token}"},
            timeout=30,
        )
    except requests.RequestException as err:
        raise StackError(f"labelstudio: {settings.label_studio_url} stopped answering: {err}") from err
    if response.status_code != 200:
        raise StackError(
            f"labelstudio: the server at {settings.label_studio_url} rejects the admin API token "
            f"(HTTP {response.status_code}). The token is set only when the database in {data_dir} is "
            "created: export the LOOM_LS_TOKEN it was created with, or remove that directory to start afresh."
        )


def _wait_healthy(
    settings: Settings,
    waiting: dict[str, int],
    started: list[str],
    with_worker: bool,
    deadline: float,
    timeout_s: float,
) -> None:
    """Poll until every process in ``waiting`` (name -> log offset) is healthy; the worker follows Prefect."""
    while waiting:
        for name, offset in list(waiting.items()):
            process = _PROCESSES[name]
            record = _read_pid_file(settings, name)
            # The pid file stays until the cleanup: children the leader left behind are found by its group.
            if record is None or not _is_alive(*record):
                raise _failure(settings, name, "exited before it became healthy", offset)
            if not process.healthy(settings):
                continue
            logger.info("%s is healthy at %s", name, process.url(settings))
            del waiting[name]
            if name == "prefect" and with_worker:
                _ensure_work_pool(settings)
                worker_offset = 0
                if _live_pid(settings, WORKER) is None:
                    worker_offset = _launch(settings, _PROCESSES[WORKER])
                    started.append(WORKER)
                waiting[WORKER] = worker_offset
        if not waiting:
            return
        if time.monotonic() > deadline:
            name, offset = next(iter(waiting.items()))
            reason = f"did not become healthy within {timeout_s:.0f} s (`loom down` + `loom up` restart it)"
            raise _failure(settings, name, reason, offset)
        time.sleep(_POLL_S)


def up(
    settings: Settings,
    services: Sequence[str] = SERVICES,
    timeout_s: float = 300,
    deploy: bool = False,
) -> StackStatus:
    """Start the services that are not running yet, all at once, and wait until they are healthy.

    Idempotent: a service whose recorded process is alive is left alone (and waited for if it is still
    starting). On failure, everything this call started is stopped again and a StackError names the
    service, its log and the end of that log.
    """
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"unknown services {sorted(unknown)}; choose from {list(SERVICES)}")
    for sub in ("labelstudio", "prefect", "mlflow/artifacts", "backend", "pids", "logs"):
        (settings.stack_dir / sub).mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    servers = [_PROCESSES[name] for name in SERVICES if name in services]
    to_start = [p for p in servers if _live_pid(settings, p.name) is None]
    for process in to_start:  # every port is checked before anything starts
        _check_port_free(settings, process)

    started: list[str] = []
    try:
        waiting = {}
        for process in to_start:
            waiting[process.name] = _launch(settings, process)
            started.append(process.name)
        waiting.update({p.name: 0 for p in servers if p.name not in waiting})
        _wait_healthy(settings, waiting, started, "prefect" in services, deadline, timeout_s)
        if "labelstudio" in services:
            _verify_label_studio_token(settings)
        if "labelstudio" in services and "backend" in services:
            connect_backend(settings)
        if deploy:
            _register_deployments(settings)
    except BaseException:
        if started:
            logger.warning("Stopping what this call started: %s", ", ".join(started))
            _stop_processes(settings, [n for n in started if n == WORKER], timeout_s=10)
            _stop_processes(settings, [n for n in started if n != WORKER], timeout_s=10)
        raise
    return status(settings, services)


def _drain_prefect_logs(timeout_s: float = 10.0) -> None:
    """Send this process's queued flow-run log lines to the Prefect server while it is still up: a line
    still queued after it stops makes the exiting process retry it (a minute, then an error). A process
    that never imported Prefect's log handlers (``loom down``) has nothing queued."""
    if "prefect.logging.handlers" in sys.modules:
        sys.modules["prefect.logging.handlers"].APILogWorker.drain_all(timeout=timeout_s)


def down(settings: Settings, timeout_s: float = 30) -> None:
    """Stop every server of the workspace with its children (SIGTERM, then SIGKILL after ``timeout_s``)."""
    _drain_prefect_logs()
    # The worker first: it would otherwise keep retrying a Prefect server that is already gone. It turns
    # SIGTERM into SIGINT and then idles; it holds no state, so it gets a few seconds, not ``timeout_s``.
    _stop_processes(settings, [WORKER], min(timeout_s, WORKER_STOP_S))
    _stop_processes(settings, [n for n in _PROCESSES if n != WORKER], timeout_s)


def stop(settings: Settings, services: Sequence[str], timeout_s: float = 30) -> None:
    """Stop some services of the workspace's stack (``up`` with the same names starts them again)."""
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"unknown services {sorted(unknown)}; choose from {list(SERVICES)}")
    _stop_processes(settings, [n for n, p in _PROCESSES.items() if p.service in services], timeout_s)


def status(settings: Settings, services: Sequence[str] = SERVICES) -> StackStatus:
    """Running / healthy / url / pid / log of each process of ``services`` (the worker goes with prefect)."""
    rows = []
    for process in _PROCESSES.values():
        if process.service not in services:
            continue
        pid = _live_pid(settings, process.name)
        healthy = pid is not None and process.healthy(settings)
        rows.append(
            ServiceStatus(
                name=process.name,
                running=pid is not None,
                healthy=healthy,
                url=process.url(settings),
                pid=pid,
                log_path=_log_path(settings, process.name),
            )
        )
    return StackStatus(tuple(rows))
