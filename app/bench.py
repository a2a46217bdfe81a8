"""Markdown tables for BENCHMARKS.md from a demo run (`python -m app.bench WORKSPACE`).

Reads ``WORKSPACE/demo_summary.json`` and the round records that `loom demo` wrote, so every number
in the tables comes from one run on one machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def report(workspace: Path) -> str:
    summary = json.loads((workspace / "demo_summary.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((workspace / "rounds").glob("*/round.json"))]
    lines = [f"Machine: {machine()}", ""]
    lines += [
        "| round | ingested | reviewed | clicks / reviewed image | painted | synthetic | auto-accepted "
        "| pre-label IoU | mIoU | pixel AUROC | AUPRO@0.3 | image AUROC | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, rec in zip(summary["rounds"], records, strict=False):
        m, c = rec["metrics"], rec["counts"]
        lines.append(
            f"| {row['round']} | {row['ingested']} | {row['reviewed']} "
            f"| {c.get('clicks_per_reviewed', float('nan')):.2f} | {c.get('painted_images', 0)} "
            f"| {c.get('synthetic', 0)} | {row['auto_accepted']} "
            f"| {row.get('prelabel_iou', float('nan')):.3f} "
            f"| {m.get('miou', 0):.3f} "
            f"| {m.get('pixel_auroc', 0):.3f} | {m.get('aupro_0.3', 0):.3f} | {m.get('image_auroc', 0):.3f} "
            f"| {row['wall_s']:.0f} |"
        )
    lines += [
        "",
        "| step | " + " | ".join(f"round {r['round']}" for r in summary["rounds"]) + " |",
        "|---|" + "---|" * len(summary["rounds"]),
    ]
    for step in summary["step_seconds"][0]:  # in the order the round ran them
        lines.append(
            f"| {step} | " + " | ".join(f"{s.get(step, 0):.1f} s" for s in summary["step_seconds"]) + " |"
        )
    lines += ["", "| round | synthetic per class | rejected | click model |", "|---|---|---|---|"]
    for rec in records:
        made, clicker = rec.get("augment", {}), rec.get("clicker", {})
        decision = "promoted" if clicker.get("promoted") else "kept the previous one"
        lines.append(
            f"| {rec['round']} | {made.get('per_class', {})} | {made.get('rejected', {})} "
            f"| {clicker.get('reason') or '-'}: {decision} |"
        )
    lines += [
        "",
        "| process | peak / current memory |",
        "|---|---|",
        f"| demo process (flow, teacher, student) | {summary['peak_rss_mb']:.0f} MB peak RSS |",
    ]
    for name, mb in summary.get("server_rss_mb", {}).items():
        lines.append(f"| {name} (with children) | {mb:.0f} MB RSS at the end |")
    lines += ["", f"Demo total (stack start + {len(summary['rounds'])} rounds): {summary['total_s']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOOM_WORKSPACE", "workspace"))))
