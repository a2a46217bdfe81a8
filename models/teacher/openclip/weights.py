"""Where the open_clip teacher's weights come from: a local checkpoint, a pretrained tag, or (tests) none.

A pretrained tag is downloaded by open_clip into its cache (the Hugging Face hub cache, or ~/.cache/clip
for URL weights) on a machine that can reach the hub; a line PC without network uses either that cache or a
checkpoint file copied onto it. `openclip_weights_available` answers "would loading work here?" without
touching the network, so `--teacher auto` can fall back to the offline backbone teacher.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Protocol

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
#: A 2-layer ViT / 2-layer text tower (7 x 7 patches at 224 px) that builds in milliseconds: tests only.
TINY_MODEL_NAME = "loom-tiny-clip"


class OpenClipWeightsUnavailable(RuntimeError):
    """The configured open_clip weights are not on this machine and cannot be downloaded."""


class WeightsSource(Protocol):
    """The fields of a teacher config that say which weights to load."""

    model_name: str
    pretrained: str | None
    checkpoint: str | None


def register_model_configs() -> None:
    """Make the project's own model configs (configs/*.json, e.g. `loom-tiny-clip`) known to open_clip."""
    known = set(open_clip.list_models())
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.stem not in known:
            open_clip.add_model_config(path)


def _how_to_get_weights(source: WeightsSource) -> str:
    return (
        f"Either pass a pretrained tag (e.g. {source.model_name} / laion400m_e32) on a machine that can "
        "download it (cached under ~/.cache/huggingface or ~/.cache/clip, then usable offline), or "
        "--clip-checkpoint PATH (round.clip_checkpoint) to a local open_clip checkpoint of that model."
    )


def _tag_is_cached(model_name: str, tag: str) -> bool:
    """Whether open_clip would find the tag's weights in its cache (no network: cache look-ups only)."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        return False
    if "file" in cfg:
        return os.path.isfile(cfg["file"])
    hub_path = cfg.get("hf_hub", "")
    if hub_path and open_clip.pretrained.has_hf_hub():  # open_clip prefers the hub when it has an entry
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub_path)
        filename = filename or HF_WEIGHTS_NAME
        # open_clip tries a .safetensors twin of the file first
        twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else f"{Path(filename).stem}.safetensors"
        candidates = [twin, filename]
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in candidates)
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.expanduser(f"~/.cache/clip/{os.path.basename(url)}"))


def openclip_weights_available(config: WeightsSource) -> bool:
    """True when `config`'s weights are on this machine: its checkpoint file exists, or its pretrained tag
    is in the open_clip / Hugging Face cache. Never uses the network; random weights count as none."""
    if config.checkpoint:
        return Path(config.checkpoint).expanduser().is_file()
    if not config.pretrained:
        return False
    register_model_configs()
    return _tag_is_cached(config.model_name, config.pretrained)


def load_clip(config: WeightsSource) -> torch.nn.Module:
    """Build `config.model_name` with its weights (checkpoint, else tag, else random), in eval mode.

    Raises:
        OpenClipWeightsUnavailable: the checkpoint file is missing, or the tag is neither cached nor
            downloadable here; the message says how to get weights.
        ValueError: unknown model name or tag, or a checkpoint that does not fit the model.
    """
    register_model_configs()
    if config.model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {config.model_name!r}; known: {open_clip.list_models()}")
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.is_file():
            raise OpenClipWeightsUnavailable(
                f"open_clip checkpoint {path} does not exist. {_how_to_get_weights(config)}"
            )
        try:
            model = open_clip.create_model(config.model_name, pretrained=str(path))
        except (RuntimeError, KeyError, OSError, ValueError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"could not load open_clip checkpoint {path} into {config.model_name}: {error}. "
                "Is it a checkpoint of that model?"
            ) from error
    elif config.pretrained:
        tags = open_clip.list_pretrained_tags_by_model(config.model_name)
        if config.pretrained not in tags:
            raise ValueError(
                f"open_clip has no pretrained tag {config.pretrained!r} for {config.model_name}; "
                f"known tags: {tags}"
            )
        try:
            model = open_clip.create_model(config.model_name, pretrained=config.pretrained)
        except (RuntimeError, OSError) as error:
            raise OpenClipWeightsUnavailable(
                f"open_clip weights {config.model_name} / {config.pretrained} are not on this machine and "
                f"cannot be downloaded ({error}). {_how_to_get_weights(config)}"
            ) from error
    else:
        logger.warning(
            "open_clip %s with RANDOM weights (no checkpoint, no pretrained tag): for tests and cost "
            "measurements only, its maps mean nothing",
            config.model_name,
        )
        model = open_clip.create_model(config.model_name, pretrained=None)
    return model.eval()
