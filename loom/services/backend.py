"""`loom backend`: Loom's Label Studio ML backend (Defect-Click), on FastAPI + uvicorn.

It speaks the protocol of the label-studio-ml-backend examples: ``GET /health``, ``POST /setup``,
``POST /predict``, ``POST /webhook`` (and ``POST /train``). The PyPI package ``label-studio-ml`` (1.0.9,
January 2023) pins Flask 1.1.2 and Werkzeug 2.0.2, which do not resolve beside MLflow 3; the protocol is
small, so it is implemented here on the web stack Prefect already brings.

- ``/predict`` with a context (a smart key point placed in the labeling UI): the clicker turns the key
  points of the region being edited into a brush mask with the key point's label, ``model_version`` and
  ``score``. Without a context (Label Studio's "Retrieve predictions"): the champion student's masks.
- Region being edited: with auto-accept on, Label Studio sends only the newest key point; without it,
  every unaccepted key point of that label, old regions' included. The backend therefore remembers, per task
  and label, which key point ids it has answered and to which region they belong: a new key point
  continues the current region when it falls inside that region's crop, else it starts a new region
  (starting from the pre-annotation's components under it). Stale key points are never fed back.
- Each image's backbone features are cached (``ClickPredictor``), so follow-up clicks run the head only.
- Images are read from the workspace's images folder (no download through Label Studio with a token);
  a path outside that folder is refused.
- Basic auth (user ``settings.backend_user``, generated password beside the other secrets) on every
  route but ``/health``.
- ``/webhook`` records annotation events; ``START_TRAINING`` (and ``/train``) start the clicker's
  fine-tuning as a Prefect deployment run, never inside the request.
- The review relay (``loom/services/review_relay.py``): ``POST /review/suspended`` registers a round about to
  suspend; annotation webhooks, a deadline timer and a periodic sweep resume it.

Every interactive answer is appended to ``stack/backend/interactions.jsonl`` (task, label, region, click
number, latency): the round reads clicks per reviewed image from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from scipy import ndimage
from starlette.concurrency import run_in_threadpool

from loom.config import Settings
from loom.services.labelstudio import (
    CLICKER_ID_PREFIX,
    SERVED_IMAGES,
    MalformedAnnotation,
    decode_region,
    mask_to_results,
)
from loom.services.review_relay import PendingReview, ReviewRelay
from loom.stages.clicking import champion_clicker_pointer, pretrained_clicker_root

logger = logging.getLogger(__name__)

#: A key point continues the current region if it was placed within this many seconds of the last one.
SESSION_IDLE_S = 600.0
#: Pixels around a first click within which the pre-annotation's components are the region's start.
START_REACH_PX = 24
_IMAGE_CACHE = 16
_INTERACTIONS = "interactions.jsonl"
_EVENTS = "events.jsonl"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FINE_TUNE_DEPLOYMENT = "clicker-fine-tune/on-demand"


class BackendError(Exception):
    """A request the backend cannot answer; ``status`` is the HTTP status, the message says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- the labeling config ----------------------------------------------------------------------


@dataclass(frozen=True)
class BrushControl:
    from_name: str
    to_name: str
    labels: tuple[str, ...]


def brush_control(label_config: str | None, fallback_labels: tuple[str, ...]) -> BrushControl:
    """The BrushLabels control of a labeling config (name, image it labels, its labels)."""
    if not label_config:
        return BrushControl("mask", "image", fallback_labels)
    try:
        brush = ET.fromstring(label_config).find(".//BrushLabels")
    except ET.ParseError as exc:
        raise BackendError(400, f"label_config is not valid XML ({exc})") from exc
    if brush is None:
        raise BackendError(
            400, "label_config has no BrushLabels control: the backend answers with brush masks"
        )
    labels = tuple(label.get("value", "") for label in brush.findall("Label"))
    return BrushControl(brush.get("name", "mask"), brush.get("toName", "image"), labels)


# ---- images -----------------------------------------------------------------------------------


