"""`loom reproduce round-NNNN`: retrain a versioned round's students from its own data and params.

The workspace is checked out at the round's tag (its DVC data: manifest, people's masks, the round's
pseudo-labels and synthetic pairs; its round record), every student the round trained is trained again with
the recorded parameters (from the champion version it was warm-started from, if any) in deterministic
mode and scored on that round's frozen test split; the workspace then goes back to its latest state.
Models go to ``stack/reproduce/round-NNNN/`` so the round's own stay.

Tolerance: in deterministic mode on the machine and thread count that ran the round, the metrics come back
exactly; another CPU or thread count changes floating-point summation order, so metrics are compared with
``TOLERANCE`` (absolute).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from loom.config import RoundParams, Settings, load_settings
from loom.services import versioning

log = logging.getLogger(__name__)

#: Largest absolute difference of a reproduced metric that still counts as the same.
TOLERANCE = 0.02
#: The metrics compared (others, such as images/s, measure the machine, not the model).
COMPARED = ("miou", "pixel_auroc", "aupro_0.3", "image_auroc")


@dataclass
class Reproduced:
    student: str
    recorded: dict[str, float]
    reproduced: dict[str, float]

    def differences(self) -> dict[str, float]:
        return {
            key: abs(self.reproduced[key] - self.recorded[key])
            for key in COMPARED
            if key in self.recorded and key in self.reproduced
        }

    @property
    def within_tolerance(self) -> bool:
        return all(diff <= TOLERANCE for diff in self.differences().values())


def recorded_round(settings: Settings, tag: str) -> dict[str, Any]:
    """The round record stored under ``tag`` (read from git, whatever is checked out)."""
    round_no = int(tag.removeprefix("round-"))
    return json.loads(versioning.file_at_tag(settings, tag, f"rounds/{round_no:04d}/round.json"))


def round_settings(workspace: Path, record: dict[str, Any]) -> Settings:
    """The settings the round ran with: its recorded params (keys this version no longer has are left out)."""
    known = {f.name for f in fields(RoundParams)}
    params = {k: v for k, v in record.get("params", {}).items() if k in known}
    if isinstance(params.get("students"), list):
        params["students"] = ",".join(params["students"])
    return load_settings(workspace, **params)


def reproduce_round(settings: Settings, tag: str, force: bool = False) -> list[Reproduced]:
    """Retrain and re-score every student of the round tagged ``tag``; the workspace is left as it was."""
    from loom.services.tracking import download_student
    from tasks.train import evaluate_student, fit_student, student_samples

    record = recorded_round(settings, tag)
    round_no = int(record["round"])
    versioning.checkout_round(settings, tag, force=force)
    results = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        rs = round_settings(settings.workspace, record)
        threshold = record.get("teacher", {}).get("pixel_threshold")
        for name, recorded in record["students"].items():
            samples, *_ = student_samples(rs, round_no, name, threshold)
            out = rs.stack_dir / "reproduce" / tag / name
            # A warm-started student starts again from the champion it started from then.
            warm = recorded.get("warm_start") or ""
            init_from = download_student(rs, warm) if warm else None
            student = fit_student(rs, name, samples, out, {"round": round_no, "reproduced": True}, init_from)
            metrics = evaluate_student.fn(rs, student, n_overlays=0).metrics
            results.append(Reproduced(name, recorded["metrics"], metrics))
            log.info("%s of %s reproduced: %s", name, tag, results[-1].differences())
    finally:
        torch.use_deterministic_algorithms(deterministic)
        versioning.restore_main(settings, force=True)
    return results
