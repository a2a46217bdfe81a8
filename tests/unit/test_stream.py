"""A user's labeled folder as a stream of batches (`loom demo --data`, the flywheel simulation)."""

from __future__ import annotations

import shutil

import pandas as pd

from loom.config import DEFAULT_CLASSES
from loom.datasets.fabric import generate
from loom.datasets.stream import TEST_SPLIT_FILE, batches_from_folder


def test_a_plain_folder_becomes_batches_with_a_frozen_test_split(tmp_path):
    generated = generate(
        tmp_path / "gen", n_images=20, size=32, defect_fraction=0.5, test_fraction=0.0, seed=1
    )
    plain = tmp_path / "mill-sample"  # what a mill has: images and class masks, no manifest
    shutil.copytree(generated / "images", plain / "images")
    shutil.copytree(generated / "masks", plain / "masks")

    batches = batches_from_folder(
        plain, tmp_path / "incoming", 3, DEFAULT_CLASSES, test_fraction=0.25, seed=0
    )
    tables = [pd.read_parquet(batch / "manifest.parquet") for batch in batches]
    test = tables[0][tables[0]["split"] == "test"]
    assert len(test) == 5 and (test["label_source"] == "human").all()
    assert all((t["split"] == "train").all() for t in tables[1:])  # the test split comes once, in batch 1
    train = [stem for t in tables for stem in t.loc[t["split"] == "train", "path"]]
    assert len(train) == len(set(train)) == 15  # every train image once
    for batch, table in zip(batches, tables, strict=True):
        for path in table["path"]:
            assert (batch / path).exists() and (batch / "masks" / path.split("/")[-1]).exists()

    # Drawn once: another call (another seed, batches gone) keeps the same test split.
    frozen = (tmp_path / "incoming" / TEST_SPLIT_FILE).read_text()
    shutil.rmtree(batches[0])
    again = batches_from_folder(plain, tmp_path / "incoming", 3, DEFAULT_CLASSES, seed=7)
    assert (tmp_path / "incoming" / TEST_SPLIT_FILE).read_text() == frozen
    assert set(pd.read_parquet(again[0] / "manifest.parquet").query("split == 'test'")["path"]) == set(
        test["path"]
    )
