"""A seeded fuzz set of bad and oddly encoded input files, each with the outcome ingest must give it.

``write_fuzz_set(root, outside)`` writes about 260 files below ``root`` (the source folder, or a folder inside
it) and a few targets in ``outside`` (a folder *outside* the source folder, for the symbolic links that point
out of it). Every file comes back as a ``FuzzCase`` that says what ``loom.data.ingest.ingest_folder`` must do
with it, so the tests assert each file exactly instead of counting:

- ``quarantined`` with a reason starting ``reason``: random bytes under image names; PNG, JPEG, TIFF, BMP,
  GIF and WebP files cut in the header and at points of the pixel data; headers that declare huge (or zero)
  sizes; sample layouts no reader turns into pixels; formats Loom does not open (EPS would run
  Ghostscript); corrupt pixel data; files that are not images; symbolic links that lead out of the source
  folder or nowhere (never followed, never read); a named pipe (reading it would hang);
- ``added``: readable odd modes that convert faithfully (1-bit, palette with transparency, LA, 16-bit
  gray/RGB/RGBA, float32 and int32 TIFF, multi-page TIFF, CMYK, EXIF rotation, a PNG named ``.jpg``, ...),
  with the exact RGB pixels when the format is lossless (``accepted=False`` leaves these out, so that a
  round's pool of good images stays the same);
- ``duplicate``: the same bytes a second time (a copied frame, the second empty file, a symbolic link to a
  file of the source folder).

File names repeat across sub-folders with different bytes (``frame_0001.png`` eight times), and some names
are hostile (undecodable bytes, a newline, quotes and commas, 250 characters). The same seed gives the same
bytes and names.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.badfiles import png_header_only

ADDED, DUPLICATE, QUARANTINED = "added", "duplicate", "quarantined"

# Reason prefixes (loom.data.imageio / loom.data.ingest word them so).
NOT_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
TOO_LARGE = "too large"
NO_PIXELS = "no pixels"
EMPTY = "empty file (0 bytes)"
UNSUPPORTED_FORMAT = "unsupported format"
LINK_OUT = "symbolic link out of the source folder"
LINK_BROKEN = "broken symbolic link"
NOT_REGULAR = "not a regular file"


@dataclass(frozen=True)
class FuzzCase:
    """One file of the fuzz set and what ingest must do with it."""

    path: Path  # as it lies in the source folder (a symbolic link stays a link)
    kind: str  # the family, e.g. "truncated_png", "odd_mode", "symlink_out"
    expected: str  # ADDED, DUPLICATE or QUARANTINED
    reason: str = ""  # QUARANTINED: the start of the reason
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # ADDED, lossless: exact RGB


@dataclass
class FuzzSet:
    root: Path
    outside: Path
    cases: list[FuzzCase]
    fifos: list[Path]  # named pipes (in the set and outside it) that a wrong reader would block on

    def expected(self, outcome: str) -> list[FuzzCase]:
        return [c for c in self.cases if c.expected == outcome]

    def by_path(self) -> dict[str, FuzzCase]:
        return {str(c.path): c for c in self.cases}


# ---- encoders --------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG from its IHDR fields and raw (filtered) scanlines, whatever they say: for invalid headers."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _tiff(
    width: int,
    height: int,
    bits: Sequence[int],
    data: bytes,
    *,
    photometric: int = 1,
    sample_format: int = 1,
    strip_offset: int | None = None,
) -> bytes:
    """A little-endian baseline TIFF with one uncompressed strip and any (even nonsensical) sample layout."""
    samples = len(bits)
    entries: list[tuple[int, int, list[int]]] = [  # (tag, type: 3 SHORT / 4 LONG, values)
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, list(bits)),
        (259, 3, [1]),
        (262, 3, [photometric]),
        (273, 4, [0]),  # strip offset, set below
        (277, 3, [samples]),
        (278, 4, [max(height, 1)]),
        (279, 4, [len(data)]),
        (339, 3, [sample_format] * samples),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    extra = b""
    packed = []
    for tag, typ, values in entries:
        fmt = "<" + ("H" if typ == 3 else "I") * len(values)
        value = struct.pack(fmt, *values)
        if len(value) <= 4:
            packed.append([tag, typ, len(values), value.ljust(4, b"\x00")])
        else:
            packed.append([tag, typ, len(values), struct.pack("<I", ifd_offset + ifd_size + len(extra))])
            extra += value
    data_offset = ifd_offset + ifd_size + len(extra)
    for entry in packed:
        if entry[0] == 273:
            entry[3] = struct.pack("<I", data_offset if strip_offset is None else strip_offset)
    ifd = struct.pack("<H", len(packed)) + b"".join(
        struct.pack("<HHI", tag, typ, count) + value for tag, typ, count, value in packed
    )
    return b"II*\x00" + struct.pack("<I", ifd_offset) + ifd + struct.pack("<I", 0) + extra + data


def _idat_span(png: bytes) -> tuple[int, int]:
    """(start, end) of the first IDAT chunk's data in a PNG."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    return at + 4, at + 4 + length


