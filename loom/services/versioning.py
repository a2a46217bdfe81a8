"""DVC + git adapter: every round's data is a tagged commit in the workspace's own git repository.

``data/`` is one DVC-tracked folder (``data.dvc`` in git, the bytes in ``.dvc/cache`` and in the DVC
remote, by default ``dvc-remote/`` beside it), the round records ``rounds/NNNN/round.json`` are plain git
files, and each round is the tag ``round-NNNN``. ``checkout_round`` runs ``git checkout round-NNNN`` and
``dvc checkout`` (``dvc pull`` when the cache lacks the objects) and gives back exactly that round's data.

git and dvc run as subprocesses (dvc from the same environment as this Python): the CLI is DVC's stable
interface, keeps DVC's global state out of the calling process, and costs well under a second per call.
Every git call is pinned to the workspace's ``.git`` (``GIT_DIR``/``GIT_WORK_TREE``) and discovery may not
climb above the workspace, so a workspace inside another repository (a checkout of Loom itself, say)
never changes that repository.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from loom.config import Settings
from loom.journal import fault_point
from loom.journal import load as load_journal

logger = logging.getLogger(__name__)

DATA_DVC = "data.dvc"
BRANCH = "main"
REMOTE_NAME = "local"
GITIGNORE_LINES = ("stack/", "dvc-remote/", "*.log", "rounds/in-progress.json", "quarantine/")
# Variables that would point git at another repository than the workspace's.
_GIT_REDIRECTS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR")


@dataclass(frozen=True)
class RoundVersion:
    tag: str
    commit: str
    data_md5: str  # DVC's hash of the whole data folder, e.g. "3f2a...e1.dir"
    pushed: int  # files this call sent to the DVC remote (0 when the remote had them all)


class VersioningError(RuntimeError):
    """A git or dvc step failed or would lose work; the message carries the command's own error."""


def round_tag(round_no: int) -> str:
    return f"round-{round_no:04d}"


# ---- running git and dvc -------------------------------------------------------------------------------


def _env(settings: Settings, pin_git: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_REDIRECTS}
    env["DVC_NO_ANALYTICS"] = "1"
    # Discovery may find the workspace's own .git but never an enclosing repository.
    env["GIT_CEILING_DIRECTORIES"] = str(settings.workspace.parent)
    if pin_git:
        env["GIT_DIR"] = str(settings.workspace / ".git")
        env["GIT_WORK_TREE"] = str(settings.workspace)
    return env


def _run(
    settings: Settings, args: Sequence[str], pin_git: bool, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), cwd=settings.workspace, env=_env(settings, pin_git), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        command = " ".join([Path(args[0]).name, *args[1:]])
        raise VersioningError(f"`{command}` failed in workspace {settings.workspace}:\n{output}")
    return result


