"""Naming predicted regions: teacher class evidence, else prototypes of labeled regions, else `defect`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.teacher.naming import NamingConfig, RegionPrototypes, connected_regions, name_regions

DEFECT = 6
RED, BLUE, GREEN = (220, 60, 60), (60, 60, 220), (60, 220, 60)


def colour_features(crops: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H / 8, W / 8): mean colour per 8 x 8 cell, a transparent stand-in."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    return F.avg_pool2d(x, 8)


def fabric_with_blob(colour: tuple[int, int, int], top: int = 24, left: int = 40, size: int = 16):
    """A grey 96 x 96 image with one coloured square, and its bool region."""
    image = np.full((96, 96, 3), 128, np.uint8)
    image[top : top + size, left : left + size] = colour
    region = np.zeros((96, 96), bool)
    region[top : top + size, left : left + size] = True
    return image, region


def prototypes_for_red_and_blue() -> RegionPrototypes:
    images, masks = [], []
    for class_id, colour in ((1, RED), (2, BLUE)):
        for top in (8, 40, 64):
            image, region = fabric_with_blob(colour, top=top)
            images.append(image)
            masks.append(region.astype(np.uint8) * class_id)
    prototypes = RegionPrototypes(colour_features, stride=8, config=NamingConfig(context=64))
    prototypes.fit(images, masks, class_ids=[1, 2, 3])
    return prototypes


def test_connected_regions_are_eight_connected() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region
    mask[6, 6] = True
    labels, count = connected_regions(mask)
    assert count == 2 and labels[1, 1] == labels[2, 2] != labels[6, 6]


def test_prototypes_collect_one_descriptor_per_region() -> None:
    prototypes = prototypes_for_red_and_blue()
    assert len(prototypes) == 6
    assert sorted(prototypes.labels.tolist()) == [1, 1, 1, 2, 2, 2]
    assert np.allclose(np.linalg.norm(prototypes.descriptors, axis=1), 1.0, atol=1e-5)


def test_prototypes_name_a_new_region_like_the_labeled_ones_and_leave_an_unknown_one() -> None:
    prototypes = prototypes_for_red_and_blue()
    for colour, expected in ((RED, 1), (BLUE, 2), (GREEN, DEFECT)):
        image, region = fabric_with_blob(colour, top=56, left=16)
        class_mask, names = name_regions(image, region, DEFECT, prototypes=prototypes)
        assert len(names) == 1
        assert names[0].class_index == expected
        assert names[0].source == ("none" if expected == DEFECT else "prototypes")
        assert set(np.unique(class_mask[region])) == {expected} and not class_mask[~region].any()


def test_teacher_class_evidence_wins_when_decisive_and_defers_when_not() -> None:
    image, region = fabric_with_blob(RED)
    second = np.zeros_like(region)
    second[70:80, 70:80] = True
    mask = region | second
    probs = np.full((2, 96, 96), 0.4, np.float32)
    probs[1][region] = 0.9  # channel 1 = class 4, decisive on the first region
    probs[0][region] = 0.1
    class_mask, names = name_regions(
        image,
        mask,
        DEFECT,
        class_probs=probs,
        prob_class_ids=[3, 4],
        prototypes=prototypes_for_red_and_blue(),
        config=NamingConfig(context=32),  # the grey region's surroundings do not reach the red one
    )
    assert names[0].class_index == 4 and names[0].source == "teacher"
    assert names[0].confidence == np.float32(0.9)
    # The second region has no decisive class evidence (0.4 each) and is grey: nothing to go on.
    assert names[1].class_index == DEFECT and names[1].source == "none"
    assert set(np.unique(class_mask)) == {0, 4, DEFECT}


def test_no_regions_gives_an_empty_mask() -> None:
    image, _ = fabric_with_blob(RED)
    class_mask, names = name_regions(image, np.zeros((96, 96), bool), DEFECT)
    assert names == [] and not class_mask.any() and class_mask.dtype == np.uint8
