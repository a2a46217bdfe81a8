"""Broken inputs of the kinds a line camera share really produces (shared by the tests)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (e.g. a 20000x20000 decompression bomb) with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def write_bad_files(folder: Path) -> dict[str, Path]:
    """Truncated, zero-byte, non-image and decompression-bomb files; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_tmp_good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.unlink()
    files = {
        "truncated": folder / "truncated.png",
        "empty": folder / "empty.png",
        "not_image": folder / "notes.png",
        "bomb": folder / "bomb.png",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["not_image"].write_text("operator notes: camera 3 lens cleaned at 14:02\n")
    png_header_only(files["bomb"], 20000, 20000)
    return files


def write_industrial_images(folder: Path, size: int = 64) -> dict[str, Path]:
    """16-bit grayscale, 8-bit grayscale and RGBA images (what industrial cameras produce); all readable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    g16 = (rng.integers(0, 4096, (size, size)) * 16).astype(np.uint16)
    files = {
        "gray16": folder / "cam_gray16.png",
        "gray8": folder / "cam_gray8.png",
        "rgba": folder / "cam_rgba.png",
    }
    Image.fromarray(g16).save(files["gray16"])
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(files["gray8"])
    Image.fromarray(rng.integers(0, 255, (size, size, 4), dtype=np.uint8), mode="RGBA").save(files["rgba"])
    return files
