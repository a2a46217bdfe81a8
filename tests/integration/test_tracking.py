"""The MLflow adapter against a real MLflow sqlite store and registry in a temporary workspace."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from safetensors.numpy import save_file

from loom.config import Settings, load_settings
from loom.services import tracking

pytestmark = pytest.mark.integration


def _student_folder(root: Path, seed: int) -> Path:
    """A stand-in student: a config and a small safetensors file whose bytes differ per seed."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"arch": "fpn", "n_classes": 6, "seed": seed}))
    rng = np.random.default_rng(seed)
    save_file(
        {"head.weight": rng.standard_normal((8, 4)).astype(np.float32)}, str(root / "model.safetensors")
    )
    return root


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@dataclass
class LoggedRounds:
    settings: Settings
    folders: dict[int, Path]
    runs: dict[int, tracking.RoundRun]
    promoted: dict[int, bool]
    metrics: dict[int, dict[str, float]]
    overlay: np.ndarray
    seconds: dict[int, float]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> LoggedRounds:
    """Three rounds: mIoU 0.5 (first, promoted), 0.4 (worse, kept out), 0.6 (better, promoted)."""
    settings = load_settings(tmp_path_factory.mktemp("tracking") / "ws")
    overlay = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    folders, runs, promoted, logged_metrics, seconds = {}, {}, {}, {}, {}
    for round_no, miou in ((1, 0.5), (2, 0.4), (3, 0.6)):
        folders[round_no] = _student_folder(settings.models_dir / f"round-{round_no:04d}", seed=round_no)
        logged_metrics[round_no] = {"miou": miou, "pixel_auroc": 0.9 + miou / 10, "aupro_0.3": 0.7}
        start = time.perf_counter()
        runs[round_no] = tracking.log_round(
            settings,
            round_no,
            params={"epochs": 6, "lr": 1e-3, "student": "fpn"},
            metrics={**logged_metrics[round_no], "iou_knot": math.nan},
            model_dir=folders[round_no],
            images={"test_0001": overlay},
            tags={"round": f"{round_no:04d}"},
        )
        seconds[round_no] = time.perf_counter() - start
        promoted[round_no] = tracking.promote_if_better(
            settings, runs[round_no].model_version, logged_metrics[round_no]
        )
    return LoggedRounds(settings, folders, runs, promoted, logged_metrics, overlay, seconds)


def _client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def test_each_round_gets_a_new_registered_version(rounds: LoggedRounds) -> None:
    assert [rounds.runs[r].model_version for r in (1, 2, 3)] == ["1", "2", "3"]
    assert len({run.run_id for run in rounds.runs.values()}) == 3
    version = _client(rounds.settings).get_model_version(rounds.settings.registered_model, "2")
    assert version.run_id == rounds.runs[2].run_id
    assert version.tags["loom.round"] == "2"


def test_only_a_strictly_better_round_takes_the_champion_alias(rounds: LoggedRounds) -> None:
    assert rounds.promoted == {1: True, 2: False, 3: True}
    current = tracking.champion(rounds.settings)
    assert current is not None
    version, champion_metrics = current
    assert version == "3"
    assert champion_metrics["miou"] == pytest.approx(0.6)
    client = _client(rounds.settings)
    name = rounds.settings.registered_model
    assert client.get_model_version(name, "1").tags["promoted"] == "true"
    worse = client.get_model_version(name, "2").tags
    assert worse["promoted"] == "false"
    assert "does not beat champion v1" in worse["promotion_reason"]
    # A tie is not an improvement, and a retried promotion of the champion changes nothing.
    assert not tracking.promote_if_better(rounds.settings, "1", {"miou": 0.6})
    assert tracking.promote_if_better(rounds.settings, "3", {"miou": 0.6})
    assert tracking.champion(rounds.settings)[0] == "3"
    # Lower-is-better metrics compare the other way round.
    assert tracking.promote_if_better(rounds.settings, "2", {"miou": 0.4}, higher_is_better=False)
    assert tracking.champion(rounds.settings)[0] == "2"
    assert tracking.promote_if_better(rounds.settings, "3", {"miou": 0.6})  # 0.6 > 0.4: back to v3
    assert tracking.champion(rounds.settings)[0] == "3"


def test_downloaded_student_is_byte_identical_to_the_logged_folder(
    rounds: LoggedRounds, tmp_path: Path
) -> None:
    champion_dir = tracking.download_student(rounds.settings)
    assert _digests(champion_dir) == _digests(rounds.folders[3])
    assert tracking.download_student(rounds.settings, "champion") == champion_dir  # cached, not fetched again
    first = tracking.download_student(rounds.settings, "1", dst=tmp_path / "v1")
    assert first.is_relative_to(tmp_path / "v1")
    assert _digests(first) == _digests(rounds.folders[1])


