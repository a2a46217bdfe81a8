"""The embedded dataset: procedural close-ups of woven and knitted fabric with exact defect masks.

A fabric is built as *yarn candidates*: per pixel, each yarn system that could be seen there (warp, weft or
the legs of knitted loops) proposes a cross-section position and an interlacing height; the highest yarn wins.
Defects edit that structure before it is shaded (holes and broken yarns remove yarns, floats lift one yarn
over its crossings), add loose yarn on top (loose ends, knots) or recolour fibres (stains), so every defect
mask is derived from the same geometry that makes the pixels. Lighting, blur and sensor noise come last and
are drawn independently of the defects, so a defect-free render of the same spec differs only where a mask is.

Everything random comes from ``np.random.default_rng(seed)``: the same seed gives the same bytes.
Images are ``H x W x 3`` uint8, masks ``H x W`` uint8 class indices (0 = normal fabric, k = ``classes[k-1]``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from loom import manifest
from loom.config import DEFAULT_CLASSES

logger = logging.getLogger(__name__)

WEAVES: tuple[str, ...] = ("plain", "twill", "satin", "knit", "denim")
DEFECT_KINDS: tuple[str, ...] = ("hole", "stain", "broken_yarn", "knot", "misweave")
#: Class names accepted for a defect kind, in order of preference; "defect" is the catch-all class.
KIND_ALIASES: dict[str, tuple[str, ...]] = {
    "hole": ("hole",),
    "stain": ("stain",),
    "broken_yarn": ("broken_yarn", "broken yarn", "broken_end", "broken_pick"),
    "knot": ("knot", "slub"),
    "misweave": ("misweave", "float", "misweave/float"),
}
LINE_SCAN_SHAPE: tuple[int, int] = (256, 4096)  # height, width of one line-scan frame
SOURCE = "fabric-sim"

# name -> RGB in [0, 1]: a dye-house palette rather than saturated primaries
PALETTE: dict[str, tuple[float, float, float]] = {
    "navy": (0.08, 0.11, 0.24),
    "black": (0.09, 0.09, 0.10),
    "charcoal": (0.24, 0.25, 0.27),
    "grey": (0.52, 0.52, 0.51),
    "light grey": (0.74, 0.74, 0.72),
    "white": (0.90, 0.89, 0.86),
    "cream": (0.92, 0.88, 0.76),
    "beige": (0.80, 0.71, 0.57),
    "khaki": (0.62, 0.57, 0.40),
    "olive": (0.38, 0.40, 0.21),
    "forest green": (0.13, 0.30, 0.19),
    "burgundy": (0.42, 0.09, 0.15),
    "red": (0.70, 0.13, 0.13),
    "rust": (0.62, 0.29, 0.13),
    "mustard": (0.80, 0.62, 0.17),
    "sky blue": (0.53, 0.70, 0.85),
    "teal": (0.09, 0.41, 0.43),
    "pink": (0.87, 0.62, 0.66),
    "brown": (0.38, 0.25, 0.16),
    "plum": (0.36, 0.20, 0.40),
}
_INDIGO = (0.10, 0.16, 0.32)
_ECRU = (0.72, 0.70, 0.62)
_TABLE = 512  # per-yarn random tables wrap after this many yarns
_LIGHT = np.array([-0.6, -0.8])  # (y, x) direction towards the light: from the top left


# ---------------------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FabricSpec:
    """What a fabric looks like. Lengths are in pixels at the rendered resolution."""

    weave: str  # one of WEAVES
    colour_name: str
    warp_colour: tuple[float, float, float]  # RGB in [0, 1]; knit uses this one only
    weft_colour: tuple[float, float, float]
    pitch: float  # warp spacing (knit: wale width), px
    aspect: float  # weft spacing / warp spacing (knit: course height / wale width)
    angle: float  # rotation of the weave, degrees
    yarn_fill: float  # fraction of the pitch a yarn covers
    weft_scale: float  # weft thickness relative to the warp (denim and satin wefts are finer)
    irregularity: float  # spread of per-yarn brightness and thickness
    waviness: float  # low-frequency yarn displacement, in pitches
    sheen: float  # strength of the specular highlight on yarn crowns
    twill: tuple[int, int, int] = (2, 1, 1)  # over, under, direction (+1 / -1); twill and denim
    satin_shafts: int = 5
    backing: float = 0.04  # grey level seen through holes
    blur: float = 0.7  # optics, Gaussian sigma in px
    noise: float = 2.0  # sensor read noise, grey levels
    light_gradient: tuple[float, float] = (0.0, 0.0)  # relative brightness change across the frame (y, x)
    vignetting: float = 0.1


@dataclass(frozen=True)
class DefectSpec:
    """One defect to render; its shape details come from ``default_rng(seed)``."""

    kind: str  # one of DEFECT_KINDS
    center: tuple[float, float]  # (y, x) px
    size: float  # characteristic radius (hole, stain, knot) or half length (broken yarn, misweave), px
    seed: int


@dataclass
class Sample:
    """One rendered image: ``image`` H x W x 3 uint8, ``mask`` H x W uint8 class indices."""

    image: np.ndarray
    mask: np.ndarray
    caption: str
    defects: list[dict]  # {"class": name, "bbox": [x0, y0, x1, y1] (exclusive ends), "area": pixels}
    spec: FabricSpec


# ---------------------------------------------------------------------------------------------------------
# Sampling a fabric
# ---------------------------------------------------------------------------------------------------------
def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> tuple[float, float, float]:
    """A dye lot: mostly lighter or darker, a little off in hue."""
    scale = (1.0 + rng.normal(0.0, amount)) * (1.0 + rng.normal(0.0, amount * 0.3, 3))
    values = np.clip(np.asarray(rgb) * scale, 0.02, 0.97)
    return (float(values[0]), float(values[1]), float(values[2]))


def sample_spec(rng: np.random.Generator) -> FabricSpec:
    """Draw a random but plausible fabric (weave, dye, yarn size, camera)."""
    weave = str(rng.choice(WEAVES, p=[0.28, 0.24, 0.13, 0.18, 0.17]))
    name = str(rng.choice(list(PALETTE)))
    warp = _jitter(rng, PALETTE[name], 0.06)
    style = rng.random()
    if weave == "denim":
        name, warp, weft = "indigo", _jitter(rng, _INDIGO, 0.12), _jitter(rng, _ECRU, 0.04)
    elif style < 0.6 or weave == "knit":
        weft = warp
    elif style < 0.9:  # melange: the weft a shade off the warp
        weft = _jitter(rng, np.asarray(warp) * rng.uniform(0.75, 1.2), 0.03)
    else:  # chambray-like contrast
        other = str(rng.choice([c for c in ("white", "cream", "black", "grey") if c != name]))
        weft, name = _jitter(rng, PALETTE[other], 0.04), f"{name} and {other}"
    pitch = {"plain": (4.5, 8.5), "twill": (4.0, 8.0), "satin": (3.5, 6.0), "knit": (8.0, 13.0)}.get(
        weave, (5.0, 9.0)
    )
    aspect = {"satin": (1.1, 1.6), "knit": (0.62, 0.8)}.get(weave, (0.85, 1.2))
    return FabricSpec(
        weave=weave,
        colour_name=name,
        warp_colour=warp,
        weft_colour=weft,
        pitch=float(rng.uniform(*pitch)),
        aspect=float(rng.uniform(*aspect)),
        angle=float(rng.uniform(-7.0, 7.0)),
        yarn_fill=float(
            rng.uniform(*{"plain": (0.78, 0.92), "satin": (0.95, 1.02)}.get(weave, (0.86, 0.98)))
        ),
        weft_scale=float(rng.uniform(0.72, 0.85) if weave in ("denim", "satin") else rng.uniform(0.92, 1.05)),
        irregularity=float(rng.uniform(0.12, 0.22) if weave == "denim" else rng.uniform(0.03, 0.1)),
        waviness=float(rng.uniform(0.05, 0.25)),
        sheen=float(rng.uniform(0.1, 0.22) if weave == "satin" else rng.uniform(0.02, 0.09)),
        twill=(int(rng.integers(2, 4)), int(rng.integers(1, 3)), int(rng.choice([-1, 1])))
        if weave == "twill"
        else (3, 1, 1),
        satin_shafts=int(rng.choice([5, 8])),
        backing=float(rng.uniform(0.015, 0.06)),
        blur=float(rng.uniform(0.45, 0.9)),
        noise=float(rng.uniform(1.0, 3.0)),
        light_gradient=(float(rng.normal(0, 0.08)), float(rng.normal(0, 0.08))),
        vignetting=float(rng.uniform(0.0, 0.25)),
    )


def weave_pattern(spec: FabricSpec) -> np.ndarray:
    """Interlacing repeat, ``(P, Q)`` bool: ``[i % P, j % Q]`` is True where warp ``i`` is over weft ``j``."""
    if spec.weave == "plain":
        i, j = np.ogrid[:2, :2]
        return (i + j) % 2 == 0
    if spec.weave in ("twill", "denim"):
        over, under, direction = spec.twill
        n = over + under
        i, j = np.ogrid[:n, :n]
        return (i - direction * j) % n < over
    if spec.weave == "satin":  # warp-faced: one interlacing per shaft repeat, spread by the move number
        n = spec.satin_shafts
        move = 2 if n == 5 else 3
        i, j = np.ogrid[:n, :n]
        return (i * move - j) % n != 0
    raise ValueError(f"weave {spec.weave!r} has no interlacing pattern (knit is rendered as loops)")


# ---------------------------------------------------------------------------------------------------------
# Geometry: pixels <-> weave coordinates, smooth noise
# ---------------------------------------------------------------------------------------------------------
class _Noise:
    """Smooth value noise over a random 256 x 256 lattice, values in about [-1, 1]."""

    def __init__(self, rng: np.random.Generator) -> None:
        lattice = rng.random((256, 256), dtype=np.float32) * 2.0 - 1.0
        # padded by one row and column so the four corners of a cell are flat offsets 0, 1, 257, 258
        self.flat = np.pad(lattice, ((0, 1), (0, 1)), mode="wrap").ravel()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a0, b0 = np.floor(a), np.floor(b)
        fa, fb = np.asarray(a - a0, np.float32), np.asarray(b - b0, np.float32)
        fa, fb = fa * fa * (3 - 2 * fa), fb * fb * (3 - 2 * fb)
        index = (a0.astype(np.int32) & 255) * 257 + (b0.astype(np.int32) & 255)
        v00, v01 = self.flat.take(index), self.flat.take(index + 1)
        v10, v11 = self.flat.take(index + 257), self.flat.take(index + 258)
        near = v00 + (v10 - v00) * fa
        return near + (v01 + (v11 - v01) * fa - near) * fb

    def fbm(self, a: np.ndarray, b: np.ndarray, octaves: int = 3) -> np.ndarray:
        total = np.zeros(np.broadcast(a, b).shape, np.float32)
        for k in range(octaves):
            total += self(a * 2**k + 17.3 * k, b * 2**k + 41.9 * k) / 2**k
        return total / 1.75


@dataclass
class _Frame:
    """Maps pixels to weave coordinates ``(u, v)``: ``u`` counts warps or wales, ``v`` wefts or courses."""

    height: int
    width: int
    angle: float  # radians
    pitch_u: float  # px per unit of u
    pitch_v: float  # px per unit of v
    offset: tuple[float, float]
    wobble: float  # amplitude of the low-frequency yarn displacement, in weave units
    noise: _Noise

    def _wobble(self, u0: np.ndarray, v0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        du = self.wobble * self.noise(u0 * 0.09 + 31.7, v0 * 0.05 + 5.1)
        dv = self.wobble * self.noise(u0 * 0.05 + 71.3, v0 * 0.09 + 13.9)
        return du, dv

    def to_weave(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        yc, xc = y - self.height / 2, x - self.width / 2
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        u0 = (xc * c + yc * s) / self.pitch_u + self.offset[0]
        v0 = (yc * c - xc * s) / self.pitch_v + self.offset[1]
        du, dv = self._wobble(u0, v0)
        return u0 + du, v0 + dv

    def to_pixel(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of ``to_weave`` (fixed-point iterations on the smooth displacement)."""
        u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
        u0, v0 = u, v
        for _ in range(4):
            du, dv = self._wobble(u0, v0)
            u0, v0 = u - du, v - dv
        xr, yr = (u0 - self.offset[0]) * self.pitch_u, (v0 - self.offset[1]) * self.pitch_v
        c, s = np.cos(self.angle), np.sin(self.angle)
        return yr * c + xr * s + self.height / 2, xr * c - yr * s + self.width / 2

    def direction(self, axis: str) -> np.ndarray:
        """Unit (y, x) pixel direction of increasing ``u`` ("u") or ``v`` ("v")."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.array([s, c]) if axis == "u" else np.array([c, -s])


# ---------------------------------------------------------------------------------------------------------
# Yarn candidates: the structure defects edit
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    """One yarn system's proposal for every pixel (all arrays ``H x W``).

    ``across`` and ``half`` share a unit, so ``|across| < half`` is inside the yarn; ``lift`` is the
    interlacing height in [0.3, 1]; ``along`` is px along the yarn (fibre texture); ``yarn`` identifies the
    physical yarn (warp / weft / course index) and ``col``/``row`` the interlacing cell.
    """

    system: int  # 0 warp, 1 weft, 2 knit
    col: np.ndarray
    row: np.ndarray
    yarn: np.ndarray
    across: np.ndarray
    half: np.ndarray
    lift: np.ndarray
    along: np.ndarray
    light: float  # cosine between the cross-section direction and the light, for side shading

    def profile(self, sl: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
        """Cylinder cross-section height in [0, 1]; 0 outside the yarn."""
        ratio = self.across[sl] / np.maximum(self.half[sl], 1e-6)
        return np.sqrt(np.clip(1.0 - ratio * ratio, 0.0, 1.0))


def _interlace_lift(state: np.ndarray, neighbour: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Height along a yarn: 1 over a crossing, 0.3 under it, blended towards the cell edges."""
    t = np.abs(frac - 0.5) * 2.0
    w = 0.5 * t * t * (3.0 - 2.0 * t)
    return 0.3 + 0.7 * (state * (1.0 - w) + neighbour * w)


