"""The Label Studio adapter and the simulated annotator against a real Label Studio on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid

import numpy as np
import pytest
import requests
from PIL import Image

from loom.config import Settings
from loom.services import labelstudio as ls
from loom.services.annotator import SimulatedAnnotator

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 24, 40


@pytest.fixture(scope="module")
def settings(stack_settings: Settings) -> Settings:
    """The stack's settings with a project of its own, so other tests' tasks never mix in."""
    return dataclasses.replace(stack_settings, project_title=f"test-labelstudio-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def project_id(settings: Settings) -> int:
    return ls.ensure_project(settings)


@pytest.fixture(scope="module")
def annotator_token(settings: Settings) -> str:
    return ls.invite_annotator(settings, f"annotator-{uuid.uuid4().hex[:8]}@loom.local", "fabric-reviewer-1")


def _truth_and_teacher(image_id: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth class mask and a teacher mask that gets it partly wrong; writes the image too."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    if seed % 3:  # every third image is defect-free
        truth[2:10, 3 + seed : 15 + seed] = 1 + seed % 6
        truth[14:20, 20:36] = 2
        truth[rng.random((HEIGHT, WIDTH)) < 0.02] = 6
    teacher = np.roll(truth, 2, axis=1)  # misplaced by two pixels
    teacher[0:3, 0:4] = 4  # and a spurious knot
    return truth, teacher


def _make_items(
    settings: Settings, n: int, start: int = 0
) -> tuple[list[ls.TaskItem], dict[str, np.ndarray]]:
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    items, truths = [], {}
    for seed in range(start, start + n):
        image_id = f"img-{uuid.uuid4().hex[:12]}"
        pixels = np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(settings.images_dir / f"{image_id}.png")
        truth, teacher = _truth_and_teacher(image_id, seed)
        items.append(
            ls.TaskItem(image_id, teacher, score=0.1 * (seed % 10), model_version="teacher-t1", round_no=1)
        )
        truths[image_id] = truth
    return items, truths


def test_ensure_project_is_idempotent(settings: Settings, project_id: int) -> None:
    assert ls.ensure_project(settings) == project_id
    client = ls.connect(settings)
    assert [p.id for p in client.projects.list() if p.title == settings.project_title] == [project_id]
    storages = client.import_storage.local.list(project=project_id)
    assert [s.path for s in storages] == [str(settings.label_studio_files_root / "images")]


def test_project_with_other_classes_is_refused(settings: Settings, project_id: int) -> None:
    other = dataclasses.replace(settings, classes=("scratch", "dent"))
    with pytest.raises(ls.LabelStudioError, match=r"labels classes .*hole.*scratch"):
        ls.ensure_project(other)


def test_push_tasks_creates_predictions_once(settings: Settings, project_id: int) -> None:
    items, _ = _make_items(settings, 4)
    task_ids = ls.push_tasks(settings, project_id, items)
    assert set(task_ids) == {item.image_id for item in items}

    client = ls.connect(settings)
    for item in items:
        task = client.tasks.get(id=task_ids[item.image_id])
        assert task.data["image_id"] == item.image_id and task.data["round"] == 1
        # The image resolves through the project's local-files storage.
        image = requests.get(
            settings.label_studio_url + task.data["image"],
            headers={"Authorization": f"Token {settings.label_studio_token}"},
            timeout=10,
        )
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        (prediction,) = client.predictions.list(task=task.id)
        assert prediction.model_version == "teacher-t1"
        assert prediction.score == pytest.approx(item.score)
        np.testing.assert_array_equal(
            ls.results_to_mask(prediction.result, HEIGHT, WIDTH, settings.classes), item.mask
        )

    assert ls.push_tasks(settings, project_id, items) == task_ids
    project_tasks = list(client.tasks.list(project=project_id, fields="task_only"))
    image_ids = [t.data["image_id"] for t in project_tasks]
    assert sorted(i for i in image_ids if i in task_ids) == sorted(task_ids)


def test_queued_tasks_get_the_new_teachers_pre_annotation(settings: Settings, project_id: int) -> None:
    """A task still waiting from an earlier round shows today's teacher; an answered one is left alone."""
    items, truths = _make_items(settings, 2, start=40)
    task_ids = ls.push_tasks(settings, project_id, items)
    client = ls.connect(settings)
    answered, waiting = items
    client.annotations.create(
        id=task_ids[answered.image_id], result=ls.mask_to_results(truths[answered.image_id], settings.classes)
    )
    newer = [
        dataclasses.replace(item, mask=truths[item.image_id], model_version="teacher-t2", round_no=2)
        for item in items
    ]

    assert ls.refresh_predictions(settings, project_id, newer) == [waiting.image_id]
    assert ls.push_tasks(settings, project_id, newer) == task_ids  # no second task
    (fresh,) = client.predictions.list(task=task_ids[waiting.image_id])
    assert fresh.model_version == "teacher-t2"
    np.testing.assert_array_equal(
        ls.results_to_mask(fresh.result, HEIGHT, WIDTH, settings.classes), truths[waiting.image_id]
    )
    (kept,) = client.predictions.list(task=task_ids[answered.image_id])
    assert kept.model_version == "teacher-t1"
    assert ls.refresh_predictions(settings, project_id, newer) == []  # already today's


