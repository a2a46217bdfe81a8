"""Fabric structure: specs, weave patterns, geometry and the yarn scene that defects edit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

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

    def _centred(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates relative to the point the weave turns about (the image centre)."""
        return y - self.height / 2, x - self.width / 2

    def _uncentred(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`_centred`."""
        return y + self.height / 2, x + self.width / 2

    def to_weave(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        yc, xc = self._centred(y, x)
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
        return self._uncentred(yr * c + xr * s, xr * c - yr * s)

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