def _woven_candidates(spec: FabricSpec, frame: _Frame, tables: dict[str, np.ndarray]) -> list[_Candidate]:
    h, w = frame.height, frame.width
    y, x = np.mgrid[:h, :w].astype(np.float32)
    u, v = frame.to_weave(y, x)
    i, j = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    fu, fv = (u - i).astype(np.float32), (v - j).astype(np.float32)
    pattern = weave_pattern(spec).astype(np.float32)
    p, q = pattern.shape
    flat = pattern.ravel()
    ip, jq = i % p, j % q
    # neighbouring cells in the repeat, without another modulo over the whole image
    ip_prev, ip_next = np.where(ip == 0, p - 1, ip - 1), np.where(ip == p - 1, 0, ip + 1)
    jq_prev, jq_next = np.where(jq == 0, q - 1, jq - 1), np.where(jq == q - 1, 0, jq + 1)
    here = flat.take(ip * q + jq)
    along_warp = flat.take(ip * q + np.where(fv < 0.5, jq_prev, jq_next))
    along_weft = flat.take(np.where(fu < 0.5, ip_prev, ip_next) * q + jq)
    warp_lift = _interlace_lift(here, along_warp, fv)
    weft_lift = _interlace_lift(1.0 - here, 1.0 - along_weft, fu)
    slub = spec.irregularity * 1.5
    warp_half = (
        0.5 * spec.yarn_fill * (1.0 + tables["thick"][0, i % _TABLE] + slub * frame.noise(i * 7.31, v * 0.23))
    )
    weft_half = (
        0.5
        * spec.yarn_fill
        * spec.weft_scale
        * (1.0 + tables["thick"][1, j % _TABLE] + slub * frame.noise(u * 0.23, j * 7.31 + 101.0))
    )
    return [
        _Candidate(0, i, j, i, fu - 0.5, warp_half, warp_lift, v * frame.pitch_v, float(-_LIGHT[1])),
        _Candidate(1, i, j, j, fv - 0.5, weft_half, weft_lift, u * frame.pitch_u, float(-_LIGHT[0])),
    ]


