"""Shared fixtures: a fresh workspace for unit tests, and one real local stack per test session.

The stack runs on its own ports (not 8080/4200/5000/9090), so tests never touch a stack a developer has up;
when one of them is taken (say, by a second test session), the whole set moves to free ports.
With ``LOOM_TEST_REUSE_STACK=1`` the stack lives in a fixed temporary workspace and stays up after the
session, so the next session starts in seconds instead of waiting for Label Studio's migrations.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from loom.config import PROJECT_ROOT, Settings, load_settings

logger = logging.getLogger(__name__)
TEST_PORTS = {
    "LOOM_LS_PORT": "18080",
    "LOOM_PREFECT_PORT": "14200",
    "LOOM_MLFLOW_PORT": "15000",
    "LOOM_BACKEND_PORT": "19090",
}


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _test_ports() -> dict[str, str]:
    if all(_port_is_free(int(port)) for port in TEST_PORTS.values()):
        return dict(TEST_PORTS)
    moved = {key: str(_free_port()) for key in TEST_PORTS}
    logger.warning("Test ports %s are taken: the test stack uses %s", TEST_PORTS, moved)
    return moved


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings of an empty workspace (no servers)."""
    return load_settings(tmp_path / "ws")


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a workspace whose Label Studio, Prefect (+ worker) and MLflow UI are up and healthy."""
    from loom.services import stack

    reuse = os.environ.get("LOOM_TEST_REUSE_STACK") == "1"
    if reuse:
        workspace = Path(tempfile.gettempdir()) / "loom-test-stack"
    else:
        workspace = tmp_path_factory.mktemp("stack") / "ws"
    # A reused stack keeps its ports: the fixed set is what it was started on.
    ports = dict(TEST_PORTS) if reuse else _test_ports()
    overrides = {**ports, "LOOM_WORKSPACE": str(workspace)}
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    # The click model the backend pre-trains at start: the tiny configuration (seconds, not minutes).
    workspace.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"]["clicker_preset"] = "tiny"
    # The relay's safety-net sweep only at the backend's start: what resumes a round in the tests is the
    # webhook or the deadline's timer, never a sweep that happened to come first.
    params["review_relay_poll_s"] = 3600
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(workspace)
    try:
        stack.up(settings)
        yield settings
    finally:
        if not reuse:
            # Flows ran against this Prefect server: send their last logs before it goes away.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=30)
            stack.down(settings)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
