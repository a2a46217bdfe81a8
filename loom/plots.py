"""Figures logged with each round (rendered off-screen to RGB arrays for MLflow)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def per_class_bars(metrics: Mapping[str, float], classes: Sequence[str]) -> np.ndarray | None:
    """(H, W, 3) uint8 bar chart of IoU and Dice per class; None when no class has a score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # off-screen: no display on servers and CI
    from matplotlib.figure import Figure

    names = [c for c in classes if f"iou_{c}" in metrics]
    if not names:
        return None
    x = np.arange(len(names))
    fig = Figure(figsize=(1.2 * len(names) + 2, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [metrics[f"iou_{c}"] for c in names], width=0.4, label="IoU")
    ax.bar(x + 0.2, [metrics.get(f"dice_{c}", 0.0) for c in names], width=0.4, label="Dice")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_title(f"test split per class (mIoU {metrics.get('miou', float('nan')):.3f})")
    ax.legend(loc="upper right")
    canvas = FigureCanvasAgg(fig)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
