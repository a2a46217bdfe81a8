"""The fabric in a line-scan frame: the columns of cloth, found without labels.

A line-scan frame spans the whole width of the cloth and often more: beyond the selvedge (the denser edge
weave) lies blank background, a blown-out white, or machine parts (rollers, bolts), filling one end of the
frame. None of it is fabric, so none of it may vouch for fabric (banks), count as fabric (thresholds) or be
called a defect (scores, masks); nor is the selvedge itself a defect.

How it is found, on the teacher's own patch features (no extra pass over the pixels):
1. Describe each patch column by the mean of its patches over the frame's height. Cloth is a stationary
   texture, so neighbouring columns describe alike; where cloth meets background the description jumps.
2. The step at column j is the distance between the mean descriptions of the `window` columns before and
   after j. Its scale is read off the frame's central columns (`centre` of the width), which are cloth in
   any frame whose background fills less than a third of it: median and MAD-sigma of the steps there.
3. From each end of the frame, the innermost column within `reach` of the width whose step stands more than
   `step_sigmas` sigmas out, moved to the peak of its run of high steps, is a candidate edge of the cloth.
   A strong step alone is also what a defect along the frame (a broken end, a stain) makes, so the
   candidate is kept only if the columns beyond it are mostly (`beyond_share`) unlike the central cloth,
   more than `beyond_sigmas` sigmas of the central columns' own spread away from their median
   description. Beyond a broken end lies ordinary cloth; if it is passed over, the next step out is tried.
4. The body starts `selvedge` of the width inside a kept edge: the selvedge band, whose width a line knows
   from its camera and cloth (the procedural set's bands are 0.4-1.2% of the width).

The teacher extracts a frame's features with its ends mirrored (crops.py), so its outermost columns look
like cloth, not like zero padding; a selvedge at the very end of the frame is then found as a step too.
The mirror flips an oriented weave (a twill's diagonal), which is a step of its own within 2 x `window`
columns of the end, so a step there must pass `end_step_sigmas`.
Images narrower than `min_columns` patch columns are left whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.robust_stats import median_and_sigma


@dataclass
class RegionConfig:
    """Settings of `fabric_columns` (see the module docstring)."""

    enabled: bool = True
    min_columns: int = 96
    window: int = 4
    centre: tuple[float, float] = (0.35, 0.65)
    reach: float = 0.35
    step_sigmas: float = 12.0
    end_step_sigmas: float = 18.0
    beyond_sigmas: float = 6.0
    beyond_share: float = 0.8
    selvedge: float = 0.012


def _steps(descriptions: torch.Tensor, window: int) -> torch.Tensor:
    """(C, D) column descriptions -> (C,) distance between the means of the `window` columns before j and
    the `window` from j on, the descriptions mirrored beyond both ends (as the frame's pixels are)."""
    columns = descriptions.shape[0]
    padded = torch.cat([descriptions[:window].flip(0), descriptions, descriptions[-window:].flip(0)])
    cumulative = torch.cat([torch.zeros(1, descriptions.shape[1]), padded.cumsum(dim=0)])
    at = torch.arange(columns) + window  # column j of the frame in `padded`
    before = (cumulative[at] - cumulative[at - window]) / window
    after = (cumulative[at + window] - cumulative[at]) / window
    return (before - after).norm(dim=1)


def _peak(step_z: torch.Tensor, start: int, direction: int) -> int:
    """The highest step of the run of strong steps that starts at `start` and goes `direction` (+1 or -1):
    a step spreads over the window on both sides of an edge, so its innermost strong column is not the
    edge."""
    threshold = float(step_z[start]) / 2
    best, j = start, start
    while 0 <= j + direction < len(step_z) and float(step_z[j + direction]) > threshold:
        j += direction
        if step_z[j] > step_z[best]:
            best = j
    return best


def fabric_columns(patches: torch.Tensor, grid: tuple[int, int], config: RegionConfig) -> tuple[int, int]:
    """[first, last) patch columns of the fabric body of one image.

    Args:
        patches: (rows x columns, D) patch features, row-major on `grid`.
        grid: (rows, columns) of the patch grid.
        config: the detector's settings.

    Returns:
        (first, last) with 0 <= first < last <= columns; (0, columns) where no edge is found.
    """
    rows, columns = grid
    if not config.enabled or columns < config.min_columns:
        return 0, columns
    descriptions = patches.float().view(rows, columns, -1).mean(dim=0)  # (C, D)
    steps = _steps(descriptions, config.window)
    lo, hi = int(columns * config.centre[0]), int(columns * config.centre[1])
    step_median, step_sigma = median_and_sigma(steps[lo:hi].numpy())
    step_z = (steps - step_median) / max(step_sigma, 1e-6)
    typical = descriptions[lo:hi].median(dim=0).values
    gaps = (descriptions - typical).norm(dim=1)
    gap_median, gap_sigma = median_and_sigma(gaps[lo:hi].numpy())
    unlike = (gaps - gap_median) / max(gap_sigma, 1e-6) > config.beyond_sigmas
    reach = int(columns * config.reach)
    band = math.ceil(columns * config.selvedge)
    first, last = 0, columns
    # The mirror at the frame's ends flips an oriented weave (twill, denim): a step of its own, up to
    # about 16 sigmas, within two windows of the end. A step there must stand out further to be an edge.
    strong = step_z > config.step_sigmas
    strong[: 2 * config.window] &= step_z[: 2 * config.window] > config.end_step_sigmas
    strong[-2 * config.window :] &= step_z[-2 * config.window :] > config.end_step_sigmas
    # Innermost first: a strong step that is not the cloth's edge (a defect along the frame) is passed
    # over for the next one out.
    for j in sorted((j for j in range(1, reach) if strong[j]), reverse=True):
        j = _peak(step_z, j, -1)
        if j > 0 and float(unlike[:j].float().mean()) >= config.beyond_share:
            first = min(j + band, columns // 2)
            break
    for j in sorted(j for j in range(columns - reach, columns) if strong[j]):
        j = _peak(step_z, j, 1)
        if j < columns and float(unlike[j:].float().mean()) >= config.beyond_share:
            last = max(j - band, columns // 2 + 1)
            break
    return first, last
