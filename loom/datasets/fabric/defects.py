"""Defects: each edits the scene and returns its exact H x W bool mask."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from loom.datasets.fabric.scene import (
    _TABLE,
    PALETTE,
    DefectSpec,
    _box_around,
    _Candidate,
    _make_tube,
    _Scene,
    _Stain,
    weave_pattern,
)


# ---------------------------------------------------------------------------------------------------------
# Defects: each edits the scene and returns its exact H x W bool mask
# ---------------------------------------------------------------------------------------------------------
def _blob(
    scene: _Scene, rng: np.random.Generator, center: tuple[float, float], radius: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Irregular blob ``s`` over a box: > 0 inside, 1 at the centre, about 0 on the outline."""
    box = _box_around(scene.shape, np.array([center[0]]), np.array([center[1]]), radius * 1.6 + 3)
    if box is None:
        return None
    py, px = np.mgrid[box].astype(np.float64)
    dy, dx = py - center[0], px - center[1]
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in range(2, 5):
        outline += rng.uniform(0.0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # fractal wobble of the outline, in pixel space so it does not repeat around the centre
    scale, shift = max(radius, 4.0), rng.uniform(0, 200, 2)
    outline += 0.3 * scene.frame.noise.fbm(px / scale * 1.5 + shift[0], py / scale * 1.5 + shift[1])
    stretch, tilt = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
    along_axis = dx * np.cos(tilt) + dy * np.sin(tilt)
    across_axis = dy * np.cos(tilt) - dx * np.sin(tilt)
    distance = np.hypot(along_axis * stretch, across_axis)
    return box, 1.0 - distance / (radius * np.clip(outline, 0.4, 1.7))


def _hole(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(scene.shape, bool)
    blob = _blob(scene, rng, d.center, d.size)
    if blob is None:
        return mask
    box, s = blob
    # each cut yarn stops at its own distance from the outline, so ends stick out like a comb
    fray = {
        k: (rng.uniform(-0.15, 0.25, _TABLE) + rng.exponential(0.12, _TABLE)).astype(np.float32)
        for k in range(3)
    }
    fuzz = scene.frame.noise(np.mgrid[box][1] * 0.7 + 300.0, np.mgrid[box][0] * 0.7)

    def select(cand: _Candidate) -> np.ndarray:
        threshold = fray[cand.system][cand.yarn[box] % _TABLE] + 0.06 * fuzz
        # yarn ends thin out before they stop, like cut and frayed threads
        cand.half[box] *= np.clip((threshold - s) / 0.08, 0.7, 1.0)
        return s > threshold

    before = scene.winner(box)
    scene.remove(box, select)
    scene.removed[box] |= s > 0.3  # the bare backing, also where the weave had gaps
    _, has_yarn = scene.winner(box)
    bare = ~has_yarn & (s > -0.05) & scene.removed[box]
    # the opening plus the cut ends around it that no longer interlace as before
    touched = bare | _changed(scene, box, before)
    filled = ndimage.binary_fill_holes(
        ndimage.binary_closing(touched, iterations=2, border_value=0) | touched
    )
    mask[box] = filled
    for _ in range(int(rng.integers(0, 4))):  # a few stray fibres hanging over the opening
        start = np.array(d.center) + rng.normal(0, d.size * 0.4, 2)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, 12))
        steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * d.size * 0.1
        pts = start + np.cumsum(steps, axis=0)
        tube = _make_tube(scene, pts, np.full(12, 0.5), scene.colour_of(0) * 0.95, 0.05, height=1.0)
        if tube is not None:
            inside = mask[tube.box] & (tube.profile > 0)
            tube.profile = np.where(inside, tube.profile, 0.0)
            tube.shadow &= mask[tube.box]
            scene.tubes.append(tube)
    return mask


