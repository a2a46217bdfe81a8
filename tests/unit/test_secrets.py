"""Workspace secrets: private from the first byte, never half-written, no key lost to a concurrent adder;
the leak scan that looks for them (loom/services/secretscan.py) does find one that was planted; and the SSRF
ban
list Label Studio gets lets the stack's host through and nothing else of its defaults."""

from __future__ import annotations

import base64
import ipaddress
import json
import multiprocessing
import os
import re
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from loom import config
from loom.config import PROJECT_ROOT, Settings, load_settings, read_workspace_secrets, workspace_secret
from loom.services.secretscan import SECRET_ENV_VARS, scan_workspace, workspace_secrets
from loom.services.stack import label_studio_banned_subnets


@pytest.fixture(autouse=True)
def no_secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets come from the workspace's file, whatever the calling shell exports."""
    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> object:
    """A umask that lets everyone read new files: the secrets must be private all the same."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_secrets_file_is_0600_from_the_first_byte(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, open_umask: object
) -> None:
    modes_at_creation: list[int] = []
    real_mkstemp = tempfile.mkstemp

    def watched_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        modes_at_creation.append(_mode(Path(name)))  # before a single byte is written
        return fd, name

    monkeypatch.setattr(config.tempfile, "mkstemp", watched_mkstemp)
    workspace_secret(settings, "A_KEY")
    workspace_secret(settings, "B_KEY")

    assert modes_at_creation == [0o600, 0o600]
    path = settings.stack_dir / "secrets.env"
    assert _mode(path) == 0o600
    assert _mode(settings.stack_dir / ".secrets.lock") == 0o600
    assert sorted(p.name for p in settings.stack_dir.iterdir()) == [".secrets.lock", "secrets.env"]


def test_an_existing_secret_is_stable_and_a_rewrite_keeps_it_private(settings: Settings) -> None:
    first = workspace_secret(settings, "A_KEY")
    path = settings.stack_dir / "secrets.env"
    path.chmod(0o644)  # widened by hand: the next write makes it private again

    assert workspace_secret(settings, "A_KEY") == first
    workspace_secret(settings, "B_KEY")

    assert _mode(path) == 0o600
    assert read_workspace_secrets(settings)["A_KEY"] == first


def _add_keys(workspace: str, worker: int, n: int, barrier: object, results: object) -> None:
    """Child process: add ``n`` keys of its own and one shared key, report what it got."""
    settings = load_settings(workspace)
    barrier.wait()
    got = {f"W{worker}_{i}": workspace_secret(settings, f"W{worker}_{i}") for i in range(n)}
    got["SHARED"] = workspace_secret(settings, "SHARED")
    results.put(got)


def _check_all_kept(settings: Settings, got: list[dict[str, str]], expected_keys: int) -> None:
    stored = read_workspace_secrets(settings)
    assert len(stored) == expected_keys, "keys were lost"
    for answer in got:
        # Secret values of a throwaway workspace; the messages still name keys only.
        lost = [k for k, v in answer.items() if stored.get(k) != v]
        assert not lost, f"stored values differ from the ones handed out for {lost}"


def test_concurrent_processes_lose_no_key(settings: Settings) -> None:
    workers, per_worker = 6, 12
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(workers)
    results = context.Queue()
    processes = [
        context.Process(target=_add_keys, args=(str(settings.workspace), w, per_worker, barrier, results))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    got = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    _check_all_kept(settings, got, workers * per_worker + 1)
    assert len({answer["SHARED"] for answer in got}) == 1, "one key got two values"


def test_concurrent_threads_lose_no_key_and_readers_never_see_a_partial_file(settings: Settings) -> None:
    workers, per_worker = 8, 10
    barrier = threading.Barrier(workers + 1)
    got: list[dict[str, str]] = [{} for _ in range(workers)]
    seen_sizes: list[int] = []
    done = threading.Event()

    def add(worker: int) -> None:
        barrier.wait()
        for i in range(per_worker):
            got[worker][f"T{worker}_{i}"] = workspace_secret(settings, f"T{worker}_{i}")

    def read() -> None:
        barrier.wait()
        while not done.is_set():
            seen_sizes.append(len(read_workspace_secrets(settings)))

    threads = [threading.Thread(target=add, args=(w,)) for w in range(workers)]
    reader = threading.Thread(target=read)
    for thread in [*threads, reader]:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()

    _check_all_kept(settings, got, workers * per_worker)
    # A reader sees no file yet, or a whole one: the number of keys never drops (no empty, no cut file).
    first = next((i for i, n in enumerate(seen_sizes) if n), len(seen_sizes))
    assert all(n > 0 for n in seen_sizes[first:])
    assert seen_sizes[first:] == sorted(seen_sizes[first:])


# ---- the leak scan -------------------------------------------------------------------------------


def _git(workspace: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    subprocess.run(["git", "-C", str(workspace), *args], check=True, capture_output=True, env=env)


def _clean_workspace(settings: Settings) -> None:
    """Round records, logs, a DVC remote and git history, all without a secret."""
    record = settings.round_dir(1) / "round.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"round": 1, "label_studio": {"url": settings.label_studio_url}}))
    (settings.stack_dir / "logs").mkdir(parents=True)
    (settings.stack_dir / "logs" / "labelstudio.log").write_text("GET /api/projects 200\n")
    (settings.backend_dir).mkdir(parents=True)
    (settings.backend_dir / "events.jsonl").write_text('{"action": "ANNOTATION_CREATED"}\n')
    (settings.dvc_remote_dir / "files" / "md5" / "ab").mkdir(parents=True)
    (settings.dvc_remote_dir / "files" / "md5" / "ab" / "cdef").write_bytes(os.urandom(4096))
    _git(settings.workspace, "init", "-q")
    _git(settings.workspace, "add", "rounds")
    _git(settings.workspace, "commit", "-q", "-m", "round 1")


CHEAP_SOURCES = ("rounds", "logs", "git", "dvc")


def test_the_scan_finds_nothing_in_a_clean_workspace(settings: Settings) -> None:
    settings.label_studio_token  # noqa: B018 (creates stack/secrets.env)
    settings.backend_password  # noqa: B018
    _clean_workspace(settings)

    report = scan_workspace(settings, sources=CHEAP_SOURCES)

    assert report.hits == [] and report.skipped == []
    assert report.secrets == 2 and report.files == 4 and report.git_bytes > 0
    assert report.per_source["rounds"]["files"] == 1 and report.per_source["dvc"]["files"] == 1


def test_the_scan_finds_a_planted_secret_wherever_it_is(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_LS_PASSWORD", "an-environment-password")
    token = settings.label_studio_token
    password = settings.backend_password
    _clean_workspace(settings)
    # The token in a round record, the backend's password as a logged basic-auth header, the environment
    # password in a file that was committed and removed again, the token inside a DVC object.
    record = settings.round_dir(2) / "round.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"round": 2, "note": f"token {token} end"}))
    header = base64.b64encode(f"{settings.backend_user}:{password}".encode()).decode()
    with (settings.stack_dir / "logs" / "backend.log").open("w") as f:
        f.write(f"headers: Authorization: Basic {header}\n")
    (settings.workspace / "notes.txt").write_text("password=an-environment-password\n")
    _git(settings.workspace, "add", "notes.txt")
    _git(settings.workspace, "commit", "-q", "-m", "notes")
    _git(settings.workspace, "rm", "-q", "notes.txt")
    _git(settings.workspace, "commit", "-q", "-m", "no notes")
    blob = settings.dvc_remote_dir / "files" / "md5" / "ab" / "0123"
    blob.write_bytes(os.urandom(3 * (1 << 20)) + token.encode() + os.urandom(100))  # across a chunk edge

    report = scan_workspace(settings, sources=CHEAP_SOURCES)

    found = {(hit.secret, hit.where) for hit in report.hits}
    assert found == {
        ("LOOM_LS_TOKEN", "rounds: rounds/0002/round.json"),
        ("LOOM_BACKEND_PASSWORD", "logs: stack/logs/backend.log"),
        ("env:LOOM_LS_PASSWORD", "git: log -p --all"),
        ("LOOM_LS_TOKEN", "dvc: dvc-remote/files/md5/ab/0123"),
    }
    summary = report.summary()
    assert "4 hits" in summary
    assert token not in summary and password not in summary and "an-environment-password" not in summary


def test_the_scan_reads_mlflow_params_and_tags(settings: Settings) -> None:
    from mlflow import MlflowClient

    token = settings.label_studio_token
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.create_experiment("scan", artifact_location=str(settings.mlflow_artifacts_dir))
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "url", settings.label_studio_url)
    client.set_tag(run.info.run_id, "leaky", f"Token {token}")
    client.set_terminated(run.info.run_id)

    report = scan_workspace(settings, sources=("mlflow",))

    assert report.skipped == [] and report.runs == 1 and report.params >= 2
    assert f"run {run.info.run_id} tag leaky" in " ".join(hit.where for hit in report.hits)
    assert {hit.secret for hit in report.hits} == {"LOOM_LS_TOKEN"}


def test_short_values_are_not_secrets(settings: Settings) -> None:
    assert workspace_secrets(settings, {"LOOM_LS_PASSWORD": "short"}) == {}
    assert set(workspace_secrets(settings, {"LOOM_LS_TOKEN": "long-enough-token"})) == {"env:LOOM_LS_TOKEN"}


# ---- Label Studio's SSRF ban list ----------------------------------------------------------------


def _banned(address: str, subnets: list[str]) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(net) for net in subnets)


def test_only_the_stack_host_is_cut_out_of_the_banned_subnets() -> None:
    subnets = label_studio_banned_subnets("127.0.0.1")
    assert not _banned("127.0.0.1", subnets)
    for address in ("127.0.0.0", "127.0.0.2", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.1"):
        assert _banned(address, subnets), address
    for address in ("192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "fe80::1"):
        assert _banned(address, subnets), address
    assert not _banned("93.184.215.14", subnets)  # a public address is no business of the list
    # Label Studio splits the variable on commas and does not strip: no spaces, every item a network.
    joined = ",".join(subnets)
    assert " " not in joined and all(ipaddress.ip_network(n) for n in joined.split(","))


LS_IO = (
    PROJECT_ROOT
    / ".venv-ls"
    / "lib"
    / "python3.11"
    / "site-packages"
    / "label_studio"
    / "core"
    / "utils"
    / "io.py"
)


@pytest.mark.skipif(not LS_IO.exists(), reason="no .venv-ls (make setup builds it)")
def test_the_list_bans_everything_label_studio_bans_by_default_but_the_stack_host() -> None:
    """Turning Label Studio's default list off must not open anything else: each subnet of that default
    (read from the installed source) is inside the list Loom passes, apart from the stack's host."""
    source = LS_IO.read_text()
    block = source[source.index("default_banned_subnets = [") :]
    block = block[: block.index("]")]
    defaults = re.findall(r"'([0-9a-fA-F:.]+/\d+)'", block)
    assert len(defaults) > 20
    ours = [ipaddress.ip_network(n) for n in label_studio_banned_subnets("127.0.0.1")]
    host = ipaddress.ip_network("127.0.0.1/32")
    for default in map(ipaddress.ip_network, defaults):
        inside = default.version == host.version and host.subnet_of(default)
        parts = list(default.address_exclude(host)) if inside else [default]
        for part in parts:
            assert any(part.version == n.version and part.subnet_of(n) for n in ours), str(default)