def test_metrics_params_and_tags_are_readable_with_mlflow_client(rounds: LoggedRounds) -> None:
    run = _client(rounds.settings).get_run(rounds.runs[2].run_id)
    assert run.data.metrics == pytest.approx(rounds.metrics[2])
    assert "iou_knot" not in run.data.metrics  # NaN is left out, not logged
    assert run.data.params == {"epochs": "6", "lr": "0.001", "student": "fpn"}
    assert run.data.tags["loom.round"] == "2" and run.data.tags["round"] == "0002"
    assert run.info.experiment_id == rounds.runs[2].experiment_id
    experiment = _client(rounds.settings).get_experiment(run.info.experiment_id)
    assert experiment.name == tracking.EXPERIMENT_NAME
    assert Path(experiment.artifact_location.removeprefix("file://")) == rounds.settings.mlflow_artifacts_dir


def test_overlays_are_logged_as_png_artifacts(rounds: LoggedRounds, tmp_path: Path) -> None:
    client = _client(rounds.settings)
    run_id = rounds.runs[1].run_id
    assert [a.path for a in client.list_artifacts(run_id, "overlays")] == ["overlays/test_0001.png"]
    local = client.download_artifacts(run_id, "overlays/test_0001.png", str(tmp_path))
    np.testing.assert_array_equal(np.asarray(Image.open(local).convert("RGB")), rounds.overlay)


def test_log_round_is_fast(rounds: LoggedRounds) -> None:
    """The first call also creates the sqlite schema; later rounds must cost about a second, not 10+."""
    print(f"log_round seconds per round: {rounds.seconds}")
    assert rounds.seconds[3] < 5.0, rounds.seconds


def test_no_champion_gives_a_clear_error(rounds: LoggedRounds) -> None:
    other = replace(rounds.settings, registered_model="never-registered")
    assert tracking.champion(other) is None
    with pytest.raises(LookupError, match=r"never-registered.*run a round first"):
        tracking.download_student(other)
    with pytest.raises(LookupError, match="has no version 42"):
        tracking.download_student(rounds.settings, "42")
    with pytest.raises(ValueError, match="'champion' or a version number"):
        tracking.download_student(rounds.settings, "best")


def test_logging_needs_a_complete_student_folder(rounds: LoggedRounds, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors"):
        tracking.log_round(rounds.settings, 9, params={}, metrics={"miou": 1.0}, model_dir=tmp_path)
    assert tracking.champion(rounds.settings)[0] == "3"


def test_embedded_mode_writes_the_workspace_store_and_local_artifacts(rounds: LoggedRounds) -> None:
    """No stack in this workspace: runs go to its sqlite store, artifacts to its own folder."""
    settings = rounds.settings
    assert tracking.tracking_uri(settings) == settings.mlflow_tracking_uri
    assert settings.mlflow_tracking_uri.startswith("sqlite:///")
    run = _client(settings).get_run(rounds.runs[1].run_id)
    assert run.info.artifact_uri.startswith(settings.mlflow_artifacts_dir.as_uri())


def test_a_half_logged_run_is_finished_or_deleted_by_the_next_try(rounds: LoggedRounds) -> None:
    """What a kill inside log_round leaves: a run with a registered version but no version tags (finished
    and reused), and a run with no version at all (deleted). Either way one run per key survives."""
    settings = rounds.settings
    client = _client(settings)
    key = {"loom.round": "7", "loom.student": "fpn", "loom.weights_sha256": "abc"}
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME).experiment_id
    bare = client.create_run(experiment, tags=key)  # killed before log_model
    logged = tracking.log_round(
        settings, 7, params={}, metrics={"miou": 0.1}, model_dir=rounds.folders[1], tags=key
    )
    client.delete_model_version_tag(settings.registered_model, logged.model_version, "loom.round")
    assert tracking.logged_version(settings, key) is None  # its version lost its tags: invisible to a retry

    recovered = tracking.recover_run(settings, key)

    assert recovered is not None and recovered.run_id == logged.run_id
    assert recovered.model_version == logged.model_version
    assert tracking.logged_version(settings, key).run_id == logged.run_id
    assert client.get_run(bare.info.run_id).info.lifecycle_stage == "deleted"
    live = client.search_runs([experiment], filter_string="tags.`loom.round` = '7'")
    assert [r.info.run_id for r in live] == [logged.run_id]


def test_with_the_stack_up_runs_go_through_the_tracking_server_which_serves_the_artifacts(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """The REST path a deployed tracking server takes: the run is logged over HTTP, its artifacts are
    uploaded to and served by the server (mlflow-artifacts:/), and read back the same way."""
    settings = replace(stack_settings, registered_model="loom-server-mode-test")
    assert tracking.tracking_uri(settings) == settings.mlflow_ui_url
    folder = _student_folder(tmp_path / "student", seed=11)
    run = tracking.log_round(settings, 1, params={"student": "fpn"}, metrics={"miou": 0.3}, model_dir=folder)

    client = MlflowClient(settings.mlflow_ui_url, registry_uri=settings.mlflow_ui_url)
    info = client.get_run(run.run_id).info
    assert info.artifact_uri.startswith("mlflow-artifacts:")
    weights = _digests(folder)["model.safetensors"]
    stored = [
        p
        for p in settings.mlflow_artifacts_dir.rglob("model.safetensors")
        if _digests(p.parent)[p.name] == weights
    ]
    assert stored, "the server keeps the uploaded artifacts in its artifacts destination"
    downloaded = tracking.download_student(settings, run.model_version, dst=tmp_path / "back")
    assert _digests(downloaded) == _digests(folder)
