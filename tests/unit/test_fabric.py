"""The embedded fabric generator: determinism, masks that match the pixels, and the dataset folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from loom.config import DEFAULT_CLASSES
from loom.data import manifest
from loom.datasets.fabric import (
    DEFECT_KINDS,
    WEAVES,
    DefectSpec,
    class_mask,
    generate,
    kind_to_class,
    render_fabric,
    render_sample,
    render_with_masks,
    sample_defects,
    sample_spec,
)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".txt", ".json")
    }


def test_render_sample_is_deterministic_by_seed() -> None:
    first, again, other = (
        render_sample(11, 96, 128, 1.0),
        render_sample(11, 96, 128, 1.0),
        render_sample(12, 96, 128, 1.0),
    )
    assert first.image.tobytes() == again.image.tobytes()
    assert first.mask.tobytes() == again.mask.tobytes()
    assert first.caption == again.caption and first.defects == again.defects
    assert first.image.tobytes() != other.image.tobytes()


def test_pixels_match_the_recorded_reference() -> None:
    """The embedded dataset is versioned by content: a changed generator (or a platform whose maths differ)
    would silently change every image id. Update the digest only on purpose."""
    sample = render_sample(2024, 64, 96, 1.0)
    digest = hashlib.sha256(sample.image.tobytes() + sample.mask.tobytes()).hexdigest()
    assert digest == "8ddabb4a9f77650f84d68c66c9aa55d65413f6d07ac98c1191f0ecec891a9440"
    assert sample.caption == "knit fabric, black, with a large stain near the left edge"


def test_shapes_dtypes_and_captions() -> None:
    sample = render_sample(3, 96, 160, defect_prob=0.0)
    assert sample.image.shape == (96, 160, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (96, 160) and sample.mask.dtype == np.uint8
    assert not sample.mask.any() and sample.defects == []
    assert sample.caption.endswith("no defect") and sample.spec.weave in sample.caption
    assert sample.image.std() > 5  # a texture, not a flat colour


def test_line_scan_frame_has_the_sensor_shape() -> None:
    sample = render_sample(5, 256, 4096, defect_prob=1.0)
    assert sample.image.shape == (256, 4096, 3) and sample.mask.shape == (256, 4096)
    assert sample.defects and sample.mask.any()


def test_every_weave_and_class_appears_and_masks_hold_valid_ids() -> None:
    weaves, classes_seen = set(), set()
    for seed in range(60):
        sample = render_sample(seed, 128, 128, defect_prob=0.7)
        weaves.add(sample.spec.weave)
        assert int(sample.mask.max()) <= len(DEFAULT_CLASSES)
        ids = set(np.unique(sample.mask).tolist()) - {0}
        assert ids == {DEFAULT_CLASSES.index(d["class"]) + 1 for d in sample.defects}
        for d in sample.defects:
            classes_seen.add(d["class"])
            x0, y0, x1, y1 = d["bbox"]
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert d["class"].replace("_", " ") in sample.caption
        if not sample.defects:
            assert sample.caption.endswith("no defect")
    assert weaves == set(WEAVES)
    assert classes_seen == {"hole", "stain", "broken_yarn", "knot", "misweave"}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_masked_pixels_show_the_defect_and_nothing_else_changes(kind: str) -> None:
    fractions = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        spec = sample_spec(rng)
        defects = sample_defects(rng, spec, 128, 128, [kind], first=kind)[:1]
        image, masks = render_with_masks(spec, 128, 128, np.random.default_rng(100 + seed), defects)
        clean = render_fabric(spec, 128, 128, np.random.default_rng(100 + seed))
        mask = masks[0]
        assert mask.any(), f"{kind} seed {seed}: empty mask"
        diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
        fraction = float((diff[mask] > 8).mean())
        fractions.append(fraction)
        assert fraction > 0.6, f"{kind} seed {seed}: only {fraction:.2f} of the mask visibly differs"
        # away from the mask (beyond shadows and blur) the image is untouched
        far = ndimage.distance_transform_edt(~mask) > 16
        assert not diff[far].any(), f"{kind} seed {seed}: pixels far from the mask changed"
    assert np.mean(fractions) > 0.85


def test_later_defects_overwrite_earlier_ones_in_the_mask() -> None:
    rng = np.random.default_rng(4)
    spec = sample_spec(rng)
    stain = sample_defects(rng, spec, 128, 128, ["stain"], "stain")[0]
    hole = DefectSpec("hole", stain.center, stain.size * 0.5, 9)
    masks = render_with_masks(spec, 128, 128, np.random.default_rng(1), [stain, hole])[1]
    assert (masks[0] & masks[1]).any()  # they overlap, so the order decides
    mask = class_mask(masks, [2, 1], (128, 128))
    assert (
        (mask[masks[1]] == 1).all()
        and (mask[masks[0] & ~masks[1]] == 2).all()
        and not mask[~(masks[0] | masks[1])].any()
    )


def test_custom_class_lists_map_defect_kinds() -> None:
    assert kind_to_class(("float", "hole"))["misweave"] == "float"
    assert set(kind_to_class(("defect",)).values()) == {"defect"}
    assert kind_to_class(("scratch",)) == {}
    sample = render_sample(1, 64, 64, defect_prob=1.0, classes=("defect",))
    assert set(np.unique(sample.mask).tolist()) <= {0, 1} and sample.mask.any()
    with pytest.raises(ValueError, match="names a fabric defect"):
        render_sample(1, 64, 64, classes=("scratch",))


def test_generate_writes_a_deterministic_loom_dataset(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", n_images=20, size=64, seed=3, line_scan=1, workers=1)
    b = generate(tmp_path / "b", n_images=20, size=64, seed=3, line_scan=1, workers=2)  # a process pool
    c = generate(tmp_path / "c", n_images=20, size=64, seed=4, workers=1)
    assert _files(a) == _files(b)
    table_a, table_b = pd.read_parquet(a / "manifest.parquet"), pd.read_parquet(b / "manifest.parquet")
    pd.testing.assert_frame_equal(table_a, table_b)
    assert (a / "images" / "fabric_00000.png").read_bytes() != (
        c / "images" / "fabric_00000.png"
    ).read_bytes()

    assert json.loads((a / "classes.json").read_text()) == list(DEFAULT_CLASSES)
    table = manifest.load(a / "manifest.parquet")
    assert list(table_a.columns) == list(manifest.COLUMNS)
    assert len(table) == 21 and set(table["split"]) == {"train", "test"}
    assert (table["source"] == "fabric-sim").all() and (table["round"] == 0).all()
    for row in table.itertuples():
        image_path = a / row.path
        assert row.image_id == hashlib.sha256(image_path.read_bytes()).hexdigest()
        image = Image.open(image_path)
        assert image.mode == "RGB" and image.size == (row.width, row.height)
        mask = np.asarray(Image.open(a / "masks" / image_path.name))
        assert mask.shape == (row.height, row.width)
        present = {DEFAULT_CLASSES[k - 1] for k in np.unique(mask) if k}
        assert present == set(filter(None, row.classes.split(",")))
        assert (a / "captions" / f"{image_path.stem}.txt").read_text().strip()
        test = row.split == "test"
        assert (row.label_source, row.review_state) == (("human", "reviewed") if test else ("none", "none"))
    test_rows = table[table["split"] == "test"]
    assert (test_rows["classes"] == "").any() and (test_rows["classes"] != "").any()
    line = table[table["path"] == "images/linescan_000.png"].iloc[0]
    assert (line["width"], line["height"], line["split"]) == (4096, 256, "train")
    assert 4 <= (table["classes"] != "").sum() <= 8  # about 30 % of the 20 squares, plus maybe the frame


def test_a_large_test_split_covers_every_class(tmp_path: Path) -> None:
    out = generate(tmp_path / "ds", n_images=100, size=48, seed=1, workers=1)
    table = manifest.load(out / "manifest.parquet")
    test = table[table["split"] == "test"]
    seen = {c for value in test["classes"] for c in value.split(",") if c}
    assert seen == {"hole", "stain", "broken_yarn", "knot", "misweave"}
    assert (test["classes"] == "").sum() >= 10  # most images are normal, in test as well
    assert 20 <= len(test) <= 35


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to generate"):
        generate(tmp_path / "x", n_images=0)
    with pytest.raises(ValueError, match="test_fraction"):
        generate(tmp_path / "x", n_images=4, test_fraction=1.0)
    with pytest.raises(ValueError, match="names a fabric defect"):
        generate(tmp_path / "x", n_images=4, classes=("scratch",))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="file"):
        generate(tmp_path / "file", n_images=4)
