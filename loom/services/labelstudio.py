"""Label Studio adapter: the project, review tasks with brush-mask pre-annotations, and corrections back.

Masks travel as Label Studio brush results in its RLE format. A class-index mask (H, W) uint8 with
0 = background and k = ``classes[k - 1]`` becomes one ``brushlabels`` result per class present; pulling
annotations back reverses that exactly. Images are served to the annotators from the workspace through
Label Studio's local-files storage. Its document root holds only a link ``images`` to the images folder
(Label Studio refuses a storage on the document root itself), so nothing else of the workspace (secrets,
server databases, masks) can be reached through Label Studio, whatever storage a user adds.

The Defect-Click ML backend (``loom backend``) is connected to the project as an interactive model with
basic auth, and a project webhook sends annotation events to it. Both live on 127.0.0.1, the one reserved
address Label Studio's SSRF guard lets through here (``label_studio_banned_subnets`` in
loom/services/stack.py):
private, link-local and the rest of loopback stay refused.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import httpx
import numpy as np
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import InputStream, bytes2bit, decode_rle, mask2rle
from label_studio_sdk.core.api_error import ApiError

from loom.config import Settings

logger = logging.getLogger(__name__)

#: Distinct colours for the class labels (cycled when there are more classes).
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#9a6324")
_IMPORT_BATCH = 100
_PAGE_SIZE = 100
_HTTP_TIMEOUT_S = 30.0
_STORAGE_TITLE = "Loom images"


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached, rejects a request, or holds a project Loom cannot use."""


class MalformedAnnotation(ValueError):
    """An annotation result that cannot be turned into a class mask (the message says why)."""


F = TypeVar("F", bound=Callable[..., Any])


def _names_the_server(fn: F) -> F:
    """Turn a failed request in ``fn`` (first argument: the settings) into a :class:`LabelStudioError`
    naming the server and what to do: an API error or a dropped connection mid-sync is a Label Studio
    fault, which a round survives (no review this round), not a crash."""

    @functools.wraps(fn)
    def wrapper(settings: Settings, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(settings, *args, **kwargs)
        except ApiError as exc:
            body = str(exc.body)[:300] if exc.body is not None else ""
            raise LabelStudioError(
                f"Label Studio at {settings.label_studio_url} answered HTTP {exc.status_code} in "
                f"{fn.__name__}: {body}. Check its log (`loom status` names it); the round goes on without "
                "review and the selected images stay queued for the next one"
            ) from exc
        except (httpx.HTTPError, requests.RequestException) as exc:
            raise LabelStudioError(
                f"Label Studio at {settings.label_studio_url} stopped answering in {fn.__name__} "
                f"({type(exc).__name__}); is it up (`loom status`, `loom up`)?"
            ) from exc

    return wrapper  # type: ignore[return-value]


# ---- labeling config ---------------------------------------------------------------------------


def label_config(classes: Sequence[str]) -> str:
    """Labeling config: brush masks per class, plus smart key points for click-to-mask help."""
    brush = "".join(
        f'    <Label value="{name}" background="{_PALETTE[i % len(_PALETTE)]}"/>\n'
        for i, name in enumerate(classes)
    )
    clicks = "".join(
        f'    <Label value="{name}" smart="true" background="{_PALETTE[i % len(_PALETTE)]}"/>\n'
        for i, name in enumerate(classes)
    )
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <BrushLabels name="mask" toName="image">\n'
        f"{brush}"
        "  </BrushLabels>\n"
        '  <KeyPointLabels name="click" toName="image" smart="true">\n'
        f"{clicks}"
        "  </KeyPointLabels>\n"
        "</View>\n"
    )


def _config_classes(config: str) -> list[str]:
    """Class names of the BrushLabels control in a labeling config."""
    root = ET.fromstring(config)
    brush = root.find(".//BrushLabels")
    return [] if brush is None else [label.get("value", "") for label in brush.findall("Label")]


# ---- connection and project --------------------------------------------------------------------


