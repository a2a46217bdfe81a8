"""Class masks <-> Label Studio brush results (RLE), without a server."""

from __future__ import annotations

import numpy as np
import pytest

from loom.services.labelstudio import MalformedAnnotation, label_config, mask_to_results, results_to_mask

CLASSES = ("hole", "stain", "broken_yarn", "knot", "misweave", "defect")


def _multi_class_mask(height: int = 13, width: int = 21) -> np.ndarray:
    rng = np.random.default_rng(0)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:5, 2:9] = 1
    mask[6:12, 10:20] = 3
    mask[rng.random((height, width)) < 0.05] = 2  # scattered speckles
    mask[0, width - 1] = 6  # a single pixel in the corner
    return mask


def test_multi_class_mask_round_trips_exactly() -> None:
    mask = _multi_class_mask()
    results = mask_to_results(mask, CLASSES)

    assert [r["value"]["brushlabels"] for r in results] == [["hole"], ["stain"], ["broken_yarn"], ["defect"]]
    for result in results:
        assert result["type"] == "brushlabels"
        assert (result["from_name"], result["to_name"]) == ("mask", "image")
        assert (result["original_height"], result["original_width"]) == mask.shape
        assert result["image_rotation"] == 0
        assert result["value"]["format"] == "rle"
    assert len({r["id"] for r in results}) == len(results)
    decoded = results_to_mask(results, *mask.shape, CLASSES)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


def test_empty_mask_gives_no_results_and_decodes_to_background() -> None:
    mask = np.zeros((8, 5), dtype=np.uint8)
    assert mask_to_results(mask, CLASSES) == []
    np.testing.assert_array_equal(results_to_mask([], 8, 5, CLASSES), mask)


def test_later_results_overwrite_earlier_ones() -> None:
    hole = np.zeros((6, 6), dtype=np.uint8)
    hole[0:4, 0:4] = 1
    knot = np.zeros((6, 6), dtype=np.uint8)
    knot[2:6, 2:6] = 4
    first, second = mask_to_results(hole, CLASSES)[0], mask_to_results(knot, CLASSES)[0]

    decoded = results_to_mask([first, second], 6, 6, CLASSES)
    assert decoded[3, 3] == 4 and decoded[0, 0] == 1 and decoded[5, 5] == 4
    assert results_to_mask([second, first], 6, 6, CLASSES)[3, 3] == 1


def test_keypoint_results_are_ignored() -> None:
    mask = _multi_class_mask()
    click = {
        "type": "keypointlabels",
        "from_name": "click",
        "to_name": "image",
        "value": {"x": 50.0, "y": 50.0, "keypointlabels": ["hole"]},
    }
    decoded = results_to_mask([click, *mask_to_results(mask, CLASSES)], *mask.shape, CLASSES)
    np.testing.assert_array_equal(decoded, mask)


def test_mask_with_unknown_class_id_is_refused() -> None:
    with pytest.raises(ValueError, match="class id 7"):
        mask_to_results(np.full((3, 3), 7, dtype=np.uint8), CLASSES)


def _one_result() -> dict:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:7, 3:9] = 2
    return mask_to_results(mask, CLASSES)[0]


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (lambda r: r["value"].update(rle=r["value"]["rle"][:6]), "truncated or corrupt"),
        (lambda r: r["value"].update(rle=[]), "non-empty list"),
        (lambda r: r["value"].update(rle="abc"), "non-empty list"),
        (lambda r: r["value"].update(rle=[300, 1, 2, 3, 4]), "non-empty list"),
        (lambda r: r["value"].update(rle=[255, 255, 255, 255, 0, 0]), "does not describe a 10x12 image"),
        (lambda r: r.update(original_width=13), "drawn on a 10x13 image"),
        (lambda r: r.update(original_height=None), "drawn on a Nonex12 image"),
        (lambda r: r["value"].update(brushlabels=["zebra"]), "unknown label 'zebra'"),
        (lambda r: r["value"].update(brushlabels=[]), "expected one brush label"),
        (lambda r: r["value"].update(format="polygon"), "is not 'rle'"),
    ],
)
def test_malformed_results_raise_with_a_reason(break_it, reason: str) -> None:
    result = _one_result()
    assert results_to_mask([result], 10, 12, CLASSES).sum() > 0  # sound before it is broken
    break_it(result)
    with pytest.raises(MalformedAnnotation, match=reason):
        results_to_mask([result], 10, 12, CLASSES)


def test_results_that_are_not_regions_raise() -> None:
    with pytest.raises(MalformedAnnotation, match="list of regions"):
        results_to_mask("not a list", 4, 4, CLASSES)  # type: ignore[arg-type]
    with pytest.raises(MalformedAnnotation, match="result 1: a region must be an object"):
        results_to_mask([_one_result(), 42], 10, 12, CLASSES)  # type: ignore[list-item]


def test_malformed_annotation_is_a_value_error() -> None:
    assert issubclass(MalformedAnnotation, ValueError)


def test_label_config_lists_every_class_for_brush_and_smart_clicks() -> None:
    config = label_config(CLASSES)
    assert '<Image name="image" value="$image" zoom="true"/>' in config
    assert '<BrushLabels name="mask" toName="image">' in config
    assert '<KeyPointLabels name="click" toName="image" smart="true">' in config
    for name in CLASSES:
        assert f'<Label value="{name}" background=' in config
        assert f'<Label value="{name}" smart="true" background=' in config


def test_correction_separates_finding_the_region_from_naming_its_class():
    from loom.services.annotator import compare_masks

    pred = np.zeros((8, 8), np.uint8)
    truth = np.zeros((8, 8), np.uint8)
    pred[2:4, 2:4] = 6  # the teacher found the region but called it "defect"
    truth[2:4, 2:4] = 1  # a person says: hole
    c = compare_masks("img", 1, pred, truth, ("hole", "stain", "broken_yarn", "knot", "misweave", "defect"))
    assert c.region_iou == 1.0 and c.pred_iou == 0.0
    assert c.pixels_relabelled == 4 and c.pixels_added == c.pixels_removed == 0
    assert c.classes_before == ("defect",) and c.classes_after == ("hole",)
