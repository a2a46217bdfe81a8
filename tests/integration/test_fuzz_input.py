"""The round's result unchanged by bad input: the same good images, alone and mixed with the fuzz set
(tests/fuzzset.py), through ingest, the pseudo-label stage and versioning, in two fresh workspaces.

No servers: the stages run as plain functions (``app.runner.run_task``), versioning with real git and dvc.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

from app.runner import run_task
from loom.config import Settings, load_settings
from loom.data import manifest
from loom.data.ingest import IngestReport
from loom.datasets.fabric import generate
from loom.services import versioning
from tasks.ingest import ingest
from tasks.pseudo_label import PseudoLabels, pseudo_label
from tests.fuzzset import ADDED, DUPLICATE, QUARANTINED, FuzzSet, entries_below, pipes_guarded, write_fuzz_set

pytestmark = pytest.mark.integration


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def remote_objects(settings: Settings) -> set[str]:
    """Hashes of what the DVC remote holds (``files/md5/ab/cdef...`` -> ``abcdef...``, ``.dir`` dropped)."""
    found = set()
    for path in settings.dvc_remote_dir.rglob("*"):
        if path.is_file():
            found.add((path.parent.name + path.name).removesuffix(".dir"))
    return found


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_round_start(settings: Settings, src: Path, fuzz: FuzzSet | None) -> tuple[IngestReport, PseudoLabels]:
    with pipes_guarded(fuzz.fifos if fuzz else []) as opened:
        report = run_task(ingest, settings, str(src), 1)
    assert opened == []  # no named pipe was read (it would have hung the round)
    return report, run_task(pseudo_label, settings, 1)


def test_bad_files_do_not_change_what_a_round_learns_nor_reach_the_dvc_remote(tmp_path: Path) -> None:
    clean_src = generate(
        tmp_path / "clean" / "line3", n_images=24, size=64, defect_fraction=0.3, test_fraction=0.25, seed=21
    )
    fuzzy_src = tmp_path / "fuzzy" / "line3"  # the same folder name: the same manifest `source`
    shutil.copytree(clean_src, fuzzy_src)
    look_alikes = sorted((fuzzy_src / "images").glob("*.png"))[:4]
    fuzz = write_fuzz_set(
        fuzzy_src / "images" / "fuzz", tmp_path / "elsewhere", seed=5, accepted=False, look_alikes=look_alikes
    )
    clean, fuzzy = load_settings(tmp_path / "ws-clean"), load_settings(tmp_path / "ws-fuzzy")

    clean_report, clean_labels = run_round_start(clean, clean_src, None)
    fuzzy_report, fuzzy_labels = run_round_start(fuzzy, fuzzy_src, fuzz)

    # ---- counts: tried = added + duplicates + quarantined, none lost, each quarantined with a reason
    tried = entries_below(fuzzy_src / "images")  # listed images and everything else below images/, unaided
    # (listed images are reported by their resolved path, the rest as found: tmp_path has no links above)
    reported = [(p, (ADDED, "")) for p in fuzzy_report.sources.values()]
    reported += [(p, (DUPLICATE, "")) for p in fuzzy_report.duplicates]
    reported += [(p, (QUARANTINED, r)) for p, r in fuzzy_report.quarantined]
    outcome = dict(reported)
    assert len(outcome) == len(reported)  # no file has two outcomes
    lost = len(tried) - len(outcome)
    assert fuzzy_report.tried() == len(outcome) == len(tried) and lost == 0
    assert len(fuzzy_report.quarantined) >= 200 and all(reason for _, reason in fuzzy_report.quarantined)
    assert set(outcome) == {str(p) for p in tried}
    for case in fuzz.cases:
        got, reason = outcome[str(case.path)]
        assert got == case.expected and reason.startswith(case.reason), (
            case.path,
            case.expected,
            got,
            reason,
        )
    assert sorted(fuzzy_report.added) == sorted(clean_report.added)  # the good images, all of them, only them
    assert fuzzy_report.human_labeled == clean_report.human_labeled

    # ---- the round's result: usable manifest rows, pseudo-label scores and masks identical
    clean_rows = manifest.usable(manifest.load(clean.manifest_path)).reset_index(drop=True)
    fuzzy_table = manifest.load(fuzzy.manifest_path)
    fuzzy_rows = manifest.usable(fuzzy_table).reset_index(drop=True)
    pd.testing.assert_frame_equal(fuzzy_rows, clean_rows)
    assert clean_rows["score"].notna().sum() > 0  # the teacher did score the pool
    assert (fuzzy_labels.image_ids, fuzzy_labels.model_version) == (
        clean_labels.image_ids,
        clean_labels.model_version,
    )
    assert (fuzzy_labels.image_threshold, fuzzy_labels.pixel_threshold) == (
        clean_labels.image_threshold,
        clean_labels.pixel_threshold,
    )
    assert folder_bytes(Path(fuzzy_labels.out_dir)) == folder_bytes(Path(clean_labels.out_dir))  # masks, maps
    for name in ("images", "masks", "captions"):
        assert folder_bytes(fuzzy.data_dir / name) == folder_bytes(clean.data_dir / name)

    # the bad files' manifest rows keep their reasons; their bytes lie beside data/, not in it
    bad_rows = fuzzy_table[fuzzy_table["quarantine_reason"] != ""]
    assert len(bad_rows) > 0 and bad_rows["path"].str.startswith("../quarantine/").all()
    kept = [p for p in fuzzy.quarantine_dir.iterdir() if p.suffix != ".csv"]
    assert len(kept) == len(bad_rows)

    # ---- versioned: the fuzz workspace's DVC remote holds no quarantined byte
    clean_version = versioning.commit_round(clean, 1, message="clean")
    fuzzy_version = versioning.commit_round(fuzzy, 1, message="with the fuzz set")
    in_remote = remote_objects(fuzzy)
    assert not {md5(p.read_bytes()) for p in kept} & in_remote
    extra = in_remote - remote_objects(clean)
    assert extra == {
        md5(fuzzy.manifest_path.read_bytes()),
        fuzzy_version.data_md5.removesuffix(".dir"),
    }  # the bad files cost the remote nothing but their manifest rows
    assert fuzzy_version.pushed == clean_version.pushed > 0
    assert "quarantine/" in (fuzzy.workspace / ".gitignore").read_text().splitlines()
