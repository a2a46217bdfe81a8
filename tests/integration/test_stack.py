"""The local stack against real servers on 127.0.0.1: start, reuse, fail clearly, stop cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from PIL import Image

from loom.config import PROJECT_ROOT, Settings, load_settings
from loom.services import stack

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _side_settings(workspace: Path) -> Settings:
    """A second workspace on free ports, apart from the session stack."""
    settings = load_settings(workspace)
    ports = replace(
        settings.ports,
        label_studio=_free_port(),
        prefect=_free_port(),
        mlflow=_free_port(),
        backend=_free_port(),
    )
    return replace(settings, ports=ports)


def _port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(path: Path) -> list[str]:
    """Processes whose command line or environment names ``path`` (the test process itself aside)."""
    needle = str(path)
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if needle in cmdline or any(needle in value for value in process.environ().values()):
                found.append(f"{process.pid}: {cmdline}")
        except psutil.Error:
            continue
    return found


@pytest.fixture
def side_settings(tmp_path: Path) -> Iterator[Settings]:
    settings = _side_settings(tmp_path / "side")
    yield settings
    stack.down(settings, timeout_s=10)  # whatever a failing test left behind


def test_status_shows_every_service_healthy(stack_settings: Settings) -> None:
    status = stack.status(stack_settings)

    assert status.all_healthy, status.table()
    assert [s.name for s in status.services] == [
        "labelstudio",
        "prefect",
        "prefect-worker",
        "mlflow",
        "backend",
    ]
    ports = stack_settings.ports
    assert status["backend"].url == f"http://127.0.0.1:{ports.backend}"
    assert status["labelstudio"].url == f"http://127.0.0.1:{ports.label_studio}"
    assert status["prefect"].url == f"http://127.0.0.1:{ports.prefect}"
    assert status["mlflow"].url == f"http://127.0.0.1:{ports.mlflow}"
    for service in status.services:
        assert service.running and service.pid is not None and service.log_path.is_file()
        assert str(service.pid) in status.table()
    assert requests.get(f"{stack_settings.prefect_api_url}/health", timeout=5).json() is True
    assert requests.get(f"{stack_settings.mlflow_ui_url}/health", timeout=5).ok


def test_up_again_leaves_running_servers_alone(stack_settings: Settings) -> None:
    before = {s.name: s.pid for s in stack.status(stack_settings).services}

    again = stack.up(stack_settings, timeout_s=60)

    assert again.all_healthy
    assert {s.name: s.pid for s in again.services} == before


def test_label_studio_token_and_workspace_files(stack_settings: Settings) -> None:
    url = stack_settings.label_studio_url
    headers = {"Authorization": f"Token {stack_settings.label_studio_token}"}
    me = requests.get(f"{url}/api/current-user/whoami", headers=headers, timeout=30)
    assert me.status_code == 200 and me.json()["email"] == stack_settings.label_studio_admin
    bad = requests.get(f"{url}/api/current-user/whoami", headers={"Authorization": "Token nope"}, timeout=30)
    assert bad.status_code == 401

    # Task data "/data/local-files/?d=images/<id>.png" resolves through the document root's link to the
    # images folder; nothing else of the workspace can be served, whatever storage a user adds.
    image_dir = stack_settings.images_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image_dir / "stack-check.png")
    project = requests.post(
        f"{url}/api/projects/", json={"title": "stack check"}, headers=headers, timeout=30
    )
    project.raise_for_status()
    project_id = project.json()["id"]
    link = stack_settings.label_studio_files_root / "images"
    try:
        storage = {"project": project_id, "path": str(link), "use_blob_urls": True, "title": "images"}
        requests.post(
            f"{url}/api/storages/localfiles/", json=storage, headers=headers, timeout=30
        ).raise_for_status()
        served = requests.get(
            f"{url}/data/local-files/", params={"d": "images/stack-check.png"}, headers=headers, timeout=30
        )
        assert served.status_code == 200
        assert served.content == (image_dir / "stack-check.png").read_bytes()
        for outside in (stack_settings.workspace, stack_settings.stack_dir, stack_settings.data_dir):
            wider = {**storage, "path": str(outside), "title": "too wide"}
            refused = requests.post(
                f"{url}/api/storages/localfiles/", json=wider, headers=headers, timeout=30
            )
            assert refused.status_code == 400, outside
        for escape in ("images/../../secrets.env", "../secrets.env", "../../stack/secrets.env"):
            leaked = requests.get(
                f"{url}/data/local-files/", params={"d": escape}, headers=headers, timeout=30
            )
            assert leaked.status_code != 200 and b"LOOM_LS_TOKEN" not in leaked.content, escape
    finally:
        requests.delete(f"{url}/api/projects/{project_id}/", headers=headers, timeout=30)
        (image_dir / "stack-check.png").unlink()


def test_worker_polls_the_work_pool(stack_settings: Settings) -> None:
    env = {**os.environ, **stack.prefect_env(stack_settings)}
    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "work-pool", "inspect", stack.WORK_POOL],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"name='{stack.WORK_POOL}'" in inspect.stdout and "type='process'" in inspect.stdout
    workers = requests.post(
        f"{stack_settings.prefect_api_url}/work_pools/{stack.WORK_POOL}/workers/filter", json={}, timeout=10
    ).json()
    assert any(w["status"] == "ONLINE" for w in workers), workers

    # Flow runs inherit the worker's environment and cwd: they must see this workspace.
    worker = psutil.Process(stack.status(stack_settings)["prefect-worker"].pid)
    assert worker.environ()["LOOM_WORKSPACE"] == str(stack_settings.workspace)
    assert worker.environ()["PREFECT_API_URL"] == stack_settings.prefect_api_url
    assert Path(worker.cwd()) == PROJECT_ROOT


def test_port_taken_by_another_program(side_settings: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", side_settings.ports.label_studio))
        squatter.listen()
        with pytest.raises(stack.StackError) as caught:
            stack.up(side_settings, services=("labelstudio",), timeout_s=30)

    message = str(caught.value)
    assert "labelstudio" in message and str(side_settings.ports.label_studio) in message
    assert "LOOM_LS_PORT" in message and "params.yaml" in message
    assert not stack.status(side_settings, services=("labelstudio",))["labelstudio"].running


def test_server_that_exits_reports_its_log_and_stops_the_rest(
    side_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "label-studio"
    broken.write_text(
        "#!/bin/sh\necho 'django.db.utils.OperationalError: disk I/O error (from the test)' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("LOOM_LS_BIN", str(broken))

    with pytest.raises(stack.StackError) as caught:
        stack.up(side_settings, services=("labelstudio", "mlflow"), timeout_s=60)

    message = str(caught.value)
    assert message.startswith("labelstudio")
    assert "disk I/O error (from the test)" in message
    assert str(side_settings.stack_dir / "logs" / "labelstudio.log") in message
    # MLflow started in the same call: it is stopped again, its port freed.
    status = stack.status(side_settings, services=("labelstudio", "mlflow"))
    assert not any(s.running for s in status.services), status.table()
    assert not _port_accepts(side_settings.ports.mlflow)


def test_corrupt_mlflow_database_is_reported(side_settings: Settings) -> None:
    db = side_settings.stack_dir / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(stack.StackError) as caught:
        stack.up(side_settings, services=("mlflow",), timeout_s=90)

    assert "mlflow" in str(caught.value) and "file is not a database" in str(caught.value)


def test_deploy_then_down_leaves_no_processes_and_frees_ports(side_settings: Settings) -> None:
    # A pid file of a process that is gone must not stop `up`.
    dead = subprocess.Popen(["true"])
    dead.wait()
    pids_dir = side_settings.stack_dir / "pids"
    pids_dir.mkdir(parents=True)
    (pids_dir / "mlflow.pid").write_text(f"{dead.pid}\n")

    status = stack.up(side_settings, services=("prefect", "mlflow"), timeout_s=180)
    assert status.all_healthy, status.table()
    assert _processes_mentioning(side_settings.workspace)

    stack.deploy(side_settings)
    wanted = {d["name"] for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["deployments"]}
    url = f"{side_settings.prefect_api_url}/deployments/filter"
    deployments = requests.post(url, json={}, timeout=10).json()
    assert {d["name"] for d in deployments} == wanted
    assert {d["work_pool_name"] for d in deployments} == {stack.WORK_POOL}

    stack.down(side_settings)

    assert _processes_mentioning(side_settings.workspace) == []
    assert not _port_accepts(side_settings.ports.prefect)
    assert not _port_accepts(side_settings.ports.mlflow)
    assert list(pids_dir.iterdir()) == []
    assert not any(s.running for s in stack.status(side_settings).services)
