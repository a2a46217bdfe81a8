"""Procedural line-scan frames: long grayscale strips across the whole cloth, with the defects a loom makes.

A line-scan camera images one line across the full width of the cloth at a time; stacking lines gives a
frame whose **width runs across the cloth** (weft / pick direction) and whose **height runs along it**
(warp / end direction, i.e. time). So a broken or missing pick is a line across the whole fabric width, a
broken end a line along the whole frame height, and a density change (the picks packed closer or looser)
starts at some row and lasts to the bottom of the frame.

Each frame is a woven fabric (plain, twill, satin or denim, never rotated: the cloth runs straight under
the camera) rendered with the embedded generator's yarn scene, plus what real frames carry: brightness
falling off toward both ends of the line, a selvedge (a denser plain edge weave) where the cloth ends, and
on some frames background beyond the selvedge (blank dark, saturated white, or machine parts) filling part
of one end. Pixel masks mark defects inside the fabric body only (never the selvedge or the background).

The fabric is rendered in column tiles (full frame height, about 256 K pixels each) so an 8192 x 512
frame needs a bounded amount of memory; tile borders are placed away from local defects, and the yarn
structure does not depend on the tiling, so tiles join without seams.

Layout written by ``generate_line_scan`` (the Loom dataset folder, as ``generate`` writes it):
``images/<stem>.png`` (mode L), ``masks/<stem>.png`` (class indices), ``captions/<stem>.txt``,
``classes.json``, ``manifest.parquet`` and the sidecar ``frames.json``: per stem, the frame's size,
``fabric`` = columns ``[x0, x1)`` of cloth (selvedge included), ``body`` = columns ``[b0, b1)`` of fabric
inside the selvedges (where defects and masks can be), ``selvedge`` (list of ``[a, b)`` bands),
``background`` (``None`` or ``{"side", "kind", "columns"}``), the weave and the defects with their kind,
class and bbox. (The manifest keeps to the contract's columns, which is why the region lives there.)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from loom.config import DEFAULT_CLASSES
from loom.datasets.fabric.dataset import (
    _choose_test,
    _defect_size,
    _image_seed,
    _reach,
    class_mask,
    kind_to_class,
    png_bytes,
    write_manifest,
)
from loom.datasets.fabric.defects import _DEFECT_RENDERERS, _add_tube, _changed, _yarn_line
from loom.datasets.fabric.render import _apply_stains, _compose, _draw_tubes
from loom.datasets.fabric.scene import (
    _TABLE,
    SOURCE,
    DefectSpec,
    FabricSpec,
    _Candidate,
    _Frame,
    _Noise,
    _Scene,
    _woven_candidates,
    sample_spec,
)

logger = logging.getLogger(__name__)

LINE_SCAN_WEAVES: tuple[str, ...] = ("plain", "twill", "satin", "denim")
#: Line-scan defect kind -> the generator kind whose class (``kind_to_class``) labels it.
LINE_SCAN_KINDS: dict[str, str] = {
    "broken_pick": "broken_yarn",
    "broken_end": "broken_yarn",
    "density_change": "misweave",
    "knot": "knot",
    "slub": "knot",
    "hole": "hole",
    "oil_stain": "stain",
    "rust_stain": "stain",
}
LINE_KINDS = ("broken_pick", "broken_end", "density_change")  # span the fabric width or the frame height
LINE_SCAN_SIZES: tuple[tuple[int, int], ...] = ((4096, 256), (8192, 512))  # (width, height)
BACKGROUNDS = ("dark", "saturated", "clutter")
_LUMA = np.array([0.3, 0.59, 0.11], np.float32)
_TILE_PIXELS = 1 << 18
_SATURATED = 4.0  # radiance of a blown-out background: stays at 255 after any falloff


# ---------------------------------------------------------------------------------------------------------
# Plan: what one frame holds (all randomness of a frame is drawn here, from its seed)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineDefect:
    """One line-scan defect. ``row``/``col`` place it (px); ``size`` is a radius or band half-width (px)."""

    kind: str  # one of LINE_SCAN_KINDS
    row: float
    col: float
    size: float
    seed: int
    factor: float = 1.0  # density_change: pick density after ``row`` relative to before


@dataclass(frozen=True)
class LinePlan:
    """Everything that decides one frame; ``render_line_frame(plan)`` is a pure function of it."""

    seed: int
    height: int
    width: int
    spec: FabricSpec
    fabric: tuple[int, int]  # [x0, x1): cloth columns, selvedge included
    body: tuple[int, int]  # [b0, b1): fabric inside the selvedges
    background: str | None  # one of BACKGROUNDS, or None when the cloth fills the frame
    falloff: float  # relative brightness lost at the ends of the line
    falloff_centre: float  # column of the brightest point, as a fraction of the width
    defects: tuple[LineDefect, ...] = field(default_factory=tuple)

    @property
    def selvedges(self) -> list[tuple[int, int]]:
        """Selvedge bands ``[a, b)`` (0, 1 or 2 of them)."""
        bands = [(self.fabric[0], self.body[0]), (self.body[1], self.fabric[1])]
        return [b for b in bands if b[1] > b[0]]


def _line_spec(rng: np.random.Generator) -> FabricSpec:
    """A woven fabric as it runs under a line camera: straight, evenly lit (the line light comes later)."""
    spec = sample_spec(rng)
    while spec.weave not in LINE_SCAN_WEAVES:
        spec = sample_spec(rng)
    return replace(
        spec,
        angle=0.0,
        waviness=spec.waviness * 0.5,
        light_gradient=(0.0, 0.0),
        vignetting=0.0,
        blur=min(spec.blur, 0.7),
    )


def _selvedge_spec(spec: FabricSpec, rng: np.random.Generator) -> FabricSpec:
    """The edge weave: plain, finer and denser than the body, often a shade off its colour."""
    shade = float(rng.uniform(0.8, 1.2))
    colour = tuple(float(np.clip(c * shade, 0.02, 0.97)) for c in spec.warp_colour)
    return replace(
        spec,
        weave="plain",
        pitch=max(2.5, spec.pitch * float(rng.uniform(0.55, 0.75))),
        aspect=float(rng.uniform(0.7, 0.85)),
        yarn_fill=float(rng.uniform(0.92, 1.0)),
        weft_scale=1.0,
        warp_colour=colour,  # type: ignore[arg-type]
        weft_colour=colour,  # type: ignore[arg-type]
        irregularity=0.03,
    )


def _region(rng: np.random.Generator, width: int) -> tuple[tuple[int, int], tuple[int, int], str | None]:
    """Cloth ``[x0, x1)``, body ``[b0, b1)`` and background kind: where the cloth ends inside the frame,
    a selvedge band is next to that end and background (one end only) lies beyond it."""
    x0, x1, background = 0, width, None
    ends = [False, False]  # the cloth's edge lies inside the frame at the left / right end
    if rng.random() < 0.5:
        background = str(rng.choice(BACKGROUNDS))
        side = int(rng.integers(2))
        gap = round(width * rng.uniform(0.03, 0.3))
        x0, x1 = (gap, width) if side == 0 else (0, width - gap)
        ends[side] = True
    elif rng.random() < 0.3:  # the cloth's edge at the very end of the line, nothing beyond
        ends[int(rng.integers(2))] = True
    band = max(6, round(width * rng.uniform(0.004, 0.012)))
    b0 = x0 + band if ends[0] else x0
    b1 = x1 - band if ends[1] else x1
    return (x0, x1), (b0, b1), background


def _place_local(
    rng: np.random.Generator,
    kind: str,
    plan_h: int,
    body: tuple[int, int],
    spec: FabricSpec,
    taken: list[tuple[LineDefect, float]],
) -> LineDefect | None:
    """A knot, slub, hole or stain inside the body, clear of the defects already ``taken``."""
    base = {"slub": "knot", "oil_stain": "stain", "rust_stain": "stain"}.get(kind, kind)
    for _ in range(30):
        size = _defect_size(base, plan_h, spec.pitch, rng)
        reach = _slub_reach(size, spec) if kind == "slub" else _reach(base, size, spec.pitch)
        margin_y = min(reach * 0.6, plan_h / 2 - 1)
        if body[1] - body[0] < 2 * reach + 8:
            return None
        row = float(rng.uniform(margin_y, plan_h - margin_y))
        col = float(rng.uniform(body[0] + reach + 4, body[1] - reach - 4))
        if all(_clear(row, col, reach, other) for other in taken):
            return LineDefect(kind, row, col, size, int(rng.integers(2**31)))
    return None


def _slub_reach(size: float, spec: FabricSpec) -> float:
    return 6 * size + spec.pitch * 2 + 6


def _local_reach(d: LineDefect, spec: FabricSpec) -> float:
    if d.kind == "slub":
        return _slub_reach(d.size, spec)
    base = {"oil_stain": "stain", "rust_stain": "stain"}.get(d.kind, d.kind)
    return _reach(base, d.size, spec.pitch)


def _clear(row: float, col: float, reach: float, other: tuple[LineDefect, float]) -> bool:
    d, r = other
    if d.kind == "broken_pick":
        return abs(row - d.row) > reach + r
    if d.kind == "broken_end":
        return abs(col - d.col) > reach + r
    if d.kind == "density_change":
        return True  # a local defect on top of a density change is drawn over it
    return bool(np.hypot(row - d.row, col - d.col) > reach + r)


def plan_frame(
    seed: int, height: int, width: int, kinds: Sequence[str], defective: bool, first: str | None = None
) -> LinePlan:
    """Draw one frame's fabric, region, lighting and (if ``defective``) one to three defects of ``kinds``."""
    rng = np.random.default_rng(seed)
    spec = _line_spec(rng)
    fabric, body, background = _region(rng, width)
    falloff = float(rng.uniform(0.25, 0.5))
    centre = float(rng.uniform(0.45, 0.55))
    defects: list[LineDefect] = []
    if defective and kinds:
        count = 1 + int(rng.random() < 0.35) + int(rng.random() < 0.15)
        wanted = [first] if first in kinds else []
        wanted += [str(rng.choice(list(kinds))) for _ in range(count - len(wanted))]
        # at most one line defect, drawn first so the local ones can keep clear of it
        lines = [k for k in wanted if k in LINE_KINDS][:1]
        wanted = lines + [k for k in wanted if k not in LINE_KINDS]
        taken: list[tuple[LineDefect, float]] = []
        for kind in wanted:
            if kind in LINE_KINDS:
                d = _place_line(rng, kind, height, body, spec)
                taken.append((d, 2.0 * d.size))
            else:
                local = _place_local(rng, kind, height, body, spec, taken)
                if local is not None:
                    taken.append((local, _local_reach(local, spec)))
        defects = [d for d, _ in taken]
    return LinePlan(seed, height, width, spec, fabric, body, background, falloff, centre, tuple(defects))


