"""Settings, the manifest contract and review selection."""

from __future__ import annotations

import pandas as pd
import pytest

from loom.config import DEFAULT_CLASSES, load_settings
from loom.data import manifest
from tasks.select import open_pool


def test_settings_layer_params_env_and_overrides(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text("round: {review_budget: 3}\nports: {label_studio: 18001}\n")
    monkeypatch.setenv("LOOM_PREFECT_PORT", "14999")
    s = load_settings(ws, epochs=1)
    assert s.round.review_budget == 3 and s.round.epochs == 1
    assert s.ports.label_studio == 18001 and s.ports.prefect == 14999
    assert s.manifest_path == ws / "data" / "manifest.parquet"
    assert s.class_index("hole") == 1 and s.class_index("never-seen") == DEFAULT_CLASSES.index("defect") + 1


def test_settings_reject_unknown_keys(tmp_path):
    (tmp_path / "params.yaml").write_text("round: {review_budgte: 3}\n")
    with pytest.raises(ValueError, match="review_budgte"):
        load_settings(tmp_path)


def test_generated_secret_is_stable_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOM_LS_TOKEN", raising=False)
    s = load_settings(tmp_path)
    token = s.label_studio_token
    assert len(token) >= 20 and token == load_settings(tmp_path).label_studio_token
    assert (s.stack_dir / "secrets.env").stat().st_mode & 0o077 == 0


def _rows(n: int, **kw) -> pd.DataFrame:
    return manifest.normalize(pd.DataFrame({"image_id": [f"id{i:02d}" for i in range(n)], "path": "x", **kw}))


def test_upsert_is_a_noop_for_known_ids_and_roundtrips(tmp_path):
    df = manifest.upsert(manifest.empty(), _rows(3, split="train"))
    again = manifest.upsert(df, _rows(4, split="test"))
    assert len(again) == 4
    assert (again.set_index("image_id").loc[["id00", "id01", "id02"], "split"] == "train").all()
    manifest.save(again, tmp_path / "m.parquet")
    loaded = manifest.load(tmp_path / "m.parquet")
    assert list(loaded.columns) == list(manifest.COLUMNS) and len(loaded) == 4


def test_open_pool_skips_queued_reviewed_test_human_and_quarantined():
    df = _rows(6, split="train", label_source="pseudo", review_state="none")
    df.loc[0, "review_state"] = "queued"
    df.loc[1, "split"] = "test"
    df.loc[2, "label_source"] = "human"
    df.loc[3, "quarantine_reason"] = "truncated"
    df.loc[4, "review_state"] = "auto_accepted"  # re-judged every round: still open
    assert open_pool(df)["image_id"].tolist() == ["id04", "id05"]


def test_retired_round_keys_warn_instead_of_failing(tmp_path):
    (tmp_path / "params.yaml").write_text("round:\n  confident_low: 0.2\n  review_budget: 7\n")
    with pytest.warns(UserWarning, match="confident_low is no longer used"):
        settings = load_settings(tmp_path)
    assert settings.round.review_budget == 7


def test_review_uncertainty_flags_unnamed_defects_trusts_confident_names_and_ranks_the_rest():
    import numpy as np

    from loom.stages.teachers import LabeledImage
    from models.teacher.naming import RegionName
    from models.teacher.types import TeacherPrediction
    from tasks.pseudo_label import review_uncertainty

    def item(score: float, mask_value: int = 0, names: tuple = ()) -> LabeledImage:
        mask = np.zeros((4, 4), np.uint8)
        mask[1, 1] = mask_value
        prediction = TeacherPrediction(
            np.zeros((4, 4), np.float32), score, mask > 0, 0.8 if score < 1 else 0.05
        )
        return LabeledImage(prediction, mask, list(names))

    labeled = [
        item(0.1),
        item(0.5),
        item(0.3),
        item(0.9, 6, (RegionName(6, 0.0, "none"),)),  # the generic "defect" class: a person must name it
        item(2.0, 1, (RegionName(1, 0.9, "prototypes"),)),  # named with a 90% vote
        item(2.0, 1, (RegionName(1, 0.6, "prototypes"),)),  # named, but a split vote
    ]
    unc = review_uncertainty(labeled, defect_id=6)
    assert unc[3] == 1.0
    assert unc[0] == 0.0 and unc[0] < unc[2] < unc[1] <= 0.8
    assert unc[4] == pytest.approx(0.1) and unc[5] == pytest.approx(0.4)


def test_update_rows_sets_values_per_image_and_ignores_unknown_ids():
    df = _rows(3, split="train")
    updates = pd.DataFrame(
        {"image_id": ["id02", "id00", "nope"], "score": [0.2, 0.9, 1.0], "classes": ["a", "b", "c"]}
    )
    out = manifest.update_rows(df, updates).set_index("image_id")
    assert (
        out.loc["id00", "score"] == 0.9
        and out.loc["id02", "score"] == 0.2
        and pd.isna(out.loc["id01", "score"])
    )
    assert out.loc["id00", "classes"] == "b" and len(out) == 3
    with pytest.raises(KeyError):
        manifest.update_rows(df, pd.DataFrame({"image_id": ["id00"], "bogus": [1]}))
