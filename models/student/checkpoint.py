"""Saving and loading students as a folder: ``config.json`` + ``model.safetensors`` (no pickles).

Every student (FPN, BAFPN, CFA, RD4AD, UniNet) mixes in :class:`PretrainedMixin`; ``config.json`` names the
architecture, so :func:`models.student.registry.load_student` can rebuild any of them from the folder alone.
Weights are read with safetensors, which cannot execute code (the ``weights_only`` guarantee).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class StudentConfig(Protocol):
    """A dataclass config: rebuilt from ``config.json`` (unknown keys such as metadata ignored)."""

    pretrained: bool


def config_to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


def config_from_dict(config_class: type, data: dict[str, Any]) -> Any:
    """Build ``config_class`` from a dict; keys that are not its fields (metadata) are ignored."""
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in data.items() if k in known})


def read_model_metadata(directory: str | Path) -> dict[str, Any]:
    """The whole ``config.json`` of a saved model (config fields and metadata such as ``image_threshold``)."""
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built as ``cls(config)``.

    The class sets ``config_class`` (its config dataclass); the instance keeps ``self.config``. A config
    with a ``pretrained`` field is rebuilt with ``pretrained=False`` so loading never re-reads ImageNet
    weights: every weight comes from ``model.safetensors``.
    """

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (config plus optional metadata such as ``image_threshold`` or ``classes``)
        and ``model.safetensors`` into ``directory``; returns the folder."""
        assert isinstance(self, nn.Module)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {**(metadata or {}), **config_to_dict(self.config), "architecture": type(self).__name__}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))
        # contiguous() because safetensors refuses views that share storage with another tensor.
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Self:
        """Rebuild a saved model in eval mode."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a student model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    "(written by save_pretrained / `loom train`)."
                )
        try:
            config_dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{config_path} is not valid JSON ({err}); re-save or re-train the model."
            ) from err
        saved_as = config_dict.get("architecture", cls.__name__)
        if saved_as != cls.__name__:
            raise ValueError(
                f"{directory} holds a {saved_as}, not a {cls.__name__}: load it with load_student"
            )
        has_pretrained = any(f.name == "pretrained" for f in fields(cls.config_class))
        config = config_from_dict(
            cls.config_class, {**config_dict, **({"pretrained": False} if has_pretrained else {})}
        )
        model = cls(config)  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        model.load_state_dict(load_file(str(weights_path)), strict=True)
        if has_pretrained:
            model.config.pretrained = bool(config_dict.get("pretrained", False))
        return model.eval()
