"""Helpers shared by the students' unit tests: a synthetic weave, a bright square, batch norm, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.backbone.efficientnet_lite import normalize
from models.student.export import export_onnx, onnx_predict, onnx_session


def fabric(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A grey weave-like texture, (size, size, 3) uint8."""
    yy, xx = np.mgrid[:size, :size]
    weave = 100 + 12 * np.sin(xx * 1.3) * np.sin(yy * 1.3) + rng.normal(0, 4, (size, size))
    return np.repeat(np.clip(weave, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def with_square(image: np.ndarray, top: int = 20, left: int = 24, side: int = 14) -> np.ndarray:
    """A copy of ``image`` with a bright square: the defect of these tests."""
    image = image.copy()
    image[top : top + side, left : left + side] = 240
    return image


def normal_batch(count: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """(count, 3, size, size) normalised defect-free weaves."""
    rng = np.random.default_rng(seed)
    return normalize(np.stack([fabric(rng, size) for _ in range(count)]))


def settle_batch_norm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Trainable batch norms take the statistics of ``images`` (a cumulative average), as training leaves
    them; the model is left in eval mode. With the fresh statistics (mean 0, var 1) an untrained deep
    decoder's eval-mode features shrink to ~1e-10 and cosines between them are rounding noise."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.weight.requires_grad]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def assert_onnx_matches_torch(model: torch.nn.Module, path: Path, num_outputs: int) -> None:
    """Export ``model`` (eval mode, calibrated) and compare onnxruntime's logits with torch's on two
    weaves, one with a square, twice over (a batch of 4, 64 px)."""
    export_onnx(model, path)
    images = np.stack([with_square(fabric(np.random.default_rng(3))), fabric(np.random.default_rng(4))] * 2)
    with torch.no_grad():
        expected = model.segment(normalize(images)).numpy()
    logits = onnx_predict(onnx_session(path, num_threads=1), images)
    assert logits.shape == expected.shape == (4, num_outputs, 64, 64)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
