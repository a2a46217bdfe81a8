"""Malformed Label Studio annotations and brush RLE: each set aside with its reason, the good ones of the same
batch still read (no server: a stand-in client serves tasks and annotations as the SDK would)."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

import loom.services.labelstudio
from loom.config import Settings, load_settings
from loom.data import manifest
from loom.services.labelstudio import MalformedAnnotation, mask_to_results, pull_annotations, results_to_mask

CLASSES = ("hole", "stain", "broken_yarn", "knot", "misweave", "defect")
H, W = 10, 12


def a_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((H, W), np.uint8)
    mask[rng.integers(0, 5) : 7, 2:9] = rng.integers(1, 4)
    mask[0, W - 1] = 6
    return mask


def rle_bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def crafted_rle(values: int, word_bits: int, runs: list[tuple[int, int]]) -> list[int]:
    """A Label Studio brush RLE written bit by bit: header (count, word size, run-length sizes), then runs."""
    bits = f"{values:032b}{word_bits - 1:05b}" + "1111" * 4  # run lengths of up to 16 bits
    for length, value in runs:  # a repeated run: flag 1, size index 0, length - 1, the value
        bits += "1" + "00" + f"{length - 1:016b}" + f"{value:0{word_bits}b}"
    return rle_bytes(bits)


# ---- the decoding path -------------------------------------------------------------------------------------


def brush(mask: np.ndarray | None = None) -> dict[str, Any]:
    return mask_to_results(a_mask(1) if mask is None else mask, CLASSES)[0]


def broken(change: Any) -> list[Any]:
    """A one-region result list, the region changed in place by ``change(region)``."""
    region = brush()
    change(region)
    return [region]


MALFORMED = [
    # (what, results, words of the reason)
    ("not a list: an object", {"type": "brushlabels"}, "list of regions, got dict"),
    ("not a list: text", "[]", "list of regions, got str"),
    ("not a list: bytes", b"[]", "list of regions, got bytes"),
    ("a region that is None", [None], "a region must be an object, got NoneType"),
    ("a region that is a number", [brush(), 7], "result 1: a region must be an object"),
    ("a region that is a list", [["brushlabels"]], "a region must be an object, got list"),
    (
        "a rectangle",
        broken(lambda r: r.update(type="rectanglelabels")),
        "type 'rectanglelabels' is not a brush",
    ),
    ("a region without a type", broken(lambda r: r.pop("type")), "type None is not a brush"),
    ("value missing", broken(lambda r: r.pop("value")), "'value' must be an object, got NoneType"),
    ("value a list", broken(lambda r: r.update(value=[1, 2])), "'value' must be an object, got list"),
    ("value a string", broken(lambda r: r.update(value="rle")), "'value' must be an object, got str"),
    ("labels missing", broken(lambda r: r["value"].pop("brushlabels")), "expected one brush label, got None"),
    (
        "labels a number",
        broken(lambda r: r["value"].update(brushlabels=3)),
        "expected one brush label, got 3",
    ),
    ("labels a string", broken(lambda r: r["value"].update(brushlabels="hole")), "expected one brush label"),
    (
        "two labels",
        broken(lambda r: r["value"].update(brushlabels=["hole", "knot"])),
        "expected one brush label",
    ),
    ("label unknown", broken(lambda r: r["value"].update(brushlabels=["zebra"])), "unknown label 'zebra'"),
    ("label a number", broken(lambda r: r["value"].update(brushlabels=[1])), "unknown label 1"),
    ("label a list", broken(lambda r: r["value"].update(brushlabels=[["hole"]])), "unknown label ['hole']"),
    ("height missing", broken(lambda r: r.pop("original_height")), "drawn on a Nonex12 image"),
    ("width as text", broken(lambda r: r.update(original_width="12")), "drawn on a 10x12 image, but"),
    ("negative height", broken(lambda r: r.update(original_height=-10)), "drawn on a -10x12 image"),
    ("drawn bigger", broken(lambda r: r.update(original_height=20, original_width=24)), "drawn on a 20x24"),
    ("not rle", broken(lambda r: r["value"].update(format="polygon")), "brush format 'polygon' is not 'rle'"),
    ("rle missing", broken(lambda r: r["value"].pop("rle")), "RLE must be a non-empty list of byte values"),
    ("rle as base64", broken(lambda r: r["value"].update(rle="AAAB4A==")), "RLE must be a non-empty list"),
    ("rle as bytes", broken(lambda r: r["value"].update(rle=b"\x00\x00\x01\xe0")), "RLE must be a non-empty"),
    ("rle of floats", broken(lambda r: r["value"].update(rle=[0.0, 0.0, 1.0, 224.0])), "non-empty list"),
    (
        "rle byte > 255",
        broken(lambda r: r["value"].update(rle=[*r["value"]["rle"][:-1], 256])),
        "byte values",
    ),
    ("rle of 3 bytes", broken(lambda r: r["value"].update(rle=r["value"]["rle"][:3])), "does not describe"),
    ("rle cut short", broken(lambda r: r["value"].update(rle=r["value"]["rle"][:6])), "truncated or corrupt"),
    (
        "rle cut in half",
        broken(lambda r: r["value"].update(rle=r["value"]["rle"][: len(r["value"]["rle"]) // 2])),
        "truncated or corrupt",
    ),
    (
        "rle for 10x13",
        broken(
            lambda r: r["value"].update(
                rle=mask_to_results(np.ones((10, 13), np.uint8), CLASSES)[0]["value"]["rle"]
            )
        ),
        "does not describe a 10x12 image",
    ),
    (
        "rle of a huge image",
        broken(lambda r: r["value"].update(rle=[255, 255, 255, 255, 0, 0])),
        "does not describe",
    ),
    (
        "rle words wider than a byte",
        broken(lambda r: r["value"].update(rle=crafted_rle(H * W * 4, 16, [(H * W * 4, 300)]))),
        "truncated or corrupt",
    ),
]


@pytest.mark.parametrize(("what", "results", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_results_are_refused_with_a_reason(what: str, results: Any, reason: str) -> None:
    with pytest.raises(MalformedAnnotation) as info:
        results_to_mask(results, H, W, CLASSES)
    assert reason in str(info.value), (what, str(info.value))


def test_a_sound_crafted_rle_and_key_points_decode() -> None:
    rle = crafted_rle(H * W * 4, 8, [(H * W * 4, 255)])  # every pixel painted
    region = {**brush(), "value": {"format": "rle", "rle": rle, "brushlabels": ["knot"]}}
    click = {"type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["hole"]}}
    np.testing.assert_array_equal(results_to_mask([click, region], H, W, CLASSES), np.full((H, W), 4))


def test_an_rle_that_decodes_to_the_wrong_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A decoder bug.
    monkeypatch.setattr(loom.services.labelstudio, "decode_rle", lambda rle: np.zeros(7, np.uint8))
    with pytest.raises(MalformedAnnotation, match=f"RLE decodes to 7 values, not {H * W * 4}"):
        results_to_mask([brush()], H, W, CLASSES)


# ---- pulling a batch ---------------------------------------------------------------------------------------


class StandIn:
    """Serves tasks with their annotations as Label Studio's JSON export does (projects.exports)."""

    def __init__(self, tasks: list[Any], annotations: dict[Any, Any]) -> None:
        self.projects = SimpleNamespace(exports=SimpleNamespace(download_sync=self._export))
        self._all = tasks
        self._annotations = annotations

    def _export(self, project_id: int, **_: Any) -> Iterator[bytes]:
        exported = []
        for task in self._all:
            key = int(task.id) if str(task.id).isdigit() else task.id
            anns = self._annotations.get(key)
            if anns is None:
                continue  # not annotated: an export of annotated tasks leaves it out
            anns = [vars(a) for a in anns] if isinstance(anns, list) else anns
            exported.append({**vars(task), "annotations": anns})
        text = json.dumps(exported, default=lambda v: v.isoformat())
        yield from (text[i : i + 1000].encode() for i in range(0, len(text), 1000))  # streamed in chunks


