"""One place for paths and settings.

Everything Loom writes lives under one workspace directory (``LOOM_WORKSPACE``, default ``./workspace``):

```
workspace/
  .git, .dvc           the workspace's own git + DVC repo (never the project's)
  data/                DVC-tracked: images/, masks/, captions/, pseudo/, manifest.parquet
  quarantine/          bad input with reasons.csv, set-aside annotations (git-ignored, not in DVC)
  rounds/NNNN/         round.json per round (git-tracked)
  dvc-remote/          default DVC remote (a local directory)
  stack/               server state: labelstudio/, prefect/, mlflow/, pids, logs (git-ignored)
```
Settings come from dataclass defaults, overridden by ``params.yaml`` (workspace first, else project root)
and by ``LOOM_*`` environment variables for ports and secrets.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Default fabric defect classes; index k in a mask is DEFAULT_CLASSES[k - 1], 0 is background.
DEFAULT_CLASSES: tuple[str, ...] = ("hole", "stain", "broken_yarn", "knot", "misweave", "defect")


@dataclass(frozen=True)
class Ports:
    label_studio: int = 8080
    prefect: int = 4200
    mlflow: int = 5000
    backend: int = 9090
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class RoundParams:
    """Knobs of one flywheel round (editable as Prefect deployment parameters)."""

    review_budget: int = 24  # images sent to people per round
    review_timeout_s: float = 3600.0  # how long the round waits for reviews before going on
    selection: str = "combined"  # random | uncertainty | disagreement | diversity | rarity | combined
    audit_share: float = 0.25  # of the budget, drawn at random: what calibrates auto-accept
    # Target share of wrong labels among the auto-accepted (loom/stages/calibration.py).
    accept_risk: float = 0.1
    teacher: str = "auto"  # auto | openclip | backbone (auto: open_clip when its weights are here)
    teacher_shots: int = 4  # known-good images (people's normal reviews) the teacher uses as references
    clip_model: str = "ViT-B-16-plus-240"
    clip_pretrained: str = "laion400m_e32"  # open_clip tag, read from the local cache only
    clip_checkpoint: str = ""  # or a local open_clip checkpoint file
    students: tuple[str, ...] = ("fpn",)  # trained each round; the best competes with the champion
    image_size: int = 256
    epochs: int = 6  # at least this many passes over the labeled set ...
    train_samples: int = 2400  # ... and at least this many crops seen, so a small labeled set still trains
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    warm_start: bool = True  # a segmenter starts from the champion's weights (same architecture and size)
    promote_metric: str = "miou"  # picks the round's best student, the challenger
    # The promotion gate (loom/evaluation/promotion.py): the lower end of the paired-bootstrap interval of the
    # gain must clear promote_min_gain (a margin for training noise, which resampling test images cannot see),
    # and no class with at least promote_min_class_pixels test pixels may lose more than the tolerance.
    promote_min_gain: float = 0.05
    promote_class_tolerance: float = 0.05
    promote_min_class_pixels: int = 500
    clicker_preset: str = "default"  # default | tiny: the click model annotators' key points run through
    clicker_fine_tune_steps: int = 200  # per-round fine-tuning of the clicker on people's masks
    augment: str = "auto"  # auto (defect_gen with a GPU, else copy_paste) | defect_gen | copy_paste | none
    augment_preset: str = "auto"  # defect_gen preset: auto (full on a GPU, else cpu) | cpu | full | tiny
    synthetic_per_round: int = 40  # synthetic image + mask pairs per round, most for the rarest class


@dataclass(frozen=True)
class Settings:
    workspace: Path
    classes: tuple[str, ...] = DEFAULT_CLASSES
    project_title: str = "Loom fabric inspection"
    registered_model: str = "loom-student"
    registered_clicker: str = "loom-clicker"
    registered_generator: str = "loom-defect-gen"
    ports: Ports = field(default_factory=Ports)
    round: RoundParams = field(default_factory=RoundParams)
    # The ML backend's review relay sweeps for suspended rounds it missed (loom/services/review_relay.py).
    review_relay_poll_s: float = 300.0

    # ---- paths -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.workspace / "data"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def masks_dir(self) -> Path:
        return self.data_dir / "masks"

    @property
    def captions_dir(self) -> Path:
        return self.data_dir / "captions"

    @property
    def pseudo_dir(self) -> Path:
        return self.data_dir / "pseudo"

    @property
    def synthetic_dir(self) -> Path:
        """Generated defect image + mask pairs (DVC-tracked with the round that made them)."""
        return self.data_dir / "synthetic"

    @property
    def quarantine_dir(self) -> Path:
        """Bad input and its reasons, beside ``data/`` so that DVC never pushes it (data/quarantine.py)."""
        return self.workspace / "quarantine"

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / "manifest.parquet"

    @property
    def calibration_path(self) -> Path:
        """Audited pseudo-labels: confidence and whether people found them wrong (stages/calibration.py)."""
        return self.data_dir / "calibration.parquet"

    @property
    def rounds_dir(self) -> Path:
        return self.workspace / "rounds"

    @property
    def dvc_remote_dir(self) -> Path:
        return self.workspace / "dvc-remote"

    @property
    def stack_dir(self) -> Path:
        return self.workspace / "stack"

    @property
    def models_dir(self) -> Path:
        """Trained student checkpoints (config + safetensors), one folder per round."""
        return self.stack_dir / "models"

    @property
    def clicker_dir(self) -> Path:
        """The click model: pre-trained cache, per-round fine-tunes, the champion pointer."""
        return self.stack_dir / "clicker"

    @property
    def label_studio_files_root(self) -> Path:
        """Label Studio's local-files document root: it holds nothing but the link ``images`` to the images
        folder, so no storage a Label Studio user adds can reach anything else of the workspace."""
        return self.stack_dir / "labelstudio-files"

    @property
    def backend_dir(self) -> Path:
        """The ML backend's own records (interactions with annotators, webhook events)."""
        return self.stack_dir / "backend"

    def round_dir(self, round_no: int) -> Path:
        return self.rounds_dir / f"{round_no:04d}"

    # ---- services ------------------------------------------------------------------------------
    @property
    def label_studio_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.label_studio}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.prefect}/api"

    @property
    def mlflow_tracking_uri(self) -> str:
        """MLflow talks straight to the sqlite store: no server needed to log or load."""
        return f"sqlite:///{self.stack_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.stack_dir / "mlflow" / "artifacts"

    @property
    def mlflow_ui_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.mlflow}"

    @property
    def backend_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.backend}"

    @property
    def backend_user(self) -> str:
        """Basic-auth user Label Studio sends to the ML backend."""
        return os.environ.get("LOOM_BACKEND_USER", "loom")

    @property
    def backend_password(self) -> str:
        return os.environ.get("LOOM_BACKEND_PASSWORD") or workspace_secret(self, "LOOM_BACKEND_PASSWORD")

    @property
    def label_studio_admin(self) -> str:
        return os.environ.get("LOOM_LS_ADMIN", "admin@loom.local")

    @property
    def label_studio_password(self) -> str:
        return os.environ.get("LOOM_LS_PASSWORD") or workspace_secret(self, "LOOM_LS_PASSWORD")

    @property
    def label_studio_token(self) -> str:
        """Admin API token: from the environment, else generated once into the workspace (mode 0600)."""
        return os.environ.get("LOOM_LS_TOKEN") or workspace_secret(self, "LOOM_LS_TOKEN")

    def class_index(self, name: str) -> int:
        """Mask value of a class name (1-based); unknown names map to the generic ``defect``."""
        names = list(self.classes)
        return names.index(name) + 1 if name in names else names.index("defect") + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["workspace"] = str(self.workspace)
        return d


