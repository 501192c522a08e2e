"""Safe decoding: every odd format gives the RGB a viewer shows; hostile bytes give a typed error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from detector_core.sources.images import ImageDecodeError, decode_image


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _px(dec, xy=(0, 0)):
    return dec.image.getpixel(xy)


def test_cmyk_jpeg():
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    dec = decode_image(_save(im, "JPEG", quality=100))
    assert dec.image.mode == "RGB" and dec.mode == "CMYK"
    assert all(c >= 250 for c in _px(dec))


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.zeros((4, 4), dtype=np.uint16)
    arr[0, 0], arr[0, 1], arr[0, 2] = 65535, 32896, 257
    dec = decode_image(_save(Image.fromarray(arr), "PNG"))
    assert _px(dec, (0, 0)) == (255, 255, 255)
    assert _px(dec, (1, 0)) == (128, 128, 128)
    assert _px(dec, (2, 0)) == (1, 1, 1)


def test_palette_with_transparency_composites_over_white():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    dec = decode_image(_save(im, "PNG", transparency=0))
    assert _px(dec, (0, 0)) == (255, 255, 255)  # transparent black shows as the white page
    assert _px(dec, (1, 1)) == (255, 0, 0)


def test_rgba_half_alpha():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert _px(decode_image(_save(im, "PNG"))) == (127, 127, 127)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    dec = decode_image(data)
    assert dec.n_frames == 3 and dec.format == "GIF"
    r, g, b = _px(dec)
    assert r > 200 and g < 50 and b < 50


def test_webp_and_greyscale_and_bilevel():
    dec = decode_image(_save(Image.new("RGB", (10, 6), (10, 200, 30)), "WEBP", lossless=True))
    assert dec.format == "WEBP" and _px(dec) == (10, 200, 30)
    assert _px(decode_image(_save(Image.new("L", (5, 5), 77), "PNG"))) == (77, 77, 77)
    assert _px(decode_image(_save(Image.new("1", (5, 5), 1), "PNG"))) == (255, 255, 255)
    assert _px(decode_image(_save(Image.new("LA", (5, 5), (0, 0)), "PNG"))) == (255, 255, 255)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    dec = decode_image(_save(im, "JPEG", exif=exif, quality=100))
    assert (dec.width, dec.height) == (40, 20)  # as stored
    assert dec.image.size == (20, 40)  # as displayed
    top = dec.image.getpixel((10, 2))
    bottom = dec.image.getpixel((10, 37))
    assert top[0] > 200 and top[2] < 60  # the red half ends on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60


def test_jpeg_draft_keeps_at_least_the_requested_size():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 1200, 3), dtype=np.uint8))
    dec = decode_image(_save(im, "JPEG"), draft_size=448)
    assert min(dec.image.size) >= 448 and dec.image.size[0] < 1200
    assert (dec.width, dec.height) == (1200, 1600)


def _bomb_png(width: int, height: int) -> bytes:
    raw = zlib.compress(b"\x00" * 9)
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(4096), "not_an_image"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not_an_image"),
        (_bomb_png(60000, 60000), "too_large"),
    ],
    ids=["empty", "random", "html", "bomb"],
)
def test_hostile_bytes_raise_typed_error(data, kind):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.kind == kind


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected_not_padded(fmt):
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _save(im, fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.kind in ("truncated", "corrupt")


def test_custom_pixel_limit():
    data = _save(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="too_large"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10000).image.size == (100, 100)