def _knit_candidates(spec: FabricSpec, frame: _Frame, tables: dict[str, np.ndarray]) -> list[_Candidate]:
    """Jersey face: every stitch shows as a V of two inclined legs; legs reach into the next course."""
    h, w = frame.height, frame.width
    y, x = np.mgrid[:h, :w].astype(np.float32)
    u, v = frame.to_weave(y, x)
    col = np.floor(u).astype(np.int32)
    row = np.floor(v).astype(np.int32)
    fx = ((u - col) * frame.pitch_u).astype(np.float32)
    fy = (v - row).astype(np.float32)
    near = np.where(fy < 0.5, row - 1, row + 1).astype(np.int32)
    wale, course = frame.pitch_u, frame.pitch_v
    radius = 0.5 * spec.yarn_fill * 0.5 * wale
    candidates = []
    for rows, local_y in ((row, fy * course), (near, (fy - (near - row)) * course)):
        thick = 1.0 + tables["thick"][2, rows % _TABLE]
        for side in (-1.0, 1.0):
            top_x, bottom_x = wale * (0.5 + side * 0.36), wale * (0.5 + side * 0.06)
            top_y, bottom_y = -0.42 * course, 1.02 * course
            dx, dy = bottom_x - top_x, bottom_y - top_y
            length = float(np.hypot(dx, dy))
            dx, dy = dx / length, dy / length
            rel_x, rel_y = fx - top_x, local_y - top_y
            t = (rel_x * dx + rel_y * dy) / length
            inside = (t > 0) & (t < 1)
            tc = np.clip(t, 0.0, 1.0)
            centred = (2.0 * tc - 1.0) ** 2
            envelope = np.sqrt(np.clip(1.0 - centred * centred, 0.0, 1.0))
            half = np.where(inside, radius * thick * envelope, 0.0).astype(np.float32)
            normal_y, normal_x = dx, -dy  # across > 0 along this direction (y, x)
            across = rel_x * normal_x + rel_y * normal_y
            lift = (0.45 + 0.55 * np.sin(np.pi * tc.astype(np.float64))).astype(np.float32)
            light = -(normal_y * _LIGHT[0] + normal_x * _LIGHT[1])
            along = t * length + rows * course * 1.7 + side * 13.0
            candidates.append(_Candidate(2, col, rows, rows, across, half, lift, along, float(light)))
    return candidates


