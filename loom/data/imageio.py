"""Robust image and mask I/O: every image Loom touches goes through here.

Reading rules (what ``read_image`` returns is always an ``(H, W, 3)`` ``uint8`` RGB array):

- **Size first.** The width and height are taken from the file header and checked against a pixel limit
  *before* any pixel is decoded, so a decompression bomb (a tiny PNG that claims 20000x20000) is refused
  without allocating it. The limit is 64 MP, overridable by ``LOOM_MAX_IMAGE_PIXELS`` or ``max_pixels``;
  a 4096x256 line-scan frame is 1 MP and passes.
- **Full decode.** The whole file is decoded, so truncated or corrupt data is caught here and not in the
  middle of a training epoch.
- **Modes.** 8-bit RGB as is; grayscale (``L``, ``1``) replicated to 3 channels; palette (``P``, ``PA``)
  expanded through the palette; ``CMYK`` / ``YCbCr`` / ``HSV`` converted to RGB.
- **Alpha is dropped**, not composited: line cameras write opaque frames, and an alpha channel added by an
  export tool must not black out pixels that hold real fabric.
- **More than 8 bits** (``I;16*``, ``I``, 16-bit RGB PNG/TIFF): the *used* bit depth is estimated from the
  maximum value, ``bits = max(8, bit_length(max))``, and ``[0, 2**bits - 1]`` is mapped linearly onto
  ``[0, 255]``. Full-range 16-bit data (max 65535) therefore maps like ``>> 8``, while 12-bit data stored in a
  16-bit container (max <= 4095) maps like ``>> 4`` instead of coming out nearly black. A dim 12-bit frame
  stays dim (it is not stretched), so brightness is comparable across frames of one camera.
- **Float** (``F``): values in ``[0, 1]`` are scaled by 255, values in ``[0, 255]`` kept, anything else is
  min-max stretched; NaN becomes 0.
- **EXIF orientation** is applied, so the array is upright as a viewer shows it.
- Multi-frame files (GIF, multi-page TIFF): the first frame.
- **Formats.** Only the raster formats cameras, export tools and datasets write are opened: PNG, JPEG (and
  MPO), TIFF, BMP, GIF, WebP, PNM, JPEG 2000 and TGA. Pillow knows many more; some of them accept
  nearly any bytes as a header, and EPS would hand the file to Ghostscript, a PostScript interpreter.
  Anything else is refused with its format's name.
- **File size.** A file larger than 8 bytes per pixel of the pixel limit plus 16 MiB (528 MB at 64 MP)
  is refused before it is read: no image Loom accepts needs more, and reading it whole would not keep
  memory bounded.

16-bit colour: Pillow keeps only the high byte of each 16-bit RGB sample, which would make 12-bit colour data
dark. Such files are decoded with OpenCV when it is installed (it comes with label-studio-sdk), else with
Pillow's high-byte rule.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Default pixel limit (64 MP); ``LOOM_MAX_IMAGE_PIXELS`` overrides it.
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "LOOM_MAX_IMAGE_PIXELS"

_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError)

# What to do about each kind of problem, keyed by the start of the reason.
_HINTS: dict[str, str] = {
    "empty file": "re-copy it from the camera or export; the copy was probably interrupted",
    "missing": "check the path; the file was moved or deleted",
    "cannot read": "check the file's permissions",
    "not an image": "remove it from the input folder, or convert it to PNG, JPEG or TIFF",
    "truncated": "re-copy the file; the transfer was probably cut short",
    "too large": f"tile or downscale it, or raise {MAX_PIXELS_ENV} if frames this size are expected",
    "unsupported mode": "convert it to 8-bit RGB or grayscale (PNG)",
    "unsupported format": "convert it to PNG",
    "no pixels": "re-export it; an image needs a width and a height of at least 1",
}

#: The Pillow formats Loom opens (see the module doc); everything else is refused by name. JPEG includes
#: MPO (Pillow opens multi-picture JPEGs from cameras through its JPEG plugin).
#: File name endings taken for images where a folder is listed (ingest opens by content, not by name).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "GIF", "WEBP", "PPM", "JPEG2000", "TGA")

# Leading bytes of the accepted formats, to tell "a PNG whose header is cut or broken" from "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
)


class BadFileError(ValueError):
    """A file Loom cannot use, with the file's path and a short reason (stored in the manifest)."""

    kind = "image"

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.hint = hint or next((h for key, h in _HINTS.items() if reason.startswith(key)), "")
        super().__init__(str(self))

    def __str__(self) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return f"cannot use {self.kind} {self.path}: {self.reason}{hint}"

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        # keeps the error picklable (task runners send exceptions between processes)
        return (type(self), (self.path, self.reason, self.hint))