def connect(settings: Settings, token: str | None = None) -> LabelStudio:
    """An SDK client for the workspace's Label Studio, after checking the server answers.

    Raises:
        LabelStudioError: the server is unreachable or rejects the token.
    """
    url = settings.label_studio_url
    try:
        health = requests.get(f"{url}/health", timeout=10)
    except requests.RequestException as exc:
        raise LabelStudioError(
            f"Label Studio at {url} is unreachable ({type(exc).__name__}). "
            "Start the local stack with `loom up`, or check LOOM_LS_PORT."
        ) from exc
    if health.status_code != 200:
        raise LabelStudioError(
            f"Label Studio at {url} answered /health with HTTP {health.status_code}; "
            "is another service on that port? Check LOOM_LS_PORT or restart with `loom up`."
        )
    client = LabelStudio(base_url=url, api_key=token or settings.label_studio_token, timeout=_HTTP_TIMEOUT_S)
    try:
        client.users.whoami()
    except ApiError as exc:
        if exc.status_code not in (401, 403):
            raise LabelStudioError(
                f"Label Studio at {url} failed to answer who the token belongs to: {exc}"
            ) from exc
        raise LabelStudioError(
            f"Label Studio at {url} rejected the API token (HTTP {exc.status_code}). Set LOOM_LS_TOKEN to "
            "the token the server was started with (`loom up` starts it with the workspace's token)."
        ) from exc
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"Label Studio at {url} stopped answering ({type(exc).__name__}).") from exc
    return client


@_names_the_server
def ensure_project(settings: Settings, client: LabelStudio | None = None) -> int:
    """Id of the project titled ``settings.project_title``, created with Loom's labeling config if missing.

    Also makes sure the project has a local-files storage on ``settings.images_dir`` so the task images
    resolve. Calling it again changes nothing.

    Raises:
        LabelStudioError: a project with that title exists but labels other classes.
    """
    client = client or connect(settings)
    projects = client.projects.list(page_size=_PAGE_SIZE)
    project = next((p for p in projects if p.title == settings.project_title), None)
    if project is None:
        project = client.projects.create(
            title=settings.project_title, label_config=label_config(settings.classes)
        )
        logger.info("Created Label Studio project %d %r", project.id, settings.project_title)
    else:
        found = _config_classes(client.projects.get(id=project.id).label_config or "<View/>")
        if sorted(found) != sorted(settings.classes):
            raise LabelStudioError(
                f"Label Studio project {project.id} {settings.project_title!r} labels classes {found}, "
                f"but this workspace uses {list(settings.classes)}. Set another project_title in params.yaml "
                "or make the classes match."
            )
    _ensure_local_storage(settings, client, project.id)
    return int(project.id)


#: The link to the images folder inside Label Studio's document root; task URLs name files under it.
SERVED_IMAGES = "images"


def link_images(settings: Settings) -> Path:
    """Make ``<document root>/images`` a relative link to the workspace's images folder; returns the link."""
    root = settings.label_studio_files_root
    root.mkdir(parents=True, exist_ok=True)
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    link = root / SERVED_IMAGES
    target = Path(os.path.relpath(settings.images_dir, root))
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return link
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def _ensure_local_storage(settings: Settings, client: LabelStudio, project_id: int) -> None:
    """Label Studio serves a local file only when a storage of the project covers its folder."""
    link = link_images(settings)
    storages = client.import_storage.local.list(project=project_id)
    if any(s.path and s.path.rstrip("/") == str(link) for s in storages):
        return
    client.import_storage.local.create(
        project=project_id,
        path=str(link),
        title=_STORAGE_TITLE,
        use_blob_urls=True,
        regex_filter=r".*\.png$",
    )
    logger.info("Added local-files storage %s to project %d", link, project_id)


ML_BACKEND_TITLE = "Loom Defect-Click"
#: Annotation events the project's webhook sends to the ML backend.
WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")


