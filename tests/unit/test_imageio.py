"""loom.data.imageio: all modes read to (H, W, 3) uint8, bad files fail with a reason, bombs before decode."""

from __future__ import annotations

import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loom.data.imageio import (
    ImageReadError,
    MaskError,
    image_size,
    is_plain_rgb8_png,
    read_image,
    read_mask,
    scale_high_bit_depth,
    write_mask,
    write_png,
)


def mode_of(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


def write_bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid 1-bit all-black PNG of the given size, written row-stream-wise (~50 KB, no big allocation)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def gradient(h: int = 24, w: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with distinct channels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def check_rgb(arr: np.ndarray, hw: tuple[int, int]) -> None:
    assert arr.dtype == np.uint8 and arr.shape == (*hw, 3)


# ---- modes ----------------------------------------------------------------------------------------------


def test_rgb8_round_trip_is_exact(tmp_path: Path) -> None:
    rgb = gradient()
    write_png(tmp_path / "deep" / "rgb.png", rgb)  # parent created
    np.testing.assert_array_equal(read_image(tmp_path / "deep" / "rgb.png"), rgb)


def test_gray_l_is_replicated(tmp_path: Path) -> None:
    gray = gradient()[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "l.png")
    out = read_image(tmp_path / "l.png")
    check_rgb(out, gray.shape)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_gray16_full_range_maps_to_255(tmp_path: Path) -> None:
    gray = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert mode_of(tmp_path / "g16.png").startswith("I")
    out = read_image(tmp_path / "g16.png")
    check_rgb(out, (16, 16))
    assert out.max() == 255 and out.min() == 0
    np.testing.assert_allclose(out[:, :, 0].astype(float), gray / 257.0, atol=1)


def test_12bit_data_in_16bit_container_is_not_dark(tmp_path: Path) -> None:
    gray = np.linspace(0, 4095, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g12.png")
    out = read_image(tmp_path / "g12.png")
    assert out.max() == 255 and out.mean() > 100  # a plain >> 8 would give max 15
    # a dim 12-bit frame stays dim relative to its bit depth, it is not stretched to 255
    dim = np.full((8, 8), 2048, np.uint16)
    dim[0, 0] = 3000
    Image.fromarray(dim).save(tmp_path / "dim.png")
    assert read_image(tmp_path / "dim.png")[1, 1, 0] == round(2048 * 255 / 4095)


def test_mode_i_32bit_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [2000, 4095]], np.int32)
    Image.fromarray(values).save(tmp_path / "i.tif")
    assert mode_of(tmp_path / "i.tif") == "I"
    out = read_image(tmp_path / "i.tif")
    assert out[1, 1, 0] == 255 and out[0, 0, 0] == 0 and 120 < out[1, 0, 0] < 130


def test_rgb16_png_uses_the_used_bit_depth(tmp_path: Path) -> None:
    import cv2  # installed with label-studio-sdk

    rgb12 = (gradient().astype(np.uint16) * 16).clip(0, 4095)  # 12-bit colour data
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb12[:, :, ::-1])  # OpenCV writes BGR
    out = read_image(tmp_path / "rgb16.png")
    check_rgb(out, rgb12.shape[:2])
    expected = np.round(rgb12 * (255 / 4095)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.dstack([gradient(), np.zeros((24, 32), np.uint8)])  # fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), gradient())


def test_la_palette_cmyk_1bit_float(tmp_path: Path) -> None:
    gray = gradient()[:, :, 1]
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[:, :, 2], gray)

    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.putdata([0, 1, 2, 1, 1, 1, 2, 0])
    pal.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert (
        tuple(out[0, 1]) == (255, 0, 0) and tuple(out[0, 2]) == (0, 255, 0) and tuple(out[0, 0]) == (0, 0, 0)
    )

    Image.fromarray(gradient()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    check_rgb(cmyk, (24, 32))
    assert np.abs(cmyk.astype(int) - gradient().astype(int)).mean() < 12

    bits = Image.fromarray(np.eye(8, dtype=bool))
    bits.save(tmp_path / "b.png")
    assert bits.mode == "1"
    out = read_image(tmp_path / "b.png")
    assert out[3, 3, 0] == 255 and out[3, 4, 0] == 0

    Image.fromarray(np.array([[0.0, 0.5], [1.0, np.nan]], np.float32)).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    assert out[:, :, 0].tolist() == [[0, 128], [255, 0]]


def test_exif_orientation_matches_pillow(tmp_path: Path) -> None:
    base = Image.fromarray(gradient(6, 10))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        base.save(path, exif=exif)
        with Image.open(path) as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        out = read_image(path)
        np.testing.assert_array_equal(out, expected, err_msg=f"orientation {orientation}")
        assert image_size(path) == (out.shape[1], out.shape[0])
    assert read_image(tmp_path / "o6.png").shape == (10, 6, 3)


def test_line_scan_frame_passes_and_image_size(tmp_path: Path) -> None:
    Image.new("L", (4096, 256), 90).save(tmp_path / "line.png")
    assert image_size(tmp_path / "line.png") == (4096, 256)
    assert read_image(tmp_path / "line.png").shape == (256, 4096, 3)


def test_is_plain_rgb8_png(tmp_path: Path) -> None:
    def encoded(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
        path = tmp_path / f"x.{fmt.lower()}"
        image.save(path, format=fmt, **kwargs)
        return path.read_bytes()

    rgb = Image.fromarray(gradient())
    assert is_plain_rgb8_png(encoded(rgb))
    assert not is_plain_rgb8_png(encoded(rgb.convert("RGBA")))
    assert not is_plain_rgb8_png(encoded(rgb.convert("L")))
    assert not is_plain_rgb8_png(encoded(rgb, "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert not is_plain_rgb8_png(encoded(rgb, exif=exif))


# ---- bad files -------------------------------------------------------------------------------------------


def reason_of(path: Path, **kwargs: int) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    err = info.value
    assert err.path == path and str(path) in str(err) and err.reason in str(err)
    assert err.hint and err.hint in str(err)  # says what to do
    return err.reason


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason_of(tmp_path / "empty.png") == "empty file (0 bytes)"
    err = ImageReadError(tmp_path / "empty.png", "empty file (0 bytes)")
    copy = pickle.loads(pickle.dumps(err))  # errors cross process boundaries in task runners
    assert (type(copy), copy.path, copy.reason, str(copy)) == (ImageReadError, err.path, err.reason, str(err))


def test_text_file_renamed_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("shift report: loom 4 stopped twice\n")
    assert reason_of(tmp_path / "notes.png").startswith("not an image")


def test_missing_file(tmp_path: Path) -> None:
    assert reason_of(tmp_path / "gone.png").startswith("missing")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noise: compressed data is large
    path = tmp_path / f"t.{fmt.lower()}"
    Image.fromarray(noisy).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert reason_of(path).startswith("truncated or corrupt")


def test_bomb_rejected_by_header_check(tmp_path: Path) -> None:
    start = time.perf_counter()
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert time.perf_counter() - start < 2.0
    assert bomb.stat().st_size < 200_000
    start = time.perf_counter()
    assert image_size(bomb) == (20000, 20000)
    assert time.perf_counter() - start < 0.5  # the header only
    start = time.perf_counter()
    reason = reason_of(bomb)
    assert time.perf_counter() - start < 0.5  # refused from the header, never decoded
    assert reason == "too large: 20000x20000 = 400.0 MP exceeds the 64 MP limit (LOOM_MAX_IMAGE_PIXELS)"


def test_pixel_limit_from_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "x.png")
    assert reason_of(tmp_path / "x.png", max_pixels=9999).startswith("too large")
    monkeypatch.setenv("LOOM_MAX_IMAGE_PIXELS", "5000")
    assert reason_of(tmp_path / "x.png").startswith("too large")
    monkeypatch.setenv("LOOM_MAX_IMAGE_PIXELS", "10000")
    assert read_image(tmp_path / "x.png").shape == (100, 100, 3)


def test_scale_high_bit_depth_rule() -> None:
    assert scale_high_bit_depth(np.array([0, 255], np.uint16)).tolist() == [0, 255]  # 8-bit data kept
    assert scale_high_bit_depth(np.array([0, 1023], np.uint16)).tolist() == [0, 255]  # 10-bit
    assert scale_high_bit_depth(np.array([-5, 65535], np.int32)).tolist() == [0, 255]


# ---- masks -----------------------------------------------------------------------------------------------


def test_mask_round_trip_and_grayscale_rgb(tmp_path: Path) -> None:
    mask = np.zeros((8, 12), np.uint8)
    mask[2:4, 3:6] = 2
    mask[5, 7] = 6
    write_mask(tmp_path / "m" / "a.png", mask)
    assert mode_of(tmp_path / "m" / "a.png") == "L"
    np.testing.assert_array_equal(read_mask(tmp_path / "m" / "a.png", 6, (8, 12)), mask)
    Image.fromarray(np.dstack([mask] * 3)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png", 6), mask)


def mask_reason(path: Path, n_classes: int, hw: tuple[int, int] | None = None) -> str:
    with pytest.raises(MaskError) as info:
        read_mask(path, n_classes, hw)
    assert str(path) in str(info.value) and info.value.reason in str(info.value)
    return info.value.reason


def test_bad_masks(tmp_path: Path) -> None:
    write_mask(tmp_path / "small.png", np.zeros((8, 12), np.uint8))
    assert (
        mask_reason(tmp_path / "small.png", 6, (16, 12)) == "wrong size: mask is 12x8 but its image is 12x16"
    )

    binary = np.zeros((4, 4), np.uint8)
    binary[1, 1] = 255
    write_mask(tmp_path / "bin.png", binary)
    assert "unknown class ids [255]" in mask_reason(tmp_path / "bin.png", 6)

    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    assert "differing channels" in mask_reason(tmp_path / "colour.png", 6)

    (tmp_path / "empty.png").write_bytes(b"")
    assert mask_reason(tmp_path / "empty.png", 6) == "empty file (0 bytes)"


def test_writers_reject_wrong_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"0\.\.255"):
        write_mask(tmp_path / "m.png", np.full((4, 4), 300, np.int32))
    assert not list(tmp_path.iterdir())


# ---- formats, signatures and file size -------------------------------------------------------------------


def test_formats_outside_the_list_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import PIL.EpsImagePlugin

    def no_ghostscript(*args: object, **kwargs: object) -> None:
        raise AssertionError("an EPS file reached Ghostscript")

    monkeypatch.setattr(PIL.EpsImagePlugin, "Ghostscript", no_ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    (tmp_path / "drawing.png").write_bytes(eps)
    assert reason_of(tmp_path / "drawing.png").startswith("unsupported format EPS: Loom reads PNG, JPEG")
    Image.fromarray(gradient()).save(tmp_path / "icon.ico")
    assert reason_of(tmp_path / "icon.ico").startswith("unsupported format ICO")
    for fmt, ext in (("TGA", "tga"), ("PPM", "ppm"), ("WEBP", "webp"), ("BMP", "bmp")):  # accepted ones
        Image.fromarray(gradient()).save(
            tmp_path / f"ok.{ext}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
        )
        np.testing.assert_array_equal(read_image(tmp_path / f"ok.{ext}"), gradient())


def test_a_cut_header_names_its_format(tmp_path: Path) -> None:
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")):
        Image.fromarray(gradient()).save(tmp_path / f"x.{ext}", format=fmt)
        (tmp_path / f"x.{ext}").write_bytes((tmp_path / f"x.{ext}").read_bytes()[:12])
        assert reason_of(tmp_path / f"x.{ext}").startswith(f"truncated or corrupt {fmt} header"), fmt
    (tmp_path / "r.png").write_bytes(b"*" + bytes(range(200)))
    assert reason_of(tmp_path / "r.png") == "not an image: PIL cannot identify it"


def test_no_pixels_and_files_too_large_to_be_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.data.imageio import _check_pixels, max_file_bytes

    with pytest.raises(ImageReadError, match="no pixels: the header declares 0x16"):
        _check_pixels(tmp_path / "z.png", 0, 16, 100)
    assert max_file_bytes() == 8 * 64_000_000 + (1 << 24)
    monkeypatch.setenv("LOOM_MAX_IMAGE_PIXELS", "100")
    with open(tmp_path / "big.png", "wb") as f:
        f.truncate(max_file_bytes() + 1)  # sparse
    assert reason_of(tmp_path / "big.png").startswith("too large: file of 16.8 MB exceeds the 17 MB limit")
