"""Whole flywheel rounds on the real stack: ingest -> ... -> version, with the simulated annotator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from prefect.settings import PREFECT_API_URL, temporary_settings

from app.demo import GroundTruth
from app.runner import run_round
from flows.flywheel import flywheel_round
from loom.config import PROJECT_ROOT, load_settings, workspace_secret
from loom.data import manifest
from loom.datasets.fabric import generate, render_sample
from loom.services import labelstudio, tracking, versioning
from loom.services.annotator import SimulatedAnnotator
from tests.badfiles import write_bad_files, write_industrial_images

pytestmark = pytest.mark.e2e

TINY_ROUND = {
    "review_budget": 5,
    "review_timeout_s": 180,
    "image_size": 128,
    "epochs": 2,
    "train_samples": 0,
    "batch_size": 8,
    "students": ["bafpn", "cfa"],  # a supervised segmenter and an anomaly scorer, side by side
    "teacher_shots": 2,
    "clicker_preset": "tiny",  # the test stack's click model (tests/conftest.py)
    "clicker_fine_tune_steps": 25,
    # The round's synthetic path with pairs that always pass (the tiny Defect-Gen of a test draws mostly
    # rejects; its training, caching and registry entry are tested in tests/integration/test_round_stages.py).
    "augment": "copy_paste",
    "synthetic_per_round": 6,
}


def data_hashes(data_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file()
    }


def camera_images(settings) -> dict[str, str]:
    """image_id (the hash of the file's bytes) -> stored path, for every manifest row not made by Defect-Gen
    or copy-paste."""
    df = manifest.load(settings.manifest_path)
    rows = df[df["label_source"] != "synthetic"]
    return dict(zip(rows["image_id"], rows["path"], strict=True))


@pytest.fixture(scope="module")
def flywheel(stack_settings, tmp_path_factory):
    ws = stack_settings.workspace
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"].update(TINY_ROUND)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(ws)

    src = tmp_path_factory.mktemp("camera")
    batch1 = generate(
        src / "batch-01", n_images=40, size=128, defect_fraction=0.4, test_fraction=0.3, seed=11
    )
    batch2 = generate(
        src / "batch-02", n_images=16, size=128, defect_fraction=0.4, test_fraction=0.0, seed=12
    )
    bad = write_bad_files(src / "batch-03")
    industrial = write_industrial_images(src / "batch-03")

    token = labelstudio.invite_annotator(
        settings, "e2e-annotator@loom.local", workspace_secret(settings, "E2E_PW")
    )
    project_id = labelstudio.ensure_project(settings)
    truth = GroundTruth([batch1, batch2], len(settings.classes))

    def truth_or_normal(image_id: str) -> np.ndarray | None:
        """The camera-format images carry no defect: a person would submit an empty mask."""
        mask = truth(image_id)
        if mask is None and (settings.images_dir / f"{image_id}.png").exists():
            w, h = Image.open(settings.images_dir / f"{image_id}.png").size
            mask = np.zeros((h, w), np.uint8)
        return mask

    annotator = SimulatedAnnotator(settings, token, truth_or_normal, settings.classes)
    stop = annotator.run_in_background(project_id, poll_s=1.0)
    try:
        rec1 = run_round(settings, source=batch1)
        hashes1 = data_hashes(settings.data_dir)
        rec2 = run_round(settings, source=batch2)
        rec3 = run_round(settings, source=src / "batch-03")
        camera_images3 = camera_images(settings)
        rec4 = run_round(settings, source=batch1)  # the same images again
    finally:
        stop.set()
    return {
        "settings": settings,
        "records": [rec1, rec2, rec3, rec4],
        "hashes1": hashes1,
        "camera_images": (camera_images3, camera_images(settings)),
        "project_id": project_id,
        "annotator": annotator,
        "bad": bad,
        "industrial": industrial,
    }


def test_round_records_are_complete(flywheel):
    settings = flywheel["settings"]
    for n, rec in enumerate(flywheel["records"], start=1):
        saved = json.loads((settings.round_dir(n) / "round.json").read_text())
        assert saved["round"] == n
        assert saved["prefect_flow_run_id"]
        assert saved["label_studio"]["project_id"] == flywheel["project_id"]
        assert saved["mlflow"]["run_id"] == rec["mlflow"]["run_id"]
        assert saved["version"]["tag"] == f"round-{n:04d}"
        assert set(saved["step_seconds"]) >= {"ingest", "pseudo_label", "train", "evaluate"}
    first = flywheel["records"][0]["counts"]
    assert first["ingested"] == 40 and first["test"] == 12
    assert first["reviewed"] == first["sent_to_review"] == TINY_ROUND["review_budget"]
    for rec in flywheel["records"]:
        assert rec["selection"]["strategy"] == "combined"
        assert len(rec["selection"]["audit"]) == rec["counts"]["audited"]
        assert (
            rec["auto_accept"]["risk"] == 0.1
            and rec["auto_accept"]["candidates"] >= rec["counts"]["auto_accepted"]
        )
    # Every round's audit was answered: calibration rests on all of them, each against its own round's label.
    audits = pd.read_parquet(settings.calibration_path)
    assert len(audits) == sum(r["counts"]["audited"] for r in flywheel["records"])
    assert audits["wrong"].notna().all()
    assert flywheel["records"][-1]["auto_accept"]["audits"] == len(audits)


def test_a_batch_ingested_again_adds_nothing_and_counts_its_duplicates(flywheel):
    first, again = flywheel["records"][0]["counts"], flywheel["records"][3]["counts"]
    assert again["ingested"] == 0
    assert again["duplicates"] == first["ingested"] == 40
    before, after = flywheel["camera_images"]
    assert after == before  # not one row more


def test_the_champion_is_the_challenger_the_gate_last_promoted(flywheel):
    """The gate's rule, replayed on each round's recorded numbers: without a champion the challenger is
    promoted; after that exactly when the interval's lower end clears ``promote_min_gain`` and no class
    regressed. The champion alias must end on the last challenger so promoted, and every round's record,
    MLflow run and registry tags must tell the same decision."""
    settings = flywheel["settings"]
    client = MlflowClient(settings.mlflow_ui_url)
    min_gain = settings.round.promote_min_gain
    last_promoted = None
    for rec in flywheel["records"]:
        gate = rec["promotion"]
        challenger = rec["students"][rec["mlflow"]["student"]]["metrics"][gate["metric"]]
        assert gate["challenger_value"] == pytest.approx(challenger)
        if last_promoted is None:
            assert gate["promoted"] and gate["champion_value"] is None
        else:
            assert gate["promoted"] == (gate["ci_low"] > min_gain and not gate["regressed"]), gate["reasons"]
        tags = client.get_model_version(settings.registered_model, rec["mlflow"]["model_version"]).tags
        assert tags["loom.promotion.promoted"] == str(gate["promoted"]).lower()
        if gate["promoted"]:
            last_promoted = rec["mlflow"]["model_version"]
    champion = client.get_model_version_by_alias(settings.registered_model, "champion")
    assert champion.version == last_promoted


def test_the_segmenter_starts_from_the_champion_it_will_meet(flywheel):
    """round.warm_start: bafpn starts from the champion when the champion is a bafpn; cfa (an anomaly
    scorer) always starts fresh; the first round has no champion to start from."""
    records = flywheel["records"]
    champion = None
    for rec in records:
        students = rec["students"]
        assert students["cfa"]["warm_start"] == ""
        expected = champion["version"] if champion and champion["student"] == "bafpn" else ""
        assert students["bafpn"]["warm_start"] == expected
        if rec["promotion"]["promoted"]:
            champion = {"version": rec["mlflow"]["model_version"], "student": rec["mlflow"]["student"]}
    assert any(rec["students"]["bafpn"]["warm_start"] for rec in records)


def test_bad_input_is_quarantined_and_the_round_goes_on(flywheel):
    settings = flywheel["settings"]
    rec3 = flywheel["records"][2]
    assert rec3["counts"]["quarantined"] == len(flywheel["bad"])
    assert rec3["counts"]["ingested"] == len(flywheel["industrial"])  # 16-bit, gray, RGBA read fine
    reasons = (settings.quarantine_dir / "reasons.csv").read_text()
    for path in flywheel["bad"].values():
        assert path.name in reasons
        assert path.exists()  # never deleted from the source


def test_every_configured_student_is_trained_evaluated_and_logged(flywheel):
    settings = flywheel["settings"]
    client = MlflowClient(settings.mlflow_tracking_uri)
    for rec in flywheel["records"]:
        assert set(rec["students"]) == {"bafpn", "cfa"}
        for name, result in rec["students"].items():
            assert 0.0 <= result["metrics"]["pixel_auroc"] <= 1.0
            run = client.get_run(rec["mlflow"]["runs"][name]["run_id"])
            assert run.data.tags["loom.student"] == name
            assert run.info.run_name == f"round-{rec['round']:04d}-{name}"
        # The round's best by the promotion metric is the one that competed with the champion.
        best = max(rec["students"], key=lambda n: rec["students"][n]["metrics"].get("miou", -1.0))
        assert rec["mlflow"]["student"] == best


def test_mlflow_has_one_run_per_round_and_a_champion(flywheel):
    settings = flywheel["settings"]
    # The rounds logged through the stack's tracking server, which serves their artifacts.
    assert tracking.tracking_uri(settings) == settings.mlflow_ui_url
    mlflow.set_tracking_uri(settings.mlflow_ui_url)
    client = MlflowClient()
    run_ids = [r["mlflow"]["run_id"] for r in flywheel["records"]]
    assert len(set(run_ids)) == 4
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert {"miou", "pixel_auroc", "image_auroc"} <= set(run.data.metrics)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    logged = {a.path for a in client.list_artifacts(run_ids[0], "overlays")}
    assert "overlays/per_class_iou.png" in logged and any(p.startswith("overlays/test_") for p in logged)
    assert "round_curve.png" in {a.path for a in client.list_artifacts(run_ids[-1])}
    for rec in flywheel["records"]:  # the record's metrics are the logged ones
        logged = client.get_run(rec["mlflow"]["run_id"]).data.metrics
        for key in ("miou", "pixel_auroc", "image_auroc"):
            assert logged[key] == pytest.approx(rec["metrics"][key], abs=1e-6)


def test_synthetic_pairs_are_made_versioned_and_trained_on(flywheel):
    settings = flywheel["settings"]
    first = flywheel["records"][0]
    counts = first["counts"]
    assert counts["synthetic"] == sum(counts["synthetic_per_class"].values()) > 0, first["augment"]
    assert set(counts["synthetic_per_class"]) <= set(settings.classes)
    assert counts["train_synthetic"] == counts["synthetic"]  # the student saw this round's pairs
    files = [p for p in flywheel["hashes1"] if p.startswith("synthetic/round-0001/images/")]
    assert len(files) == counts["synthetic"]  # so the round-0001 tag restores them (test below)
    df = manifest.load(settings.manifest_path)
    synthetic = df[df["label_source"] == "synthetic"]
    assert set(synthetic["split"]) == {"train"}
    assert len(synthetic[synthetic["round"] == 1]) == counts["synthetic"]


def test_the_click_model_is_fine_tuned_and_judged_every_round(flywheel):
    settings = flywheel["settings"]
    client = MlflowClient(
        tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri
    )
    tuned = [r["clicker"] for r in flywheel["records"] if r["clicker"]["version"]]
    assert tuned, [r["clicker"]["reason"] for r in flywheel["records"]]
    for clicker in tuned:
        version = client.get_model_version(settings.registered_clicker, clicker["version"])
        assert version.tags["promoted"] == str(clicker["promoted"]).lower()
        assert "NoC@85" in version.tags["promotion_reason"]
        better = clicker["metrics"]["tuned_gate"] < clicker["metrics"]["base_gate"]
        assert clicker["promoted"] == better
    pointer = settings.clicker_dir / "champion.json"
    if any(c["promoted"] for c in tuned):
        champion = client.get_model_version_by_alias(settings.registered_clicker, "champion")
        assert json.loads(pointer.read_text())["version"] == champion.version
    else:
        assert not pointer.exists()


def test_label_studio_holds_predictions_and_annotations_without_duplicates(flywheel):
    settings = flywheel["settings"]
    client = labelstudio.connect(settings)
    tasks = list(client.tasks.list(project=flywheel["project_id"], fields="all"))
    image_ids = [t.data["image_id"] for t in tasks]
    assert len(image_ids) == len(set(image_ids)), "a rerun created duplicate tasks"
    sent = sum(r["counts"]["sent_to_review"] for r in flywheel["records"])
    assert len(tasks) <= sent and len(tasks) >= TINY_ROUND["review_budget"]
    for t in tasks[:5]:
        preds = list(client.predictions.list(task=t.id))
        assert preds and preds[0].model_version and preds[0].score is not None
    assert flywheel["annotator"].corrections, "the annotator corrected nothing"


def test_dvc_restores_round_one_byte_identical(flywheel):
    settings = flywheel["settings"]
    try:
        versioning.checkout_round(settings, "round-0001")
        assert data_hashes(settings.data_dir) == flywheel["hashes1"]
    finally:
        versioning.restore_main(settings)
    assert data_hashes(settings.data_dir) != flywheel["hashes1"]


def test_reproduce_gives_a_rounds_metrics_back(flywheel):
    from flows.reproduce import reproduce_round

    settings = flywheel["settings"]
    before = data_hashes(settings.data_dir)
    results = reproduce_round(settings, "round-0002")
    assert {r.student for r in results} == set(flywheel["records"][1]["students"])
    for result in results:
        assert result.differences() and result.within_tolerance, result
    assert data_hashes(settings.data_dir) == before  # the workspace is back at its latest state


def test_predict_champion_on_a_line_scan_frame(flywheel, tmp_path):
    settings = flywheel["settings"]
    frame = render_sample(5, height=256, width=4096, defect_prob=1.0).image
    Image.fromarray(frame).save(tmp_path / "frame.png")
    out = tmp_path / "pred"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "loom"),
            "predict",
            str(tmp_path / "frame.png"),
            "--out",
            str(out),
            "--model",
            "champion",
            "--workspace",
            str(settings.workspace),
        ],
        check=True,
    )
    amap = np.load(out / "maps" / "frame.npy")
    assert amap.shape == (256, 4096) and amap.dtype == np.float32
    assert Image.open(out / "masks" / "frame.png").size == (4096, 256)
    assert (out / "scores.csv").read_text().startswith("image,score,label,classes")


def test_exported_champion_gives_the_same_masks_in_onnxruntime(flywheel, tmp_path):
    from app.runner import resolve_model
    from models.backbone.efficientnet_lite import normalize
    from models.student.export import onnx_predict
    from models.student.registry import load_student

    settings = flywheel["settings"]
    onnx_path = tmp_path / "line.onnx"
    subprocess.run(
        [str(Path(sys.executable).parent / "loom"), "export", "--out", str(onnx_path),
         "--workspace", str(settings.workspace)],
        check=True,
    )  # fmt: skip
    model = load_student(resolve_model(settings, "champion"))
    size = model.config.image_size
    tiles = np.stack([render_sample(seed, height=size, width=size, defect_prob=1.0).image for seed in (1, 2)])
    onnx_logits = onnx_predict(onnx_path, tiles)
    with torch.inference_mode():
        torch_logits = model.segment(normalize(torch.from_numpy(tiles)))
    assert onnx_logits.shape == tuple(torch_logits.shape)
    agree = (onnx_logits.argmax(1) == torch_logits.argmax(1).numpy()).mean()
    assert agree >= 0.999


def test_a_scheduled_deployment_runs_a_round_through_the_worker(flywheel):
    """The path of scheduled and UI-triggered rounds: prefect.yaml deployment -> work pool -> worker."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from app.runner import prefect_api
    from loom.services import stack

    settings = flywheel["settings"]
    stack.deploy(settings)
    with prefect_api(settings):
        run = run_deployment(
            "flywheel-round/nightly", parameters={"review_budget": 0, "review_timeout_s": 5}, timeout=900
        )
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("flywheel-round/nightly")
    assert run.state.is_completed(), f"deployment run ended {run.state}"
    assert any(getattr(s.schedule, "cron", None) == "0 2 * * *" for s in deployment.schedules)
    record = json.loads((settings.round_dir(5) / "round.json").read_text())
    assert record["prefect_flow_run_id"] == str(run.id)
    assert record["counts"]["sent_to_review"] == 0


def test_the_flywheel_deployment_runs_rounds_as_subflows_until_its_stop_rule(flywheel):
    from prefect.deployments import run_deployment

    from app.runner import prefect_api

    settings = flywheel["settings"]
    with prefect_api(settings):  # the deployments were registered by the scheduled-round test above
        run = run_deployment(
            "flywheel/until-plateau",
            parameters={"max_rounds": 1, "plateau_rounds": 0, "review_budget": 0, "review_timeout_s": 5},
            timeout=900,
        )
    assert run.state.is_completed(), f"deployment run ended {run.state}"
    assert not (settings.round_dir(7) / "round.json").exists()  # max_rounds: 1
    record = json.loads((settings.round_dir(6) / "round.json").read_text())
    assert record["prefect_flow_run_id"] != str(run.id)  # the round ran as its own (sub)flow run


def _flow_run_processes(settings) -> list:
    """The worker's flow-run processes (``python -m prefect.engine``): busy while a round runs."""
    import psutil

    from loom.services import stack

    def command(process: psutil.Process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # gone, or a zombie: exited, not reaped yet
            return ""

    worker = psutil.Process(stack.service_pid(settings, stack.WORKER))
    return [p for p in worker.children(recursive=True) if "prefect.engine" in command(p)]


def _wait_until_suspended(settings, run_id) -> bool:
    """Poll the round's state until it is Suspended; returns whether a flow-run process was seen busy
    on the way (what makes the idle check after it meaningful)."""
    from prefect.client.orchestration import get_client

    seen_busy = False
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 600
        run = client.read_flow_run(run_id)
        while not run.state.is_paused() and time.monotonic() < deadline:
            assert not run.state.is_final(), f"the round ended {run.state} instead of suspending"
            seen_busy = seen_busy or bool(_flow_run_processes(settings))
            time.sleep(0.5)
            run = client.read_flow_run(run_id)
    assert run.state.name == "Suspended", f"the round is {run.state.name}, not suspended"
    return seen_busy


def _wait_until_final(run_id, timeout_s: float = 900):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout_s
        run = client.read_flow_run(run_id)
        while not run.state.is_final() and time.monotonic() < deadline:
            time.sleep(2)
            run = client.read_flow_run(run_id)
    return run


def test_a_deployment_round_suspends_for_review_and_a_label_studio_webhook_resumes_it(flywheel):
    """No process waits while people review: the round suspends, the worker's flow-run process exits,
    and the webhook of the last annotation makes the relay in ``loom backend`` resume it."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from app.runner import prefect_api

    settings = flywheel["settings"]
    with prefect_api(settings):  # the deployments were registered by the scheduled-round test above
        run = run_deployment(
            "flywheel-round/nightly",
            parameters={"review_budget": 3, "review_timeout_s": 3600},
            timeout=0,
        )
        seen_busy = _wait_until_suspended(settings, run.id)
        assert seen_busy
        deadline = time.monotonic() + 60  # the suspended process is on its way out
        while _flow_run_processes(settings) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _flow_run_processes(settings) == []
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(run.id).state.name == "Suspended"  # still waiting, with no process
        stop = flywheel["annotator"].run_in_background(flywheel["project_id"], poll_s=1.0)
        try:
            run = _wait_until_final(run.id)
        finally:
            stop.set()
    assert run.state.is_completed(), f"the resumed round ended {run.state}"
    record = json.loads((settings.round_dir(7) / "round.json").read_text())
    assert record["prefect_flow_run_id"] == str(run.id)
    wait = record["label_studio"]["wait"]
    assert (wait["how"], wait["reason"], wait["trigger"]) == ("suspended", "done", "webhook")
    assert wait["annotated"] == wait["total"] == record["counts"]["sent_to_review"] > 0
    assert record["counts"]["reviewed"] == record["counts"]["sent_to_review"]
    events = [json.loads(line) for line in (settings.backend_dir / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["action"] == "review_resumed" and e["flow_run"] == str(run.id)]
    assert len(resumed) == 1 and resumed[0]["trigger"] == "webhook"


def test_the_review_deadline_resumes_a_suspended_round_and_the_rest_stays_queued(flywheel):
    from prefect.deployments import run_deployment

    from app.runner import prefect_api

    settings = flywheel["settings"]
    with prefect_api(settings):
        run = run_deployment(
            "flywheel-round/nightly", parameters={"review_budget": 2, "review_timeout_s": 5}, timeout=0
        )
        _wait_until_suspended(settings, run.id)
        run = _wait_until_final(run.id)
    assert run.state.is_completed(), f"the resumed round ended {run.state}"
    record = json.loads((settings.round_dir(8) / "round.json").read_text())
    wait = record["label_studio"]["wait"]
    assert (wait["how"], wait["reason"], wait["trigger"]) == ("suspended", "timeout", "timer")
    assert wait["annotated"] == 0 and wait["waited_s"] >= 5
    assert record["counts"]["reviewed"] == 0
    assert record["counts"]["pending_review"] >= record["counts"]["sent_to_review"] > 0
    assert not list((settings.backend_dir / "suspended").glob("*.json"))  # nothing left pending


def test_a_train_request_fine_tunes_the_click_model_through_the_worker(flywheel):
    """Label Studio's "train" (here POST /train on the backend) starts the clicker-fine-tune deployment;
    the request returns at once and the worker does the training."""
    import requests
    from prefect.client.orchestration import get_client

    from app.runner import prefect_api
    from loom.services import stack

    settings = flywheel["settings"]
    stack.deploy(settings)
    answer = requests.post(
        f"{settings.backend_url}/train",
        json={},
        auth=(settings.backend_user, settings.backend_password),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    run_id = answer.json()["flow_run_id"]
    with prefect_api(settings), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 600
        run = client.read_flow_run(run_id)
        while not run.state.is_final() and time.monotonic() < deadline:
            time.sleep(2)
            run = client.read_flow_run(run_id)
    assert run.state.is_completed(), f"fine-tuning run ended {run.state}"
    mlflow_client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    runs = [v.run_id for v in mlflow_client.search_model_versions(f"name='{settings.registered_clicker}'")]
    assert len(runs) > sum(1 for r in flywheel["records"] if r["clicker"]["version"])


def test_no_secret_in_round_records_mlflow_logs_prefect_git_or_dvc(flywheel):
    """After the rounds (and, in a full run, the deployment rounds above), no value of stack/secrets.env or
    of the LOOM_* secret environment is in a round record, the MLflow store (files, params, tags), a log
    under stack/, a Prefect flow-run log, the workspace's git history or the DVC remote."""
    import os
    import stat

    from loom.config import secrets_path
    from loom.services.secretscan import scan_workspace

    settings = flywheel["settings"]
    assert stat.S_IMODE(secrets_path(settings).stat().st_mode) == 0o600
    # Label Studio's document root: the link to the images folder and nothing else.
    assert os.listdir(settings.label_studio_files_root) == ["images"]

    started = time.perf_counter()
    report = scan_workspace(settings)
    print(f"secret scan in {time.perf_counter() - started:.1f} s\n{report.summary()}")

    assert report.skipped == [], report.skipped
    # The admin token and password, the backend's password, the annotator's password at least.
    assert report.secrets >= 4
    assert report.per_source["rounds"]["files"] >= len(flywheel["records"])
    assert report.runs >= len(flywheel["records"]) and report.params > 0
    assert report.per_source["logs"]["files"] >= 5  # one per server at least
    assert report.round_log_lines > 0 and report.log_lines >= report.round_log_lines
    assert report.git_bytes > 0 and report.per_source["dvc"]["files"] > 0
    assert report.hits == [], [f"{hit.secret} in {hit.where}" for hit in report.hits]

    # The benchmark script is the same scan from the command line (the stack's ports are in the environment).
    script = PROJECT_ROOT / "benchmarks" / "secret_scan.py"
    command = [sys.executable, str(script), "--workspace", str(settings.workspace)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    print(run.stdout)
    assert run.returncode == 0 and " 0 hits" in run.stdout, run.stdout[-3000:]


def test_the_round_goes_on_without_review_when_label_studio_is_down(stack_settings, tmp_path, monkeypatch):
    """A real fault: nothing listens on the Label Studio port. No review and, in a fresh workspace, nothing
    to train on yet (no labels, no audits for auto-accept): a versioned round that says so."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    monkeypatch.setenv("LOOM_LS_PORT", str(dead_port))
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["round"].update(TINY_ROUND)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(ws)
    batch = generate(
        tmp_path / "batch", n_images=24, size=128, defect_fraction=0.4, test_fraction=0.3, seed=21
    )

    # This workspace has no stack of its own: run against the session's Prefect server.
    with temporary_settings(updates={PREFECT_API_URL: stack_settings.prefect_api_url}):
        record = flywheel_round(workspace=str(ws), source=str(batch))

    assert record["label_studio"]["project_id"] is None
    assert str(dead_port) in record["label_studio"]["skipped"]
    assert record["counts"]["reviewed"] == 0 and record["counts"]["pending_review"] > 0
    assert (settings.round_dir(1) / "round.json").exists() and record["git"]["tag"] == "round-0001"
    assert record["students"] == {} and "no student trained" in record["summary"]
    assert "people have reviewed nothing" in record["mlflow"]["skipped"]
    queued = manifest.load(settings.manifest_path).query("review_state == 'queued'")
    assert len(queued) == record["counts"]["sent_to_review"]  # nothing lost: they wait for the next round