# ---- the set ---------------------------------------------------------------------------------------------


class _Writer:
    """Writes files below the root and records what ingest must do with each one."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.cases: list[FuzzCase] = []
        self.fifos: list[Path] = []

    def noise(self, h: int, w: int, channels: int = 3) -> np.ndarray:
        shape = (h, w) if channels == 1 else (h, w, channels)
        return self.rng.integers(0, 256, shape, dtype=np.uint8)

    def put(
        self,
        rel: str | Path,
        data: bytes,
        kind: str,
        expected: str,
        reason: str = "",
        pixels: np.ndarray | None = None,
    ) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.cases.append(FuzzCase(path, kind, expected, reason, pixels))
        return path

    def bad(self, rel: str | Path, data: bytes, kind: str, reason: str) -> Path:
        return self.put(rel, data, kind, QUARANTINED, reason)

    def link(self, rel: str, target: str | Path, kind: str, expected: str, reason: str = "") -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path)
        self.cases.append(FuzzCase(path, kind, expected, reason))
        return path


def _random_bytes(w: _Writer) -> None:
    """Random bytes under image names, 8 extensions x 9 lengths, starting with a byte no signature has."""
    for ext in ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp"):
        for k, length in enumerate((5, 9, 17, 33, 100, 511, 2048, 4096, 9000)):
            data = bytearray(w.noise(1, length, 1).tobytes())
            data[0] = 0x2A  # "*": starts no image signature, so the reason is always "not an image"
            w.bad(f"random/{ext}/r{k}.{ext}", bytes(data), "random_bytes", NOT_IMAGE)


def _truncated(w: _Writer, size: int) -> None:
    """Each format cut in its header (after the signature) and at ten points of its pixel data."""
    rgb = Image.fromarray(w.noise(size, size))  # noise: the pixel data fills most of the file
    files = {
        "png": _encode(rgb, "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=95),
        "tiff": _encode(rgb, "TIFF"),
        "bmp": _encode(rgb, "BMP"),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "webp": _encode(rgb, "WEBP", lossless=True),
    }
    for fmt, data in files.items():
        if fmt == "png":
            start, end = _idat_span(data)  # inside the compressed pixels: rows are lost
            end -= 16  # (a cut in the last bytes, the zlib checksum, leaves every pixel there)
        elif fmt in ("jpeg", "webp"):
            start, end = len(data) // 4, len(data) - 2
        else:
            start, end = len(data) // 3, len(data) - 16  # TIFF/BMP/GIF: the header is at the start
        cuts = [12, *np.linspace(start, end, 9, dtype=int).tolist()]
        for cut in cuts:
            w.bad(f"truncated/{fmt}/cut{cut:05d}.{fmt}", data[:cut], f"truncated_{fmt}", CORRUPT)


def _huge(w: _Writer, size: int) -> None:
    """Headers that declare far more pixels than the limit (or none at all), with tiny bodies."""
    (w.root / "huge").mkdir(parents=True, exist_ok=True)
    for width, height in ((20000, 20000), (100000, 1000), (2**31 - 1, 1), (1, 2**31 - 1), (65535, 65535)):
        png_header_only(w.root / f"huge/png_{width}x{height}.png", width, height)
        w.cases.append(
            FuzzCase(w.root / f"huge/png_{width}x{height}.png", "huge_png", QUARANTINED, TOO_LARGE)
        )
    for width, height in ((0, 0), (0, 16), (16, 0)):
        png_header_only(w.root / f"huge/png_{width}x{height}.png", width, height)
        w.cases.append(FuzzCase(w.root / f"huge/png_{width}x{height}.png", "zero_size", QUARANTINED, CORRUPT))

    small = Image.fromarray(w.noise(size, size))
    jpeg = bytearray(_encode(small, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    for width, height in ((65500, 65500), (60000, 2000)):
        data = bytearray(jpeg)
        struct.pack_into(">HH", data, sof + 5, height, width)
        w.bad(f"huge/jpeg_{width}x{height}.jpg", bytes(data), "huge_jpeg", TOO_LARGE)
    data = bytearray(jpeg)
    struct.pack_into(">HH", data, sof + 5, 0, 0)
    w.bad("huge/jpeg_0x0.jpg", bytes(data), "zero_size", CORRUPT)

    bmp = bytearray(_encode(small, "BMP"))
    for width, height in ((100000, 100000), (2**31 - 1, 1), (-size, size)):  # -16: 2**32 - 16 wide
        data = bytearray(bmp)
        struct.pack_into("<ii", data, 18, width, height)
        w.bad(f"huge/bmp_{width}x{height}.bmp", bytes(data), "huge_bmp", TOO_LARGE)

    gif = bytearray(_encode(small.convert("P"), "GIF"))
    for width, height in ((65535, 65535), (65535, 1200)):
        data = bytearray(gif)
        struct.pack_into("<HH", data, 6, width, height)
        w.bad(f"huge/gif_{width}x{height}.gif", bytes(data), "huge_gif", TOO_LARGE)

    for width, height in ((1_000_000, 1_000_000), (70000, 1000)):
        data = _tiff(width, height, (8,), b"\x00" * 64)
        w.bad(f"huge/tiff_{width}x{height}.tif", data, "huge_tiff", TOO_LARGE)
    w.bad("huge/tiff_0x16.tif", _tiff(0, 16, (8,), b"\x00" * 16), "zero_size", CORRUPT)


def _bad_modes(w: _Writer, size: int) -> None:
    """Sample layouts no reader turns into pixels: invalid PNG bit depths, exotic TIFF samples."""
    raw8 = (b"\x00" + bytes(size * 3)) * size
    for depth, colour_type in ((4, 2), (3, 0), (16, 3), (8, 5), (8, 7), (1, 6)):
        data = _png(size, size, depth, colour_type, raw8)
        w.bad(f"modes/png_depth{depth}_type{colour_type}.png", data, "bad_mode_png", CORRUPT)
    tiffs = {
        "float64": ((64,), 3, 1),  # (bits, sample format, photometric)
        "complex_int": ((32,), 5, 1),
        "gray_alpha_16": ((16, 16), 1, 1),
        "rgb_3bit": ((3, 3, 3), 1, 2),
        "rgb_float16": ((16, 16, 16), 3, 2),
        "five_samples": ((8, 8, 8, 8, 8), 1, 2),
    }
    for name, (bits, sample_format, photometric) in tiffs.items():
        data = bytes(size * size * sum(bits) // 8 + 8)
        tiff = _tiff(size, size, bits, data, photometric=photometric, sample_format=sample_format)
        w.bad(f"modes/tiff_{name}.tif", tiff, "bad_mode_tiff", CORRUPT)


def _corrupt_data(w: _Writer, size: int) -> None:
    """Complete files whose pixel data is damaged or missing."""
    rgb = Image.fromarray(w.noise(size, size))
    png = bytearray(_encode(rgb, "PNG"))
    start, _ = _idat_span(bytes(png))
    garbled = bytearray(png)
    garbled[start : start + 8] = b"\xff" * 8  # the zlib header and first bytes: not a deflate stream
    w.bad("corrupt/png_zlib_garbage.png", bytes(garbled), "corrupt_data", CORRUPT)
    w.bad("corrupt/png_no_idat.png", _png_without_idat(bytes(png)), "corrupt_data", CORRUPT)
    tiff = _tiff(size, size, (8, 8, 8), bytes(size * size * 3), photometric=2, strip_offset=10**7)
    w.bad("corrupt/tiff_strip_beyond_end.tif", tiff, "corrupt_data", CORRUPT)
    bmp = bytearray(_encode(rgb, "BMP"))
    struct.pack_into("<I", bmp, 10, 10**7)  # pixel data offset far past the end
    w.bad("corrupt/bmp_offset_beyond_end.bmp", bytes(bmp), "corrupt_data", CORRUPT)


def _png_without_idat(png: bytes) -> bytes:
    at = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[at : at + 4])[0]
    return png[:at] + png[at + 12 + length :]


def _not_images(w: _Writer, size: int) -> None:
    """Files that are not images under image names, and images in formats Loom does not open."""
    texts = {
        "notes.png": b"operator notes: camera 3 lens cleaned at 14:02\n",
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "scan.tif": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
        "frames.bmp": b"PK\x03\x04" + bytes(26) + b"frame.png",
        "vector.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n',
        "labels.jpg": b'{"image": "a.png", "label": "hole"}\n',
        "export.png": b"image_id,label\na,hole\n",
        "README": b"line 3 camera, shift B\n",
        "sidecar.xmp": b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>\n",
    }
    for name, data in texts.items():
        w.bad(f"other/{name}", data, "not_an_image", NOT_IMAGE)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n"
    w.bad("other/drawing.png", eps, "unsupported_format", UNSUPPORTED_FORMAT)  # Pillow would run Ghostscript
    small = Image.fromarray(w.noise(size, size))
    for fmt, ext in (("ICO", "png"), ("PCX", "jpg"), ("SGI", "tif"), ("QOI", "png")):
        w.bad(
            f"other/{fmt.lower()}_image.{ext}", _encode(small, fmt), "unsupported_format", UNSUPPORTED_FORMAT
        )


def _empty(w: _Writer) -> None:
    """Zero-byte files share their (empty) content: the first is quarantined, the rest are duplicates."""
    names = ["a_first.png", "b.jpg", "c.jpeg", "d.tif", "e.bmp", "f.gif", "g.webp", "h"]
    for k, name in enumerate(names):
        w.put(f"empty/{name}", b"", "empty", QUARANTINED if k == 0 else DUPLICATE, EMPTY if k == 0 else "")


def _odd_modes(w: _Writer, size: int) -> None:
    """Readable odd modes and encodings; ``pixels`` is the exact RGB where the format is lossless."""
    rgb = w.noise(size, size)
    gray = w.noise(size, size, 1)

    def gray3(values: np.ndarray) -> np.ndarray:
        return np.repeat(values[:, :, None], 3, axis=2)

    def add(rel: str, data: bytes, pixels: np.ndarray | None) -> None:
        w.put(f"modes/{rel}", data, "odd_mode", ADDED, pixels=pixels)

    bits = gray > 127
    add("bilevel.png", _encode(Image.fromarray(bits), "PNG"), gray3(np.where(bits, 255, 0).astype(np.uint8)))
    add("bilevel.tif", _encode(Image.fromarray(bits), "TIFF"), gray3(np.where(bits, 255, 0).astype(np.uint8)))
    add("bilevel.bmp", _encode(Image.fromarray(bits), "BMP"), gray3(np.where(bits, 255, 0).astype(np.uint8)))
    add("gray.png", _encode(Image.fromarray(gray), "PNG"), gray3(gray))
    add("gray.pgm", _encode(Image.fromarray(gray), "PPM"), gray3(gray))
    la = Image.fromarray(np.dstack([gray, w.noise(size, size, 1)]), "LA")
    add("gray_alpha.png", _encode(la, "PNG"), gray3(gray))

    palette = w.noise(1, 256 * 3, 1).ravel()
    index = w.noise(size, size, 1) % 16
    colours = palette.reshape(256, 3)[index]
    pal = Image.fromarray(index, "P")
    pal.putpalette(palette.tolist())
    add("palette.png", _encode(pal, "PNG"), colours)
    add("palette_transparent.png", _encode(pal, "PNG", transparency=3), colours)  # tRNS: one colour clear
    add("palette_alpha.png", _encode(pal, "PNG", transparency=bytes(range(0, 256))), colours)
    add("palette.bmp", _encode(pal, "BMP"), colours)
    add("palette_transparent.gif", _encode(pal, "GIF", transparency=0), colours)
    add("palette_4bit.png", _encode(pal, "PNG", bits=4), colours)
    frames = [pal, Image.fromarray((index + 1) % 16, "P")]
    frames[1].putpalette(palette.tolist())
    add("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), colours)

    rgba = np.dstack([rgb, w.noise(size, size, 1)])
    add("rgba.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb)
    add("rgba.webp", _encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True), rgb)
    add("rgb.webp", _encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb)
    add("rgb.ppm", _encode(Image.fromarray(rgb), "PPM"), rgb)
    add("rgb.tga", _encode(Image.fromarray(rgb), "TGA"), rgb)
    for compression in ("tiff_lzw", "tiff_adobe_deflate", "packbits"):
        add(f"rgb_{compression}.tif", _encode(Image.fromarray(rgb), "TIFF", compression=compression), rgb)

    g16 = (w.rng.integers(0, 65536, (size, size))).astype(np.uint16)
    g16[0, 0] = 65535  # full range: maps like >> 8, rounded
    full = np.round(g16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    add("gray16.png", _encode(Image.fromarray(g16), "PNG"), gray3(full))
    add("gray16.tif", _encode(Image.fromarray(g16), "TIFF"), gray3(full))
    g12 = (w.rng.integers(0, 4096, (size, size))).astype(np.uint16)
    g12[0, 0] = 4095  # 12-bit data in a 16-bit container is not left dark
    add(
        "gray12_in_16.png",
        _encode(Image.fromarray(g12), "PNG"),
        gray3(np.round(g12 * 255.0 / 4095).astype(np.uint8)),
    )
    i32 = (w.rng.integers(0, 1024, (size, size))).astype(np.int32)
    i32[0, 0] = 1023
    add(
        "int32.tif",
        _encode(Image.fromarray(i32), "TIFF"),
        gray3(np.round(i32 * 255.0 / 1023).astype(np.uint8)),
    )
    f32 = w.rng.random((size, size)).astype(np.float32)
    add(
        "float32.tif",
        _encode(Image.fromarray(f32), "TIFF"),
        gray3(np.round(f32.astype(np.float64) * 255).astype(np.uint8)),
    )

    import cv2  # installed with label-studio-sdk; writes 16-bit colour PNG, which Pillow cannot

    c16 = w.rng.integers(0, 65536, (size, size, 3)).astype(np.uint16)
    c16[0, 0, 0] = 65535
    full16 = np.round(c16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    add("rgb16.png", cv2.imencode(".png", c16[:, :, ::-1])[1].tobytes(), full16)
    rgba16 = np.dstack([c16[:, :, ::-1], w.rng.integers(0, 65536, (size, size)).astype(np.uint16)])
    add("rgba16.png", cv2.imencode(".png", rgba16)[1].tobytes(), full16)

    pages = [Image.fromarray(rgb), Image.fromarray(w.noise(size, size)), Image.fromarray(gray)]
    add("multipage.tif", _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]), rgb)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    add("cmyk.tif", _encode(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB")))
    add("cmyk.jpg", _encode(cmyk, "JPEG", quality=95), None)
    add("gray.jpg", _encode(Image.fromarray(gray), "JPEG"), None)
    add("progressive.jpg", _encode(Image.fromarray(rgb), "JPEG", progressive=True), None)
    add("rgb.jp2", _encode(Image.fromarray(rgb), "JPEG2000", irreversible=False), rgb)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    tall = w.noise(size, size // 2)
    add(
        "exif_rotated.png",
        _encode(Image.fromarray(tall), "PNG", exif=exif),
        np.ascontiguousarray(np.rot90(tall, k=-1)),
    )
    add("png_named.jpg", _encode(Image.fromarray(rgb[::-1]), "PNG"), np.ascontiguousarray(rgb[::-1]))
    add("jpeg_named.png", _encode(Image.fromarray(rgb[:, ::-1]), "JPEG"), None)


def _links(w: _Writer, outside: Path, size: int, accepted: bool) -> None:
    """Symbolic links: out of the source folder (never followed), broken, looping, and one inside it."""
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.png"  # a good image: following the link would ingest it
    secret.write_bytes(_encode(Image.fromarray(w.noise(size, size)), "PNG"))
    (outside / "notes.txt").write_text("not for the workspace\n")
    (outside / "folder").mkdir(exist_ok=True)
    Image.fromarray(w.noise(size, size)).save(outside / "folder" / "inner.png")
    fifo = outside / "pipe.png"
    os.mkfifo(fifo)
    w.fifos.append(fifo)

    w.link("links/out_image.png", secret, "symlink_out", QUARANTINED, LINK_OUT)
    w.link("links/out_text.png", outside / "notes.txt", "symlink_out", QUARANTINED, LINK_OUT)
    w.link("links/out_folder", outside / "folder", "symlink_out", QUARANTINED, LINK_OUT)
    w.link("links/out_pipe.png", fifo, "symlink_out", QUARANTINED, LINK_OUT)
    w.link(
        "links/out_relative.png",
        os.path.relpath(secret, w.root / "links"),
        "symlink_out",
        QUARANTINED,
        LINK_OUT,
    )
    w.link("links/out_root.png", "/", "symlink_out", QUARANTINED, LINK_OUT)
    w.link("links/out_chain_1.png", "out_chain_2.png", "symlink_out", QUARANTINED, LINK_OUT)
    w.link("links/out_chain_2.png", secret, "symlink_out", QUARANTINED, LINK_OUT)
    w.link(
        "links/dangling.png",
        w.root / "links" / "no_such_file.png",
        "symlink_broken",
        QUARANTINED,
        LINK_BROKEN,
    )
    w.link("links/loop_a.png", "loop_b.png", "symlink_broken", QUARANTINED, LINK_BROKEN)
    w.link("links/loop_b.png", "loop_a.png", "symlink_broken", QUARANTINED, LINK_BROKEN)
    if accepted:
        target = w.put(
            "links/a_target.png", _encode(Image.fromarray(w.noise(size, size)), "BMP"), "target", ADDED
        )
    else:
        target = w.bad("links/a_target.png", b"target, not an image", "target", NOT_IMAGE)
    w.link("links/z_inside.png", target.name, "symlink_inside", DUPLICATE)  # read through: same bytes again

    pipe = w.root / "special" / "stream.png"
    pipe.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(pipe)
    w.fifos.append(pipe)
    w.cases.append(FuzzCase(pipe, "special_file", QUARANTINED, NOT_REGULAR))


def _same_names(w: _Writer, size: int, accepted: bool) -> None:
    """``frame_0001.png`` in eight sub-folders with different bytes (and once with the same bytes)."""
    good = [_encode(Image.fromarray(w.noise(size, size)), "PNG") for _ in range(3)]
    bad = [
        b"",  # the empty file's bytes: a duplicate of empty/a_first.png
        good[0][: len(good[0]) // 2],
        b"*" + w.noise(1, 300, 1).tobytes(),  # "*" starts no image signature
        b"frame dropped\n",
    ]
    for k, data in enumerate(good if accepted else []):
        w.put(f"names/cam{k}/frame_0001.png", data, "same_name", ADDED)
    expected = [(DUPLICATE, ""), (QUARANTINED, CORRUPT), (QUARANTINED, NOT_IMAGE), (QUARANTINED, NOT_IMAGE)]
    for k, (data, (outcome, reason)) in enumerate(zip(bad, expected, strict=True)):
        w.put(f"names/night{k}/frame_0001.png", data, "same_name", outcome, reason)
    if accepted:  # the same name and the same bytes: a copied frame
        w.put("names/z_copy/frame_0001.png", good[0], "same_name", DUPLICATE)
    w.bad("names/upper/FRAME_0001.PNG", b"FRAME", "same_name", NOT_IMAGE)


def _hostile_names(w: _Writer, size: int, accepted: bool) -> None:
    """Names a careless CSV, parquet or quarantine writer trips on: each with bad content, and (``accepted``)
    again with a good image in a sibling folder."""
    names = [
        os.fsdecode(b"undecodable_\xff\xfe.png"),
        "new\nline.png",
        'quote",comma,.png',
        "x" * 246 + ".png",  # 250 bytes: with a prefix, longer than a file name may be
        "-leading-dash.png",
        "spaces in name .png",
        "ünïcödé_画像.png",
        "semi;colon|pipe.png",
    ]
    for k, name in enumerate(names):
        w.bad(f"names/hostile/{name}", b"junk %d" % k, "hostile_name", NOT_IMAGE)
        if accepted:
            data = _encode(Image.fromarray(w.noise(size, size)), "PNG")
            w.put(f"names/hostile_good/{name}", data, "hostile_name", ADDED)


def write_fuzz_set(
    root: Path,
    outside: Path,
    *,
    seed: int = 0,
    size: int = 16,
    accepted: bool = True,
    look_alikes: Sequence[Path] = (),
) -> FuzzSet:
    """Write the fuzz set below ``root``, and link targets into ``outside`` (which lies outside the source).

    Args:
        root: where the files go: the source folder, or a folder inside it.
        outside: a folder outside the source folder, for the targets of the links that point out of it.
        seed: the same seed gives the same bytes and names.
        size: side of the small images, in pixels (small keeps the whole set's ingest to about a second).
        accepted: include the readable odd modes (they are added to the pool); ``False`` gives only files that
            must not change what a round learns (quarantined or duplicate).
        look_alikes: good images of the source folder: each one's name comes back with bad bytes in a
            sub-folder (quarantined; the good one is still added), and each one's bytes come back under
            another name (duplicate).
    Returns:
        The FuzzSet: every file with its expected outcome, and the named pipes.
    """
    root.mkdir(parents=True, exist_ok=True)
    w = _Writer(root, seed)
    _random_bytes(w)
    _truncated(w, max(size, 24))
    _huge(w, size)
    _bad_modes(w, size)
    _corrupt_data(w, size)
    _not_images(w, size)
    _empty(w)
    if accepted:
        _odd_modes(w, size)
    _links(w, outside, size, accepted)
    _same_names(w, size, accepted)
    _hostile_names(w, size, accepted)
    for k, good in enumerate(look_alikes):
        data = good.read_bytes()
        w.bad(f"look_alikes/{k:03d}/{good.name}", data[: len(data) // 3], "look_alike", CORRUPT)
        w.put(f"look_alikes/copies/copy_{k:03d}{good.suffix}", data, "copy", DUPLICATE)
    return FuzzSet(root=root, outside=outside, cases=w.cases, fifos=w.fifos)


def entries_below(root: Path) -> list[Path]:
    """Every non-hidden entry below ``root`` that is not a folder (files, links, pipes), links not followed.

    What ingest must account for, counted independently of it.
    """
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        here = Path(folder)
        found += [here / f for f in files if not f.startswith(".")]
        found += [here / d for d in dirs if (here / d).is_symlink()]  # links to folders show up as dirs
    return sorted(found)


@contextmanager
def pipes_guarded(fifos: Sequence[Path], after_s: float = 20.0) -> Iterator[list[Path]]:
    """Yield a list that names each pipe someone was blocked reading after ``after_s`` (then unblocked).

    A reader of a named pipe waits for a writer forever; the guard opens each pipe for writing once the time
    is up, so a wrong read ends (at end of file) and the test fails instead of hanging.
    """
    opened: list[Path] = []
    done = threading.Event()

    def watch() -> None:
        if done.wait(after_s):
            return
        for fifo in fifos:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nobody reads it
            except OSError:
                continue
            opened.append(fifo)
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield opened
    finally:
        done.set()
        watcher.join()