def task(task_id: Any, image_id: Any, total: Any = 1, data: Any = "default") -> SimpleNamespace:
    return SimpleNamespace(
        id=task_id, data={"image_id": image_id} if data == "default" else data, total_annotations=total
    )


def annotation(ann_id: Any, result: Any, minute: int = 0, **fields: Any) -> SimpleNamespace:
    values = {
        "id": ann_id,
        "result": result,
        "was_cancelled": False,
        "updated_at": dt.datetime(2026, 11, 23, 14, minute, tzinfo=dt.UTC),
        "completed_by": 5,
        "lead_time": 12.5,
    }
    return SimpleNamespace(**{**values, **fields})


def batch() -> tuple[StandIn, dict[str, np.ndarray], dict[str, str]]:
    """Tasks with good annotations among malformed ones: (client, good image -> mask, bad image -> reason)."""
    good = {f"good{k}": a_mask(10 + k) for k in range(5)}
    good["good_empty"] = np.zeros((H, W), np.uint8)
    good["good_none"] = np.zeros((H, W), np.uint8)
    tasks, annotations = [], {}

    def add(task_id: Any, image_id: str, anns: Any, **task_fields: Any) -> None:
        tasks.append(task(task_id, image_id, **task_fields))
        annotations[int(task_id) if str(task_id).isdigit() else task_id] = anns  # asked for by number

    for k in range(3):
        add(100 + k, f"good{k}", [annotation(500 + k, mask_to_results(good[f"good{k}"], CLASSES))])
    # the newest non-cancelled annotation wins; an older malformed one and a newer skipped one do not matter
    add(
        103,
        "good3",
        [
            annotation(503, "garbage", minute=1),
            annotation(504, mask_to_results(good["good3"], CLASSES), minute=2),
            annotation(505, [], minute=3, was_cancelled=True),
        ],
    )
    # odd bookkeeping (who, how long, ids as text) does not cost a person's mask
    add(
        "104",
        "good4",
        [
            annotation(
                "506", mask_to_results(good["good4"], CLASSES), completed_by={"id": "7"}, lead_time="fast"
            )
        ],
    )
    add(105, "good_empty", [annotation(507, [])])  # no region: a normal image
    add(106, "good_none", [annotation(508, None, completed_by="someone", updated_at=None)])

    bad = {
        "bad_label": (
            "unknown label 'zebra'",
            [annotation(600, broken(lambda r: r["value"].update(brushlabels=["zebra"])))],
        ),
        "bad_size": (
            "drawn on a 20x24 image",
            [annotation(601, mask_to_results(np.ones((20, 24), np.uint8), CLASSES))],
        ),
        "bad_rle": (
            "RLE is truncated or corrupt",
            [annotation(602, broken(lambda r: r["value"].update(rle=r["value"]["rle"][:6])))],
        ),
        "bad_words": (
            "RLE is truncated or corrupt",
            [
                annotation(
                    603,
                    broken(lambda r: r["value"].update(rle=crafted_rle(H * W * 4, 16, [(H * W * 4, 300)]))),
                )
            ],
        ),
        "bad_type": (
            "type 'polygonlabels' is not a brush mask",
            [annotation(604, broken(lambda r: r.update(type="polygonlabels")))],
        ),
        "bad_value": ("'value' must be an object", [annotation(605, broken(lambda r: r.update(value=None)))]),
        "bad_result_dict": ("list of regions, got dict", [annotation(606, {"type": "brushlabels"})]),
        "bad_result_text": ("list of regions, got str", [annotation(607, "[{...}]")]),
        "bad_region": ("a region must be an object, got int", [annotation(608, [3])]),
        "bad_annotation_id": ("the annotation id None is not a number", [annotation(None, [])]),
        "bad_annotation_list": ("the annotations must be a list, got dict", {"id": 609}),
    }
    for k, (image_id, (_, anns)) in enumerate(bad.items()):
        add(200 + k, image_id, anns)
    add("abc", "bad_task_id", [annotation(610, [])])
    bad_reasons = {image_id: reason for image_id, (reason, _) in bad.items()}
    bad_reasons["bad_task_id"] = "the task id 'abc' is not a number"

    # not Loom's to read this round: no error, no annotation
    tasks += [
        task(300, "earlier_round_image"),
        task(301, "not_annotated", total=0),
        task(302, "total_unknown", total=None),
        task(303, "no_data", data=None),
        task(304, "data_a_list", data=["good0"]),
        task(305, "no_image_id", data={"image": "x.png"}),
    ]
    add(306, "only_cancelled", [annotation(611, [], was_cancelled=True)])
    return StandIn(tasks, annotations), good, bad_reasons


