"""The `flywheel` flow's loop: which batch comes next and when the wheel stops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.loop import stop_reason, unprocessed_batches
from loom.config import load_settings
from loom.evaluation.plots import curve_points, round_curve


def _record(round_no: int, promoted: bool, miou: float, reviewed: int = 10) -> dict:
    return {
        "round": round_no,
        "mlflow": {"promoted": promoted},
        "metrics": {"miou": miou},
        "counts": {"reviewed": reviewed},
    }


def test_the_loop_stops_for_each_reason_and_goes_on_otherwise():
    going = [_record(1, True, 0.3), _record(2, True, 0.4)]
    assert stop_reason(going, 2, max_rounds=6, review_limit=None, target_miou=None, plateau_rounds=3) is None
    assert "6 rounds" in stop_reason(going, 6, 6, None, None, 3)
    assert "reviewed 20 images" in stop_reason(going, 2, 6, 20, None, 3)
    assert "reached the target" in stop_reason(going, 2, 6, None, 0.4, 3)
    # A round that was not promoted does not count towards the target, however high its own mIoU.
    assert stop_reason([*going, _record(3, False, 0.9)], 3, 6, None, 0.5, 3) is None
    flat = [*going, _record(3, False, 0.2), _record(4, False, 0.3), _record(5, False, 0.1)]
    assert "plateau" in stop_reason(flat, 5, 6, None, None, 3)
    assert stop_reason(flat, 5, 6, None, None, 0) is None  # plateau rule off


def test_each_round_takes_the_next_batch_no_round_has_ingested(tmp_path):
    settings = load_settings(tmp_path / "ws")
    incoming = tmp_path / "incoming"
    for name in ("batch-02", "batch-01", "batch-03"):
        (incoming / name).mkdir(parents=True)
    (incoming / "notes.txt").write_text("not a batch")
    assert unprocessed_batches(settings, str(incoming)) == [str(incoming / f"batch-0{i}") for i in (1, 2, 3)]
    record = settings.round_dir(1) / "round.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"round": 1, "source": str(incoming / "batch-01")}))
    assert unprocessed_batches(settings, str(incoming))[0] == str(incoming / "batch-02")
    assert unprocessed_batches(settings, None) == []
    with pytest.raises(FileNotFoundError, match="incoming folder"):
        unprocessed_batches(settings, str(tmp_path / "missing"))


def test_the_round_curve_counts_reviews_cumulatively_and_draws():
    records = [
        {**_record(1, True, 0.3, reviewed=24), "counts": {"reviewed": 24, "auto_accepted": 0}},
        {
            **_record(2, True, 0.4),
            "counts": {"reviewed": 12, "auto_accepted": 30},
            "auto_accept": {"candidates": 120},
        },
    ]
    points = curve_points(records)
    assert [p["reviewed_cum"] for p in points] == [24, 36]
    assert [p["auto_accepted_share"] for p in points] == [0.0, 0.25]
    image = round_curve({"a": points, "b": points[:1]})
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