class ImageStore:
    """Task images read from the workspace's images folder, the last few kept decoded."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.images_dir.resolve()
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, data: dict[str, Any]) -> Path:
        """The image file of a task's data: ``image_id`` or a local-files URL, inside the images folder."""
        image_id = data.get("image_id")
        if image_id is not None:
            name = f"{image_id}.png"
        else:
            url = str(data.get("image") or "")
            parsed = urlparse(url)
            if not parsed.path.endswith("/data/local-files/"):
                raise BackendError(
                    400, f"task image {url!r} is not a local file of the workspace; only those are served"
                )
            name = unquote(parse_qs(parsed.query).get("d", [""])[0])
            served = Path(name).parts
            name = str(Path(*served[1:])) if len(served) > 1 and served[0] == SERVED_IMAGES else name
        if not name or ".." in Path(name).parts or not all(_SAFE_NAME.match(p) for p in Path(name).parts):
            raise BackendError(400, f"task image {name!r} is not a file name inside the images folder")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise BackendError(400, f"task image {name!r} lies outside the workspace's images folder")
        return path

    def read(self, data: dict[str, Any]) -> tuple[str, np.ndarray]:
        from loom.data.imageio import ImageReadError, read_image

        path = self.path_of(data)
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return path.stem, self._cache[path]
        if not path.is_file():
            raise BackendError(404, f"task image {path.name} is not in the workspace's images folder")
        try:
            image = read_image(path)
        except ImageReadError as exc:
            raise BackendError(422, f"task image {path.name} cannot be read: {exc}") from exc
        with self._lock:
            self._cache[path] = image
            while len(self._cache) > _IMAGE_CACHE:
                self._cache.popitem(last=False)
        return path.stem, image


# ---- the models -------------------------------------------------------------------------------


class ClickerHolder:
    """The click model the backend answers with: the champion a round promoted, else the pre-trained one.

    Nothing is loaded at import time. At start a background thread makes sure the pre-trained clicker
    exists (training it from the embedded fabric generator when the workspace has none); until then,
    interactive requests get a 503 that says so. A newly promoted champion is picked up on the next
    request (the pointer file's modification time is checked, microseconds).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._predictor: Any = None
        self._key: tuple[str, float] | None = None
        self.version = ""
        self.state = "starting"
        self._pretrained: Path | None = None

    def warm_up(self) -> threading.Thread:
        thread = threading.Thread(target=self._prepare, name="clicker-warm-up", daemon=True)
        thread.start()
        return thread

    def _prepare(self) -> None:
        from loom.stages.clicking import pretrain_clicker

        try:
            self.state = "pretraining"
            self._pretrained = pretrain_clicker(
                pretrained_clicker_root(self.settings), config=self.settings.round.clicker_preset
            )
            self.get()
            self.state = "ready"
        except Exception as exc:  # reported through /health and every interactive answer
            logger.exception("clicker could not be prepared")
            self.state = f"error: {exc}"

    def _reference(self) -> tuple[Path, str, float] | None:
        pointer = champion_clicker_pointer(self.settings)
        try:
            mtime = pointer.stat().st_mtime
            record = json.loads(pointer.read_text())
            return Path(record["model_dir"]), f"loom-clicker-v{record['version']}", mtime
        except (OSError, ValueError, KeyError):
            pass
        if self._pretrained is None:
            return None
        return self._pretrained, f"loom-clicker-pretrained-{self._pretrained.name[-8:]}", 0.0

    def current_version(self) -> str:
        reference = self._reference()
        return reference[1] if reference else ""

    def get(self) -> tuple[Any, str]:
        """(ClickPredictor, model_version) for the current clicker."""
        from models.clicker import ClickPredictor, ClickSegmenter

        reference = self._reference()
        if reference is None:
            raise BackendError(503, f"the clicker is not ready yet ({self.state}); try again in a minute")
        model_dir, version, mtime = reference
        with self._lock:
            if self._key != (str(model_dir), mtime):
                logger.info("loading clicker %s from %s", version, model_dir)
                self._predictor = ClickPredictor(ClickSegmenter.from_pretrained(model_dir))
                self._key, self.version = (str(model_dir), mtime), version
            return self._predictor, self.version


class StudentHolder:
    """The champion student, for plain predictions ("Retrieve predictions" in Label Studio)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._model: Any = None
        self._version: str | None = None

    def get(self) -> tuple[Any, str]:
        from loom.services.tracking import champion, download_student
        from models.student.registry import load_student

        current = champion(self.settings)
        if current is None:
            raise BackendError(503, "no champion student yet: run a round (`loom round`) to train one")
        with self._lock:
            if self._version != current[0]:
                self._model = load_student(download_student(self.settings, "champion"))
                self._version = current[0]
            return self._model, f"loom-student-v{self._version}"