def _git(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not (settings.workspace / ".git").is_dir():
        raise VersioningError(f"{settings.workspace} has no git repository yet; run `loom init` first")
    return _run(settings, ["git", *args], pin_git=True, check=check)


def _dvc(settings: Settings, *args: str) -> str:
    executable = Path(sys.executable).parent / "dvc"
    found = str(executable) if executable.exists() else shutil.which("dvc")
    if found is None:
        raise VersioningError(
            "the `dvc` command is missing from this environment; reinstall Loom's dependencies"
        )
    return _run(settings, [found, *args], pin_git=False).stdout.strip()


def _head(settings: Settings) -> str | None:
    probe = _git(settings, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    return probe.stdout.strip() if probe.returncode == 0 else None


def _subject(settings: Settings) -> str:
    """The subject line of HEAD's commit ("" in a repository without commits)."""
    probe = _git(settings, "log", "-1", "--format=%s", check=False)
    return probe.stdout.strip() if probe.returncode == 0 else ""


def _has_staged_changes(settings: Settings) -> bool:
    return _git(settings, "diff", "--cached", "--quiet", check=False).returncode != 0


def _tag_commit(settings: Settings, tag: str) -> str | None:
    probe = _git(settings, "rev-parse", "--verify", "--quiet", f"refs/tags/{tag}^{{commit}}", check=False)
    return probe.stdout.strip() if probe.returncode == 0 else None


def tagged_version(settings: Settings, round_no: int) -> RoundVersion | None:
    """The version of a round already tagged (commit, data hash as that commit records it), else None."""
    tag = round_tag(round_no)
    commit = _tag_commit(settings, tag) if (settings.workspace / ".git").is_dir() else None
    if commit is None:
        return None
    try:
        outs = yaml.safe_load(file_at_tag(settings, tag, DATA_DVC))["outs"]
        md5 = next(str(out["md5"]) for out in outs if out.get("path") == settings.data_dir.name)
    except (VersioningError, yaml.YAMLError, KeyError, TypeError, StopIteration):
        md5 = ""
    return RoundVersion(tag=tag, commit=commit, data_md5=md5, pushed=0)


def round_tags(settings: Settings) -> list[str]:
    """The workspace's round tags (``round-NNNN``), sorted; empty without a repository."""
    if not (settings.workspace / ".git").is_dir():
        return []
    return sorted(_git(settings, "tag", "--list", "round-*").stdout.split())


def next_round_number(settings: Settings) -> int:
    """The round in progress (a rerun finishes it), else one more than the highest recorded or tagged."""
    current = load_journal(settings)
    if current is not None:
        return current.round_no
    done = [
        int(p.name) for p in settings.rounds_dir.glob("[0-9][0-9][0-9][0-9]") if (p / "round.json").exists()
    ]
    done += [int(tag.removeprefix("round-")) for tag in round_tags(settings)]
    return max(done, default=0) + 1


def file_at_tag(settings: Settings, tag: str, path: str) -> str:
    """The text of ``path`` (relative to the workspace) as committed under ``tag``."""
    shown = _git(settings, "show", f"refs/tags/{tag}:{path}", check=False)
    if shown.returncode != 0:
        known = round_tags(settings)
        raise VersioningError(
            f"workspace {settings.workspace} has no {path} at tag {tag}; "
            f"versioned rounds: {', '.join(known) or 'none yet'}"
        )
    return shown.stdout


# ---- the repository ------------------------------------------------------------------------------------


def init_repo(settings: Settings) -> None:
    """Make the workspace a git + DVC repository with a local DVC remote and a first commit. Idempotent."""
    ws = settings.workspace
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / ".git").is_dir():
        # An explicit target directory: never mistake an enclosing repository for the workspace's.
        _run(settings, ["git", "init", "--quiet", "--initial-branch", BRANCH, str(ws)], pin_git=False)
    for key, value in (("user.name", "Loom"), ("user.email", "loom@localhost"), ("commit.gpgsign", "false")):
        _git(settings, "config", "--local", key, value)
    _ensure_gitignore(ws / ".gitignore")

    if not (ws / ".dvc").is_dir():
        _dvc(settings, "init", "--quiet")
    remote_url = os.path.relpath(settings.dvc_remote_dir, ws)  # relative: the workspace stays relocatable
    if not _dvc_configured(settings):
        _dvc(settings, "config", "core.autostage", "true")
        _dvc(settings, "remote", "add", "--default", "--force", REMOTE_NAME, remote_url)
    settings.dvc_remote_dir.mkdir(parents=True, exist_ok=True)

    _git(settings, "add", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
    if _head(settings) is None or _has_staged_changes(settings):
        _git(settings, "commit", "--quiet", "-m", "Loom workspace: git + DVC with a local remote")
        logger.info("workspace repository ready at %s", ws)


def _ensure_gitignore(path: Path) -> None:
    lines = path.read_text().splitlines() if path.exists() else []
    missing = [line for line in GITIGNORE_LINES if line not in lines]
    if missing:
        path.write_text("\n".join([*lines, *missing]) + "\n")


def _dvc_configured(settings: Settings) -> bool:
    """Whether .dvc/config has autostage and our default remote already (saves two dvc calls per round)."""
    config_dir = settings.workspace / ".dvc"
    parser = configparser.ConfigParser()
    parser.read(config_dir / "config")
    # DVC writes the section as 'remote "local"' (configobj quoting) and the url relative to .dvc/.
    remote = next((parser[s] for s in parser.sections() if s.strip("'") == f'remote "{REMOTE_NAME}"'), None)
    url = remote.get("url") if remote is not None else None
    return (
        parser.get("core", "autostage", fallback="") == "true"
        and parser.get("core", "remote", fallback="") == REMOTE_NAME
        and url is not None
        and (config_dir / url).resolve() == settings.dvc_remote_dir.resolve()
    )


# ---- versioning a round ----------------------------------------------------------------------------------


def commit_round(
    settings: Settings,
    round_no: int,
    paths_to_commit: Sequence[Path] = (),
    message: str = "",
    force: bool = False,
) -> RoundVersion:
    """``dvc add data``, commit it with the round's files, ``dvc push``, tag ``round-NNNN``.

    A round's tag is never moved silently: if it exists, this raises unless ``force=True`` (which re-points
    it at the new commit). A retry after a failed push is recognised (the tag is on HEAD and nothing changed
    since) and only pushes again. The data is pushed before the tag is made, so a tag never names data the
    remote lacks; a rerun after a kill between commit and tag amends the round's commit instead of adding
    a second one.

    Args:
        round_no: the round number; the tag is ``round-NNNN``.
        paths_to_commit: more workspace files to commit with the data (``rounds/NNNN/round.json``).
        message: commit message; ``"round NNNN: "`` is put in front unless it already starts so.
        force: move an existing tag instead of failing.
    """
    ws = settings.workspace
    tag = round_tag(round_no)
    if not settings.data_dir.is_dir():
        raise VersioningError(
            f"no data folder at {settings.data_dir}: ingest images before versioning a round"
        )
    if (ws / ".git").is_dir() and _git(settings, "symbolic-ref", "--quiet", "HEAD", check=False).returncode:
        raise VersioningError(
            f"workspace {ws} is checked out at an older round (detached HEAD); call restore_main() "
            "before versioning a new round"
        )
    init_repo(settings)
    tagged = _tag_commit(settings, tag)
    if tagged is not None and tagged != _head(settings) and not force:
        raise VersioningError(
            f"tag {tag} already exists in {ws} (commit {tagged[:12]}); round numbers are not reused. "
            "Pass force=True to move the tag to a new version of this round."
        )
    relative = [_inside_workspace(ws, Path(p)) for p in paths_to_commit]

    _dvc(settings, "add", "--quiet", settings.data_dir.name)
    _git(settings, "add", DATA_DVC, ".gitignore", *relative)
    fault_point("version:added")
    prefix = f"round {round_no:04d}"
    if tagged is not None and not force:
        if _has_staged_changes(settings):
            raise VersioningError(
                f"tag {tag} is on the last commit but the data or files changed since; "
                "pass force=True to version this round again"
            )
        logger.info("%s already committed; pushing its data again", tag)
    else:
        subject = message if message.startswith(prefix) else f"{prefix}: {message or 'data'}"
        # A rerun after a kill between commit and tag amends that commit: one commit per round.
        again = tagged is None and _subject(settings).startswith(prefix + ":")
        if again:
            logger.info("round %04d was committed, not tagged (interrupted): amending its commit", round_no)
        _git(settings, "commit", "--quiet", "--allow-empty", *(["--amend"] if again else []), "-m", subject)
    fault_point("version:committed")
    # Push before tagging: a round's tag never names data the remote lacks.
    pushed = _parse_pushed(_dvc(settings, "push"))
    fault_point("version:pushed")
    if tagged is None or force:
        _git(settings, "tag", *(["--force"] if force else []), "-a", tag, "-m", _subject(settings))
    version = RoundVersion(
        tag=tag, commit=_head(settings) or "", data_md5=_recorded_md5(settings) or "", pushed=pushed
    )
    logger.info(
        "versioned %s: commit %s, data %s, %d files pushed",
        tag,
        version.commit[:12],
        version.data_md5,
        pushed,
    )
    return version


def _inside_workspace(ws: Path, path: Path) -> str:
    absolute = (path if path.is_absolute() else ws / path).resolve()
    if not absolute.is_relative_to(ws.resolve()):
        raise VersioningError(f"{path} lies outside workspace {ws}; only workspace files can be versioned")
    if not absolute.exists():
        raise VersioningError(f"{absolute} does not exist; write it before versioning the round")
    return str(absolute.relative_to(ws.resolve()))


def _parse_pushed(output: str) -> int:
    """Files pushed, from ``dvc push``'s summary ("51 files pushed", or "Everything is up to date")."""
    match = re.search(r"(\d+) files? pushed", output)
    return int(match.group(1)) if match else 0


# ---- fingerprints --------------------------------------------------------------------------------------


def _recorded_md5(settings: Settings) -> str | None:
    """The data folder's hash as the checked-out ``data.dvc`` records it; None without a data.dvc."""
    path = settings.workspace / DATA_DVC
    if not path.exists():
        return None
    try:
        outs = yaml.safe_load(path.read_text())["outs"]
        return next(str(out["md5"]) for out in outs if out.get("path") == settings.data_dir.name)
    except (yaml.YAMLError, KeyError, TypeError, StopIteration) as err:
        raise VersioningError(
            f"{path} is not a DVC file for {settings.data_dir.name}/ ({err}); restore it from git"
        ) from err


def data_fingerprint(settings: Settings) -> str:
    """The hash DVC gives the data folder as it is now (e.g. ``"3f2a...e1.dir"``).

    It equals the md5 in ``data.dvc`` while the data is unchanged since the last versioned round. DVC's
    hash cache (its state database, keyed by inode, size and mtime) means unchanged files are not read
    again, so this costs about a directory listing.
    """
    from dvc.repo import Repo  # heavy import, only needed here
    from dvc_data.hashfile.build import build

    if not (settings.workspace / ".dvc").is_dir():
        raise VersioningError(f"{settings.workspace} has no DVC repository yet; run `loom init` first")
    if not settings.data_dir.is_dir():
        raise VersioningError(f"no data folder at {settings.data_dir}: ingest images first")
    with Repo(str(settings.workspace)) as repo:
        _, _, obj = build(
            repo.cache.local, str(settings.data_dir), repo.fs, "md5", ignore=repo.dvcignore, dry_run=True
        )
    return str(obj.hash_info.value)


# ---- going back to a round -------------------------------------------------------------------------------


def _refuse_to_lose_work(settings: Settings) -> None:
    """Raise when checking out another commit would discard changes that no round has versioned."""
    tracked = _git(settings, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if tracked:
        raise VersioningError(
            f"workspace {settings.workspace} has uncommitted changes to versioned files:\n{tracked}\n"
            "version them in a round first, or pass force=True to discard them"
        )
    if not settings.data_dir.exists():
        return
    recorded = _recorded_md5(settings)
    # Hash comparison, not `dvc status`: that reports only "not in cache" once the cache is gone.
    if (recorded is None and any(settings.data_dir.iterdir())) or (
        recorded is not None and data_fingerprint(settings) != recorded
    ):
        raise VersioningError(
            f"{settings.data_dir} has changes that no round has versioned; version them first "
            "(`loom round`), or pass force=True to discard them"
        )


def _sync_data(settings: Settings) -> None:
    """Make data/ match the checked-out data.dvc: from the cache, else from the DVC remote."""
    if not (settings.workspace / DATA_DVC).exists():
        return
    try:
        _dvc(settings, "checkout", "--force", "--quiet", DATA_DVC)
    except VersioningError as err:
        logger.info(
            "DVC cache lacks this round's data (%s); pulling from the remote", str(err).splitlines()[-1]
        )
        _dvc(settings, "pull", "--force", "--quiet", DATA_DVC)


def checkout_round(settings: Settings, tag: str, force: bool = False) -> None:
    """Put the workspace (round records and data/) in the state tagged ``tag``, e.g. ``round-0003``.

    The repository is then at a detached HEAD; ``restore_main`` returns to the latest state.
    Unversioned changes stop the checkout unless ``force=True``.
    """
    if _tag_commit(settings, tag) is None:
        known = round_tags(settings)
        raise VersioningError(
            f"no tag {tag} in workspace {settings.workspace}; "
            f"versioned rounds: {', '.join(known) or 'none yet'}"
        )
    if not force:
        _refuse_to_lose_work(settings)
    _git(settings, "checkout", "--quiet", *(["--force"] if force else []), f"refs/tags/{tag}^{{commit}}")
    _sync_data(settings)
    logger.info("workspace %s checked out at %s", settings.workspace, tag)


def restore_main(settings: Settings, force: bool = False) -> None:
    """Return the workspace to the tip of its main branch, data included."""
    if not force:
        _refuse_to_lose_work(settings)
    _git(settings, "checkout", "--quiet", *(["--force"] if force else []), BRANCH)
    _sync_data(settings)
