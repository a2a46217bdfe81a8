"""Rendering: shading, lighting, blur and sensor noise on top of the (possibly edited) scene."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from loom.datasets.fabric.defects import _DEFECT_RENDERERS
from loom.datasets.fabric.scene import (
    _TABLE,
    DEFECT_KINDS,
    DefectSpec,
    FabricSpec,
    _Frame,
    _knit_candidates,
    _Noise,
    _Scene,
    _woven_candidates,
)


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