def _place_line(
    rng: np.random.Generator, kind: str, height: int, body: tuple[int, int], spec: FabricSpec
) -> LineDefect:
    seed = int(rng.integers(2**31))
    if kind == "broken_pick":
        return LineDefect(kind, float(rng.uniform(0.1, 0.9) * height), 0.0, spec.pitch * spec.aspect, seed)
    if kind == "broken_end":
        margin = min(4 * spec.pitch, (body[1] - body[0]) / 4)
        col = float(rng.uniform(body[0] + margin, body[1] - margin))
        return LineDefect(kind, 0.0, col, spec.pitch, seed)
    factor = float(rng.uniform(1.3, 1.7) if rng.random() < 0.5 else rng.uniform(0.6, 0.77))
    return LineDefect(kind, float(int(rng.uniform(0.25, 0.75) * height)), 0.0, 0.0, seed, factor)


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _LineFrame(_Frame):
    """A column tile of a line-scan frame: tile pixel ``(y, x)`` is frame pixel ``(y, x + origin)``.

    Picks after ``density_row`` are ``density_factor`` times as dense (the row coordinate is stretched
    before it becomes a weft position), so a density change is part of the geometry, not painted on.
    """

    origin: float = 0.0
    full: tuple[int, int] = (0, 0)  # frame height, width
    density_row: float = float("inf")
    density_factor: float = 1.0

    def _centred(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame pixel coordinates relative to the frame's centre, rows after ``density_row`` stretched."""
        y = np.asarray(y, np.float32)
        if np.isfinite(self.density_row):
            r, f = np.float32(self.density_row), np.float32(self.density_factor)
            y = np.where(y < r, y, r + (y - r) * f).astype(np.float32)
        yc = y - np.float32(self.full[0] / 2)
        xc = np.asarray(x, np.float32) + np.float32(self.origin - self.full[1] / 2)
        return yc, xc

    def _uncentred(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`_centred`: tile pixel coordinates."""
        y, x = y + self.full[0] / 2, x + self.full[1] / 2 - self.origin
        if np.isfinite(self.density_row):
            r = self.density_row
            y = np.where(y < r, y, r + (y - r) / self.density_factor)
        return y, x


@dataclass
class LineFrame:
    """A rendered frame: ``image`` H x W uint8 (grayscale), ``masks`` one H x W bool per plan defect."""

    plan: LinePlan
    image: np.ndarray
    masks: list[np.ndarray]


def _tables(spec: FabricSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-yarn brightness and thickness offsets (3 x _TABLE: warp, weft, unused knit row)."""
    irregular = spec.irregularity
    return {
        "bright": np.clip(rng.normal(0.0, irregular, (3, _TABLE)), -2 * irregular, 2 * irregular).astype(
            np.float32
        ),
        "thick": np.clip(rng.normal(0.0, irregular * 0.8, (3, _TABLE)), -0.3, 0.3).astype(np.float32),
    }


def _scene_for(
    spec: FabricSpec, plan: LinePlan, x0: int, x1: int, noise: _Noise, tables: dict, offset: tuple
) -> _Scene:
    """The yarn scene of frame columns ``[x0, x1)`` (arrays H x (x1 - x0))."""
    density = next((d for d in plan.defects if d.kind == "density_change"), None)
    frame = _LineFrame(
        height=plan.height,
        width=x1 - x0,
        angle=0.0,
        pitch_u=spec.pitch,
        pitch_v=spec.pitch * spec.aspect,
        offset=offset,
        wobble=spec.waviness,
        noise=noise,
        origin=float(x0),
        full=(plan.height, plan.width),
        density_row=density.row if density else float("inf"),
        density_factor=density.factor if density else 1.0,
    )
    shape = (plan.height, x1 - x0)
    candidates = _woven_candidates(spec, frame, tables)
    return _Scene(spec, frame, candidates, tables, np.zeros(shape, bool), np.ones(shape, np.float32))


def _radiance(scene: _Scene) -> np.ndarray:
    """Gray radiance (H x w float32) of a scene after its defects edited it: luminance of the albedo."""
    albedo, shade, specular = _compose(scene)
    _draw_tubes(scene, albedo, shade, specular)
    _apply_stains(scene, albedo)
    lum = float(np.asarray(scene.spec.warp_colour, np.float32) @ _LUMA)
    gain = float(np.clip(0.25 / max(lum, 1e-3), 1.0, 1.5))  # exposure set for the cloth
    gray = (albedo @ _LUMA) * shade * gain + np.maximum(specular, 0.0)
    return np.where(specular < 0, np.float32(scene.spec.backing), gray).astype(np.float32)


def _line_select(
    d: LineDefect, scene: _Scene, body: tuple[int, int], index: int
) -> Callable[[_Candidate], np.ndarray]:
    """Selector of the yarn a broken pick / end removes, only over the body's columns."""
    frame = scene.frame
    assert isinstance(frame, _LineFrame)
    cols = np.arange(scene.shape[1], dtype=np.float32) + frame.origin
    in_body = ((cols >= body[0]) & (cols < body[1]))[None, :]
    system = 1 if d.kind == "broken_pick" else 0

    def select(cand: _Candidate) -> np.ndarray:
        if cand.system != system:
            return np.zeros(cand.yarn.shape, bool)
        return (cand.yarn == index) & in_body

    return select


def _broken_line(scene: _Scene, d: LineDefect, body: tuple[int, int]) -> np.ndarray:
    """Remove one pick across the body (or one end along the whole height); H x w bool mask."""
    frame = scene.frame
    assert isinstance(frame, _LineFrame)
    rng = np.random.default_rng(d.seed)
    if d.kind == "broken_pick":
        _, v = frame.to_weave(np.float32(d.row), np.float32(frame.full[1] / 2 - frame.origin))
        index = int(np.floor(v))
    else:
        u, _ = frame.to_weave(np.float32(frame.full[0] / 2), np.float32(d.col - frame.origin))
        index = int(np.floor(u))
    box = (slice(None), slice(None))
    before = scene.winner(box)
    select = _line_select(d, scene, body, index)
    track = np.zeros(scene.shape, bool)
    for cand in scene.candidates:
        track |= select(cand) & (cand.profile() > 0)
    scene.remove(box, select)
    scene.darken[track] *= rng.uniform(0.45, 0.65)  # the neighbours sink into the gap the yarn left
    return _changed(scene, box, before) | track


def _slub(scene: _Scene, d: DefectSpec, rng: np.random.Generator) -> np.ndarray:
    """A thick place spun into a pick: a swollen stretch of weft lying proud of the face."""
    mask = np.zeros(scene.shape, bool)
    u, v = scene.frame.to_weave(np.float32(d.center[0]), np.float32(d.center[1]))
    index = int(np.floor(v))
    half = d.size * rng.uniform(3.0, 5.5) / scene.frame.pitch_u
    pts = _yarn_line(scene, "v", index, float(u) - half, float(u) + half, step=0.5)
    bump = np.sin(np.linspace(0.0, np.pi, len(pts))) ** 0.7
    radius = 0.5 * scene.spec.yarn_fill * scene.frame.pitch_v
    radii = (radius * (0.8 + (rng.uniform(1.4, 2.2) - 0.8) * bump)).astype(np.float32)
    colour = np.clip(scene.colour_of(1) * rng.uniform(1.05, 1.3), 0.02, 1.0)
    _add_tube(scene, mask, pts, radii, colour, height=1.5)
    return mask


def _stain_tone(kind: str, fabric: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gray RGB of an oil or rust stain with contrast on a mono sensor: oil darkens any cloth; rust is a
    darker brown on light cloth and shows lighter than dark cloth."""
    lum = float(fabric @ _LUMA)
    if kind == "oil_stain":
        tone = lum * rng.uniform(0.3, 0.55)
    elif lum > 0.35:
        tone = lum * rng.uniform(0.5, 0.7)
    else:
        tone = lum + rng.uniform(0.15, 0.3)
    return np.full(3, np.clip(tone, 0.01, 1.0), np.float32)


def _local(scene: _Scene, d: LineDefect, origin: int) -> np.ndarray:
    """Knot, slub, hole or stain through the embedded generator's defect renderers (tile coordinates)."""
    spec = DefectSpec(
        {"slub": "knot", "oil_stain": "stain", "rust_stain": "stain"}.get(d.kind, d.kind),
        (d.row, d.col - origin),
        d.size,
        d.seed,
    )
    rng = np.random.default_rng(d.seed)
    if d.kind == "slub":
        return _slub(scene, spec, rng)
    mask = _DEFECT_RENDERERS[spec.kind](scene, spec, rng)
    if d.kind in ("oil_stain", "rust_stain") and scene.stains:
        scene.stains[-1].colour = _stain_tone(d.kind, scene.colour_of(0), rng)
    return mask


def _tile_edges(plan: LinePlan, x0: int, x1: int) -> list[int]:
    """Column borders of the fabric tiles: about ``_TILE_PIXELS`` each, never through a local defect."""
    tile = max(128, _TILE_PIXELS // plan.height)
    busy = [
        (d.col - _local_reach(d, plan.spec) - 4, d.col + _local_reach(d, plan.spec) + 4)
        for d in plan.defects
        if d.kind not in LINE_KINDS
    ]
    edges = [x0]
    edge = x0 + tile
    while edge < x1 - tile // 4:
        for lo, hi in sorted(busy):
            if lo < edge < hi:
                edge = int(np.ceil(hi))
        if edge >= x1:
            break
        edges.append(edge)
        edge += tile
    return [*edges, x1]


def _background(plan: LinePlan, rng: np.random.Generator, columns: int) -> np.ndarray:
    """Radiance (H x columns) beyond the cloth: dark, blown out, or machine parts (bars, bolts, texture)."""
    h = plan.height
    if plan.background == "dark":
        return np.full((h, columns), rng.uniform(0.005, 0.04), np.float32)
    if plan.background == "saturated":
        return np.full((h, columns), _SATURATED, np.float32)
    noise = _Noise(rng)
    x = np.arange(columns, dtype=np.float32)
    # stationary parts: each sensor pixel sees the same metal every line, so they run down the frame
    profile = np.full(columns, rng.uniform(0.04, 0.12), np.float32)
    for _ in range(int(rng.integers(2, 6))):
        centre, half = rng.uniform(0, columns), rng.uniform(3, max(4.0, columns * 0.12))
        t = (x - centre) / half
        inside = np.abs(t) < 1
        bar = rng.uniform(0.15, 0.6) * (0.5 + 0.5 * np.sqrt(np.clip(1 - t * t, 0, 1)))  # a round bar
        bar = bar + rng.uniform(0.2, 0.8) * np.exp(-(((t - rng.uniform(-0.5, 0.5)) / 0.08) ** 2))  # glint
        profile = np.where(inside, bar, profile).astype(np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    texture = 1.0 + 0.25 * noise.fbm(x[None, :] * 0.15, y * 0.15)
    radiance = profile[None, :] * texture
    if rng.random() < 0.6:  # a turning roller: bolt heads pass at a steady pace
        lo = int(rng.integers(0, max(1, columns - 8)))
        hi = min(columns, lo + int(rng.integers(8, max(9, columns // 2))))
        period, radius = rng.uniform(40, 120), rng.uniform(3, 8)
        phase = rng.uniform(0, period)
        for cx in np.arange(lo + radius * 2, hi - radius, radius * 5):
            dy = (y - phase + cx * 0.3) % period - period / 2
            head = (dy**2 + (x[None, :] - cx) ** 2) < radius**2
            radiance = np.where(head, rng.uniform(0.5, 0.9), radiance)
    return radiance.astype(np.float32)


def _camera(plan: LinePlan, radiance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Line light falloff, lens blur, shot and read noise and the sensor's column gains; H x W uint8."""
    width = plan.width
    t = (np.arange(width, dtype=np.float32) - plan.falloff_centre * (width - 1)) / (width / 2)
    light = 1.0 - plan.falloff * np.clip(t * t, 0.0, 1.5)  # smooth, brightest near the middle of the line
    rows = 1.0 + rng.normal(0.0, 0.004, plan.height).astype(np.float32)  # the line light's ripple
    lit = radiance * light[None, :] * rows[:, None]
    blurred = ndimage.gaussian_filter(lit, sigma=plan.spec.blur, mode="reflect")
    level = np.clip(blurred, 0.0, 1.0) * 255.0
    sigma = plan.spec.noise + 0.12 * np.sqrt(level)
    columns = (1.0 + rng.normal(0.0, 0.006, width)).astype(np.float32)
    noisy = level * columns[None, :] + sigma * rng.standard_normal(level.shape, dtype=np.float32)
    noisy = np.where(blurred >= 1.0, 255.0, noisy)  # a full well reads full scale, with no noise
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_line_frame(plan: LinePlan) -> LineFrame:
    """Render ``plan``: the H x W uint8 grayscale frame and one H x W bool mask per defect (body only)."""
    h, w = plan.height, plan.width
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 11]))
    noise, tables = _Noise(rng), _tables(plan.spec, rng)
    offset = (float(rng.uniform(0, 64)), float(rng.uniform(0, 64)))
    camera_rng = np.random.default_rng(rng.integers(2**63))
    background_rng = np.random.default_rng(rng.integers(2**63))
    selvedge_spec = _selvedge_spec(plan.spec, rng)
    radiance = np.zeros((h, w), np.float32)
    masks = [np.zeros((h, w), bool) for _ in plan.defects]
    x0, x1 = plan.fabric
    edges = _tile_edges(plan, x0, x1)
    for a, b in itertools.pairwise(edges):
        scene = _scene_for(plan.spec, plan, a, b, noise, tables, offset)
        for k, d in enumerate(plan.defects):
            if d.kind in ("broken_pick", "broken_end"):
                if d.kind == "broken_pick" or a - 3 * plan.spec.pitch <= d.col < b + 3 * plan.spec.pitch:
                    masks[k][:, a:b] |= _broken_line(scene, d, plan.body)
            elif d.kind == "density_change":
                masks[k][int(d.row) :, a:b] = True
                # the packed (or open) picks let through less (more) of the dark backing
                scene.darken[int(d.row) :] *= 0.93 if d.factor > 1 else 1.06
            elif a <= d.col < b:
                masks[k][:, a:b] |= _local(scene, d, a)
        radiance[:, a:b] = _radiance(scene)
        del scene
    for a, b in plan.selvedges:
        scene = _scene_for(selvedge_spec, plan, a, b, noise, tables, offset)
        radiance[:, a:b] = _radiance(scene) * np.float32(rng.uniform(0.9, 1.1))
        seam = b - 1 if a == plan.fabric[0] else a  # the binding where the body weave starts: a groove
        radiance[:, seam] *= np.float32(0.6)
    if plan.background is not None:
        gap = slice(0, x0) if x0 > 0 else slice(x1, w)
        radiance[:, gap] = _background(plan, background_rng, gap.stop - gap.start)
    image = _camera(plan, radiance, camera_rng)
    body = np.zeros(w, bool)
    body[plan.body[0] : plan.body[1]] = True
    return LineFrame(plan, image, [m & body[None, :] for m in masks])


# ---------------------------------------------------------------------------------------------------------
# The dataset folder
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LineJob:
    stem: str
    seed: int
    height: int
    width: int
    defective: bool
    first: str | None
    classes: tuple[str, ...]


def _where(bbox: Sequence[int], height: int, width: int) -> str:
    x0, y0, x1, y1 = bbox
    if x1 - x0 > 0.5 * width:
        return "across the width"
    if y1 - y0 > 0.9 * height:
        return "along the frame"
    cx = (x0 + x1) / 2 / width
    part = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "middle"
    return f"in the {part} of the line"


def _caption(plan: LinePlan, records: Sequence[dict]) -> str:
    spec = plan.spec
    head = (
        f"{spec.weave} fabric, {spec.colour_name}, line-scan {plan.width}x{plan.height}, "
        f"fabric columns {plan.fabric[0]}-{plan.fabric[1]}"
    )
    if plan.background:
        head += f", {plan.background} background beyond the selvedge"
    if not records:
        return f"{head}, no defect"
    phrases = []
    for r in records:
        noun = r["kind"].replace("_", " ")
        article = "an" if noun[0] in "aeiou" else "a"
        phrases.append(f"{article} {noun} {_where(r['bbox'], plan.height, plan.width)}")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{head}, with {listed}"


def _region_record(plan: LinePlan) -> dict:
    background = None
    if plan.background is not None:
        left = plan.fabric[0] > 0
        columns = [0, plan.fabric[0]] if left else [plan.fabric[1], plan.width]
        background = {"side": "left" if left else "right", "kind": plan.background, "columns": columns}
    return {
        "width": plan.width,
        "height": plan.height,
        "fabric": list(plan.fabric),
        "body": list(plan.body),
        "selvedge": [list(b) for b in plan.selvedges],
        "background": background,
        "weave": plan.spec.weave,
    }


def build_line_frame(
    seed: int,
    height: int,
    width: int,
    classes: Sequence[str] = DEFAULT_CLASSES,
    defective: bool = True,
    first: str | None = None,
) -> tuple[LineFrame, np.ndarray, list[dict]]:
    """One frame, its H x W uint8 class-index mask and its defect records (kind, class, bbox, area)."""
    mapping = kind_to_class(classes)
    kinds = [k for k, base in LINE_SCAN_KINDS.items() if base in mapping]
    if not kinds:
        raise ValueError(f"none of the classes {list(classes)} names a defect the line-scan set can draw")
    frame = render_line_frame(plan_frame(seed, height, width, kinds, defective, first))
    ids, kept, records = [], [], []
    for d, m in zip(frame.plan.defects, frame.masks, strict=True):
        if not m.any():
            continue
        name = mapping[LINE_SCAN_KINDS[d.kind]]
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        records.append({"kind": d.kind, "class": name, "bbox": bbox, "area": int(m.sum())})
        ids.append(list(classes).index(name) + 1)
        kept.append(m)
    return frame, class_mask(kept, ids, (height, width)), records


def _render_line_job(job: _LineJob) -> tuple[str, bytes, bytes, str, list[str], dict]:
    frame, mask, records = build_line_frame(
        job.seed, job.height, job.width, job.classes, job.defective, job.first
    )
    present = sorted({r["class"] for r in records}, key=job.classes.index)
    info = _region_record(frame.plan) | {"defects": records}
    return job.stem, png_bytes(frame.image), png_bytes(mask), _caption(frame.plan, records), present, info


def _parse_sizes(width: int, height: int, sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    chosen = list(sizes) if sizes else [(width, height)]
    for w, h in chosen:
        if w < 256 or h < 32:
            raise ValueError(f"line-scan frame {w}x{h} is too small; use at least 256 x 32 (width x height)")
    return chosen


def generate_line_scan(
    out_dir: Path,
    n_frames: int = 100,
    width: int = 4096,
    height: int = 256,
    defect_fraction: float = 2 / 3,
    test_fraction: float = 0.25,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    sizes: Sequence[tuple[int, int]] | None = None,
    workers: int = 2,
) -> Path:
    """Write ``n_frames`` line-scan frames into ``out_dir`` (the Loom dataset folder layout); return it.

    ``sizes`` (``(width, height)`` pairs, e.g. ``LINE_SCAN_SIZES``) cycles frame sizes; without it every
    frame is ``width x height``. ``defect_fraction`` of the frames hold defects (their first kinds cycle
    through every kind the classes can label); the rest are clean. Besides images (mode L), masks,
    captions, ``classes.json`` and ``manifest.parquet``, ``frames.json`` records each frame's fabric
    region (see the module doc). The same arguments give byte-identical files; ``workers`` > 1 renders in
    a spawn process pool, so call it under ``if __name__ == "__main__"`` in scripts.
    """
    out_dir = Path(out_dir)
    classes = tuple(classes)
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if not 0.0 <= defect_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            f"defect_fraction must be in [0, 1] and test_fraction in [0, 1), got {defect_fraction} "
            f"and {test_fraction}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; choose another --out")
    shapes = _parse_sizes(width, height, sizes)
    mapping = kind_to_class(classes)
    kinds = [k for k, base in LINE_SCAN_KINDS.items() if base in mapping]
    if not kinds:
        raise ValueError(f"none of the classes {list(classes)} names a defect the line-scan set can draw")

    plan = np.random.default_rng(np.random.SeedSequence([seed, 8]))
    defective = set(plan.permutation(n_frames)[: round(n_frames * defect_fraction)].tolist())
    cycle = [kinds[i] for i in plan.permutation(len(kinds))]
    jobs, order = [], 0
    for i in range(n_frames):
        w, h = shapes[i % len(shapes)]
        first = cycle[order % len(cycle)] if i in defective else None
        order += i in defective
        jobs.append(
            _LineJob(f"linescan_{i:05d}", _image_seed(seed, i, 2), h, w, i in defective, first, classes)
        )

    for sub in ("images", "masks", "captions"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rows, frames = [], {}
    for stem, image, mask, caption, present, info in _run_line_jobs(jobs, workers):
        (out_dir / "images" / f"{stem}.png").write_bytes(image)
        (out_dir / "masks" / f"{stem}.png").write_bytes(mask)
        (out_dir / "captions" / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        image_id = hashlib.sha256(image).hexdigest()
        rows.append((stem, image_id, present))
        frames[stem] = {"image_id": image_id} | info
    (out_dir / "classes.json").write_text(json.dumps(list(classes)) + "\n", encoding="utf-8")
    (out_dir / "frames.json").write_text(json.dumps(frames, indent=1) + "\n", encoding="utf-8")

    test = _choose_test(plan, [(s, p) for s, _, p in rows], test_fraction, cover_all=n_frames >= 20)
    shape_of = {job.stem: (job.width, job.height) for job in jobs}
    write_manifest(out_dir, rows, shape_of, test, f"{SOURCE}-linescan")
    logger.info(
        "line-scan set: %d frames (%d defective, %d test) in %s", n_frames, len(defective), len(test), out_dir
    )
    return out_dir


def _run_line_jobs(
    jobs: Sequence[_LineJob], workers: int
) -> list[tuple[str, bytes, bytes, str, list[str], dict]]:
    """Render in a small spawn process pool when it pays off; results keep the jobs' order."""
    if workers <= 1 or len(jobs) < 4:
        return [_render_line_job(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # spawn, not fork: the caller may hold threads that a fork would copy mid-state; one frame per task
    # keeps at most ``workers`` frames (a few hundred MB each at 8192 x 512) in memory at once
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_render_line_job, jobs, chunksize=1))


__all__ = [
    "LINE_SCAN_KINDS",
    "LINE_SCAN_SIZES",
    "LINE_SCAN_WEAVES",
    "LineDefect",
    "LineFrame",
    "LinePlan",
    "build_line_frame",
    "generate_line_scan",
    "plan_frame",
    "render_line_frame",
]
