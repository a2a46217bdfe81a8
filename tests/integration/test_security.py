"""What the real stack keeps closed: Label Studio serves the images folder and nothing else (no path
spelling reaches ``stack/secrets.env``), its SSRF guard still refuses private, link-local and the rest of
the loopback addresses while the ML backend on 127.0.0.1 connects, and the backend wants its credentials.

No request here leaves the machine: the banned private addresses only go to Label Studio's webhook
validation, which refuses (or would store) a URL without connecting to it; what Label Studio does connect
to is a stand-in backend on a loopback address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from loom.config import Settings, read_workspace_secrets, secrets_path
from loom.data.imageio import write_png
from loom.services import labelstudio as ls
from loom.services.stack import label_studio_banned_subnets

pytestmark = pytest.mark.integration
_TIMEOUT = 30


@dataclasses.dataclass
class Served:
    settings: Settings
    project_id: int
    image_id: str
    image_bytes: bytes
    admin: requests.Session
    annotator: requests.Session


def _admin_session(settings: Settings) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {settings.label_studio_token}"
    return session


@pytest.fixture(scope="module")
def served(stack_settings: Settings) -> Iterator[Served]:
    """A project of its own with the local-files storage Loom adds, an image in the images folder, and
    two clients: the admin's token and a logged-in annotator's browser session (cookies, no token)."""
    settings = dataclasses.replace(stack_settings, project_title=f"test-security-{uuid.uuid4().hex[:8]}")
    project_id = ls.ensure_project(settings)
    image_id = f"security-{uuid.uuid4().hex[:12]}"
    rng = np.random.default_rng(0)
    write_png(settings.images_dir / f"{image_id}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    email, password = f"reviewer-{uuid.uuid4().hex[:8]}@loom.local", uuid.uuid4().hex
    ls.invite_annotator(settings, email, password)
    annotator = requests.Session()
    assert ls._submit_form(
        annotator, settings.label_studio_url, f"{settings.label_studio_url}/user/login/", email, password
    )
    admin = _admin_session(settings)
    image_bytes = (settings.images_dir / f"{image_id}.png").read_bytes()
    yield Served(settings, project_id, image_id, image_bytes, admin, annotator)
    admin.delete(f"{settings.label_studio_url}/api/projects/{project_id}/", timeout=_TIMEOUT)
    (settings.images_dir / f"{image_id}.png").unlink(missing_ok=True)


def _local_file(session: requests.Session, settings: Settings, raw_query: str) -> requests.Response:
    """GET /data/local-files/?d=... with the query sent byte for byte as given (no re-encoding)."""
    return session.get(
        f"{settings.label_studio_url}/data/local-files/?d={raw_query}",
        timeout=_TIMEOUT,
        allow_redirects=False,
    )


def _escapes(settings: Settings) -> list[str]:
    """Ways to name stack/secrets.env (and its neighbours) relative to stack/labelstudio-files/."""
    absolute = str(secrets_path(settings))
    return [
        "stack/secrets.env",
        "secrets.env",
        "../secrets.env",
        "images/../secrets.env",
        "images/../../secrets.env",
        "images/../../stack/secrets.env",
        "images/../../../stack/secrets.env",
        "images/../../../../../../../../.." + absolute,
        absolute,
        "/" + absolute,
        "file://" + absolute,
        "%2e%2e/secrets.env",
        "%2E%2E%2Fsecrets.env",
        "images%2F%2E%2E%2F%2E%2E%2Fsecrets.env",
        "images/%2e%2e/%2e%2e/%2e%2e/stack/secrets.env",
        "%252e%252e%252fsecrets.env",
        "..%5csecrets.env",
        "images/..%2f..%2fsecrets.env",
        "....//secrets.env",
        "images/../../labelstudio/label_studio.sqlite3",
        "images/../../mlflow/mlflow.db",
        "images/../../.secrets.lock",
    ]


def test_local_files_serve_the_image_and_refuse_secrets_for_admin_and_annotator(served: Served) -> None:
    settings = served.settings
    secret_values = [v.encode() for v in read_workspace_secrets(settings).values()]
    assert len(secret_values) >= 3 and secrets_path(settings).is_file()
    refused: dict[int, int] = {}
    for who, session in (("admin token", served.admin), ("annotator session", served.annotator)):
        image = _local_file(session, settings, f"images/{served.image_id}.png")
        assert image.status_code == 200, who
        assert image.content == served.image_bytes, who
        for escape in _escapes(settings):
            response = _local_file(session, settings, escape)
            # 404: inside the document root but no storage or no file; 500: Django's safe_join refused a path
            # outside the document root (SuspiciousFileOperation, which Label Studio's handler turns into a
            # 500) before anything was opened.
            assert response.status_code in (400, 403, 404, 500), (who, escape, response.status_code)
            leaked = [i for i, value in enumerate(secret_values) if value in response.content]
            assert not leaked, (who, escape, "the response holds a secret")
            assert b"LOOM_" not in response.content, (who, escape)
            refused[response.status_code] = refused.get(response.status_code, 0) + 1
    # Someone with neither token nor session gets not even the image.
    anonymous = _local_file(requests.Session(), settings, f"images/{served.image_id}.png")
    assert anonymous.status_code in (401, 403) and anonymous.content != served.image_bytes
    print(
        f"local-files: image served to both; {sum(refused.values())} escapes refused, by status {refused}; "
        f"anonymous: {anonymous.status_code}"
    )


# ---- SSRF ---------------------------------------------------------------------------------------


class _StandInBackend(BaseHTTPRequestHandler):
    """Answers Label Studio's ML-backend checks like a backend would, and remembers who called."""

    calls: list[str]

    def do_GET(self) -> None:
        self.calls.append(f"GET {self.path}")
        self._answer({"status": "UP", "model_class": "StandIn"})

    def do_POST(self) -> None:
        self.calls.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer({"model_version": "stand-in"})

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


