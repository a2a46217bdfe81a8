"""ONNX export of any student's ``segment`` and inference with onnxruntime (what the line can run).

The exported graph takes the camera's bytes as they are, uint8 RGB (batch, S, S, 3), and does the
backbone's input scaling itself, so the line needs neither torch nor the project's preprocessing code:

    images  uint8   (batch, S, S, 3)   ->   logits  float32 (batch, K+1, S, S), channel 0 background

The batch is dynamic; the side S is fixed at the model's ``image_size`` (larger images are tiled, see
:mod:`models.tiling`). The file's metadata records the architecture, ``image_size`` and ``num_classes``.

The TorchScript-based exporter (``dynamo=False``) is used: it handles these plain conv/attention graphs,
takes a second for a full model on two cores and needs no extra packages.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models.backbone.efficientnet_lite import INPUT_MEAN, INPUT_STD

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class _BytesToLogits(nn.Module):
    """(B, S, S, 3) uint8 RGB -> (B, K+1, S, S) logits: the input scaling of ``normalize`` + ``segment``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # On the 0..255 scale: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        self.register_buffer("offset", torch.tensor(INPUT_MEAN).mul(255.0).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(INPUT_STD).mul(255.0).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.offset) / self.scale
        return self.model.segment(x)


def export_onnx(
    model: nn.Module, path: str | Path, image_size: int | None = None, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``model.segment`` as an ONNX graph taking uint8 images (see the module docstring).

    The model is copied to the CPU in eval mode for the export; the caller's model is left as it was.

    Args:
        model: a student with ``segment(x) -> (B, K+1, H, W)`` logits.
        path: the ``.onnx`` file to write (parent folders are created).
        image_size: the fixed side S; defaults to ``model.config.image_size``.
        opset: ONNX opset version.

    Returns:
        The written path.
    """
    if not hasattr(model, "segment"):
        raise TypeError(f"{type(model).__name__} has no segment(x) method: only students can be exported")
    size = image_size or getattr(getattr(model, "config", None), "image_size", None)
    if not size:
        raise ValueError(f"{type(model).__name__} has no config.image_size: pass image_size")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _BytesToLogits(copy.deepcopy(model).cpu().eval()).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter announces its own deprecation on every call; nothing for the caller to act on.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # Shape arithmetic (SAME padding, size matching) is frozen into the graph: intended, since the
        # spatial size is fixed; the tracer warns about each such place.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    _write_metadata(path, model, size)
    logger.info("exported %s (%d x %d inputs) to %s", type(model).__name__, size, size, path)
    return path


def _write_metadata(path: Path, model: nn.Module, image_size: int) -> None:
    """Record what the graph is in the file itself, so a line runtime can check its inputs."""
    graph = onnx.load(str(path))
    config = getattr(model, "config", None)
    entries = {
        "architecture": type(model).__name__,
        "image_size": str(image_size),
        "num_classes": str(getattr(config, "num_classes", "")),
        "input": "uint8 RGB (batch, image_size, image_size, 3)",
        "output": "float32 logits (batch, num_classes + 1, image_size, image_size), channel 0 background",
    }
    onnx.helper.set_model_props(graph, entries)
    onnx.save(graph, str(path))


def onnx_session(path: str | Path, num_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for an exported student.

    Args:
        path: the ``.onnx`` file.
        num_threads: intra-op threads; None lets onnxruntime use every core.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: export a student first (models.student.export.export_onnx)"
        )
    options = ort.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_predict(model: str | Path | ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Logits of an exported student.

    Args:
        model: the ``.onnx`` file or a session from :func:`onnx_session` (reuse one for many calls).
        images: (B, S, S, 3) uint8 RGB with S the exported ``image_size``.

    Returns:
        (B, K+1, S, S) float32 logits, channel 0 background.
    """
    session = model if isinstance(model, ort.InferenceSession) else onnx_session(model)
    expected = session.get_inputs()[0].shape  # ["batch", S, S, 3]
    if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape[1:]) != list(expected[1:]):
        raise ValueError(
            f"the exported student takes uint8 images (B, {expected[1]}, {expected[2]}, 3), got "
            f"{images.dtype} {images.shape}: tile larger images (models.tiling) and convert to uint8 RGB"
        )
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
    return logits
