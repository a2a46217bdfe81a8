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


def round_curve(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> np.ndarray:
    """(H, W, 3) uint8: the flywheel round over round, one line per strategy (or run).

    Args:
        curves: name -> rounds in order, each with ``round``, ``miou`` (test split), ``reviewed_cum``
            (images people reviewed so far) and ``reviews`` (this round), optionally ``auto_accepted_share``.

    Left: test mIoU against the reviews spent so far; right: reviews per round (solid) and the share of the
    pool auto-accepted (dashed, right axis).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100)
    quality, work = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    share = work.twinx()
    for name, rounds in curves.items():
        line = quality.plot(
            [r["reviewed_cum"] for r in rounds], [r["miou"] for r in rounds], marker="o", label=name
        )[0]
        numbers = [r["round"] for r in rounds]
        work.plot(numbers, [r.get("reviews", np.nan) for r in rounds], marker="o", color=line.get_color())
        if any("auto_accepted_share" in r for r in rounds):
            share.plot(
                numbers,
                [r.get("auto_accepted_share", np.nan) for r in rounds],
                linestyle="--",
                color=line.get_color(),
            )
    quality.set(xlabel="images reviewed so far", ylabel="student mIoU (test split)", title="quality")
    work.set(xlabel="round", ylabel="reviews this round (solid)", title="people's work")
    share.set_ylabel("auto-accepted share of the pool (dashed)")
    share.set_ylim(0, 1)
    quality.legend(loc="lower right", fontsize="small")
    canvas = FigureCanvasAgg(fig)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def curve_points(records: Sequence[Mapping]) -> list[dict[str, float]]:
    """Round records (rounds/NNNN/round.json, in order) as the points of :func:`round_curve`."""
    points, reviewed = [], 0
    for record in records:
        counts = record["counts"]
        reviewed += int(counts["reviewed"])
        judged = int(record.get("auto_accept", {}).get("candidates") or 0)
        points.append(
            {
                "round": record["round"],
                "miou": float(record["metrics"].get("miou", np.nan)),
                "reviews": int(counts["reviewed"]),
                "reviewed_cum": reviewed,
                "auto_accepted_share": counts["auto_accepted"] / judged if judged else 0.0,
            }
        )
    return points
