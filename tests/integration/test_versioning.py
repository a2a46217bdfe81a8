"""The DVC + git adapter against real git and dvc in temporary workspaces."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from loom.config import Settings, load_settings
from loom.services import versioning

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    return result.stdout.strip() if result.returncode == 0 else f"<rc {result.returncode}>"


def _repo_state(repo: Path) -> dict[str, str]:
    """What versioning could change in a repository it must leave alone."""
    return {
        "head": _git(repo, "rev-parse", "--verify", "--quiet", "HEAD"),
        "branch": _git(repo, "symbolic-ref", "--quiet", "HEAD"),
        "refs": _git(repo, "for-each-ref"),
        "config": _git(repo, "config", "--local", "--list"),
        "dvc_files": " ".join(sorted(p for p in ("data.dvc", ".dvc", ".dvcignore") if (repo / p).exists())),
    }


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass
class TwoRounds:
    settings: Settings
    states: dict[int, dict[str, str]]
    versions: dict[int, versioning.RoundVersion]
    project_before: dict[str, str]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory) -> TwoRounds:
    """Round 1 with a few images and a manifest; round 2 edits one file, deletes one and adds two."""
    project_before = _repo_state(PROJECT_ROOT)
    settings = load_settings(tmp_path_factory.mktemp("versioning") / "ws")
    versioning.init_repo(settings)
    versioning.init_repo(settings)  # a second call changes nothing and does not fail

    rng = random.Random(0)
    for i in range(5):
        _write(settings.images_dir / f"img_{i}.png", rng.randbytes(3000))
    _write(settings.masks_dir / "img_0.png", b"mask-v1")
    _write(settings.manifest_path, b"manifest round 1")
    record = settings.round_dir(1) / "round.json"
    _write(record, b'{"round": 1}\n')
    states = {1: _snapshot(settings.data_dir)}
    versions = {1: versioning.commit_round(settings, 1, [record], message="first round")}

    _write(settings.masks_dir / "img_0.png", b"mask-v2 corrected by a person")
    (settings.images_dir / "img_4.png").unlink()
    _write(settings.images_dir / "img_5.png", rng.randbytes(3000))
    _write(settings.captions_dir / "img_0.txt", b"a hole in the weave")
    _write(settings.manifest_path, b"manifest round 2")
    record2 = settings.round_dir(2) / "round.json"
    _write(record2, b'{"round": 2}\n')
    states[2] = _snapshot(settings.data_dir)
    versions[2] = versioning.commit_round(settings, 2, [record2], message="round 0002: corrections")
    return TwoRounds(settings, states, versions, project_before)


def test_init_sets_up_git_dvc_and_a_local_remote(two_rounds: TwoRounds) -> None:
    ws = two_rounds.settings.workspace
    assert _git(ws, "config", "--local", "user.name") == "Loom"
    assert _git(ws, "config", "--local", "user.email") == "loom@localhost"
    assert set(versioning.GITIGNORE_LINES) <= set((ws / ".gitignore").read_text().splitlines())
    config = (ws / ".dvc" / "config").read_text()
    assert "autostage = true" in config and "url = ../dvc-remote" in config
    log = _git(ws, "log", "--format=%s", "main").splitlines()
    # One init commit (the second init_repo added none), then one commit per round.
    assert log == ["round 0002: corrections", "round 0001: first round", log[-1]] and len(log) == 3


def test_rounds_are_tagged_commits_with_data_in_the_remote(two_rounds: TwoRounds) -> None:
    ws = two_rounds.settings.workspace
    v1, v2 = two_rounds.versions[1], two_rounds.versions[2]
    assert (v1.tag, v2.tag) == ("round-0001", "round-0002")
    assert _git(ws, "rev-parse", "round-0001^{commit}") == v1.commit
    assert _git(ws, "rev-parse", "round-0002^{commit}") == v2.commit
    assert v1.data_md5.endswith(".dir") and v1.data_md5 != v2.data_md5
    # Round 1: 7 files + the directory listing; round 2: 4 new files + its listing.
    assert (v1.pushed, v2.pushed) == (8, 5)
    assert "rounds/0001/round.json" in _git(ws, "ls-tree", "-r", "--name-only", "round-0001")
    assert versioning.data_fingerprint(two_rounds.settings) == v2.data_md5


def test_checkout_restores_each_round_byte_identical(two_rounds: TwoRounds) -> None:
    settings = two_rounds.settings
    try:
        versioning.checkout_round(settings, "round-0001")
        assert _snapshot(settings.data_dir) == two_rounds.states[1]
        assert (settings.round_dir(1) / "round.json").exists()
        assert not (settings.round_dir(2) / "round.json").exists()  # committed only in round 2
        with pytest.raises(versioning.VersioningError, match="detached HEAD"):
            versioning.commit_round(settings, 3)
        versioning.checkout_round(settings, "round-0002")
        assert _snapshot(settings.data_dir) == two_rounds.states[2]
    finally:
        versioning.restore_main(settings, force=True)
    assert _snapshot(settings.data_dir) == two_rounds.states[2]
    assert _git(settings.workspace, "symbolic-ref", "--short", "HEAD") == "main"


def test_checkout_with_an_empty_cache_pulls_from_the_remote(two_rounds: TwoRounds) -> None:
    settings = two_rounds.settings
    shutil.rmtree(settings.workspace / ".dvc" / "cache")
    try:
        versioning.checkout_round(settings, "round-0001")
        assert _snapshot(settings.data_dir) == two_rounds.states[1]
    finally:
        versioning.restore_main(settings, force=True)
    assert _snapshot(settings.data_dir) == two_rounds.states[2]


def test_unversioned_data_changes_stop_a_checkout(two_rounds: TwoRounds) -> None:
    settings = two_rounds.settings
    extra = settings.images_dir / "unversioned.png"
    _write(extra, b"not in any round yet")
    try:
        assert versioning.data_fingerprint(settings) != two_rounds.versions[2].data_md5
        with pytest.raises(versioning.VersioningError, match="no round has versioned"):
            versioning.checkout_round(settings, "round-0001")
        assert extra.exists()  # nothing was discarded
        assert _git(settings.workspace, "symbolic-ref", "--short", "HEAD") == "main"
    finally:
        extra.unlink()


def test_bad_requests_get_clear_errors(two_rounds: TwoRounds) -> None:
    settings = two_rounds.settings
    with pytest.raises(versioning.VersioningError, match=r"no tag round-0042.*round-0001, round-0002"):
        versioning.checkout_round(settings, "round-0042")
    with pytest.raises(versioning.VersioningError, match="already exists"):
        versioning.commit_round(settings, 1)
    with pytest.raises(versioning.VersioningError, match="outside workspace"):
        versioning.commit_round(settings, 3, [PROJECT_ROOT / "pyproject.toml"])
    assert versioning.round_tag(3) not in _git(settings.workspace, "tag", "--list")


def test_forced_rerun_moves_the_tag(two_rounds: TwoRounds) -> None:
    settings = two_rounds.settings
    _write(settings.captions_dir / "img_5.txt", b"a knot")
    again = versioning.commit_round(settings, 2, message="redo", force=True)
    assert again.tag == "round-0002" and again.commit != two_rounds.versions[2].commit
    assert _git(settings.workspace, "rev-parse", "round-0002^{commit}") == again.commit
    # A retry of the same call (say after a failed push) only pushes again.
    retry = versioning.commit_round(settings, 2, message="redo")
    assert retry.commit == again.commit and retry.pushed == 0


def test_the_project_repository_is_never_touched(two_rounds: TwoRounds) -> None:
    assert _repo_state(PROJECT_ROOT) == two_rounds.project_before


def test_a_workspace_nested_in_another_repository_leaves_it_alone(tmp_path: Path) -> None:
    """Like ./workspace in a checkout of Loom: the outer repository keeps its HEAD, refs, index and config."""
    outer = tmp_path / "outer"
    outer.mkdir()
    _git(outer, "init", "--quiet", "--initial-branch", "trunk")
    (outer / "README").write_text("outer project\n")
    _git(outer, "add", "README")
    _git(outer, "-c", "user.name=Someone", "-c", "user.email=someone@example.org", "commit", "-qm", "outer")
    before = {**_repo_state(outer), "status": _git(outer, "status", "--porcelain", "--ignored")}

    settings = load_settings(outer / "workspace")
    _write(settings.images_dir / "a.png", b"pixels")
    version = versioning.commit_round(settings, 1)
    versioning.checkout_round(settings, version.tag)
    versioning.restore_main(settings)

    after = {**_repo_state(outer), "status": _git(outer, "status", "--porcelain", "--ignored")}
    # The only difference git sees from outside: a new, untracked folder holding its own repository.
    assert before.pop("status") == ""
    assert after.pop("status") == "?? workspace/"
    assert after == before
    assert _git(settings.workspace, "rev-parse", "--show-toplevel") == str(settings.workspace)
