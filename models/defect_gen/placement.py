"""Put generated defects into real normal images at full resolution, and reject broken samples.

A crop of the pipeline's size is cut at a random place of a full-resolution normal image, the defect is
generated inside the crop's inpainting square (conditioned on the real fabric around it), and the generated
defect is written back at the same place: its mask's pixels exactly, blended into the real fabric over a
``paste_margin`` pixel rim (the defect's own edge), and the real fabric everywhere else. The generated
background of the square is a worse copy of fabric that is right there; keeping it would hand the student
a square of smoothed weave labeled "normal". The result is the whole normal image with one generated defect
and its class mask.

Rejection, with a count per reason:
- ``empty``: fewer than ``min_pixels`` pixels of the asked class;
- ``wrong_class``: the asked class is under half of the generated defect pixels;
- ``shattered``: more connected regions than twice the most any training instance of the class had (at
  least ``min_components_limit``);
- ``leaked``: the mask touches all four sides of the inpainting square (the defect does not end inside it);
- ``unseen``: with a scorer (``anomaly_map(image) -> (H, W)``), the mean score inside the mask does not
  exceed the image's typical level outside it (median + ``unseen_mads`` scaled MADs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from models.defect_gen.data import count_components
from models.defect_gen.pipeline import DefectGenPipeline, region_box
from models.progress import progress
from models.robust_stats import median_and_sigma

REASONS = ("empty", "wrong_class", "shattered", "leaked", "unseen")

Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RejectionRules:
    """Thresholds of the rejection checks (module docstring)."""

    min_pixels: int = 4
    min_components_limit: int = 3
    unseen_mads: float = 3.0


@dataclass
class GenerationReport:
    """What one call of :func:`generate_on_normals` produced and threw away."""

    counts: dict[str, int] = field(default_factory=lambda: {"accepted": 0, **dict.fromkeys(REASONS, 0)})
    seconds: float = 0.0
    generated: int = 0

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def component_limit(pipeline: DefectGenPipeline, class_id: int, rules: RejectionRules) -> int:
    stats = pipeline.stats.get(pipeline.class_names[class_id - 1], {})
    return max(rules.min_components_limit, 2 * int(stats.get("max_components", 1)))


def rejection_reason(
    region_mask: np.ndarray,
    class_id: int,
    max_components: int,
    rules: RejectionRules = RejectionRules(),
) -> str | None:
    """Why the mask inside the inpainting square is broken (a key of :data:`REASONS`), or None.

    Only the checks that need no scorer (``unseen`` is :func:`unseen_by`).
    """
    own = int((region_mask == class_id).sum())
    if own < rules.min_pixels:
        return "empty"
    if own * 2 < int((region_mask > 0).sum()):
        return "wrong_class"
    if count_components(region_mask) > max_components:
        return "shattered"
    defect = region_mask > 0
    if defect[0].any() and defect[-1].any() and defect[:, 0].any() and defect[:, -1].any():
        return "leaked"
    return None


def unseen_by(anomaly_map: np.ndarray, mask: np.ndarray, mads: float) -> bool:
    """True when the mean score inside ``mask > 0`` does not exceed median + mads * sigma outside it."""
    inside = mask > 0
    median, sigma = median_and_sigma(anomaly_map[~inside])
    return float(anomaly_map[inside].mean()) <= median + mads * sigma


def random_crop_corner(shape: tuple[int, int], size: int, rng: np.random.Generator) -> tuple[int, int]:
    height, width = shape
    if height < size or width < size:
        raise ValueError(f"normal image {width}x{height} is smaller than the Defect-Gen crop ({size} px)")
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def feather_alpha(own: np.ndarray, margin: int) -> np.ndarray:
    """1 on the defect's pixels, falling linearly to 0 over ``margin`` pixels around them."""
    distance = ndimage.distance_transform_edt(~own)
    return np.clip(1.0 - distance / (margin + 1.0), 0.0, 1.0).astype(np.float32)