@_names_the_server
def connect_ml_backend(settings: Settings, project_id: int, client: LabelStudio | None = None) -> int:
    """Id of the project's interactive ML backend at ``settings.backend_url``, added (or its credentials
    refreshed) if needed, plus a webhook that sends annotation events to it. Calling it again changes nothing.

    Raises:
        LabelStudioError: Label Studio refuses the backend (it checks ``/health`` and ``/setup`` on add).
    """
    client = client or connect(settings)
    auth = {
        "auth_method": "BASIC_AUTH",
        "basic_auth_user": settings.backend_user,
        "basic_auth_pass": settings.backend_password,
    }
    try:
        found = [
            b for b in client.ml.list(project=project_id) if (b.url or "").rstrip("/") == settings.backend_url
        ]
        if found:
            # url and project go along: Label Studio 1.23 re-checks the backend on update (HTTP 500 else).
            backend = client.ml.update(
                found[0].id, url=settings.backend_url, project=project_id, is_interactive=True, **auth
            )
        else:
            backend = client.ml.create(
                project=project_id,
                url=settings.backend_url,
                title=ML_BACKEND_TITLE,
                is_interactive=True,
                timeout=30,
                **auth,
            )
            logger.info("Connected ML backend %s to project %d", settings.backend_url, project_id)
        _ensure_webhook(settings, client, project_id)
    except ApiError as exc:
        raise LabelStudioError(
            f"Label Studio at {settings.label_studio_url} refused the ML backend {settings.backend_url} "
            f"(HTTP {exc.status_code}: {str(exc.body)[:300]}). Is `loom backend` up (`loom status`)?"
        ) from exc
    return int(backend.id)


def _ensure_webhook(settings: Settings, client: LabelStudio, project_id: int) -> None:
    """One webhook to the backend's ``/webhook`` carrying its credentials.

    Label Studio adds a webhook to ``<backend>/webhook`` by itself when an ML backend is created, without
    the backend's basic auth (so every event would get a 401): that one is updated, not duplicated.
    """
    url = f"{settings.backend_url}/webhook"
    wanted = {
        "url": url,
        "send_payload": True,
        "send_for_all_actions": False,
        "actions": list(WEBHOOK_ACTIONS),
        "headers": {"Authorization": _basic_auth_header(settings)},
    }
    existing = [w for w in client.webhooks.list(project=project_id) if (w.url or "") == url]
    if not existing:
        client.webhooks.create(project=project_id, **wanted)
        return
    for hook in existing:
        if (hook.headers or {}) != wanted["headers"] or set(hook.actions or []) != set(WEBHOOK_ACTIONS):
            client.webhooks.update(id=hook.id, **wanted)


def _basic_auth_header(settings: Settings) -> str:
    pair = f"{settings.backend_user}:{settings.backend_password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def ml_backend_id(settings: Settings, project_id: int, client: LabelStudio | None = None) -> int | None:
    """Id of the project's interactive backend at ``settings.backend_url``, or None when not connected."""
    client = client or connect(settings)
    for backend in client.ml.list(project=project_id):
        if (backend.url or "").rstrip("/") == settings.backend_url and backend.is_interactive:
            return int(backend.id)
    return None


def image_url(settings: Settings, image_id: str) -> str:
    """The task's image URL, relative to Label Studio's document root (see :func:`link_images`)."""
    return f"/data/local-files/?d={SERVED_IMAGES}/{image_id}.png"


def task_url(settings: Settings, project_id: int, task_id: int | None = None) -> str:
    """Link a person can open: the task in the project's data manager (the project itself without a task)."""
    url = f"{settings.label_studio_url}/projects/{project_id}/data"
    return url if task_id is None else f"{url}?task={task_id}"


# ---- masks <-> brush results -------------------------------------------------------------------


#: Result ids of the pre-annotations Loom sends start with this, the ML backend's answers with "loom-":
#: a region with neither was drawn by hand.
PREANNOTATION_ID_PREFIX = "pre-"
CLICKER_ID_PREFIX = "loom-"


