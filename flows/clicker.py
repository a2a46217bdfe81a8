"""Fine-tune the click model between rounds: the ML backend starts this deployment on a "train" request."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow

from loom.config import load_settings
from loom.services.versioning import next_round_number
from tasks.clicker import fine_tune_round_clicker


@flow(name="clicker-fine-tune")
def clicker_fine_tune(workspace: str | None = None) -> dict[str, Any]:
    """Fine-tune on every human mask so far (pre-annotations of the latest round); promote if NoC falls."""
    settings = load_settings(workspace)
    round_no = max(next_round_number(settings) - 1, 1)
    return asdict(fine_tune_round_clicker(settings, round_no, suffix=f"-{int(time.time())}"))


if __name__ == "__main__":
    clicker_fine_tune()