def sizes_for(*names: str) -> dict[str, tuple[int, int]]:
    return {name: (H, W) for name in names}


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings(tmp_path / "ws")


def test_a_batch_keeps_its_good_annotations_and_sets_the_bad_ones_aside(settings: Settings) -> None:
    client, good, bad = batch()
    sizes = sizes_for(*good, *bad, "not_annotated", "total_unknown", "no_data", "only_cancelled")
    pulled, errors = pull_annotations(settings, 3, sizes, client=client)

    assert {p.image_id for p in pulled} == set(good)
    for p in pulled:
        np.testing.assert_array_equal(p.mask, good[p.image_id], err_msg=p.image_id)
    by_image = {p.image_id: p for p in pulled}
    assert (by_image["good3"].annotation_id, by_image["good3"].task_id) == (504, 103)
    assert (by_image["good4"].annotation_id, by_image["good4"].task_id) == (506, 104)
    assert by_image["good4"].completed_by == 7 and by_image["good4"].lead_time is None
    assert by_image["good_none"].completed_by is None and by_image["good_none"].updated_at is None
    assert by_image["good0"].updated_at == "2026-11-23T14:00:00+00:00" and by_image["good0"].lead_time == 12.5

    reasons = dict(errors)
    assert len(errors) == len(reasons) == len(bad)  # one reason per set-aside annotation
    assert set(reasons) == set(bad)
    for image_id, words in bad.items():
        assert words in reasons[image_id], (image_id, reasons[image_id])
        assert reasons[image_id].startswith("task ")  # which task to open in Label Studio
    assert reasons["bad_label"].startswith("task 200, annotation 600: result 0: unknown label 'zebra'")


def test_pull_corrections_sets_aside_beside_data_and_keeps_the_rest(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.review import pull_corrections

    client, good, bad = batch()
    ids = [*good, *bad]
    rows = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"images/{i}.png" for i in ids],
            "width": W,
            "height": H,
            "split": "train",
            "review_state": "queued",
        }
    )
    manifest.save(rows, settings.manifest_path)
    monkeypatch.setattr(loom.services.labelstudio, "connect", lambda *args, **kwargs: client)

    outcome = pull_corrections.fn(settings, 3)
    table = manifest.load(settings.manifest_path).set_index("image_id")
    assert outcome.reviewed == len(good) and {i for i, _ in outcome.malformed} == set(bad)
    assert set(table.index[table["review_state"] == "reviewed"]) == set(good)
    assert set(table.index[table["review_state"] == "queued"]) == set(bad)  # still in review
    path = settings.quarantine_dir / "annotations.csv"
    assert not path.is_relative_to(settings.data_dir)  # not pushed to the DVC remote with the data
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert {line["image_id"]: line["reason"] for line in lines} == dict(outcome.malformed)
    assert {line["project_id"] for line in lines} == {"3"}