def mask_to_results(
    mask: np.ndarray,
    classes: Sequence[str],
    from_name: str = "mask",
    to_name: str = "image",
    id_prefix: str = "",
) -> list[dict[str, Any]]:
    """Brush results for a class-index mask.

    Args:
        mask: (H, W) integer mask, 0 = background, k = ``classes[k - 1]``.
        classes: the project's class names.
        id_prefix: put before each result's random id (says where the region came from).

    Returns:
        One ``brushlabels`` result (RLE) per class present, in class order; empty for an all-background mask.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if mask.size and int(mask.max()) > len(classes):
        raise ValueError(f"mask holds class id {int(mask.max())} but only {len(classes)} classes are known")
    height, width = mask.shape
    results = []
    for class_id in np.unique(mask):
        if class_id == 0:
            continue
        binary = np.where(mask == class_id, 255, 0).astype(np.uint8)
        results.append(
            {
                "id": id_prefix + uuid.uuid4().hex[:10],
                "type": "brushlabels",
                "from_name": from_name,
                "to_name": to_name,
                "original_width": int(width),
                "original_height": int(height),
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": mask2rle(binary),
                    "brushlabels": [classes[int(class_id) - 1]],
                },
            }
        )
    return results


#: Result types without a region of their own: the smart key points (the brush masks they produced are read).
_POINT_TYPES = ("keypointlabels",)


def results_to_mask(
    results: Sequence[Mapping[str, Any]], height: int, width: int, classes: Sequence[str]
) -> np.ndarray:
    """Class-index mask (height, width) uint8 from brush results; later results win where regions overlap.

    Key point results (the smart clicks) are ignored. A region of any other shape (a rectangle, a polygon:
    only possible once someone changes the labeling config) is refused, not skipped: skipping it would turn a
    defect a person marked into background.

    Raises:
        MalformedAnnotation: not a list of region objects, a region of another type, a missing or odd
            ``value``, bad RLE, a size other than (height, width), or a label outside ``classes``.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
        raise MalformedAnnotation(f"result must be a list of regions, got {type(results).__name__}")
    for index, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise MalformedAnnotation(
                f"result {index}: a region must be an object, got {type(result).__name__}"
            )
        kind = result.get("type")
        if kind in _POINT_TYPES:
            continue
        if kind != "brushlabels":
            raise MalformedAnnotation(
                f"result {index}: a region of type {kind!r} is not a brush mask; Loom's labeling config "
                "has brush labels and smart key points only"
            )
        value = result.get("value")
        if not isinstance(value, Mapping):
            raise MalformedAnnotation(
                f"result {index}: 'value' must be an object, got {type(value).__name__}"
            )
        labels = value.get("brushlabels")
        if not isinstance(labels, Sequence) or isinstance(labels, (str, bytes)) or len(labels) != 1:
            raise MalformedAnnotation(f"result {index}: expected one brush label, got {labels!r}")
        if not isinstance(labels[0], str) or labels[0] not in classes:
            raise MalformedAnnotation(f"result {index}: unknown label {labels[0]!r}; known: {list(classes)}")
        size = (result.get("original_height"), result.get("original_width"))
        if size != (height, width):
            raise MalformedAnnotation(
                f"result {index}: drawn on a {size[0]}x{size[1]} image, but the image is {height}x{width}"
            )
        if value.get("format", "rle") != "rle":
            raise MalformedAnnotation(f"result {index}: brush format {value.get('format')!r} is not 'rle'")
        region = decode_region(value.get("rle"), height, width, index)
        mask[region] = classes.index(labels[0]) + 1
    return mask


def decode_region(rle: Any, height: int, width: int, index: int) -> np.ndarray:
    """Boolean (height, width) region of one brush RLE, validated before decoding."""
    if not isinstance(rle, list) or not rle or not all(isinstance(b, int) and 0 <= b <= 255 for b in rle):
        raise MalformedAnnotation(f"result {index}: RLE must be a non-empty list of byte values")
    expected = height * width * 4  # RGBA values
    if len(rle) < 4 or InputStream(bytes2bit(rle[:4])).read(32) != expected:
        # Checked first: the header's count sizes the decoder's buffer, and a bad one could be huge.
        raise MalformedAnnotation(f"result {index}: RLE does not describe a {height}x{width} image")
    try:
        decoded = decode_rle(rle)
    except (ValueError, IndexError, OverflowError) as exc:  # OverflowError: a run value wider than a byte
        raise MalformedAnnotation(f"result {index}: RLE is truncated or corrupt ({exc})") from exc
    if decoded.size != expected:  # the header said so, but the decoder is not ours: check, do not assume
        raise MalformedAnnotation(f"result {index}: RLE decodes to {decoded.size} values, not {expected}")
    return decoded.reshape(height, width, 4)[:, :, 3] > 0


