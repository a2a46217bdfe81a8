"""The Defect-Click ML backend against the real Label Studio, and its answers to bad requests."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import numpy as np
import pytest
import requests

from loom.config import Settings
from loom.data.imageio import write_png
from loom.datasets.fabric import render_sample
from loom.services import labelstudio as ls
from loom.services.backend import read_interactions

pytestmark = pytest.mark.integration
SECRETS = "../../stack/secrets.env"


def wait_for_clicker(settings: Settings, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = requests.get(f"{settings.backend_url}/health", timeout=10).json()["clicker"]
        assert not state.startswith("error"), state
        if state == "ready":
            return
        time.sleep(1)
    raise AssertionError("the backend's click model did not become ready")


@dataclasses.dataclass
class Project:
    settings: Settings
    project_id: int
    ml_backend: int
    annotator_token: str
    task_id: int
    image_id: str
    truth: np.ndarray  # (H, W) class mask of the task's image


@pytest.fixture(scope="module")
def project(stack_settings: Settings) -> Project:
    """A project of its own, connected to the backend, with one pre-annotated fabric image."""
    settings = dataclasses.replace(stack_settings, project_title=f"test-backend-{uuid.uuid4().hex[:8]}")
    project_id, ml_backend = ls.ensure_project(settings), None
    ml_backend = ls.connect_ml_backend(settings, project_id)
    sample = render_sample(3, 256, 256, defect_prob=1.0)
    image_id = f"backend-{uuid.uuid4().hex[:12]}"
    write_png(settings.images_dir / f"{image_id}.png", sample.image)
    teacher = np.roll(sample.mask, 5, axis=1)  # a pre-annotation that is a little off
    task_ids = ls.push_tasks(settings, project_id, [ls.TaskItem(image_id, teacher, 0.8, "teacher-test", 1)])
    token = ls.invite_annotator(settings, f"clicker-{uuid.uuid4().hex[:8]}@loom.local", "fabric-reviewer-2")
    wait_for_clicker(settings)
    return Project(settings, project_id, ml_backend, token, task_ids[image_id], image_id, sample.mask)


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    pick = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # a defect pixel near the centroid
    return float(xs[pick]), float(ys[pick])


def _label_of(project: Project) -> str:
    return project.settings.classes[int(np.bincount(project.truth[project.truth > 0]).argmax()) - 1]


def test_connected_as_interactive_model(project: Project) -> None:
    client = ls.connect(project.settings)
    backend = client.ml.get(project.ml_backend)
    assert backend.is_interactive and backend.auth_method == "BASIC_AUTH"
    assert backend.url.rstrip("/") == project.settings.backend_url
    assert ls.connect_ml_backend(project.settings, project.project_id) == project.ml_backend  # idempotent
    hooks = client.webhooks.list(project=project.project_id)
    assert [h.url for h in hooks] == [f"{project.settings.backend_url}/webhook"]


def test_interactive_request_through_label_studio_returns_a_brush_mask(project: Project) -> None:
    height, width = project.truth.shape
    x, y = _centre(project.truth)
    label = _label_of(project)
    session = requests.Session()
    point = ls.keypoint_result(x, y, width, height, label, True)
    first = ls.interactive_annotate(
        project.settings, session, project.annotator_token, project.ml_backend, project.task_id, [point]
    )
    assert first["model_version"].startswith("loom-clicker")
    assert 0.0 <= first["score"] <= 1.0
    [region] = first["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [label]
    assert (region["original_height"], region["original_width"]) == (height, width)
    mask = ls.results_to_mask([region], height, width, [label]) > 0
    assert mask[int(y), int(x)], "the clicked pixel belongs to the answer"

    # A follow-up click on the same region: same region id, cached features (the head only).
    again = ls.keypoint_result(x + 1, y, width, height, label, True)
    second = ls.interactive_annotate(
        project.settings, session, project.annotator_token, project.ml_backend, project.task_id, [again]
    )
    assert second["result"][0]["id"] == region["id"]
    rows = read_interactions(project.settings, {project.task_id})
    assert [r["clicks"] for r in rows[-2:]] == [1, 2]
    assert rows[-2]["encoded"] is True and rows[-1]["encoded"] is False


def test_stale_key_points_are_not_fed_back(project: Project) -> None:
    """Without auto-accept the UI resends every key point of the label: answered ones count once."""
    height, width = project.truth.shape
    label = _label_of(project)
    session = requests.Session()
    x, y = _centre(project.truth)
    corner = (width - 6.0 if x < width / 2 else 5.0, height - 6.0 if y < height / 2 else 5.0)
    far = ls.keypoint_result(*corner, width, height, label, True)  # a region of its own, far away
    ls.interactive_annotate(
        project.settings, session, project.annotator_token, project.ml_backend, project.task_id, [far]
    )
    near = ls.keypoint_result(x, y, width, height, label, True)
    ls.interactive_annotate(
        project.settings, session, project.annotator_token, project.ml_backend, project.task_id, [far, near]
    )
    last = read_interactions(project.settings, {project.task_id})[-1]
    assert last["new_keypoints"] == 1 and last["clicks"] == 1  # `far` was not added to this region


def _post(settings: Settings, body: object, auth: tuple[str, str] | None = None) -> requests.Response:
    auth = auth or (settings.backend_user, settings.backend_password)
    return requests.post(f"{settings.backend_url}/predict", json=body, auth=auth, timeout=30)


def _interactive_body(project: Project, result: list, data: dict | None = None) -> dict:
    return {
        "tasks": [{"id": project.task_id, "data": data or {"image_id": project.image_id}}],
        "label_config": ls.label_config(project.settings.classes),
        "params": {"context": {"result": result}},
    }


def test_bad_requests_get_a_clear_4xx_and_the_backend_stays_up(project: Project) -> None:
    settings = project.settings
    height, width = project.truth.shape
    good = ls.keypoint_result(10, 10, width, height, "hole", True)
    outside = json.loads(json.dumps(good))
    outside["value"]["x"] = 140.0
    unknown = json.loads(json.dumps(good))
    unknown["value"]["keypointlabels"] = ["scratch"]
    cases = {
        "no key points": (_interactive_body(project, []), 400, "no smart key points"),
        "point outside": (_interactive_body(project, [outside]), 400, "outside the image"),
        "unknown label": (_interactive_body(project, [unknown]), 400, "unknown label 'scratch'"),
        "missing image": (
            _interactive_body(project, [good], {"image_id": "no-such-image"}),
            404,
            "not in the workspace",
        ),
        "path outside": (
            _interactive_body(
                project, [good], {"image": "/data/local-files/?d=images/../../stack/secrets.env"}
            ),
            400,
            "images folder",
        ),
        "not a task list": ({"tasks": "nope"}, 400, "'tasks' must be"),
    }
    for name, (body, status, words) in cases.items():
        response = _post(settings, body)
        assert response.status_code == status, (name, response.text)
        assert words in " ".join(response.json()["errors"]), (name, response.text)
    wrong = _post(settings, _interactive_body(project, [good]), auth=(settings.backend_user, "wrong"))
    assert wrong.status_code == 401 and "basic-auth" in wrong.json()["detail"]
    assert requests.post(f"{settings.backend_url}/predict", data="{", timeout=30).status_code == 401
    garbage = requests.post(
        f"{settings.backend_url}/predict",
        data="{not json",
        auth=(settings.backend_user, settings.backend_password),
        timeout=30,
    )
    assert garbage.status_code == 400
    assert requests.get(f"{settings.backend_url}/health", timeout=10).json()["status"] == "UP"
    assert _post(settings, _interactive_body(project, [good])).status_code == 200  # still answering


def test_webhook_records_annotation_events(project: Project) -> None:
    client = ls.connect(project.settings, token=project.annotator_token)
    events = project.settings.backend_dir / "events.jsonl"
    before = len(events.read_text().splitlines()) if events.exists() else 0
    client.annotations.create(
        id=project.task_id, result=ls.mask_to_results(project.truth, project.settings.classes)
    )
    deadline = time.monotonic() + 30
    rows: list[dict] = []
    while time.monotonic() < deadline and not rows:
        lines = events.read_text().splitlines()[before:] if events.exists() else []
        rows = [json.loads(line) for line in lines if '"ANNOTATION_CREATED"' in line]
        time.sleep(0.5)
    assert rows and rows[0]["task"] == project.task_id