class ImageReadError(BadFileError):
    """An image that cannot be read: empty, not an image, truncated, too large or of an unsupported mode."""


class MaskError(BadFileError):
    """A class-index mask that is unreadable, of the wrong size, multi-coloured or holds unknown class ids."""

    kind = "mask"


# ---- the header check --------------------------------------------------------------------------------


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else ``LOOM_MAX_IMAGE_PIXELS``, else 64 MP."""
    if max_pixels is not None:
        return int(max_pixels)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        return int(float(raw))
    except ValueError as err:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels (e.g. 64000000)") from err


def max_file_bytes(max_pixels: int | None = None) -> int:
    """Largest image file read: 8 bytes per pixel of the pixel limit (16-bit RGBA, uncompressed) + 16 MiB."""
    return 8 * max_image_pixels(max_pixels) + (1 << 24)


def check_file_size(path: str | Path, size: int, max_pixels: int | None = None) -> None:
    """Refuse a file too large to be an image under the pixel limit, before a byte of it is read.

    Raises:
        ImageReadError: ``too large: file of ... exceeds ...``.
    """
    limit = max_file_bytes(max_pixels)
    if size > limit:
        raise ImageReadError(
            path,
            f"too large: file of {size / 1e6:.1f} MB exceeds the {limit / 1e6:.0f} MB limit for images "
            f"(8 bytes per pixel of {MAX_PIXELS_ENV})",
        )


def _sniff(fp: IO[bytes]) -> str | None:
    """The accepted format the file's first bytes announce (None: no known signature)."""
    fp.seek(0)
    head = fp.read(16)
    fp.seek(0)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


# Pillow has its own, global bomb guard (an error above ~179 MP) that fires inside Image.open before we can
# read the size. Loom's limit replaces it for the header read only; the lock keeps the swap atomic.
_PIL_LIMIT_LOCK = threading.Lock()


def _open_header(fp: IO[bytes], path: Path) -> Image.Image:
    """Parse the header only (lazy open) of an accepted format (``FORMATS``); nothing is decoded yet."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp, formats=_open_formats())
        except UnidentifiedImageError as err:
            raise ImageReadError(path, _unidentified(fp)) from err
        except _DECODE_ERRORS as err:
            raise ImageReadError(
                path, f"truncated or corrupt {_sniff(fp) or 'image'} header ({err})"
            ) from err
        finally:
            Image.MAX_IMAGE_PIXELS = saved


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """``FORMATS`` that this Pillow build has a reader for (Image.open fails on a name it does not know)."""
    Image.init()
    return tuple(name for name in FORMATS if name in Image.OPEN)


def _unidentified(fp: IO[bytes]) -> str:
    """Why no accepted format opens the file: a broken header of one, another format, or no image at all.

    The second look asks every Pillow plugin, but only to parse a header (which none of them hands to an
    outside program); the image is closed undecoded.
    """
    announced = _sniff(fp)
    if announced:
        return (
            f"truncated or corrupt {announced} header (the signature is there, the header cannot be parsed)"
        )
    try:
        other = Image.open(fp)
    except Exception:  # any failure here means the same: no format knows these bytes
        return "not an image: PIL cannot identify it"
    fmt = other.format
    other.close()
    return f"unsupported format {fmt}: Loom reads {', '.join(_open_formats())}"


def _check_pixels(path: Path, width: int, height: int, limit: int) -> None:
    if width < 1 or height < 1:
        raise ImageReadError(path, f"no pixels: the header declares {width}x{height}")
    pixels = width * height
    if pixels > limit:
        raise ImageReadError(
            path,
            f"too large: {width}x{height} = {pixels / 1e6:.1f} MP exceeds the {limit / 1e6:g} MP limit "
            f"({MAX_PIXELS_ENV})",
        )


@contextmanager
def _opened(source: Path | bytes, path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """Open an image (a file, or bytes already read) header-only, refusing empty files and oversized headers.

    The file stays open while the context lasts, so the caller can decode it.
    """
    limit = max_image_pixels(max_pixels)
    if isinstance(source, bytes):
        fp: IO[bytes] = io.BytesIO(source)
    else:
        try:
            fp = open(source, "rb")  # noqa: SIM115 - closed by the with-block below
        except FileNotFoundError as err:
            raise ImageReadError(path, "missing: no such file") from err
        except OSError as err:
            raise ImageReadError(path, f"cannot read file ({err.strerror or err})") from err
    with fp:
        size = fp.seek(0, os.SEEK_END)
        if size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        check_file_size(path, size, max_pixels)
        fp.seek(0)
        im = _open_header(fp, path)
        try:
            _check_pixels(path, im.width, im.height, limit)
            yield im
        finally:
            im.close()


def _load(im: Image.Image, path: Path) -> None:
    """Decode every pixel (Pillow decodes lazily); truncated or corrupt data raises here."""
    try:
        im.load()
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"too large: {err}") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(path, f"truncated or corrupt image data ({err})") from err


# ---- pixel conversion --------------------------------------------------------------------------------


def scale_high_bit_depth(values: np.ndarray) -> np.ndarray:
    """Map integer samples of more than 8 bits to uint8 by their used bit depth (see the module doc).

    Args:
        values: integer array of any shape (e.g. ``(H, W)`` uint16 or int32).
    Returns:
        uint8 array of the same shape.
    """
    clipped = np.clip(values.astype(np.int64, copy=False), 0, None)
    peak = int(clipped.max()) if clipped.size else 0
    bits = max(8, peak.bit_length())
    return np.round(clipped * (255.0 / (2**bits - 1))).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float samples (mode ``F``) to uint8: [0, 1] x 255, [0, 255] kept, else min-max stretched."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        v = v * 255.0
    elif lo < 0.0 or hi > 255.0:
        v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.round(np.clip(v, 0, 255)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _is_16bit_colour(im: Image.Image) -> bool:
    """Pillow opens 16-bit RGB(A) as 8-bit RGB(A); the tile's raw mode still tells the stored depth."""
    return im.mode in ("RGB", "RGBA") and any(";16" in str(getattr(t, "args", "")) for t in im.tile)