# ---- tasks and predictions ---------------------------------------------------------------------


@dataclass
class TaskItem:
    """One image to review: the teacher's mask (H, W) uint8 class ids, its score and provenance.

    ``score``: probability in [0, 1] that the image is defective (Label Studio shows it as a percentage).
    """

    image_id: str
    mask: np.ndarray
    score: float
    model_version: str
    round_no: int


def _iter_tasks(client: LabelStudio, project_id: int, fields: str = "task_only") -> Iterator[Any]:
    yield from client.tasks.list(project=project_id, fields=fields, page_size=_PAGE_SIZE)


def _tasks_by_image(client: LabelStudio, project_id: int) -> dict[str, Any]:
    """image_id -> the project's task for it (the first task wins if an image appears twice)."""
    found: dict[str, Any] = {}
    for task in _iter_tasks(client, project_id):
        image_id = (task.data or {}).get("image_id")
        if image_id is not None:
            found.setdefault(str(image_id), task)
    return found


def _task_image_ids(client: LabelStudio, project_id: int) -> dict[str, int]:
    """image_id -> task id of the project's tasks (the first task wins if an image appears twice)."""
    return {image_id: int(task.id) for image_id, task in _tasks_by_image(client, project_id).items()}


@_names_the_server
def push_tasks(
    settings: Settings, project_id: int, items: Sequence[TaskItem], client: LabelStudio | None = None
) -> dict[str, int]:
    """Create review tasks with the masks as predictions; images already in the project are not added again.

    Returns:
        image_id -> task id for every item (existing tasks included).
    """
    client = client or connect(settings)
    task_ids = _task_image_ids(client, project_id)
    new_items = list({item.image_id: item for item in items if item.image_id not in task_ids}.values())
    for start in range(0, len(new_items), _IMPORT_BATCH):
        batch = new_items[start : start + _IMPORT_BATCH]
        response = client.projects.import_tasks(
            id=project_id, request=[_task_payload(settings, item) for item in batch], return_task_ids=True
        )
        created = list(getattr(response, "task_ids", None) or [])
        if len(created) == len(batch):
            task_ids.update({item.image_id: int(tid) for item, tid in zip(batch, created, strict=True)})
        else:  # the server did not say which id is which: read them back
            task_ids = _task_image_ids(client, project_id)
        logger.info("Imported %d review tasks into project %d", len(batch), project_id)
    missing = [item.image_id for item in items if item.image_id not in task_ids]
    if missing:
        raise LabelStudioError(f"Label Studio project {project_id} did not create tasks for {missing[:5]}")
    return {item.image_id: task_ids[item.image_id] for item in items}


@_names_the_server
def refresh_predictions(
    settings: Settings,
    project_id: int,
    items: Sequence[TaskItem],
    client: LabelStudio | None = None,
) -> list[str]:
    """Replace the pre-annotation of tasks nobody has annotated yet when a newer teacher made ``items``.

    An image queued in an earlier round and still waiting shows that round's teacher's mask; people
    should start from today's. Tasks with an annotation are left as they are.

    Returns:
        The image ids whose pre-annotation was replaced.
    """
    client = client or connect(settings)
    tasks = _tasks_by_image(client, project_id)  # the listing carries each task's annotation count
    refreshed = []
    for item in items:
        task = tasks.get(item.image_id)
        if task is None or (task.total_annotations or 0) > 0:
            continue
        task_id = int(task.id)
        stale = client.predictions.list(task=task_id)
        if not stale or all(p.model_version == item.model_version for p in stale):
            continue  # created by this push, or already today's
        fresh = _task_payload(settings, item)["predictions"][0]
        client.predictions.create(task=task_id, project=project_id, **fresh)
        for old in stale:
            client.predictions.delete(id=old.id)
        refreshed.append(item.image_id)
    if refreshed:
        logger.info(
            "Refreshed the pre-annotation of %d queued tasks in project %d", len(refreshed), project_id
        )
    return refreshed


