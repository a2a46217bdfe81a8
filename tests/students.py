"""Helpers shared by the students' unit tests."""

from __future__ import annotations

import torch


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