def _decode_16bit_colour(data: bytes) -> np.ndarray | None:
    """16-bit colour samples as ``(H, W, 3)`` uint16 RGB via OpenCV, or None if OpenCV is unavailable."""
    try:
        import cv2
    except ImportError:
        return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint16:
        return None
    return arr[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped


def _to_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """A decoded Pillow image as ``(H, W, 3)`` uint8 RGB (rules in the module doc)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :3])
    if mode == "L":
        return _gray_to_rgb(np.asarray(im, dtype=np.uint8))
    if mode in ("LA", "La", "1"):
        return _gray_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode in ("P", "PA"):
        return np.ascontiguousarray(np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, :3])
    if mode.startswith("I"):
        values = np.asarray(im)
        if values.ndim != 2:
            raise ImageReadError(path, f"unsupported mode {mode} (shape {values.shape})")
        return _gray_to_rgb(scale_high_bit_depth(values))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(im)))
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as err:
        raise ImageReadError(path, f"unsupported mode {mode}: Pillow cannot convert it to RGB") from err


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1-8) to an ``(H, W, C)`` array."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=-1)[::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(arr)) if op else arr


def _orientation(im: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation tag (1 = upright).

    With ``header_only``, nothing is decoded: Pillow's PNG reader decodes the whole image to look for an eXIf
    chunk stored after the pixels, which ``image_size`` must not do (it has no pixel limit), so such a late
    chunk is ignored there.
    """
    if header_only and im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1


# ---- public API ----------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (already read, e.g. for hashing) exactly like ``read_image``.

    Args:
        data: the file's bytes.
        name: the file's path, used in error messages.
        max_pixels: pixel limit (default: ``LOOM_MAX_IMAGE_PIXELS`` or 64 MP).
    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    Raises:
        ImageReadError: with the file's path and a short reason.
    """
    path = Path(name)
    with _opened(data, path, max_pixels) as im:
        deep_colour = _is_16bit_colour(im)  # ask before decoding: loading clears the tile list
        _load(im, path)
        rgb: np.ndarray | None = None
        if deep_colour:
            deep = _decode_16bit_colour(data)
            if deep is not None and deep.shape[:2] == (im.height, im.width):
                rgb = np.ascontiguousarray(scale_high_bit_depth(deep))
        if rgb is None:
            rgb = _to_rgb8(im, path)
        return _orient(rgb, _orientation(im))


def is_plain_rgb8_png(data: bytes) -> bool:
    """True when the bytes are a PNG that already is what Loom stores: 8-bit RGB, no transparency, no EXIF.

    Such files can be kept byte for byte instead of being re-encoded (the header is checked, not the pixels;
    decode the file too before trusting it).
    """
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    bit_depth, colour_type = data[24], data[25]
    return bit_depth == 8 and colour_type == 2 and b"eXIf" not in data and b"tRNS" not in data


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB, upright, fully decoded.

    The header's size is checked against ``max_pixels`` (default ``LOOM_MAX_IMAGE_PIXELS`` or 64 MP) before
    decoding. See the module doc for mode, bit-depth, alpha and orientation rules.

    Raises:
        ImageReadError: empty, missing, not an image, truncated/corrupt, too large or unsupported mode.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            check_file_size(path, os.fstat(f.fileno()).st_size, max_pixels)
            data = f.read()
    except FileNotFoundError as err:
        raise ImageReadError(path, "missing: no such file") from err
    except OSError as err:
        raise ImageReadError(path, f"cannot read file ({err.strerror or err})") from err
    return decode_image(data, path, max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone, as ``read_image`` would return it (EXIF rotation applied).

    No pixel is decoded and no size limit applies. Raises ImageReadError for empty or non-image files.
    """
    path = Path(path)
    with _opened(path, path, max_pixels=2**62) as im:
        width, height = im.size
        return (height, width) if _orientation(im, header_only=True) in (5, 6, 7, 8) else (width, height)


def read_mask(path: str | Path, n_classes: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a class-index mask (0 = background, k = class k) as ``(H, W)`` uint8.

    Accepted: single-channel masks (``L``, ``P`` - palette indices are the class ids -, ``1``, ``I;16``),
    and RGB(A)/LA masks whose colour channels are equal (grayscale saved as colour); alpha is ignored.

    Args:
        path: mask file.
        n_classes: number of defect classes; valid values are ``0..n_classes``.
        expected_hw: ``(H, W)`` of the image the mask belongs to, checked when given.
    Raises:
        MaskError: unreadable, wrong size, colour mask, or values above ``n_classes``.
    """
    path = Path(path)
    try:
        with _opened(path, path, None) as im:
            _load(im, path)
            values = _mask_values(im, path)
    except ImageReadError as err:
        raise MaskError(path, err.reason, err.hint) from err
    height, width = values.shape
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        exp_h, exp_w = expected_hw
        raise MaskError(
            path,
            f"wrong size: mask is {width}x{height} but its image is {exp_w}x{exp_h}",
            "re-export the mask at the image's resolution",
        )
    unknown = np.unique(values[(values < 0) | (values > n_classes)])
    if unknown.size:
        shown = ", ".join(str(int(v)) for v in unknown[:8])
        raise MaskError(
            path,
            f"unknown class ids [{shown}]: valid values are 0 (background) to {n_classes}",
            "write class indices, not 0/255 (binary masks must be converted; see `loom datasets`)",
        )
    return values.astype(np.uint8)


def _mask_values(im: Image.Image, path: Path) -> np.ndarray:
    """Class ids of a decoded mask as an ``(H, W)`` integer array."""
    if im.mode in ("L", "P", "1") or im.mode.startswith("I"):
        values = np.asarray(im).astype(np.int64)
    elif im.mode == "F":
        floats = np.asarray(im)
        if not np.all(np.isfinite(floats)) or not np.all(floats == np.round(floats)):
            raise MaskError(path, "float mask with non-integer values", "save class indices as 8-bit PNG")
        values = floats.astype(np.int64)
    elif im.mode in ("RGB", "RGBA", "LA", "PA"):
        colour = np.asarray(im.convert("RGB") if im.mode == "PA" else im)
        colour = colour[:, :, :1] if im.mode == "LA" else colour[:, :, :3]
        if not np.all(colour == colour[:, :, :1]):
            raise MaskError(
                path,
                f"multi-channel {im.mode} mask with differing channels (a colour mask)",
                "save it as a single-channel class-index PNG (mode L)",
            )
        values = colour[:, :, 0].astype(np.int64)
    else:
        raise MaskError(path, f"unsupported mode {im.mode} for a mask", "save it as an 8-bit PNG (mode L)")
    if values.ndim != 2:
        raise MaskError(path, f"unsupported mask shape {values.shape}", "save it as an 8-bit PNG (mode L)")
    return values


def _atomic_save(image: Image.Image, path: Path) -> None:
    """Save as PNG through a temporary file, so a crash never leaves half an image behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        image.save(tmp, format="PNG")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB array (or ``(H, W)`` grayscale) as PNG; parent dirs are created."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(
            f"write_png({path}): expected (H, W, 3) or (H, W) uint8, got {arr.shape} {arr.dtype}"
        )
    _atomic_save(Image.fromarray(np.ascontiguousarray(arr)), Path(path))


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write an ``(H, W)`` class-index mask (values 0..255) as a single-channel (mode L) PNG."""
    arr = np.asarray(mask)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"write_mask({path}): expected an (H, W) integer mask, got {arr.shape} {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise ValueError(f"write_mask({path}): class ids must be in 0..255, got {arr.min()}..{arr.max()}")
    _atomic_save(Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))), Path(path))