def _task_payload(settings: Settings, item: TaskItem) -> dict[str, Any]:
    if not 0.0 <= item.score <= 1.0:  # Label Studio shows the score as a percentage
        raise ValueError(f"pre-annotation score of {item.image_id} must be a probability, got {item.score}")
    return {
        "data": {
            "image": image_url(settings, item.image_id),
            "image_id": item.image_id,
            "round": item.round_no,
        },
        "predictions": [
            {
                "model_version": item.model_version,
                "score": float(item.score),
                "result": mask_to_results(item.mask, settings.classes, id_prefix=PREANNOTATION_ID_PREFIX),
            }
        ],
    }


# ---- interactive (smart) key points ------------------------------------------------------------------


def keypoint_result(
    x: float,
    y: float,
    width: int,
    height: int,
    label: str,
    is_positive: bool = True,
    from_name: str = "click",
    to_name: str = "image",
) -> dict[str, Any]:
    """A smart key point as the labeling UI serialises it (percent coordinates, ``is_positive``).

    Args:
        x, y: the click in image pixels (column, row), pixel centres at integers.
        width, height: the image's size in pixels.
        label: the class the annotator picked on the key point tool.
    """
    return {
        "id": uuid.uuid4().hex[:10],
        "type": "keypointlabels",
        "from_name": from_name,
        "to_name": to_name,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "is_positive": bool(is_positive),
        "value": {
            "x": 100.0 * (x + 0.5) / width,
            "y": 100.0 * (y + 0.5) / height,
            "width": 0.5,
            "keypointlabels": [label],
            "labels": [label],
        },
    }


