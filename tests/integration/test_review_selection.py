"""Selection and calibrated auto-accept as the round runs them: real teacher, manifest, files; no servers."""

from __future__ import annotations

import numpy as np
import pytest

from app.demo import GroundTruth
from loom.config import Settings, load_settings
from loom.data import manifest
from loom.data.imageio import write_mask
from loom.data.ingest import ingest_folder
from loom.datasets.fabric import generate
from tasks.pseudo_label import pseudo_label
from tasks.select import auto_accept, read_calibration, select_for_review

pytestmark = pytest.mark.integration


def _review(settings: Settings, truth: GroundTruth, image_ids: list[str]) -> None:
    """What pull-corrections leaves behind when people answered these tasks with the truth."""
    df = manifest.load(settings.manifest_path)
    for image_id in image_ids:
        write_mask(settings.masks_dir / f"{image_id}.png", truth(image_id))
    df = manifest.update(df, image_ids, label_source="human", review_state="reviewed")
    manifest.save(df, settings.manifest_path)


def test_a_round_audits_at_random_records_outcomes_and_accepts_within_the_risk(tmp_path) -> None:
    data = generate(tmp_path / "data", n_images=48, size=64, defect_fraction=0.3, test_fraction=0.2, seed=3)
    settings = load_settings(
        tmp_path / "ws", review_budget=8, audit_share=0.5, accept_risk=0.3, selection="combined"
    )
    ingest_folder(settings, data, round_no=1)
    truth = GroundTruth([data], len(settings.classes))

    labels = pseudo_label.fn(settings, 1)
    first = select_for_review.fn(settings, labels)
    assert len(first.review) == 8 and len(first.audit) == 4 and set(first.audit) <= set(first.review)
    df = manifest.load(settings.manifest_path)
    assert set(df.loc[df["review_state"] == "queued", "image_id"]) == set(first.review)

    # People answer only half of the tasks in time: the rest stays queued and is not audited yet.
    done = first.audit[:2] + [i for i in first.review if i not in first.audit][:2]
    _review(settings, truth, done)
    accepted = auto_accept.fn(settings, labels)
    audits = read_calibration(settings)
    assert sorted(audits["image_id"]) == sorted(first.audit)  # recorded when drawn ...
    assert sorted(audits.loc[audits["wrong"].notna(), "image_id"]) == sorted(first.audit[:2])  # ... answered
    assert (audits["round"] == 1).all() and audits["confidence"].between(0, 1).all()
    assert accepted.audits == 2 and not accepted.accepted  # 1 / (2 + 1) > 0.3: nothing can pass yet
    assert accepted.threshold is None
    auto_accept.fn(settings, labels)  # a retried task records nothing twice
    assert read_calibration(settings)["wrong"].notna().sum() == 2

    # Round 2: the backlog counts against the budget and is not sent twice.
    labels = pseudo_label.fn(settings, 2)
    second = select_for_review.fn(settings, labels)
    backlog = [i for i in first.review if i not in done]
    assert set(second.review[: len(backlog)]) == set(backlog) and len(second.review) == 8
    assert not set(second.review[len(backlog) :]) & set(first.review)
    _review(settings, truth, second.review)
    accepted = auto_accept.fn(settings, labels)
    audits = read_calibration(settings)
    # Round 1's late audits count once answered, against round 1's pseudo-labels.
    assert audits["wrong"].notna().all() and len(audits) == len(first.audit) + len(second.audit)
    assert sorted(audits.loc[audits["round"] == 1, "image_id"]) == sorted(first.audit)
    df = manifest.load(settings.manifest_path).set_index("image_id")
    assert (df.loc[accepted.accepted, "review_state"] == "auto_accepted").all()
    assert (df.loc[accepted.accepted, "label_source"] == "pseudo").all()
    if accepted.accepted:  # everything accepted is at least as confident as the threshold
        confidence = 1.0 - df.loc[accepted.accepted, "uncertainty"]
        assert (confidence >= accepted.threshold - 1e-9).all()
    assert accepted.audit_error == pytest.approx(float(np.mean(audits["wrong"].astype(bool))))