def place(
    normal: np.ndarray,
    crop: np.ndarray,
    crop_mask: np.ndarray,
    top: int,
    left: int,
    box: tuple[int, int],
    margin: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The normal image with the crop's generated defect written back at (top, left), and its class mask.

    Inside the inpainting square the crop's pixels replace the normal's with weight 1 on the mask's pixels,
    falling to 0 over ``margin`` pixels around them (``margin=None``: weight 1 on the whole square);
    everything else is the normal image's own bytes.
    """
    start, stop = box
    square = crop_mask[start:stop, start:stop]
    if margin is None:
        alpha = np.ones((*square.shape, 1), np.float32)
    else:
        alpha = feather_alpha(square > 0, margin)[..., None]
    image = normal.copy()
    mask = np.zeros(normal.shape[:2], dtype=np.uint8)
    rows = slice(top + start, top + stop)
    cols = slice(left + start, left + stop)
    generated = crop[start:stop, start:stop].astype(np.float32)
    image[rows, cols] = np.round(alpha * generated + (1 - alpha) * image[rows, cols]).astype(np.uint8)
    mask[rows, cols] = square
    return image, mask


def generate_on_normals(
    pipeline: DefectGenPipeline,
    class_id: int,
    n: int,
    normals: Sequence[np.ndarray],
    seed: int = 0,
    scorer: Scorer | None = None,
    rules: RejectionRules = RejectionRules(),
    max_attempts: int | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], GenerationReport]:
    """Up to ``n`` accepted (image, class mask) pairs of class ``class_id`` on random normal images.

    Generates in batches of ``config.batch_size_sample`` until ``n`` are accepted or ``max_attempts``
    (default ``4 n``) samples were made; the report counts accepted samples and each rejection reason.
    """
    if not normals:
        raise ValueError("generate: no normal images to place defects on")
    if not 1 <= class_id <= pipeline.num_classes:
        raise ValueError(f"class id {class_id} outside 1..{pipeline.num_classes}")
    config = pipeline.config
    size, box = config.crop_size, region_box(config)
    limit = component_limit(pipeline, class_id, rules)
    max_attempts = max_attempts if max_attempts is not None else 4 * n
    rng = np.random.default_rng(seed)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    report = GenerationReport()
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    started = time.perf_counter()
    # Counted in accepted pairs, the unit asked for; the note says how many samples that took so far.
    shown = progress(f"defect-gen {pipeline.class_names[class_id - 1]}", n, "pairs")
    with shown:
        while len(pairs) < n and report.generated < max_attempts:
            batch = min(config.batch_size_sample, max_attempts - report.generated)
            picks = rng.integers(0, len(normals), batch)
            corners = [random_crop_corner(normals[i].shape[:2], size, rng) for i in picks]
            crops = np.stack(
                [
                    normals[i][top : top + size, left : left + size]
                    for i, (top, left) in zip(picks, corners, strict=True)
                ]
            )
            images, masks = pipeline.inpaint(crops, [class_id] * batch, generator)
            report.generated += batch
            for i, (top, left), image, mask in zip(picks, corners, images, masks, strict=True):
                reason = rejection_reason(mask[box[0] : box[1], box[0] : box[1]], class_id, limit, rules)
                full = (
                    place(normals[i], image, mask, top, left, box, config.paste_margin)
                    if reason is None
                    else None
                )
                if (
                    full is not None
                    and scorer is not None
                    and unseen_by(scorer(full[0]), full[1], rules.unseen_mads)
                ):
                    reason = "unseen"
                if reason is not None:
                    report.counts[reason] += 1
                    continue
                if len(pairs) < n:
                    pairs.append(full)
                    report.counts["accepted"] += 1
            shown.set_completed(len(pairs), note=f"{report.generated} sampled")
    report.seconds = time.perf_counter() - started
    return pairs, report