def interactive_annotate(
    settings: Settings,
    session: requests.Session,
    token: str,
    ml_backend: int,
    task_id: int,
    keypoints: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Ask Label Studio for an interactive pre-annotation, the request the labeling UI sends on a smart click.

    Label Studio forwards it to the project's interactive ML backend and answers with that backend's
    prediction (``{"result": [...], "score": ..., "model_version": ...}``).

    Raises:
        LabelStudioError: Label Studio or the backend reported an error.
    """
    url = f"{settings.label_studio_url}/api/ml/{ml_backend}/interactive-annotating"
    try:
        response = session.post(
            url,
            json={"task": task_id, "context": {"result": list(keypoints)}},
            headers={"Authorization": f"Token {token}"},
            timeout=_HTTP_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise LabelStudioError(f"Label Studio at {settings.label_studio_url} is unreachable: {exc}") from exc
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200 or body.get("errors") or "data" not in body:
        raise LabelStudioError(
            f"interactive request for task {task_id} failed (HTTP {response.status_code}): "
            f"{body.get('errors') or response.text[:300]}"
        )
    return body["data"]


# ---- annotations back --------------------------------------------------------------------------


@dataclass
class PulledAnnotation:
    """A person's latest answer for one task: the corrected mask (H, W) uint8 class ids and who/when."""

    image_id: str
    task_id: int
    mask: np.ndarray
    annotation_id: int
    completed_by: int | None
    updated_at: str | None
    lead_time: float | None
    hand_drawn: int = 0  # brush regions neither Loom's pre-annotation nor the ML backend's answer


def hand_drawn_regions(results: Sequence[Mapping[str, Any]]) -> int:
    """Brush regions whose id says neither Loom's pre-annotation nor the click model made them."""
    return sum(
        1
        for r in results
        if isinstance(r, Mapping)
        and r.get("type") == "brushlabels"
        and not str(r.get("id", "")).startswith((PREANNOTATION_ID_PREFIX, CLICKER_ID_PREFIX))
    )


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _as_int(value: Any) -> int | None:
    """An id or count as int: ints, integral floats and digit strings; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def latest_annotation(annotations: Sequence[Any]) -> Any | None:
    """The most recently updated annotation that was not cancelled (skipped), or None."""
    kept = [a for a in annotations if not _field(a, "was_cancelled")]
    return max(
        kept, key=lambda a: (str(_field(a, "updated_at") or ""), _as_int(_field(a, "id")) or 0), default=None
    )


@_names_the_server
def pull_annotations(
    settings: Settings,
    project_id: int,
    image_sizes: Mapping[str, tuple[int, int]],
    client: LabelStudio | None = None,
) -> tuple[list[PulledAnnotation], list[tuple[str, str]]]:
    """Latest non-cancelled annotation of each task whose image is in ``image_sizes`` (image_id -> (h, w)).

    The annotated tasks come in one export (one request, whatever the number of tasks; not one per task).
    Tasks of other images (earlier rounds) are skipped. A malformed annotation never stops the others: it is
    set aside with its reason (a bad mask, a region of another type, an id that is not a number, ...), and its
    image stays in review.

    Returns:
        (pulled annotations, [(image_id, reason), ...] for annotations that could not be read).
    """
    client = client or connect(settings)
    pulled: list[PulledAnnotation] = []
    errors: list[tuple[str, str]] = []
    for task in exported_tasks(client, project_id):
        data = _field(task, "data")
        image_id = str(data.get("image_id")) if isinstance(data, Mapping) else ""
        if image_id not in image_sizes:
            continue
        try:
            one = _read_task(task, image_id, image_sizes[image_id], settings.classes)
        except MalformedAnnotation as exc:
            logger.warning("Task %s (image %s): annotation set aside: %s", _field(task, "id"), image_id, exc)
            errors.append((image_id, f"task {_field(task, 'id')}, {exc}"))
            continue
        if one is not None:
            pulled.append(one)
    return pulled, errors


def exported_tasks(client: LabelStudio, project_id: int) -> list[Any]:
    """Every annotated task of the project with its annotations (JSON export: one request)."""
    chunks = client.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=False)
    raw = b"".join(chunks)
    try:
        tasks = json.loads(raw)
    except ValueError as exc:
        raise LabelStudioError(f"Label Studio's export of project {project_id} is not JSON ({exc})") from exc
    if not isinstance(tasks, list):
        raise LabelStudioError(f"Label Studio's export of project {project_id} is not a list of tasks")
    return tasks


def _read_task(
    task: Any, image_id: str, size: tuple[int, int], classes: Sequence[str]
) -> PulledAnnotation | None:
    """The latest annotation of one task (None: none submitted), checked field by field.

    Raises:
        MalformedAnnotation: the task's or annotation's id is not a number, or its result is not a mask.
    """
    task_id = _as_int(_field(task, "id"))
    if task_id is None:
        raise MalformedAnnotation(f"the task id {_field(task, 'id')!r} is not a number")
    annotations = _field(task, "annotations")
    annotations = [] if annotations is None else annotations
    if not isinstance(annotations, Sequence) or isinstance(annotations, (str, bytes)):
        raise MalformedAnnotation(f"the annotations must be a list, got {type(annotations).__name__}")
    annotation = latest_annotation(annotations)
    if annotation is None:
        return None
    annotation_id = _as_int(_field(annotation, "id"))
    if annotation_id is None:
        raise MalformedAnnotation(f"the annotation id {_field(annotation, 'id')!r} is not a number")
    result = _field(annotation, "result")
    result = [] if result is None else result  # submitted with no region: the image is normal
    try:
        mask = results_to_mask(result, size[0], size[1], classes)
    except MalformedAnnotation as exc:
        raise MalformedAnnotation(f"annotation {annotation_id}: {exc}") from exc
    updated = _field(annotation, "updated_at")
    lead_time = _field(annotation, "lead_time")
    return PulledAnnotation(
        image_id=image_id,
        task_id=task_id,
        mask=mask,
        annotation_id=annotation_id,
        completed_by=_user_id(_field(annotation, "completed_by")),
        updated_at=updated.isoformat()
        if hasattr(updated, "isoformat")
        else (None if updated is None else str(updated)),
        # who and how long are bookkeeping: an odd value is dropped, the person's mask is kept
        lead_time=float(lead_time)
        if isinstance(lead_time, int | float) and not isinstance(lead_time, bool)
        else None,
        hand_drawn=hand_drawn_regions(result),
    )


def _user_id(completed_by: Any) -> int | None:
    """The annotator's user id (an int, or an object with ``id``); None when absent or not a number."""
    if completed_by is None:
        return None
    return _as_int(completed_by if isinstance(completed_by, int | str) else _field(completed_by, "id"))


@_names_the_server
def review_progress(
    settings: Settings, project_id: int, task_ids: Sequence[int], client: LabelStudio | None = None
) -> tuple[int, int]:
    """(annotated, total) over ``task_ids``: how many have at least one submitted annotation."""
    client = client or connect(settings)
    wanted = set(task_ids)
    done = sum(
        1 for t in _iter_tasks(client, project_id) if t.id in wanted and (t.total_annotations or 0) > 0
    )
    return done, len(wanted)


# ---- annotators --------------------------------------------------------------------------------


def invite_annotator(settings: Settings, email: str, password: str) -> str:
    """API token of an annotator account, signed up through the organisation's invite link if new.

    Logs in when the account already exists. Label Studio wants passwords of at least 8 characters.

    Raises:
        LabelStudioError: the server is unreachable, or neither sign-up nor log-in worked.
    """
    url = settings.label_studio_url
    connect(settings)  # clear error when the server is down
    with requests.Session() as session:
        if _submit_form(session, url, f"{url}/user/login/", email, password):
            return _session_token(session, url)
        invite = requests.get(
            f"{url}/api/invite",
            headers={"Authorization": f"Token {settings.label_studio_token}"},
            timeout=_HTTP_TIMEOUT_S,
        )
        if invite.status_code != 200:
            raise LabelStudioError(
                f"Label Studio at {url} refused an invite link (HTTP {invite.status_code})"
            )
        signup_url = urljoin(url + "/", invite.json()["invite_url"])
        if _submit_form(session, url, signup_url, email, password):
            logger.info("Signed up annotator %s", email)
            return _session_token(session, url)
    raise LabelStudioError(
        f"Label Studio at {url}: could not sign up or log in annotator {email} "
        "(wrong password for an existing account, or a password under 8 characters?)"
    )


def _submit_form(session: requests.Session, base_url: str, form_url: str, email: str, password: str) -> bool:
    """Post Label Studio's login or sign-up form; True when the session ends up logged in."""
    page = session.get(form_url, timeout=_HTTP_TIMEOUT_S)
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    csrf = match.group(1) if match else session.cookies.get("csrftoken", "")
    session.post(
        page.url,
        data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
        headers={"Referer": page.url},
        timeout=_HTTP_TIMEOUT_S,
    )
    check = session.get(f"{base_url}/api/current-user/whoami", timeout=_HTTP_TIMEOUT_S, allow_redirects=False)
    return check.status_code == 200 and check.headers.get("content-type", "").startswith("application/json")


def _session_token(session: requests.Session, url: str) -> str:
    response = session.get(f"{url}/api/current-user/token", timeout=_HTTP_TIMEOUT_S)
    if response.status_code != 200 or "token" not in response.json():
        raise LabelStudioError(f"Label Studio at {url} gave no API token (HTTP {response.status_code})")
    return str(response.json()["token"])


__all__ = [
    "LabelStudioError",
    "MalformedAnnotation",
    "PulledAnnotation",
    "TaskItem",
    "connect",
    "connect_ml_backend",
    "ensure_project",
    "image_url",
    "interactive_annotate",
    "invite_annotator",
    "keypoint_result",
    "label_config",
    "latest_annotation",
    "mask_to_results",
    "ml_backend_id",
    "pull_annotations",
    "push_tasks",
    "refresh_predictions",
    "results_to_mask",
    "review_progress",
    "task_url",
]