#: The workspace's generated secrets, one ``KEY=value`` a line (mode 0600, outside anything served).
SECRETS_FILE = "secrets.env"
# Taken (flock) around every read-modify-write of SECRETS_FILE: two processes adding keys at once
# (the backend and a flow run at a first start) would otherwise each write the file without the other's key.
_SECRETS_LOCK = ".secrets.lock"


def secrets_path(settings: Settings) -> Path:
    """``stack/secrets.env``: in the stack folder, which no server of the stack serves."""
    return settings.stack_dir / SECRETS_FILE


def read_workspace_secrets(settings: Settings) -> dict[str, str]:
    """Every secret of ``stack/secrets.env`` (empty when there is none yet). Writes replace the file whole
    (:func:`workspace_secret`), so a reader never sees it half-written and needs no lock."""
    try:
        text = secrets_path(settings).read_text()
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip()
    return values


def _write_secrets(path: Path, values: dict[str, str]) -> None:
    """Replace ``path`` by a file holding ``values``: written to a temporary file in the same folder, which
    ``mkstemp`` creates with mode 0600 (never readable by others, not even for an instant), synced, then
    renamed over the old one, so a reader sees the old file or the new one, never a partial or empty one."""
    fd, tmp_name = tempfile.mkstemp(prefix=".secrets.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in values.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def workspace_secret(settings: Settings, key: str) -> str:
    """Read (or create) a random secret kept in ``stack/secrets.env``, never in code or logs.

    Adding a key is a read-modify-write under an exclusive lock on ``stack/.secrets.lock``, and the file is
    replaced atomically with mode 0600 (:func:`_write_secrets`): concurrent adders lose no key, and readers
    (who take no lock) never see a half-written file.
    """
    known = read_workspace_secrets(settings)
    if key in known:
        return known[key]
    path = secrets_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(path.parent / _SECRETS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        values = read_workspace_secrets(settings)  # again: another process may have added keys meanwhile
        if key not in values:
            values[key] = secrets.token_hex(20)
            _write_secrets(path, values)
        return values[key]
    finally:
        os.close(lock_fd)  # releases the lock


#: Round settings older workspaces may still carry, and what replaced them.
RETIRED_ROUND_KEYS = {"confident_low": "auto-accept is calibrated now: see round.accept_risk"}


def _merge(cls: type, base: Any, overrides: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(
            f"params.yaml: unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}"
        )
    return cls(**{**asdict(base), **overrides})


def load_settings(workspace: str | Path | None = None, **round_overrides: Any) -> Settings:
    """Settings for a workspace: defaults < params.yaml < LOOM_* environment < keyword overrides."""
    ws = Path(workspace or os.environ.get("LOOM_WORKSPACE", "workspace")).resolve()
    params: dict[str, Any] = {}
    for candidate in (ws / "params.yaml", PROJECT_ROOT / "params.yaml"):
        if candidate.exists():
            params = yaml.safe_load(candidate.read_text()) or {}
            break
    ports = _merge(Ports, Ports(), params.get("ports", {}))
    env_ports = {
        "label_studio": os.environ.get("LOOM_LS_PORT"),
        "prefect": os.environ.get("LOOM_PREFECT_PORT"),
        "mlflow": os.environ.get("LOOM_MLFLOW_PORT"),
        "backend": os.environ.get("LOOM_BACKEND_PORT"),
    }
    ports = _merge(Ports, ports, {k: int(v) for k, v in env_ports.items() if v})
    round_params = dict(params.get("round", {}))
    for key in sorted(set(RETIRED_ROUND_KEYS) & set(round_params)):
        warnings.warn(f"params.yaml: round.{key} is no longer used ({RETIRED_ROUND_KEYS[key]})", stacklevel=2)
        round_params.pop(key)
    rnd = _merge(RoundParams, RoundParams(), round_params)
    rnd = _merge(RoundParams, rnd, {k: v for k, v in round_overrides.items() if v is not None})
    if isinstance(rnd.students, str | list):  # params.yaml gives a list, the command line a comma list
        names = rnd.students.split(",") if isinstance(rnd.students, str) else rnd.students
        rnd = replace(rnd, students=tuple(name.strip() for name in names if name.strip()))
    top = {k: v for k, v in params.items() if k not in ("ports", "round", "dataset", "demo")}
    if "classes" in top:
        top["classes"] = tuple(top["classes"])
    return Settings(workspace=ws, ports=ports, round=rnd, **top)
