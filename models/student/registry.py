"""Every student by name: build one from a name and config overrides, load any saved one from its folder.

A saved student's ``config.json`` names its class (``"architecture"``, written by
:meth:`~models.student.checkpoint.PretrainedMixin.save_pretrained`), so :func:`load_student` needs only the
folder. Adding a student is one line in :data:`STUDENTS`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from models.student.bafpn import BAFPNLoss, BAFPNModel
from models.student.cfa import CFALoss, CFAModel
from models.student.checkpoint import CONFIG_NAME
from models.student.fpn import FPNSegmenter, SegmentationLoss
from models.student.rd4ad import RD4ADLoss, RD4ADModel
from models.student.uninet import UniNetLoss, UniNetModel

#: Short name -> model class (a ``PretrainedMixin`` module with a ``config_class``).
STUDENTS: dict[str, type[nn.Module]] = {
    "fpn": FPNSegmenter,
    "bafpn": BAFPNModel,
    "cfa": CFAModel,
    "rd4ad": RD4ADModel,
    "uninet": UniNetModel,
}
#: Short name -> the loss its training loop calls.
LOSSES: dict[str, type[nn.Module]] = {
    "fpn": SegmentationLoss,
    "bafpn": BAFPNLoss,
    "cfa": CFALoss,
    "rd4ad": RD4ADLoss,
    "uninet": UniNetLoss,
}


def _known() -> str:
    return ", ".join(f"{name} ({cls.__name__})" for name, cls in STUDENTS.items())


def student_class(name: str) -> type[nn.Module]:
    """The class registered as ``name`` (a short name such as ``"bafpn"`` or a class name)."""
    if name in STUDENTS:
        return STUDENTS[name]
    for cls in STUDENTS.values():
        if cls.__name__ == name:
            return cls
    raise ValueError(f"unknown student {name!r}; known students: {_known()}")


def build_student(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """A new student with its config's defaults, changed by ``overrides``.

    Args:
        name: a key of :data:`STUDENTS`, e.g. ``"bafpn"``.
        num_classes: defect classes, background excluded.
        **overrides: config fields, e.g. ``tiny=True`` or ``channels=96``.

    Raises:
        ValueError: unknown student or config field (the message lists the valid ones).
    """
    cls = student_class(name)
    config_class = cls.config_class  # type: ignore[attr-defined]
    valid = [f.name for f in fields(config_class)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; its fields are {valid}")
    return cls(config_class(num_classes=num_classes, **overrides))


def build_loss(name: str, model: nn.Module | None = None) -> nn.Module:
    """The training loss of student ``name``; losses that depend on the model's config (CFA's neighbour
    counts) are built from ``model.config``."""
    key = next((k for k, cls in STUDENTS.items() if name in (k, cls.__name__)), None)
    if key is None:
        raise ValueError(f"unknown student {name!r}; known students: {_known()}")
    loss_class = LOSSES[key]
    from_config = getattr(loss_class, "from_config", None)
    if from_config is not None and model is not None:
        return from_config(model.config)
    return loss_class()


def is_anomaly_scorer(model: nn.Module) -> bool:
    """True for students that learn normal fabric and score deviations (trained by train_anomaly_model)."""
    return callable(getattr(model, "calibrate", None))


def scores_anomalies(name: str) -> bool:
    """:func:`is_anomaly_scorer` for a student name, without building the model."""
    return callable(getattr(student_class(name), "calibrate", None))


def load_student(directory: str | Path) -> nn.Module:
    """Rebuild any saved student (eval mode) from its folder (``config.json`` + ``model.safetensors``).

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: ``config.json`` is unreadable or names no known architecture.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a student model folder holds {CONFIG_NAME} and model.safetensors "
            "(written by save_pretrained / `loom train`)"
        )
    try:
        architecture = json.loads(config_path.read_text()).get("architecture")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(
            f"{config_path} is not a JSON object ({err}); re-save or re-train the model"
        ) from err
    if not architecture:
        raise ValueError(f'{config_path} names no "architecture"; known architectures: {_known()}')
    try:
        cls = student_class(str(architecture))
    except ValueError:
        raise ValueError(
            f"{directory} holds an unknown architecture {architecture!r}; known architectures: {_known()}"
        ) from None
    return cls.from_pretrained(directory)  # type: ignore[attr-defined]
