"""Rounds that survive faults, on the real stack: kill -9 of `loom round` at step boundaries and inside
steps, Label Studio stopped for a minute under push and pull, the MLflow server killed at logging, and two
rounds at once. The round runs in its own process (`loom round`, as cron or a person would start it); the
faults are real (SIGKILL, stopped servers); ``LOOM_KILL_AT`` / ``LOOM_STOP_AT`` only choose the moment.

After every fault the next plain `loom round` must finish the same round: no duplicate Label Studio task,
no lost annotation, one MLflow run and model version per student, one commit and one tag per round with
its data on the DVC remote, and the champion from a versioned round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from app.demo import GroundTruth
from loom import journal
from loom.config import PROJECT_ROOT, Settings, load_settings, workspace_secret
from loom.data import manifest
from loom.datasets.fabric import generate
from loom.services import labelstudio, stack, tracking, versioning
from loom.services.annotator import SimulatedAnnotator

pytestmark = pytest.mark.e2e

LOOM = Path(os.environ.get("VIRTUAL_ENV", PROJECT_ROOT / ".venv")) / "bin" / "loom"
#: The smallest round that still has every step: one supervised student trained for two epochs (so a
#: kill after the first is a kill mid-training), a review that people finish in seconds.
RELIABLE_ROUND = {
    "review_budget": 3,
    "review_timeout_s": 60,
    "image_size": 64,
    "epochs": 2,
    "train_samples": 0,
    "batch_size": 8,
    "students": ["fpn"],
    "teacher_shots": 2,
    "clicker_preset": "tiny",
    "clicker_fine_tune_steps": 0,  # its step is cached like the others; its training costs 10 s a round
    "augment": "copy_paste",
    "synthetic_per_round": 2,
}
#: Where a round is cut: step boundaries, and inside review, training, MLflow logging and versioning.
KILL_POINTS = [
    "ingest:done",
    "push_to_label_studio:done",
    "wait_for_review:start",  # people are reviewing
    "train:epoch",  # after the first of two epochs
    "mlflow:registered:loom-student",  # the run and its model version exist, the version's tags do not
    "version:committed",  # committed, neither pushed nor tagged
    "version:pushed",  # pushed, not tagged
    "publish:start",  # versioned, the champion not moved yet
]


@dataclass
class Line:
    settings: Settings
    project_id: int
    batches: list[Path]
    rows: list[dict]  # one per fault, for BENCHMARKS.md's Reliability table (LOOM_RELIABILITY_REPORT)


@pytest.fixture(scope="module")
def line(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory):
    """The stack's workspace with the smallest round, new camera batches and an annotator at work."""
    ws = stack_settings.workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["round"].update(RELIABLE_ROUND)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_settings(ws)
    src = tmp_path_factory.mktemp("line")
    batches = [
        generate(src / f"b{i}", n_images=10, size=64, defect_fraction=0.4, test_fraction=0.2, seed=60 + i)
        for i in range(5)  # new images for: the kill at ingest, two rounds at once (2), Label Studio down (2)
    ]
    truth = GroundTruth(batches, len(settings.classes))

    def truth_or_normal(image_id: str) -> np.ndarray | None:
        """Images of other tests' batches get an empty mask: every task is answered."""
        mask = truth(image_id)
        if mask is None:
            row = manifest.load(settings.manifest_path).set_index("image_id").loc[image_id]
            mask = np.zeros((int(row["height"]), int(row["width"])), np.uint8)
        return mask

    token = labelstudio.invite_annotator(
        settings, "line-annotator@loom.local", workspace_secret(settings, "LINE_PW")
    )
    project_id = labelstudio.ensure_project(settings)
    annotator = SimulatedAnnotator(settings, token, truth_or_normal, settings.classes)
    stop = annotator.run_in_background(project_id, poll_s=1.0)
    rows: list[dict] = []
    yield Line(settings, project_id, batches, rows)
    stop.set()
    report = os.environ.get("LOOM_RELIABILITY_REPORT")
    if report:
        Path(report).write_text(json.dumps(rows, indent=2) + "\n")


# ---- running `loom round` ---------------------------------------------------------------------------


def start_round(
    settings: Settings, source: Path | None = None, resume: bool = False, **env: str
) -> subprocess.Popen:
    args = [str(LOOM), "round", "--workspace", str(settings.workspace)]
    args += ["--source", str(source)] if source else []
    args += ["--resume"] if resume else []
    return subprocess.Popen(
        args,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 900) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out, err


def run_round(
    settings: Settings, source: Path | None = None, resume: bool = False, **env: str
) -> tuple[int, str, str]:
    return finish(start_round(settings, source, resume, **env))


