"""A labeled sample of a line's fabric as a stream of batches, to rehearse the flywheel on it.

`loom demo --data DIR` and benchmarks/flywheel_sim.py take any folder dataset with class masks (a Loom
dataset folder, or ``images/`` + ``masks/``): its test split, given by the dataset's manifest or drawn once
by ``seed`` and frozen in ``<out>/test-split.json``, goes to people as the human-verified test split of
batch 1; its train images arrive in batches, round after round, in an order drawn by ``seed``. The
simulated annotator answers from the masks (app.demo.GroundTruth reads them from the batch folders).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from loom.data.imageio import write_mask, write_png
from loom.datasets.folder import load_labeled_folder
from loom.datasets.importers import manifest_row, prepare_folder, save_folder

logger = logging.getLogger(__name__)

TEST_SPLIT_FILE = "test-split.json"


def choose_test_split(
    data: Path, stems: Sequence[str], out: Path, test_fraction: float, seed: int
) -> set[str]:
    """Test-split stems: the dataset's own (manifest ``split``), else drawn once and kept in ``out``."""
    manifest_path = Path(data) / "manifest.parquet"
    if manifest_path.exists():
        table = pd.read_parquet(manifest_path)
        given = {Path(p).stem for p in table.loc[table["split"] == "test", "path"]}
        if given:
            return given
    frozen = Path(out) / TEST_SPLIT_FILE
    if frozen.exists():
        return set(json.loads(frozen.read_text())["test"])
    n_test = max(1, round(len(stems) * test_fraction))
    drawn = sorted(np.random.default_rng(seed).choice(sorted(stems), size=n_test, replace=False).tolist())
    frozen.parent.mkdir(parents=True, exist_ok=True)
    frozen.write_text(json.dumps({"data": str(data), "seed": seed, "test": drawn}, indent=1) + "\n")
    return set(drawn)


def batches_from_folder(
    data: Path,
    out: Path,
    rounds: int,
    classes: Sequence[str],
    first: int | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> list[Path]:
    """Write ``rounds`` Loom dataset folders ``out/batch-NN`` from the folder dataset ``data``.

    Batch 1 holds the test split (human-labeled) and ``first`` train images (default: an even share);
    the others split the remaining train images evenly. Batches already written are kept as they are.

    Raises:
        FileNotFoundError: ``data`` lacks images or masks (the message says which).
        ValueError: fewer train images than rounds.
    """
    out = Path(out)
    wanted = [out / f"batch-{r:02d}" for r in range(1, rounds + 1)]
    if all((batch / "manifest.parquet").exists() for batch in wanted):
        return wanted
    items = {item.stem: item for item in load_labeled_folder(Path(data), classes)}
    test = choose_test_split(Path(data), list(items), out, test_fraction, seed)
    train = [stem for stem in sorted(items) if stem not in test]
    if len(train) < rounds:
        raise ValueError(f"{data}: {len(train)} train images cannot make {rounds} batches; use fewer rounds")
    order = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    first = first or len(order) // rounds
    rest = np.array_split(np.array(order[first:], dtype=object), max(rounds - 1, 1)) if rounds > 1 else []
    chunks = [order[:first], *[list(chunk) for chunk in rest]]
    for r, (batch, chunk) in enumerate(zip(wanted, chunks, strict=True), start=1):
        if (batch / "manifest.parquet").exists():
            continue
        prepare_folder(batch, classes)
        (batch / "masks").mkdir(exist_ok=True)
        members = [(stem, "test") for stem in sorted(test)] if r == 1 else []
        members += [(stem, "train") for stem in chunk]
        rows = []
        for stem, split in members:
            item = items[stem]
            image = batch / "images" / f"{stem}.png"
            write_png(image, item.image)
            write_mask(batch / "masks" / f"{stem}.png", item.mask)
            names = ",".join(classes[v - 1] for v in np.unique(item.mask) if 0 < v <= len(classes))
            rows.append(manifest_row(image, batch, split, Path(data).name, names, human=split == "test"))
        save_folder(rows, batch)
        logger.info("%s: %d images (%d test)", batch, len(rows), len(test) if r == 1 else 0)
    return wanted
