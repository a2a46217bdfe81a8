"""The embedded dataset: procedural close-ups of woven and knitted fabric with exact defect masks.

A fabric is built as *yarn candidates*: per pixel, each yarn system that could be seen there (warp, weft or
the legs of knitted loops) proposes a cross-section position and an interlacing height; the highest yarn wins.
Defects edit that structure before it is shaded (holes and broken yarns remove yarns, floats lift one yarn
over its crossings), add loose yarn on top (loose ends, knots) or recolour fibres (stains), so every defect
mask is derived from the same geometry that makes the pixels. Lighting, blur and sensor noise come last and
are drawn independently of the defects, so a defect-free render of the same spec differs only where a mask is.

Everything random comes from ``np.random.default_rng(seed)``: the same seed gives the same bytes.
Images are ``H x W x 3`` uint8, masks ``H x W`` uint8 class indices (0 = normal fabric, k = ``classes[k-1]``).

The line-scan set (``linescan.py``; ``generate_line_scan`` or ``loom datasets linescan --out DIR --frames 100
--size 4096x256 --size 8192x512``) is separate from the demo's data and meant for benchmarks and tests: long
grayscale frames across the whole cloth (plain, twill, satin, denim) with broken picks across the fabric
width, broken ends along the frame, knots, slubs, holes, oil and rust stains and density changes that start
mid-frame (classes broken_yarn, knot, hole, stain, misweave), plus clean frames; each with brightness falling
off toward the ends of the line, selvedges where the cloth ends and, on some frames, dark, blown-out or
cluttered background beyond one end. Its ``frames.json`` records each frame's fabric columns.
"""

from loom.datasets.fabric.dataset import (
    caption_for,
    class_mask,
    generate,
    kind_to_class,
    png_bytes,
    render_sample,
    sample_defects,
)
from loom.datasets.fabric.linescan import (
    LINE_SCAN_KINDS,
    LINE_SCAN_SIZES,
    build_line_frame,
    generate_line_scan,
)
from loom.datasets.fabric.render import render_fabric, render_with_masks
from loom.datasets.fabric.scene import (
    DEFECT_KINDS,
    KIND_ALIASES,
    LINE_SCAN_SHAPE,
    SOURCE,
    WEAVES,
    DefectSpec,
    FabricSpec,
    Sample,
    sample_spec,
    weave_pattern,
)

__all__ = [
    "DEFECT_KINDS",
    "KIND_ALIASES",
    "LINE_SCAN_KINDS",
    "LINE_SCAN_SHAPE",
    "LINE_SCAN_SIZES",
    "SOURCE",
    "WEAVES",
    "DefectSpec",
    "FabricSpec",
    "Sample",
    "build_line_frame",
    "caption_for",
    "class_mask",
    "generate",
    "generate_line_scan",
    "kind_to_class",
    "png_bytes",
    "render_fabric",
    "render_sample",
    "render_with_masks",
    "sample_defects",
    "sample_spec",
    "weave_pattern",
]