def wait_stopped(process: subprocess.Popen, timeout_s: float = 600) -> None:
    """Until the round's process has stopped itself (SIGSTOP at its ``LOOM_STOP_AT`` point)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    raise AssertionError(f"the round never reached its stop point in {timeout_s} s")


def record_of(settings: Settings, round_no: int) -> dict:
    return json.loads((settings.round_dir(round_no) / "round.json").read_text())


# ---- what must hold after every fault ----------------------------------------------------------------


def annotated_images(settings: Settings, project_id: int) -> set[str]:
    client = labelstudio.connect(settings)
    return {
        str(t.data["image_id"])
        for t in client.tasks.list(project=project_id, fields="task_only", page_size=100)
        if (t.total_annotations or 0) > 0
    }


def assert_round_is_whole(line: Line, round_no: int, annotated_before: set[str]) -> dict:
    settings = line.settings
    record = record_of(settings, round_no)
    assert record["round"] == round_no and journal.load(settings) is None

    # Label Studio: one task per image; every annotation made before the round is in the manifest.
    client = labelstudio.connect(settings)
    tasks = list(client.tasks.list(project=line.project_id, fields="task_only", page_size=100))
    per_image = Counter(str(t.data["image_id"]) for t in tasks)
    assert max(per_image.values()) == 1, [i for i, n in per_image.items() if n > 1]
    df = manifest.load(settings.manifest_path)
    assert df["image_id"].is_unique
    reviewed = set(df.loc[df["review_state"] == "reviewed", "image_id"])
    assert annotated_before <= reviewed, annotated_before - reviewed
    assert all((settings.masks_dir / f"{i}.png").exists() for i in annotated_before)

    # MLflow: one live run and one registered version per student for this round.
    uri = tracking.tracking_uri(settings)
    mlflow_client = MlflowClient(uri, registry_uri=uri)
    experiment = mlflow_client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    runs = mlflow_client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`loom.round` = '{round_no}'"
    )
    students = [r.data.tags.get("loom.student") for r in runs if r.data.tags.get("loom.student")]
    assert sorted(students) == sorted(record["students"]), students
    versions = [
        v
        for v in mlflow_client.search_model_versions(f"name='{settings.registered_model}'")
        if (v.tags or {}).get("loom.round") == str(round_no)
    ]
    assert len(versions) == len(record["students"]), [v.version for v in versions]

    # git + DVC: one commit per round, tags without gaps, the tag holds this round's record and data,
    # and the remote holds that data.
    tags = versioning.round_tags(settings)
    assert tags == [versioning.round_tag(n) for n in range(1, round_no + 1)]
    subjects = versioning._git(settings, "log", "--format=%s").stdout.splitlines()
    assert sum(s.startswith(f"round {round_no:04d}:") for s in subjects) == 1
    tagged = json.loads(versioning.file_at_tag(settings, tags[-1], f"rounds/{round_no:04d}/round.json"))
    assert tagged["round"] == round_no
    assert versioning.tagged_version(settings, round_no).commit == versioning._head(settings)
    assert versioning.tagged_version(settings, round_no).data_md5.endswith(".dir")
    cloud = versioning._dvc(settings, "status", "--cloud", "data.dvc")
    assert "in sync" in cloud or not cloud.strip(), cloud

    # The champion comes from a versioned round.
    current = tracking.champion(settings)
    if current is not None:
        version = mlflow_client.get_model_version(settings.registered_model, current[0])
        assert int(version.tags["loom.round"]) <= round_no
    line.rows.append(
        {
            "round": round_no,
            "flow_runs": len(record["attempts"]["flow_runs"]),
            "duplicate_tasks": sum(n - 1 for n in per_image.values()),
            "lost_annotations": len(annotated_before - reviewed),
            "runs_per_student": len(students) / max(1, len(record["students"])),
            "versions_per_student": len(versions) / max(1, len(record["students"])),
            "round_commits": 1,
            "reviewed": record["counts"]["reviewed"],
            "review_skipped": bool(record["label_studio"]["skipped"]),
        }
    )
    return record


# ---- kill -9 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_round_killed_at_any_point_is_finished_by_the_next_run(line: Line, point: str) -> None:
    settings = line.settings
    annotated_before = annotated_images(settings, line.project_id)
    source = line.batches[0] if point == "ingest:done" else None
    round_no = versioning_next(settings)

    code, _, err = run_round(settings, source, **{journal.KILL_AT_ENV: point})
    assert code == -signal.SIGKILL, err[-3000:]
    cut = journal.load(settings)
    assert cut is not None and cut.round_no == round_no
    assert cut.steps  # it got somewhere before it was cut
    assert versioning.round_tag(round_no) not in versioning.round_tags(settings) or point == "publish:start"

    started = time.monotonic()
    # The next trigger: a plain `loom round`, or `loom round --resume` as a person would type it.
    code, out, err = run_round(settings, source, resume=point.startswith("version"))
    rerun_s = time.monotonic() - started
    assert code == 0, err[-3000:]
    assert f"round {round_no}:" in out
    record = assert_round_is_whole(line, round_no, annotated_before)
    line.rows[-1].update(fault=f"kill -9 at {point}", rerun_s=round(rerun_s, 1))
    # The versioned record: the rerun's, or the first run's when that was cut after versioning.
    assert len(record["attempts"]["flow_runs"]) == (1 if point == "publish:start" else 2)
    if point == "ingest:done":  # the first run ingested: the rerun's record counts what it did
        assert record["counts"]["ingested"] == 10


def versioning_next(settings: Settings) -> int:
    from loom.services.versioning import next_round_number

    return next_round_number(settings)


# ---- services failing under a round --------------------------------------------------------------------


def _restart_later(settings: Settings, services: tuple[str, ...], after_s: float) -> threading.Thread:
    def restart() -> None:
        time.sleep(after_s)
        stack.up(settings, services=services)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("step", ["push_to_label_studio", "pull_corrections"])
def test_label_studio_down_for_a_minute_costs_nothing(line: Line, step: str) -> None:
    """Label Studio stops as the round reaches ``step`` and comes back 60 s later: the round completes,
    after its retries or without review, and no selected image or annotation is lost."""
    settings = line.settings
    annotated_before = annotated_images(settings, line.project_id)
    round_no = versioning_next(settings)
    source = line.batches[3 if step == "push_to_label_studio" else 4]  # new images: something to review
    process = start_round(settings, source, **{journal.STOP_AT_ENV: f"{step}:start"})
    wait_stopped(process)
    stack.stop(settings, ["labelstudio"])
    down_at = time.monotonic()
    restarter = _restart_later(settings, ("labelstudio",), 60)
    process.send_signal(signal.SIGCONT)
    code, _, err = finish(process)
    restarter.join(timeout=300)
    assert code == 0, err[-3000:]
    assert time.monotonic() - down_at >= 60 or "skipped" in json.dumps(record_of(settings, round_no))
    record = assert_round_is_whole(line, round_no, annotated_before)
    df = manifest.load(settings.manifest_path)
    queued = set(df.loc[df["review_state"] == "queued", "image_id"])
    reviewed = set(df.loc[df["review_state"] == "reviewed", "image_id"])
    # Nothing lost: every annotation in Label Studio is in the manifest or waits, queued, for the next pull.
    assert annotated_images(settings, line.project_id) - reviewed <= queued
    if record["label_studio"]["skipped"]:  # degraded: what was selected waits for the next round
        assert "Label Studio" in record["label_studio"]["skipped"]
        assert record["counts"]["reviewed"] == 0 and len(queued) >= record["counts"]["sent_to_review"]
    else:  # the retries outlived the outage: reviewed as usual
        assert record["counts"]["reviewed"] > 0
    line.rows[-1].update(
        fault=f"Label Studio down 60 s at {step}", round_s=round(time.monotonic() - down_at, 1)
    )


def test_mlflow_down_at_logging_fails_the_round_clearly_and_the_rerun_completes(line: Line) -> None:
    settings = line.settings
    annotated_before = annotated_images(settings, line.project_id)
    round_no = versioning_next(settings)
    champion_before = tracking.champion(settings)
    process = start_round(settings, **{journal.STOP_AT_ENV: "log_and_promote:start"})
    wait_stopped(process)
    pid = stack.service_pid(settings, "mlflow")
    os.killpg(pid, signal.SIGKILL)  # the server dies (not `loom down`: its pid file stays)
    process.send_signal(signal.SIGCONT)
    code, _, err = finish(process)
    assert code != 0
    assert "MLflow" in err and "loom up" in err, err[-3000:]
    assert journal.load(settings).round_no == round_no  # nothing half-done: not versioned, not promoted
    assert versioning.round_tag(round_no) not in versioning.round_tags(settings)
    stack.up(settings, services=("mlflow",))
    assert tracking.champion(settings) == champion_before

    started = time.monotonic()
    code, _out, err = run_round(settings)
    assert code == 0, err[-3000:]
    assert_round_is_whole(line, round_no, annotated_before)
    line.rows[-1].update(
        fault="MLflow server killed at logging", rerun_s=round(time.monotonic() - started, 1)
    )


def test_two_rounds_at_once_one_runs_the_other_is_refused(line: Line) -> None:
    settings = line.settings
    annotated_before = annotated_images(settings, line.project_id)
    round_no = versioning_next(settings)
    first = start_round(settings, line.batches[1], **{journal.STOP_AT_ENV: "select:done"})
    wait_stopped(first)  # the first holds the workspace, in the middle of its round

    code, _, err = run_round(settings, line.batches[2])
    assert code == 2
    assert "round not started" in err and "busy" in err and "a round runs" in err, err[-2000:]

    first.send_signal(signal.SIGCONT)
    code, _out, err = finish(first)
    assert code == 0, err[-3000:]
    record = assert_round_is_whole(line, round_no, annotated_before)
    assert record["counts"]["ingested"] == 10  # the first's batch only: the refused one ingested nothing
    df = manifest.load(settings.manifest_path)
    assert not df["path"].isna().any() and (df["round"] <= round_no).all()
    line.rows[-1].update(fault="two rounds at once (the second refused)")