# ---------------------------------------------------------------------------------------------------------
# The scene: structure plus what defects add on top
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Tube:
    """A loose yarn lying on the surface (loose end, float, knot), rasterised inside ``box``."""

    box: tuple[slice, slice]
    profile: np.ndarray  # cylinder height in [0, 1], 0 outside
    across: np.ndarray  # signed, in radii
    along: np.ndarray  # px
    shadow: np.ndarray  # bool: shadow cast on the fabric
    colour: np.ndarray  # RGB
    sheen: float
    shadow_depth: float


@dataclass
class _Stain:
    box: tuple[slice, slice]
    alpha: np.ndarray
    colour: np.ndarray


@dataclass
class _Scene:
    spec: FabricSpec
    frame: _Frame
    candidates: list[_Candidate]
    tables: dict[str, np.ndarray]
    removed: np.ndarray  # bool H x W: a yarn was taken away here, so bare spots show the backing
    darken: np.ndarray  # float H x W multiplier (grooves left by missing yarns)
    tubes: list[_Tube] = field(default_factory=list)
    stains: list[_Stain] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.frame.height, self.frame.width

    def colour_of(self, system: int) -> np.ndarray:
        return np.asarray(self.spec.weft_colour if system == 1 else self.spec.warp_colour, np.float32)

    def winner(self, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Index of the visible candidate and whether any yarn is there, inside ``box``."""
        heights = np.stack([c.profile(box) * c.lift[box] for c in self.candidates])
        return np.argmax(heights, axis=0), heights.max(axis=0) > 0

    def remove(
        self, box: tuple[slice, slice], select: Callable[[_Candidate], np.ndarray], see_through: bool = True
    ) -> None:
        """Take yarn away where ``select(candidate)`` (a bool array over ``box``) is True; with
        ``see_through`` the bare spots show the backing, else the shadowed yarns beneath."""
        for cand in self.candidates:
            gone = select(cand)
            if see_through:
                self.removed[box] |= gone & (cand.profile(box) > 0)
            cand.half[box] = np.where(gone, 0.0, cand.half[box])


def _box_around(
    shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, margin: float
) -> tuple[slice, slice] | None:
    y0, y1 = int(np.floor(np.min(ys) - margin)), int(np.ceil(np.max(ys) + margin)) + 1
    x0, x1 = int(np.floor(np.min(xs) - margin)), int(np.ceil(np.max(xs) + margin)) + 1
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, shape[0]), min(x1, shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return slice(y0, y1), slice(x0, x1)


def _polyline_distance(
    py: np.ndarray, px: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distance from pixels to a polyline ``points`` (N x 2, y/x): distance, signed side, segment, t."""
    a, b = points[:-1], points[1:]
    seg = b - a
    seg_len2 = np.maximum((seg**2).sum(axis=1), 1e-9)
    rel_y, rel_x = py[..., None] - a[:, 0], px[..., None] - a[:, 1]
    t = np.clip((rel_y * seg[:, 0] + rel_x * seg[:, 1]) / seg_len2, 0.0, 1.0)
    dy, dx = rel_y - t * seg[:, 0], rel_x - t * seg[:, 1]
    dist2 = dy * dy + dx * dx
    best = np.argmin(dist2, axis=-1)
    pick = best[..., None]
    dist = np.sqrt(np.take_along_axis(dist2, pick, -1)[..., 0])
    side = np.sign(np.take_along_axis(rel_x * seg[:, 0] - rel_y * seg[:, 1], pick, -1)[..., 0])
    return dist, side, best, np.take_along_axis(t, pick, -1)[..., 0]


def _make_tube(
    scene: _Scene,
    points: np.ndarray,
    radii: np.ndarray,
    colour: np.ndarray,
    sheen: float,
    height: float = 1.5,
) -> _Tube | None:
    """Rasterise a yarn of varying radius along ``points`` (N x 2, y/x); ``height`` sets the shadow offset."""
    offset = -_LIGHT * height
    box = _box_around(scene.shape, points[:, 0], points[:, 1], float(radii.max()) + height + 2)
    if box is None:
        return None
    py, px = np.mgrid[box].astype(np.float32)
    dist, side, seg, t = _polyline_distance(py, px, points)
    radius = radii[seg] + (radii[seg + 1] - radii[seg]) * t
    ratio = dist / np.maximum(radius, 1e-6)
    profile = np.sqrt(np.clip(1.0 - ratio * ratio, 0.0, 1.0))
    lengths = np.r_[0.0, np.cumsum(np.hypot(*np.diff(points, axis=0).T))]
    along = lengths[seg] + t * (lengths[seg + 1] - lengths[seg])
    shadow_dist, _, shadow_seg, shadow_t = _polyline_distance(py - offset[0], px - offset[1], points)
    shadow_radius = radii[shadow_seg] + (radii[shadow_seg + 1] - radii[shadow_seg]) * shadow_t
    shadow = (shadow_dist < shadow_radius * 1.1) & (profile <= 0)
    if not (profile > 0).any():
        return None
    return _Tube(box, profile, side * ratio, along, shadow, colour, sheen, 0.45)


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


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
def _build_scene(spec: FabricSpec, height: int, width: int, rng: np.random.Generator) -> _Scene:
    noise = _Noise(rng)
    irregular = spec.irregularity
    # rows: warp, weft, knit course; courses vary less, or every jersey would show barre stripes
    spread = np.array([[1.0], [1.0], [0.35]])
    tables = {
        "bright": (
            np.clip(rng.normal(0.0, irregular, (3, _TABLE)), -2 * irregular, 2 * irregular) * spread
        ).astype(np.float32),
        "thick": np.clip(rng.normal(0.0, irregular * 0.8, (3, _TABLE)) * spread, -0.3, 0.3).astype(
            np.float32
        ),
    }
    knit = spec.weave == "knit"
    frame = _Frame(
        height=height,
        width=width,
        angle=np.deg2rad(spec.angle),
        pitch_u=spec.pitch,
        pitch_v=spec.pitch * spec.aspect,
        offset=(float(rng.uniform(0, 64)), float(rng.uniform(0, 64))),
        wobble=spec.waviness * (0.5 if knit else 1.0),
        noise=noise,
    )
    candidates = (_knit_candidates if knit else _woven_candidates)(spec, frame, tables)
    return _Scene(
        spec, frame, candidates, tables, np.zeros((height, width), bool), np.ones((height, width), np.float32)
    )


def _fibre_texture(
    noise: _Noise, across: np.ndarray, along: np.ndarray, seed: float, twist: float
) -> np.ndarray:
    """Multiplicative fibre detail: streaks along the yarn plus the diagonal ridges of its twist."""
    streaks = noise(across * 4.5 + seed, along * 0.35)
    fuzz = noise(across * 9.0 + seed + 57.0, along * 1.3)
    ridges = np.sin((along * 0.9 + across * 2.2 * twist).astype(np.float64)).astype(np.float32)
    return 1.0 + 0.13 * streaks + 0.07 * fuzz + 0.06 * ridges


def _eighth_power(x: np.ndarray) -> np.ndarray:
    squared = x * x
    squared = squared * squared
    return squared * squared


def _shade(profile: np.ndarray, lift: np.ndarray, side: np.ndarray) -> np.ndarray:
    """Diffuse shading of a yarn cross-section: crown bright, flanks and dives under crossings darker."""
    root = np.sqrt(profile)
    return (0.28 + 0.72 * root * np.sqrt(np.sqrt(root))) * (0.45 + 0.55 * lift) * (1.0 + 0.3 * side)


def _compose(scene: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Albedo (H x W x 3), shading (H x W) and specular (H x W) of the fabric before stains and lighting."""
    spec, tables, noise = scene.spec, scene.tables, scene.frame.noise
    profiles = [c.profile() for c in scene.candidates]
    heights = np.stack([p * c.lift for p, c in zip(profiles, scene.candidates, strict=True)])
    top = np.argmax(heights, axis=0)
    has_yarn = heights.max(axis=0) > 0

    def pick(values: Sequence[np.ndarray]) -> np.ndarray:
        return np.where(top == 0, values[0], values[1]) if len(values) == 2 else np.choose(top, values)

    profile = pick(profiles)
    lift = pick([c.lift for c in scene.candidates])
    across = pick([c.across / np.maximum(c.half, 1e-6) for c in scene.candidates])
    along = pick([c.along for c in scene.candidates])
    system = np.array([c.system for c in scene.candidates], np.int32)[top]
    light = np.array([c.light for c in scene.candidates], np.float32)[top]
    yarn = pick([c.yarn for c in scene.candidates]) % _TABLE
    brightness = 1.0 + tables["bright"][system, yarn]
    twist = np.where(system == 1, -1.0, 1.0).astype(np.float32)
    texture = _fibre_texture(noise, across, along, 0.0, twist) * brightness
    colours = np.stack([scene.colour_of(s) for s in range(3)])
    albedo = colours[system] * texture[..., None]
    if spec.weave == "knit":  # heathered yarn: fibres of slightly different shades
        albedo *= 1.0 + 0.05 * noise(across * 6.0 + 900.0, along * 0.8)[..., None]
    shade = _shade(profile, lift, across * light)
    specular = spec.sheen * _eighth_power(profile) * lift * lift
    gap = colours.mean(axis=0) * 0.35
    albedo = np.where(has_yarn[..., None], albedo, gap)
    shade = np.where(has_yarn, shade, 1.0).astype(np.float32)
    specular = np.where(has_yarn, specular, 0.0).astype(np.float32)
    backing = scene.removed & ~has_yarn
    return albedo.astype(np.float32), shade * scene.darken, np.where(backing, -1.0, specular)


def _draw_tubes(scene: _Scene, albedo: np.ndarray, shade: np.ndarray, specular: np.ndarray) -> None:
    noise = scene.frame.noise
    for tube in scene.tubes:
        box, on = tube.box, tube.profile > 0
        shade[box] = np.where(tube.shadow, shade[box] * (1.0 - tube.shadow_depth), shade[box])
        specular[box] = np.where(tube.shadow & (specular[box] >= 0), specular[box] * 0.5, specular[box])
        texture = _fibre_texture(noise, tube.across, tube.along, 333.0, 1.0)
        albedo[box] = np.where(on[..., None], tube.colour * texture[..., None], albedo[box])
        tube_shade = _shade(tube.profile, np.ones_like(tube.profile), tube.across * 0.7)
        shade[box] = np.where(on, tube_shade, shade[box])
        specular[box] = np.where(on, tube.sheen * _eighth_power(tube.profile), specular[box])


def _apply_stains(scene: _Scene, albedo: np.ndarray) -> None:
    for stain in scene.stains:
        region = albedo[stain.box]
        lum = region @ np.array([0.3, 0.59, 0.11], np.float32)
        keep = np.clip(lum / max(float(lum.mean()), 1e-3), 0.6, 1.4)[..., None]  # fibre texture shows through
        a = stain.alpha[..., None]
        albedo[stain.box] = region * (1.0 - a) + stain.colour * keep * a


def _camera(spec: FabricSpec, radiance: np.ndarray, sensor: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Lens blur, shot and read noise and the column fixed-pattern of a line sensor; returns uint8."""
    blurred = ndimage.gaussian_filter(radiance, sigma=(spec.blur, spec.blur, 0), mode="reflect")
    level = np.clip(blurred, 0.0, 1.0) * 255.0
    sigma = spec.noise + 0.12 * np.sqrt(level)
    noisy = level * columns[None, :, None] + sigma * sensor
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _render(
    spec: FabricSpec, height: int, width: int, rng: np.random.Generator, defects: Sequence[DefectSpec]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image (H x W x 3 uint8) and one H x W bool mask per defect, in order."""
    scene = _build_scene(spec, height, width, rng)
    # all randomness of the camera is drawn before defects, so a defect never shifts another pixel's noise
    sensor = rng.standard_normal((height, width, 3), dtype=np.float32)
    columns = (1.0 + rng.normal(0.0, 0.006, width)).astype(np.float32)
    masks = [_DEFECT_RENDERERS[d.kind](scene, d, np.random.default_rng(d.seed)) for d in defects]
    albedo, shade, specular = _compose(scene)
    _draw_tubes(scene, albedo, shade, specular)
    _apply_stains(scene, albedo)
    lum = float(np.asarray(spec.warp_colour) @ np.array([0.3, 0.59, 0.11]))
    gain = float(np.clip(0.2 / max(lum, 1e-3), 1.0, 1.4))  # auto exposure lifts dark cloth off the floor
    radiance = albedo * shade[..., None] * gain + np.maximum(specular, 0.0)[..., None]
    radiance = np.where((specular < 0)[..., None], np.float32(spec.backing), radiance)
    longest = max(height, width)
    yy = (np.arange(height, dtype=np.float32) / max(height - 1, 1) - 0.5)[:, None]
    xx = (np.arange(width, dtype=np.float32) / max(width - 1, 1) - 0.5)[None, :]
    # vignetting follows the optics: a line sensor falls off along its line, hardly across it
    r2 = (2 * xx * width / longest) ** 2 + (2 * yy * height / longest) ** 2
    gradient = 1.0 + 2 * (spec.light_gradient[0] * yy + spec.light_gradient[1] * xx)
    light = gradient * (1.0 - spec.vignetting * r2 / 2)
    radiance = radiance * light[..., None]
    return _camera(spec, radiance.astype(np.float32), sensor, columns), masks


def render_with_masks(
    spec: FabricSpec, height: int, width: int, rng: np.random.Generator, defects: Sequence[DefectSpec]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render ``spec`` with ``defects``: the H x W x 3 uint8 image and one H x W bool mask per defect.

    Two calls with equally seeded ``rng`` and the same spec differ only where the defects are.
    """
    if height < 8 or width < 8:
        raise ValueError(f"fabric image must be at least 8 x 8 pixels, got {height} x {width}")
    unknown = [d.kind for d in defects if d.kind not in _DEFECT_RENDERERS]
    if unknown:
        raise ValueError(f"unknown defect kind(s) {unknown}; known: {list(DEFECT_KINDS)}")
    return _render(spec, height, width, rng, defects)


def render_fabric(
    spec: FabricSpec, height: int, width: int, rng: np.random.Generator, defects: Sequence[DefectSpec] = ()
) -> np.ndarray:
    """Render ``spec`` (with optional ``defects``) as an H x W x 3 uint8 image."""
    return render_with_masks(spec, height, width, rng, defects)[0]


# ---------------------------------------------------------------------------------------------------------
# Samples: fabric + defects + mask + caption
# ---------------------------------------------------------------------------------------------------------
def kind_to_class(classes: Sequence[str]) -> dict[str, str]:
    """Which class name each renderable defect kind is labelled with; kinds with no class are left out."""
    names = {c.lower(): c for c in classes}
    mapping = {}
    for kind in DEFECT_KINDS:
        match = next((names[a] for a in KIND_ALIASES[kind] if a in names), names.get("defect"))
        if match is not None:
            mapping[kind] = match
    return mapping


def _reach(kind: str, size: float, pitch: float) -> float:
    """Radius around a defect's centre that its pixels (outline, loose ends, shadows) stay within."""
    return {
        "hole": 1.7 * size + 4,
        "stain": 1.7 * size + 2,
        "knot": 2.2 * size + 4,
        "broken_yarn": size + 5 * pitch,
        "misweave": size + 4 * pitch,
    }[kind] + 2


def _defect_size(kind: str, side: float, pitch: float, rng: np.random.Generator) -> float:
    scale = side / 256.0
    low, high = {
        "hole": (4.5 * scale, 0.12 * side),
        "stain": (0.035 * side, 0.13 * side),
        "knot": (max(1.6, 0.45 * pitch), max(2.0, 1.3 * pitch)),  # a lump is thicker than its yarn
        "broken_yarn": (0.07 * side, 0.3 * side),
        "misweave": (0.05 * side, 0.2 * side),
    }[kind]
    return float(np.exp(rng.uniform(np.log(low), np.log(max(high, low * 1.01)))))


def sample_defects(
    rng: np.random.Generator,
    spec: FabricSpec,
    height: int,
    width: int,
    kinds: Sequence[str],
    first: str | None = None,
) -> list[DefectSpec]:
    """One to a few defects that do not overlap (so each mask pixel shows the defect it names)."""
    side = min(height, width)
    count = (
        1
        + int(rng.random() < 0.28)
        + int(rng.random() < 0.08)
        + int(rng.integers(0, 1 + width // (4 * side)))
    )
    wanted = [first] if first else []
    wanted += [str(rng.choice(list(kinds))) for _ in range(count - len(wanted))]
    placed: list[tuple[DefectSpec, float]] = []
    for kind in wanted:
        for _ in range(20):
            size = _defect_size(kind, side, spec.pitch, rng)
            reach = _reach(kind, size, spec.pitch)
            margin_y, margin_x = min(reach * 0.6, height / 2 - 1), min(reach * 0.6, width / 2 - 1)
            center = (
                float(rng.uniform(margin_y, height - margin_y)),
                float(rng.uniform(margin_x, width - margin_x)),
            )
            if all(np.hypot(center[0] - d.center[0], center[1] - d.center[1]) > reach + r for d, r in placed):
                placed.append((DefectSpec(kind, center, size, int(rng.integers(2**31))), reach))
                break
    return [d for d, _ in placed]


def _where(box: Sequence[int], height: int, width: int) -> str:
    x0, y0, x1, y1 = box
    cy, cx = (y0 + y1) / 2 / height, (x0 + x1) / 2 / width
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if not row and not col:
        return "in the centre"
    if row and col:
        return f"near the {row} {col}"
    return f"near the {row or col} edge" if col else f"near the {row}"


def caption_for(spec: FabricSpec, defects: Sequence[dict], height: int, width: int) -> str:
    """Free-text description, e.g. "twill fabric, navy, with a small knot near the top left"."""
    head = f"{spec.weave} fabric, {spec.colour_name}"
    if not defects:
        return f"{head}, no defect"
    side = min(height, width)
    phrases = []
    for d in defects:
        x0, y0, x1, y1 = d["bbox"]
        extent = max(x1 - x0, y1 - y0) / side
        size = (
            "tiny" if extent < 0.05 else "small" if extent < 0.12 else "medium" if extent < 0.25 else "large"
        )
        noun = d["class"].replace("_", " ")
        phrases.append(f"a {size} {noun} {_where(d['bbox'], height, width)}")
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{head}, with {listed}"


def class_mask(masks: Sequence[np.ndarray], class_ids: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Paint H x W bool ``masks`` with their class ids into one uint8 mask; later ones win overlaps."""
    out = np.zeros(shape, np.uint8)
    for m, k in zip(masks, class_ids, strict=True):
        out[m] = k
    return out


def _build_sample(
    seed: int,
    height: int,
    width: int,
    defect_prob: float,
    classes: Sequence[str],
    force_defective: bool | None = None,
    first_kind: str | None = None,
) -> Sample:
    mapping = kind_to_class(classes)
    if not mapping:
        raise ValueError(
            f"none of the classes {list(classes)} names a fabric defect the generator can draw; "
            f"include one of {list(DEFECT_KINDS)} or 'defect'"
        )
    if len(classes) > 255:
        raise ValueError(f"{len(classes)} classes do not fit a uint8 mask (at most 255)")
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng)
    defective = bool(rng.random() < defect_prob) if force_defective is None else force_defective
    render_seed = int(rng.integers(2**63))
    first = first_kind if first_kind in mapping else None
    defects = sample_defects(rng, spec, height, width, list(mapping), first) if defective else []
    image, masks = _render(spec, height, width, np.random.default_rng(render_seed), defects)
    kept = [(d, m) for d, m in zip(defects, masks, strict=True) if m.any()]  # clipped away at the border
    ids = [list(classes).index(mapping[d.kind]) + 1 for d, _ in kept]
    mask = class_mask([m for _, m in kept], ids, (height, width))
    records = []
    for d, m in kept:
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        records.append({"class": mapping[d.kind], "bbox": bbox, "area": int(m.sum()), "kind": d.kind})
    return Sample(image, mask, caption_for(spec, records, height, width), records, spec)


def render_sample(
    seed: int,
    height: int = 256,
    width: int = 256,
    defect_prob: float = 0.3,
    classes: Sequence[str] = DEFAULT_CLASSES,
) -> Sample:
    """One fabric image with its class-index mask and caption; the same seed gives the same bytes."""
    return _build_sample(seed, height, width, defect_prob, classes)


# ---------------------------------------------------------------------------------------------------------
# The dataset folder
# ---------------------------------------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    """Encode an H x W x 3 or H x W uint8 array as PNG; same array, same bytes (no metadata, fixed level)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _image_seed(seed: int, index: int, stream: int) -> int:
    """Independent per-image seed, stable for (dataset seed, image index, stream)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class _Job:
    stem: str
    seed: int
    height: int
    width: int
    defective: bool
    first_kind: str | None
    classes: tuple[str, ...]


def _render_job(job: _Job) -> tuple[str, bytes, bytes, str, list[str]]:
    sample = _build_sample(job.seed, job.height, job.width, 0.0, job.classes, job.defective, job.first_kind)
    present = sorted({d["class"] for d in sample.defects}, key=job.classes.index)
    return job.stem, png_bytes(sample.image), png_bytes(sample.mask), sample.caption, present


def _choose_test(
    rng: np.random.Generator, results: Sequence[tuple[str, list[str]]], test_fraction: float, cover_all: bool
) -> set[str]:
    """Stems of the frozen test split: the same fraction of normal and of defective images, and (when
    ``cover_all``) at least one image of every defect class present in the data."""
    if test_fraction <= 0:
        return set()
    normal = [stem for stem, present in results if not present]
    defective = [(stem, present) for stem, present in results if present]
    test: set[str] = set()
    if normal:
        order = rng.permutation(len(normal))
        test |= {normal[i] for i in order[: max(1, round(len(normal) * test_fraction))]}
    if defective:
        order = [defective[i] for i in rng.permutation(len(defective))]
        target = max(1, round(len(defective) * test_fraction))
        covered: set[str] = set()
        if cover_all:
            for stem, present in order:
                if set(present) - covered:
                    test.add(stem)
                    covered |= set(present)
        for stem, _ in order:
            if sum(1 for s, _ in defective if s in test) >= target:
                break
            test.add(stem)
    return test


def generate(
    out_dir: Path,
    n_images: int = 240,
    size: int = 256,
    defect_fraction: float = 0.3,
    test_fraction: float = 0.25,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    line_scan: int = 0,
    workers: int = 2,
) -> Path:
    """Write the embedded fabric dataset into ``out_dir`` (the Loom dataset folder layout) and return it.

    ``images/<stem>.png`` (RGB), ``masks/<stem>.png`` (class indices, zeros for normal images),
    ``captions/<stem>.txt``, ``classes.json`` and ``manifest.parquet``. The test split (human labels,
    reviewed) is chosen by ``seed`` and holds normal and defective images; ``line_scan`` extra 4096 x 256
    frames go to train. The same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    classes = tuple(classes)
    if n_images < 0 or line_scan < 0:
        raise ValueError(f"n_images ({n_images}) and line_scan ({line_scan}) must not be negative")
    if n_images + line_scan == 0:
        raise ValueError("nothing to generate: n_images and line_scan are both 0")
    if size < 32:
        raise ValueError(f"size {size} is too small for a fabric close-up; use at least 32 pixels")
    if not 0.0 <= defect_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            "defect_fraction must be in [0, 1] and test_fraction in [0, 1), "
            f"got {defect_fraction} and {test_fraction}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder; choose another --out")
    kinds = list(kind_to_class(classes))
    if not kinds:
        raise ValueError(f"none of the classes {list(classes)} names a fabric defect the generator can draw")

    plan = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    n_defective = round(n_images * defect_fraction)
    defective = set(plan.permutation(n_images)[:n_defective].tolist())
    kind_cycle = [kinds[i] for i in plan.permutation(len(kinds))]  # balanced first defects
    jobs, order = [], 0
    for i in range(n_images):
        first = kind_cycle[order % len(kinds)] if i in defective else None
        order += i in defective
        jobs.append(
            _Job(f"fabric_{i:05d}", _image_seed(seed, i, 0), size, size, i in defective, first, classes)
        )
    for i in range(line_scan):
        jobs.append(
            _Job(
                f"linescan_{i:03d}",
                _image_seed(seed, i, 1),
                *LINE_SCAN_SHAPE,
                bool(plan.random() < defect_fraction),
                None,
                classes,
            )
        )

    for sub in ("images", "masks", "captions"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    results = _run_jobs(jobs, workers)
    rows = []
    for stem, image, mask, caption, present in results:
        (out_dir / "images" / f"{stem}.png").write_bytes(image)
        (out_dir / "masks" / f"{stem}.png").write_bytes(mask)
        (out_dir / "captions" / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        rows.append((stem, hashlib.sha256(image).hexdigest(), present))
    (out_dir / "classes.json").write_text(json.dumps(list(classes)) + "\n", encoding="utf-8")

    squares = [(stem, present) for stem, _, present in rows if stem.startswith("fabric_")]
    test = _choose_test(plan, squares, test_fraction, cover_all=n_images >= 100)
    shapes = {job.stem: (job.width, job.height) for job in jobs}
    table = pd.DataFrame(
        {
            "image_id": [image_id for _, image_id, _ in rows],
            "path": [f"images/{stem}.png" for stem, _, _ in rows],
            "width": [shapes[stem][0] for stem, _, _ in rows],
            "height": [shapes[stem][1] for stem, _, _ in rows],
            "source": SOURCE,
            "split": ["test" if stem in test else "train" for stem, _, _ in rows],
            "round": 0,
            "label_source": ["human" if stem in test else "none" for stem, _, _ in rows],
            "classes": [",".join(present) for _, _, present in rows],
            "review_state": ["reviewed" if stem in test else "none" for stem, _, _ in rows],
        }
    )
    manifest.save(manifest.normalize(table), out_dir / "manifest.parquet")
    logger.info(
        "fabric dataset: %d images (%d defective, %d test) and %d line-scan frames in %s",
        n_images,
        n_defective,
        len(test),
        line_scan,
        out_dir,
    )
    return out_dir


def _run_jobs(jobs: Sequence[_Job], workers: int) -> list[tuple[str, bytes, bytes, str, list[str]]]:
    """Render in a small process pool when it pays off; results keep the jobs' order."""
    if workers <= 1 or len(jobs) < 16:
        return [_render_job(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # spawn, not fork: the caller may hold threads (Prefect, servers) that a fork would copy mid-state
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_render_job, jobs, chunksize=8))
