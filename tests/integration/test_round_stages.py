"""The round's learning stages on a workspace of their own (MLflow in its sqlite file, no servers):
Defect-Gen augmentation with its cache and registry entry, and the click model's fine-tuning gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from app.demo import GroundTruth
from loom.config import PROJECT_ROOT, Settings, load_settings
from loom.data import manifest
from loom.data.imageio import write_mask
from loom.data.ingest import ingest_folder
from loom.datasets.fabric import generate
from tasks.augment import augment, log_generator
from tasks.clicker import fine_tune_round_clicker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A workspace whose train images people labeled (their true masks) and a frozen test split."""
    root = tmp_path_factory.mktemp("stages")
    data = generate(root / "data", n_images=32, size=64, defect_fraction=0.5, test_fraction=0.3, seed=5)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"].update(
        {
            "augment": "defect_gen",
            "augment_preset": "tiny",
            "synthetic_per_round": 6,
            "clicker_preset": "tiny",
            "clicker_fine_tune_steps": 25,
        }
    )
    (root / "ws").mkdir()
    (root / "ws" / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(root / "ws")
    ingest_folder(settings, data, round_no=1)
    df = manifest.load(settings.manifest_path)
    train = df[df["split"] == "train"]
    truth = GroundTruth([data], len(settings.classes))  # what people would paint
    for image_id in train["image_id"]:
        write_mask(settings.masks_dir / f"{image_id}.png", truth(image_id))
    df = manifest.update(df, train["image_id"], label_source="human", review_state="reviewed")
    manifest.save(df, settings.manifest_path)
    return settings


def test_augment_writes_pairs_registers_the_model_once_and_reuses_it(labeled: Settings) -> None:
    settings = labeled
    first = augment.fn(settings, 1)
    assert first.model_dir and not first.skipped
    written = sorted((settings.synthetic_dir / "round-0001" / "images").glob("*.png"))
    rows = manifest.load(settings.manifest_path)
    rows = rows[rows["label_source"] == "synthetic"]
    assert len(written) == len(rows) == first.total
    assert set(first.per_class) <= set(settings.classes) and set(first.rejected) <= set(first.per_class)
    assert set(first.methods) == set(first.per_class)  # how each class's pairs were made
    assert set(first.methods.values()) <= {"defect_gen", "copy_paste"}
    assert set(rows["split"]) <= {"train"}
    version = log_generator.fn(settings, 1, first)
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    tags = client.get_model_version(settings.registered_generator, version).tags
    assert tags["loom.training_key"] == Path(first.model_dir).name

    # Nobody labeled anything new: the same model comes back from the cache and is not registered again.
    report = json.loads((settings.stack_dir / "defect-gen").glob("*/*/training.json").__next__().read_text())
    again = augment.fn(settings, 2)
    assert again.model_dir == first.model_dir
    assert again.seconds["train"] < 0.5 * report["seconds"] + 0.5
    assert log_generator.fn(settings, 2, again) == version
    versions = client.search_model_versions(f"name='{settings.registered_generator}'")
    assert len(versions) == 1


def test_click_model_is_fine_tuned_measured_and_promoted_only_when_better(labeled: Settings) -> None:
    settings = labeled
    outcome = fine_tune_round_clicker.fn(settings, 1)
    assert outcome.version and outcome.objects > 0 and outcome.base.startswith("loom-clicker-pretrained")
    metrics = outcome.metrics
    assert 1 <= metrics["tuned_noc85"] <= 20 and 1 <= metrics["base_noc85"] <= 20
    # Judged on the mean of the starts measured: the test images got the teacher's pre-annotations (cached),
    # and the start from them counts wherever one touches a test object.
    assert (settings.clicker_dir / "gate-prelabels.npz").is_file()
    starts = [metrics["base_noc85"]] + [metrics[k] for k in ("base_prelabel_noc85",) if k in metrics]
    assert metrics["base_gate"] == pytest.approx(sum(starts) / len(starts))
    assert outcome.promoted == (metrics["tuned_gate"] < metrics["base_gate"])
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    version = client.get_model_version(settings.registered_clicker, outcome.version)
    assert version.tags["promoted"] == str(outcome.promoted).lower()
    pointer = settings.clicker_dir / "champion.json"
    assert pointer.exists() == outcome.promoted
    if outcome.promoted:  # the backend now answers with it, and the next round starts from it
        assert json.loads(pointer.read_text())["model_dir"] == outcome.model_dir
        assert fine_tune_round_clicker.fn(settings, 2).base == f"loom-clicker-v{outcome.version}"