StartStandIn = Callable[[str], tuple[str, list[str]]]


@pytest.fixture
def stand_in() -> Iterator[StartStandIn]:
    """Start stand-in backends on given loopback addresses; returns (url, calls) per start."""
    servers: list[ThreadingHTTPServer] = []

    def start(host: str) -> tuple[str, list[str]]:
        calls: list[str] = []
        handler = type("Handler", (_StandInBackend,), {"calls": calls})
        server = ThreadingHTTPServer((host, 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_address[1]}", calls

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _ml_backend(
    session: requests.Session, settings: Settings, project_id: int, url: str
) -> requests.Response:
    body = {"project": project_id, "url": url, "title": "stand-in", "is_interactive": False}
    return session.post(f"{settings.label_studio_url}/api/ml/", json=body, timeout=_TIMEOUT)


def test_ssrf_guard_refuses_other_loopback_addresses_but_lets_the_backend_host_in(
    served: Served, stand_in: StartStandIn
) -> None:
    settings = served.settings
    # The same stand-in backend, once on the stack's host and once on another loopback address.
    allowed_url, allowed_calls = stand_in(settings.ports.host)
    banned_url, banned_calls = stand_in("127.0.0.2")

    refused = _ml_backend(served.admin, settings, served.project_id, banned_url)
    assert refused.status_code == 403, refused.text
    assert "reserved network address" in refused.json()["detail"]
    assert banned_calls == [], "Label Studio connected to a banned address"

    accepted = _ml_backend(served.admin, settings, served.project_id, allowed_url)
    assert accepted.status_code == 201, accepted.text
    assert any(call.startswith("GET /health") for call in allowed_calls)
    served.admin.delete(f"{settings.label_studio_url}/api/ml/{accepted.json()['id']}", timeout=_TIMEOUT)
    # Label Studio added a webhook to the stand-in on its own when the backend was added: gone with it.
    for hook in ls.connect(settings).webhooks.list(project=served.project_id):
        if (hook.url or "").startswith(allowed_url):
            ls.connect(settings).webhooks.delete(hook.id)


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "127.0.0.2"],
)
def test_ssrf_guard_refuses_private_and_link_local_webhooks(served: Served, address: str) -> None:
    """Webhook URLs are checked when they are saved; an inactive webhook with no actions is never sent, so
    not even a guard that failed would make Label Studio send a request to these addresses."""
    settings = served.settings
    banned = [ipaddress.ip_network(net) for net in label_studio_banned_subnets(settings.ports.host)]
    assert any(ipaddress.ip_address(address) in net for net in banned)  # the list Loom gave Label Studio
    body = {
        "project": served.project_id,
        "url": f"http://{address}/latest/meta-data/",
        "is_active": False,
        "send_payload": False,
        "send_for_all_actions": False,
        "actions": [],
    }
    response = served.admin.post(f"{settings.label_studio_url}/api/webhooks/", json=body, timeout=_TIMEOUT)
    if response.status_code == 201:  # clean up before failing
        served.admin.delete(
            f"{settings.label_studio_url}/api/webhooks/{response.json()['id']}/", timeout=_TIMEOUT
        )
    assert response.status_code == 403, (address, response.status_code, response.text[:300])
    assert "reserved network address" in response.text


def test_the_projects_webhook_to_the_backend_on_loopback_is_accepted(served: Served) -> None:
    """The other side of the guard: Loom's own webhook (127.0.0.1, the backend's port) is saved."""
    settings = served.settings
    ls.connect_ml_backend(settings, served.project_id)
    hooks = ls.connect(settings).webhooks.list(project=served.project_id)
    assert f"{settings.backend_url}/webhook" in [h.url for h in hooks]


# ---- the ML backend's credentials ----------------------------------------------------------------


BACKEND_ROUTES = ("/setup", "/predict", "/webhook", "/review/suspended", "/train")


def test_every_backend_route_but_health_wants_the_credentials(stack_settings: Settings) -> None:
    settings = stack_settings
    user, password = settings.backend_user, settings.backend_password
    wrong = {
        "none": None,
        "wrong password": (user, password[:-1] + ("0" if password[-1] != "0" else "1")),
        "wrong user": (user + "x", password),
        "empty": ("", ""),
        "token instead": (user, settings.label_studio_token),
    }
    for route in BACKEND_ROUTES:
        for name, auth in wrong.items():
            response = requests.post(f"{settings.backend_url}{route}", json={}, auth=auth, timeout=_TIMEOUT)
            assert response.status_code == 401, (route, name, response.status_code)
            assert response.headers.get("WWW-Authenticate") == "Basic", (route, name)
            assert password not in response.text and settings.label_studio_token not in response.text
        bearer = requests.post(
            f"{settings.backend_url}{route}",
            json={},
            headers={"Authorization": f"Bearer {password}"},
            timeout=_TIMEOUT,
        )
        assert bearer.status_code == 401, (route, "bearer")
        # With the credentials the request passes the gate (a body that is not JSON: 400, nothing starts).
        right = requests.post(
            f"{settings.backend_url}{route}", data="{", auth=(user, password), timeout=_TIMEOUT
        )
        assert right.status_code == 400, (route, right.status_code)
    health = requests.get(f"{settings.backend_url}/health", timeout=_TIMEOUT)
    assert health.status_code == 200 and password not in health.text