def _stain(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(scene.shape, bool)
    blob = _blob(scene, rng, d.center, d.size)
    if blob is None:
        return mask
    box, s = blob
    softness = rng.uniform(0.15, 0.4)
    alpha = np.clip(s / softness, 0.0, 1.0) ** rng.uniform(0.5, 1.0)
    if rng.random() < 0.3:  # water-mark: a darker tide line at the rim
        alpha = np.clip(alpha * 0.7 + 0.6 * np.exp(-(((s - 0.12) / 0.08) ** 2)), 0.0, 1.0)
    mottle = scene.frame.noise.fbm(np.mgrid[box][1] / 5.0 + 500.0, np.mgrid[box][0] / 5.0)
    alpha = np.clip(alpha * rng.uniform(0.75, 0.95) * (1.0 + 0.15 * mottle), 0.0, 1.0).astype(np.float32)
    fabric = scene.colour_of(0)
    lum = float(fabric @ np.array([0.3, 0.59, 0.11]))
    if lum < 0.4:  # bleach, chalk or lint marks show on dark cloth
        options = [(0.85, 0.85, 0.82), 0.35 * fabric + 0.65 * np.array([0.92, 0.9, 0.85]), (0.7, 0.62, 0.45)]
    else:  # oil, rust, ink, coffee on light cloth
        options = [(0.16, 0.14, 0.11), (0.50, 0.25, 0.09), (0.10, 0.13, 0.34), (0.36, 0.23, 0.13)]
    colour = np.asarray(options[int(rng.integers(len(options)))], np.float32)
    scene.stains.append(_Stain(box, alpha, colour))
    mask[box] = alpha > 0.3
    return mask


def _nearest_yarn(scene: _Scene, center: tuple[float, float], axis: str) -> tuple[int, float]:
    """Index of the yarn of system ``axis`` ("u": warp/wale, "v": weft/course) nearest ``center``, and the
    position along it (weave units)."""
    u, v = scene.frame.to_weave(np.float32(center[0]), np.float32(center[1]))
    return (int(np.floor(u)), float(v)) if axis == "u" else (int(np.floor(v)), float(u))


def _yarn_line(
    scene: _Scene, axis: str, index: int, start: float, stop: float, step: float = 0.25
) -> np.ndarray:
    """Pixel points (N x 2, y/x) along the centre line of yarn ``index`` from ``start`` to ``stop``."""
    along = np.arange(start, stop + 1e-6, step, dtype=np.float32)
    centre = np.full_like(along, index + 0.5)
    ys, xs = scene.frame.to_pixel(centre, along) if axis == "u" else scene.frame.to_pixel(along, centre)
    return np.stack([ys, xs], axis=1)


def _changed(scene: _Scene, box: tuple[slice, slice], before: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    after_idx, after_yarn = scene.winner(box)
    before_idx, before_yarn = before
    return (
        (before_yarn != after_yarn)
        | (before_yarn & (after_idx != before_idx))
        | scene.removed[box] & ~after_yarn
    )


def _broken_yarn(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(scene.shape, bool)
    knit = scene.spec.weave == "knit"
    axis = "u" if knit or rng.random() < 0.5 else "v"
    pitch_along = scene.frame.pitch_v if axis == "u" else scene.frame.pitch_u
    index, mid = _nearest_yarn(scene, d.center, axis)
    half_len = d.size / pitch_along
    start, stop = mid - half_len, mid + half_len
    pts = _yarn_line(scene, axis, index, start - 1, stop + 1)
    box = _box_around(scene.shape, pts[:, 0], pts[:, 1], scene.frame.pitch_u + scene.frame.pitch_v)
    if box is None:
        return mask
    before = scene.winner(box)
    ragged = rng.uniform(-0.3, 0.3, 2)

    def select(cand: _Candidate) -> np.ndarray:
        if knit:  # a dropped stitch runs into a ladder: whole loops of one wale disappear
            return (cand.col[box] == index) & (cand.row[box] >= int(start)) & (cand.row[box] <= int(stop))
        if cand.system != (0 if axis == "u" else 1):
            return np.zeros(cand.yarn[box].shape, bool)
        position = cand.along[box] / pitch_along
        return (cand.yarn[box] == index) & (position > start + ragged[0]) & (position < stop + ragged[1])

    track = np.zeros(scene.shape, bool)
    for cand in scene.candidates:
        track[box] |= select(cand) & (cand.profile(box) > 0)
    scene.remove(box, select)
    scene.darken[track] *= rng.uniform(0.45, 0.65)  # neighbours sink into the gap it leaves
    mask[box] = _changed(scene, box, before) | track[box]
    colour = scene.colour_of(2 if knit else (0 if axis == "u" else 1)) * rng.uniform(0.95, 1.2)
    yarn_radius = 0.5 * scene.spec.yarn_fill * (scene.frame.pitch_u if axis == "u" else scene.frame.pitch_v)
    if knit:  # the ladder's rungs: the course yarns left spanning the dropped wale
        for r in range(int(start), int(stop) + 1):
            rung = _yarn_line(scene, "v", r, index + 0.05, index + 0.95, 0.1)
            rung[:, 0] += 0.15 * scene.frame.pitch_v * np.sin(np.linspace(0, np.pi, len(rung)))
            _add_tube(scene, mask, rung, np.full(len(rung), yarn_radius * 0.28), colour, height=0.8)
    # the loose end: the broken yarn's tail, lifted off the surface and curling away
    end = stop + ragged[1] if rng.random() < 0.5 else start + ragged[0]
    sign = 1.0 if end > mid else -1.0
    tail_len = rng.uniform(2.5, 6.0) * pitch_along
    heading = scene.frame.direction("v" if axis == "u" else "u") * sign
    angle = rng.uniform(0.2, 0.9) * rng.choice([-1, 1])
    steps = 14
    turns = angle + np.cumsum(rng.normal(rng.uniform(-0.15, 0.15), 0.2, steps))
    rot = np.stack([np.cos(turns), np.sin(turns)], axis=1)
    directions = np.stack(
        [heading[0] * rot[:, 0] - heading[1] * rot[:, 1], heading[1] * rot[:, 0] + heading[0] * rot[:, 1]],
        axis=1,
    )
    origin = _yarn_line(scene, axis, index, end - sign * 0.3, end - sign * 0.3)[0]
    pts = np.vstack([origin, origin + np.cumsum(directions * tail_len / steps, axis=0)])
    radii = yarn_radius * np.linspace(0.9, 0.45, steps + 1)
    _add_tube(scene, mask, pts, radii, colour, height=2.0)
    return mask


def _add_tube(
    scene: _Scene, mask: np.ndarray, pts: np.ndarray, radii: np.ndarray, colour: np.ndarray, height: float
) -> None:
    tube = _make_tube(scene, pts, radii, colour, scene.spec.sheen + 0.05, height=height)
    if tube is not None:
        scene.tubes.append(tube)
        mask[tube.box] |= tube.profile > 0


def _knot(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(scene.shape, bool)
    axis = "u" if rng.random() < 0.5 else "v"
    index, mid = _nearest_yarn(scene, d.center, axis)
    pitch_along = scene.frame.pitch_v if axis == "u" else scene.frame.pitch_u
    length = d.size * rng.uniform(1.0, 2.0) / pitch_along
    pts = _yarn_line(scene, axis, index, mid - length / 2, mid + length / 2, step=max(length / 6, 0.02))
    pts = pts + rng.normal(0, d.size * 0.1, pts.shape)
    bump = np.sin(np.linspace(0.15, np.pi - 0.15, len(pts))) ** 0.6
    radii = d.size * (0.55 + 0.45 * bump) * rng.uniform(0.85, 1.1, len(pts))
    base = scene.colour_of(0 if axis == "u" else 1)
    if rng.random() < 0.2:  # a foreign fibre tuft
        colour = np.asarray(PALETTE[str(rng.choice(list(PALETTE)))], np.float32)
    else:
        dark_cloth = float(base @ np.array([0.3, 0.59, 0.11])) < 0.3  # a dark lump would vanish there
        colour = np.clip(base * (1.6 if dark_cloth else rng.choice([0.55, 1.45])), 0.02, 1.0)
    height = max(1.5, d.size * 0.7)
    first_tube = len(scene.tubes)
    _add_tube(scene, mask, pts, radii.astype(np.float32), colour, height=height)
    if rng.random() < 0.6:  # the wrapped-over turn of the knot, slightly across the first lump
        turn = np.array([-0.5, 0.5])[:, None] * rng.normal(0, 1, 2) * d.size * 1.4 + pts[len(pts) // 2]
        _add_tube(scene, mask, turn, np.array([0.6, 0.6], np.float32) * d.size, colour * 1.1, height=height)
    for tube in scene.tubes[first_tube:]:
        tube.shadow_depth = 0.6  # a lump stands higher than loose yarn
    return mask


def _misweave(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    """A float: yarns lying loose over several crossings instead of interlacing (knit: a missed stitch)."""
    mask = np.zeros(scene.shape, bool)
    spec = scene.spec
    knit = spec.weave == "knit"
    if knit:
        axis = "v"
    elif spec.weave == "plain":
        axis = "u" if rng.random() < 0.5 else "v"
    else:  # float the yarn that is rarely on top, so it stands out from the face
        axis = "v" if weave_pattern(spec).mean() > 0.5 else "u"
    pitch_along = scene.frame.pitch_v if axis == "u" else scene.frame.pitch_u
    pitch_across = scene.frame.pitch_u if axis == "u" else scene.frame.pitch_v
    index, mid = _nearest_yarn(scene, d.center, axis)
    cells = max(3, round(2 * d.size / pitch_along))
    start = int(np.floor(mid)) - cells // 2
    stop = start + cells - 1
    count = 1 if knit else int(rng.choice([1, 1, 2, 3]))
    yarns = range(index, index + count)
    lines = [_yarn_line(scene, axis, k, start + 0.2, stop + 0.8) for k in yarns]
    allpts = np.vstack(lines)
    box = _box_around(scene.shape, allpts[:, 0], allpts[:, 1], pitch_across + 2)
    if box is None:
        return mask
    before = scene.winner(box)
    system = 0 if axis == "u" else 1

    def select(cand: _Candidate) -> np.ndarray:
        cell = cand.row[box] if axis == "u" else cand.col[box]
        own = (cand.yarn[box] >= index) & (cand.yarn[box] < index + count)
        in_span = (cell >= start) & (cell <= stop)
        if knit:
            return own & (cand.col[box] >= start) & (cand.col[box] <= stop)
        return own & in_span & (cand.system == system)

    scene.remove(box, select, see_through=False)
    mask[box] = _changed(scene, box, before)
    colour = np.clip(scene.colour_of(2 if knit else system) * rng.uniform(1.08, 1.25), 0, 1)
    thickness = 1.0 if knit else 1.1 * (spec.weft_scale if axis == "v" else 1.0)
    radius = 0.5 * spec.yarn_fill * pitch_across * thickness
    for line in lines:
        line = line + np.linspace(0, 1, len(line))[:, None] * rng.normal(
            0, 0.3, 2
        )  # loose, slightly off line
        radii = np.full(len(line), radius, np.float32)
        radii[:3], radii[-3:] = radius * np.array([0.5, 0.7, 0.9]), radius * np.array([0.9, 0.7, 0.5])
        tube = _make_tube(scene, line, radii, colour, spec.sheen * 2 + 0.08, height=1.2)
        if tube is not None:
            scene.tubes.append(tube)
            mask[tube.box] |= tube.profile > 0
    return mask


_DEFECT_RENDERERS: dict[str, Callable[[_Scene, DefectSpec, np.random.Generator], np.ndarray]] = {
    "hole": _hole,
    "stain": _stain,
    "broken_yarn": _broken_yarn,
    "knot": _knot,
    "misweave": _misweave,
}