def test_invite_annotator_is_idempotent(settings: Settings) -> None:
    email = f"annotator-{uuid.uuid4().hex[:8]}@loom.local"
    token = ls.invite_annotator(settings, email, "fabric-reviewer-2")
    assert ls.invite_annotator(settings, email, "fabric-reviewer-2") == token
    assert ls.connect(settings, token=token).users.whoami().email == email
    with pytest.raises(ls.LabelStudioError, match=email):
        ls.invite_annotator(settings, email, "a-wrong-password")


def test_annotations_round_trip_and_malformed_one_is_reported(
    settings: Settings, project_id: int, annotator_token: str
) -> None:
    items, truths = _make_items(settings, 6, start=10)
    task_ids = ls.push_tasks(settings, project_id, items)
    admin = ls.connect(settings)

    # One annotation arrives broken (a truncated RLE) before the annotator gets to it.
    broken_id = items[1].image_id
    broken = ls.mask_to_results(np.ones((HEIGHT, WIDTH), dtype=np.uint8), settings.classes)
    broken[0]["value"]["rle"] = broken[0]["value"]["rle"][:7]
    admin.annotations.create(id=task_ids[broken_id], result=broken)
    assert ls.review_progress(settings, project_id, list(task_ids.values())) == (1, 6)

    annotator = SimulatedAnnotator(settings, annotator_token, truths.get, settings.classes)
    corrections = annotator.annotate_pending(project_id)
    assert {c.image_id for c in corrections} == set(truths) - {broken_id}
    assert annotator.annotate_pending(project_id) == []  # nothing left to do
    for correction in corrections:
        assert not correction.accepted_as_is  # the teacher's spurious knot always needs removing
        assert correction.pixels_removed > 0 and 0.0 <= correction.pred_iou < 1.0
        assert "knot" in correction.classes_before
    assert ls.review_progress(settings, project_id, list(task_ids.values())) == (6, 6)

    sizes = {image_id: (HEIGHT, WIDTH) for image_id in truths}
    pulled, errors = ls.pull_annotations(settings, project_id, sizes)

    assert [image_id for image_id, _ in errors] == [broken_id]
    assert f"task {task_ids[broken_id]}" in errors[0][1] and "RLE" in errors[0][1]
    annotator_id = ls.connect(settings, token=annotator_token).users.whoami().id
    assert {p.image_id for p in pulled} == set(truths) - {broken_id}
    for p in pulled:
        np.testing.assert_array_equal(p.mask, truths[p.image_id])
        assert p.task_id == task_ids[p.image_id]
        assert p.completed_by == annotator_id
        assert p.lead_time is not None and p.lead_time >= 0
        assert p.updated_at


def test_latest_annotation_wins(settings: Settings, project_id: int) -> None:
    items, truths = _make_items(settings, 1, start=30)
    image_id = items[0].image_id
    task_id = ls.push_tasks(settings, project_id, items)[image_id]
    admin = ls.connect(settings)
    admin.annotations.create(id=task_id, result=ls.mask_to_results(items[0].mask, settings.classes))
    time.sleep(0.05)
    admin.annotations.create(id=task_id, result=ls.mask_to_results(truths[image_id], settings.classes))
    admin.annotations.create(id=task_id, result=[], was_cancelled=True)  # a skip is not an answer

    pulled, errors = ls.pull_annotations(settings, project_id, {image_id: (HEIGHT, WIDTH)})
    assert errors == []
    (only,) = pulled
    np.testing.assert_array_equal(only.mask, truths[image_id])


def test_background_annotator_answers_new_tasks(
    settings: Settings, project_id: int, annotator_token: str
) -> None:
    items, truths = _make_items(settings, 3, start=40)
    # Earlier tests left unanswered tasks of images it does not know: it must leave those alone.
    annotator = SimulatedAnnotator(settings, annotator_token, truths.get, settings.classes)
    stop = annotator.run_in_background(project_id, poll_s=0.2)
    try:
        task_ids = list(ls.push_tasks(settings, project_id, items).values())
        deadline = time.monotonic() + 30
        while ls.review_progress(settings, project_id, task_ids) != (3, 3):
            assert time.monotonic() < deadline, "the background annotator did not answer in 30 s"
            time.sleep(0.2)
    finally:
        stop.set()
    assert {c.image_id for c in annotator.corrections} == set(truths)


def test_unreachable_server_names_the_url(tmp_path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(workspace=tmp_path)
    settings = dataclasses.replace(settings, ports=dataclasses.replace(settings.ports, label_studio=port))
    with pytest.raises(ls.LabelStudioError, match=f"127.0.0.1:{port}.*loom up"):
        ls.connect(settings)
    with pytest.raises(ls.LabelStudioError, match=f"127.0.0.1:{port}"):
        ls.invite_annotator(settings, "nobody@loom.local", "whatever-123")


def test_wrong_token_is_reported(settings: Settings) -> None:
    with pytest.raises(ls.LabelStudioError, match="rejected the API token"):
        ls.connect(settings, token="not-the-token")


def test_task_url_points_at_the_data_manager(settings: Settings) -> None:
    assert ls.task_url(settings, 3, 17) == f"{settings.label_studio_url}/projects/3/data?task=17"
    assert ls.task_url(settings, 3) == f"{settings.label_studio_url}/projects/3/data"