# ---- click sessions ---------------------------------------------------------------------------


@dataclass
class RegionSession:
    """The key points of one region being edited and the backend's last answer for it."""

    region_id: str
    label: str
    clicks: list[Any] = field(default_factory=list)
    start_mask: np.ndarray | None = None  # the pre-annotation's components under the first click
    last_mask: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    replaces: str | None = None  # id of the pre-annotation region this one takes the place of
    updated: float = field(default_factory=time.monotonic)

    def accepts(self, y: float, x: float, label: str) -> bool:
        if label != self.label or time.monotonic() - self.updated > SESSION_IDLE_S or self.box is None:
            return False
        top, left, bottom, right = self.box
        return top <= y < bottom and left <= x < right


class Sessions:
    """Region sessions per (task, label) and the key point ids already answered per task."""

    def __init__(self) -> None:
        self.current: dict[tuple[int, str], RegionSession] = {}
        self.seen: dict[int, dict[str, str]] = {}  # task -> key point id -> region id
        self.lock = threading.Lock()


@dataclass(frozen=True)
class KeyPoint:
    id: str
    label: str
    y: float  # pixel coordinates of the image, pixel centres at integers
    x: float
    is_positive: bool


def parse_keypoints(results: Any, height: int, width: int, labels: tuple[str, ...]) -> list[KeyPoint]:
    """Smart key points of a request's ``context.result`` (percent coordinates) in image pixels."""
    if not isinstance(results, list):
        raise BackendError(400, "context.result must be a list of the labeling UI's results")
    points = []
    for index, result in enumerate(results):
        if not isinstance(result, dict) or result.get("type") != "keypointlabels":
            continue
        value = result.get("value") or {}
        names = value.get("keypointlabels") or value.get("labels") or []
        if len(names) != 1:
            raise BackendError(400, f"key point {index}: expected one label, got {names!r}")
        if names[0] not in labels:
            raise BackendError(400, f"key point {index}: unknown label {names[0]!r}; known: {list(labels)}")
        try:
            px, py = float(value["x"]), float(value["y"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(400, f"key point {index}: value.x and value.y must be numbers") from exc
        if not (0.0 <= px <= 100.0 and 0.0 <= py <= 100.0):
            raise BackendError(400, f"key point {index} at ({px:.1f}%, {py:.1f}%) lies outside the image")
        points.append(
            KeyPoint(
                id=str(result.get("id") or uuid.uuid4().hex[:10]),
                label=names[0],
                # Percent of the image -> pixel coordinates with pixel centres at integers.
                y=float(np.clip(py / 100.0 * height - 0.5, 0.0, height - 1.0)),
                x=float(np.clip(px / 100.0 * width - 0.5, 0.0, width - 1.0)),
                is_positive=bool(result.get("is_positive", True)),
            )
        )
    if not points:
        raise BackendError(400, "context holds no smart key points: place a key point with a smart label")
    return points


def _prediction_regions(task: dict[str, Any], height: int, width: int) -> list[tuple[str, str, np.ndarray]]:
    """(result id, label, region mask) of the brush regions of the task's newest prediction."""
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if not predictions:
        return []
    newest = max(predictions, key=lambda p: (str(p.get("created_at") or ""), int(p.get("id") or 0)))
    regions = []
    for index, result in enumerate(newest.get("result") or []):
        if not isinstance(result, dict) or result.get("type") != "brushlabels":
            continue
        if (result.get("original_height"), result.get("original_width")) != (height, width):
            continue
        value = result.get("value") or {}
        try:
            mask = decode_region(value.get("rle"), height, width, index)
        except MalformedAnnotation as exc:
            logger.warning("task %s: pre-annotation region %d unreadable (%s)", task.get("id"), index, exc)
            continue
        labels = value.get("brushlabels") or [""]
        regions.append((str(result.get("id") or ""), str(labels[0]), mask))
    return regions


def _components_near(mask: np.ndarray, y: float, x: float, reach: int) -> np.ndarray:
    """The connected components of ``mask`` that come within ``reach`` pixels of (y, x)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    top, left = max(int(y) - reach, 0), max(int(x) - reach, 0)
    window = labelled[top : int(y) + reach + 1, left : int(x) + reach + 1]
    ids = np.unique(window[window > 0])
    return np.isin(labelled, ids)


# ---- the app ----------------------------------------------------------------------------------


class Backend:
    """State shared by the routes: models, images, sessions, records."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.images = ImageStore(settings)
        self.clicker = ClickerHolder(settings)
        self.student = StudentHolder(settings)
        self.sessions = Sessions()
        self._log_lock = threading.Lock()
        settings.backend_dir.mkdir(parents=True, exist_ok=True)
        self.relay = ReviewRelay(settings, record=lambda entry: self.record(_EVENTS, entry))

    def record(self, name: str, entry: dict[str, Any]) -> None:
        line = json.dumps({"t": datetime.now(UTC).isoformat(), **entry}, default=str)
        with self._log_lock, (self.settings.backend_dir / name).open("a") as f:
            f.write(line + "\n")

    # -- interactive ---------------------------------------------------------------------------

    def interactive(self, task: dict[str, Any], context: dict[str, Any], control: BrushControl) -> dict:
        from models.clicker import Click

        started = time.perf_counter()
        task_id = int(task.get("id") or 0)
        image_key, image = self.images.read(task.get("data") or {})
        height, width = image.shape[:2]
        points = parse_keypoints(context.get("result"), height, width, control.labels)
        predictor, version = self.clicker.get()
        with self.sessions.lock:
            seen = self.sessions.seen.setdefault(task_id, {})
            fresh = [p for p in points if p.id not in seen]
            session = self.sessions.current.get((task_id, points[-1].label))
            for point in fresh:
                session = self.sessions.current.get((task_id, point.label))
                if session is None or not (
                    session.accepts(point.y, point.x, point.label)
                    or (not point.is_positive and session.clicks)
                ):
                    session = self._start_region(task, point, height, width)
                    self.sessions.current[(task_id, point.label)] = session
                session.clicks.append(Click(y=point.y, x=point.x, is_positive=point.is_positive))
                seen[point.id] = session.region_id
            if session is None or not session.clicks:
                raise BackendError(400, "the key points of this request were all answered for another region")
            clicks = list(session.clicks)
            previous = session.last_mask if session.last_mask is not None else session.start_mask
        answer = predictor.predict(image, clicks, prev_mask=previous, image_key=image_key)
        region = answer.mask.astype(bool)
        with self.sessions.lock:
            session.last_mask, session.box, session.updated = region, answer.box, time.monotonic()
        result = mask_to_results(region.astype(np.uint8), [session.label], control.from_name, control.to_name)
        for item in result:  # the same id every click: accepting the answer replaces the region's last one
            item["id"] = session.replaces or session.region_id
        latency_ms = 1000.0 * (time.perf_counter() - started)
        self.record(
            _INTERACTIONS,
            {
                "task": task_id,
                "label": session.label,
                "region": session.region_id,
                "clicks": len(clicks),
                "new_keypoints": len(fresh),
                "positive": clicks[-1].is_positive,
                "encoded": bool(answer.encoded),
                "ms": round(latency_ms, 2),
                "mask_sha1": mask_digest(region),
                "model_version": version,
            },
        )
        return {"result": result, "score": float(np.clip(answer.score, 0.0, 1.0)), "model_version": version}

    def _start_region(self, task: dict[str, Any], point: KeyPoint, height: int, width: int) -> RegionSession:
        """A new region under ``point``: it starts from the pre-annotation's components there, and takes the
        place of the pre-annotation's region when that region is this one object of the same label."""
        session = RegionSession(region_id=CLICKER_ID_PREFIX + uuid.uuid4().hex[:10], label=point.label)
        regions = _prediction_regions(task, height, width)
        if not regions:
            return session
        union = np.zeros((height, width), dtype=bool)
        for _, _, mask in regions:
            union |= mask
        start = _components_near(union, point.y, point.x, START_REACH_PX)
        if start.any():
            session.start_mask = start
            for region_id, label, mask in regions:
                if label == point.label and region_id and not (mask & ~start).any():
                    session.replaces = region_id
        return session

    # -- plain predictions ---------------------------------------------------------------------

    def predictions(self, tasks: list[dict[str, Any]], control: BrushControl) -> list[dict[str, Any]]:
        from models.student.training import predict_images

        model, version = self.student.get()
        classes = tuple(self.settings.classes)
        unknown = [c for c in classes if c not in control.labels]
        if unknown:
            raise BackendError(400, f"label_config lacks the workspace's classes {unknown}")
        images = [self.images.read(task.get("data") or {})[1] for task in tasks]
        outputs = predict_images(model, images)
        return [
            {
                "result": mask_to_results(mask, classes, control.from_name, control.to_name),
                "score": float(np.clip(score, 0.0, 1.0)),
                "model_version": version,
            }
            for _, mask, score in outputs
        ]

    # -- training ------------------------------------------------------------------------------

    def start_fine_tuning(self, reason: str) -> dict[str, Any]:
        """Start the clicker's fine-tuning as a Prefect deployment run (the request returns at once)."""
        from prefect.deployments import run_deployment

        try:
            run = run_deployment(
                FINE_TUNE_DEPLOYMENT,
                parameters={"workspace": str(self.settings.workspace)},
                timeout=0,
                tags=["loom", "clicker"],
            )
        except Exception as exc:
            raise BackendError(
                503,
                f"could not start the Prefect deployment {FINE_TUNE_DEPLOYMENT} "
                f"({type(exc).__name__}: {exc}); is Prefect up with the deployments registered "
                "(`loom up --deploy`)?",
            ) from exc
        self.record(_EVENTS, {"action": "fine_tune_started", "reason": reason, "flow_run": str(run.id)})
        logger.info("clicker fine-tuning started: flow run %s (%s)", run.id, reason)
        return {"status": "started", "flow_run_id": str(run.id), "deployment": FINE_TUNE_DEPLOYMENT}


def _json_body(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BackendError(400, f"{what}: the body must be a JSON object")
    return raw


def create_app(settings: Settings) -> FastAPI:
    """The backend's app; the models load lazily (the clicker warms up in a thread at start)."""
    backend = Backend(settings)
    security = HTTPBasic(auto_error=False)

    def authorised(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), settings.backend_user.encode())
            and secrets.compare_digest(credentials.password.encode(), settings.backend_password.encode())
        )
        if not ok:
            raise HTTPException(
                status_code=401,
                detail="wrong or missing basic-auth credentials: Label Studio's ML backend connection must "
                "use the user and password of stack/secrets.env (`loom up` sets them)",
                headers={"WWW-Authenticate": "Basic"},
            )

    app = FastAPI(title="Loom Defect-Click backend")
    app.state.backend = backend

    @app.on_event("startup")
    def _warm_up() -> None:
        backend.clicker.warm_up()
        backend.relay.start(settings.review_relay_poll_s)

    @app.on_event("shutdown")
    def _stop_relay() -> None:
        backend.relay.stop()

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, exc: BackendError) -> JSONResponse:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return JSONResponse(status_code=exc.status, content={"status": "error", "errors": [str(exc)]})

    async def body_of(request: Request, what: str) -> dict[str, Any]:
        try:
            raw = await request.json()
        except ValueError as exc:
            raise BackendError(400, f"{what}: the body is not JSON ({exc})") from exc
        return _json_body(raw, what)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "DefectClick",
            "clicker": backend.clicker.state,
            "model_version": backend.clicker.current_version(),
        }

    @app.post("/setup", dependencies=[Depends(authorised)])
    async def setup(request: Request) -> dict[str, Any]:
        await body_of(request, "setup")
        return {"model_version": backend.clicker.current_version() or "loom-clicker-pretraining"}

    @app.post("/predict", dependencies=[Depends(authorised)])
    async def predict(request: Request) -> dict[str, Any]:
        body = await body_of(request, "predict")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise BackendError(400, "predict: 'tasks' must be a non-empty list of task objects")
        control = brush_control(body.get("label_config"), tuple(settings.classes))
        params = body.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if context is None:
            return {"results": await run_in_threadpool(backend.predictions, tasks, control)}
        if not isinstance(context, dict):
            raise BackendError(
                400, "predict: params.context must be an object with the key points in 'result'"
            )
        if len(tasks) != 1:
            raise BackendError(400, f"an interactive request carries one task, got {len(tasks)}")

        return {"results": [await run_in_threadpool(backend.interactive, tasks[0], context, control)]}

    @app.post("/webhook", dependencies=[Depends(authorised)])
    async def webhook(request: Request) -> dict[str, Any]:
        body = await body_of(request, "webhook")
        action = str(body.get("action") or "")
        if not action:
            raise BackendError(400, "webhook: no 'action' in the event")
        annotation = body.get("annotation") if isinstance(body.get("annotation"), dict) else {}
        task = body.get("task") if isinstance(body.get("task"), dict) else {}
        project = body.get("project") if isinstance(body.get("project"), dict) else {}
        backend.record(
            _EVENTS,
            {
                "action": action,
                "project": project.get("id"),
                "task": task.get("id") or annotation.get("task"),
                "annotation": annotation.get("id"),
                "completed_by": annotation.get("completed_by"),
            },
        )
        if action == "START_TRAINING":
            return await run_in_threadpool(backend.start_fine_tuning, "START_TRAINING from Label Studio")
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            # Off the request: Label Studio waits for this answer, and the check calls Label Studio back.
            project_id = project.get("id")
            threading.Thread(
                target=backend.relay.on_annotation,
                args=(int(project_id) if project_id is not None else None,),
                name="review-relay-webhook",
                daemon=True,
            ).start()
        return {"status": "recorded", "action": action}

    @app.post("/review/suspended", dependencies=[Depends(authorised)])
    async def review_suspended(request: Request) -> dict[str, Any]:
        body = await body_of(request, "review/suspended")
        try:
            review = PendingReview.from_dict(body)
        except ValueError as exc:
            raise BackendError(400, f"review/suspended: {exc}") from exc
        backend.relay.register(review)
        return {"status": "registered", "flow_run_id": review.flow_run_id}

    @app.post("/train", dependencies=[Depends(authorised)])
    async def train(request: Request) -> dict[str, Any]:
        await body_of(request, "train")
        return await run_in_threadpool(backend.start_fine_tuning, "train request")

    return app


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the backend until it is stopped (SIGTERM)."""
    import uvicorn

    logger.info("Loom ML backend for %s on http://%s:%d", settings.workspace, host, port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)


def mask_digest(mask: np.ndarray) -> str:
    """A short digest of a boolean mask (shape and pixels): ties a stored region to its answer."""

    bits = np.packbits(np.asarray(mask, dtype=bool))
    return hashlib.sha1(repr(mask.shape).encode() + bits.tobytes()).hexdigest()[:16]


def read_interactions(settings: Settings, task_ids: set[int] | None = None) -> list[dict[str, Any]]:
    """The backend's interactive answers (optionally for some tasks), oldest first."""
    path = settings.backend_dir / _INTERACTIONS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed backend
        if task_ids is None or row.get("task") in task_ids:
            rows.append(row)
    return rows


__all__ = ["Backend", "BackendError", "create_app", "mask_digest", "read_interactions", "serve"]
