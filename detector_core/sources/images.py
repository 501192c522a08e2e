"""Safe decoding of untrusted image bytes into RGB PIL images.

Buckets hold anything: empty objects, HTML saved as ``.jpg``, truncated uploads,
decompression bombs, CMYK JPEGs, 16-bit PNGs, palette images with transparency,
animations. ``decode_image`` turns bytes into an RGB image the way a viewer shows it
(EXIF orientation applied, alpha composited over white, 16-bit scaled to 8-bit, the
first frame of an animation) or raises ``ImageDecodeError`` with a ``kind`` that the
scan writes to its errors table. It never returns a silent black image and never
lets a Pillow exception other than the typed one escape.

``draft_size`` lets JPEGs decode at a reduced DCT scale (Pillow's ``draft``) when the
model needs far fewer pixels than the photo has; the result is still at least that
size on its shorter side.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from detector_core.sources.containers import PNG_SIGNATURE, png_without_text

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DecodedImage", "ImageDecodeError", "decode_image"]

# Pillow's own bomb limit is ~89 MP; 2**26 (~67 MP) still admits every camera photo
# while capping a decode at ~200 MB of RGB.
DEFAULT_MAX_PIXELS = 1 << 26
# Reads stop here: an object (or a link to /dev/zero) can never fill a decoder's memory.
DEFAULT_MAX_BYTES = 64 << 20

# Never decode a truncated file as if it were whole (it would pad with grey).
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """Bytes that cannot be turned into an image; ``kind`` says why.

    Kinds: ``empty``, ``not_an_image``, ``too_large``, ``truncated``, ``corrupt``,
    ``unsupported_mode``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass
class DecodedImage:
    """An RGB image and what the file said about itself."""

    image: Image.Image
    format: str
    width: int
    height: int
    mode: str
    n_frames: int
    jpeg_quality: int | None = None
    exif: bool = False


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        if mode == "F":
            scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
            arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255)
        elif mode == "I" and arr.max(initial=0) <= 255:
            arr8 = np.clip(arr, 0, 255)
        else:
            arr8 = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
        return Image.fromarray(np.rint(arr8).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError("unsupported_mode", f"cannot convert mode {mode} to RGB: {exc}") from exc


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """Decode untrusted bytes to RGB, or raise ``ImageDecodeError``.

    Args:
        data: the object's bytes.
        max_pixels: refuse images whose header claims more pixels (decompression bombs).
        draft_size: for JPEG, allow DCT downscaling as long as both sides stay at least
            this many pixels (None: full resolution). Other formats are always decoded in
            full: no pixel-domain filter measured so far matches DCT scaling
            (``python -m bench.bench_draft``).
    """
    if not data:
        raise ImageDecodeError("empty", "the object has no bytes")
    try:
        return _decode(data, max_pixels, draft_size)
    except ImageDecodeError as exc:
        # Pillow refuses a PNG whose text chunks pass its limits (MAX_TEXT_CHUNK, MAX_TEXT_MEMORY), and
        # inflates them all first. The evidence reader has already read (and bounded) that text: the
        # pixels are decoded without it, so a file that declares itself generated is still scored.
        if "MAX_TEXT" not in exc.message or not data.startswith(PNG_SIGNATURE):
            raise
    return _decode(png_without_text(data), max_pixels, draft_size)


def _decode(data: bytes, max_pixels: int, draft_size: int | None) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # We check the pixel count ourselves, against our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", "no image format recognises these bytes") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    fmt = im.format or "unknown"
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"image claims size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}")
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    mode = im.mode
    quality = estimate_jpeg_quality(im) if fmt == "JPEG" else None
    exif = bool(im.info.get("exif"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if n_frames > 1:
                im.seek(0)
            if draft_size and fmt == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", str(exc)) from exc
    except OSError as exc:
        kind = "truncated" if "truncat" in str(exc).lower() or "broken data stream" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(kind, f"{type(exc).__name__}: {exc}") from exc
    except (SyntaxError, ValueError, TypeError, EOFError, IndexError, MemoryError) as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a bad EXIF block must not cost the image its pixels
        pass
    try:
        rgb = _to_rgb(im)
    except ImageDecodeError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageDecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(image=rgb, format=fmt, width=width, height=height, mode=mode, n_frames=n_frames, jpeg_quality=quality,
                        exif=exif)


def draft_factor(width: int, height: int, draft_size: int) -> int:
    """The DCT scale Pillow's ``draft`` picks for a JPEG: the largest of 8, 4, 2, 1 that keeps both sides at least ``draft_size``."""
    scale = min(width // draft_size, height // draft_size)
    return next(a for a in (8, 4, 2, 1) if scale >= a)


# The luminance quantisation table of the JPEG standard (Annex K), which libjpeg scales by quality.
_STD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)


def _libjpeg_table_sum(quality: int) -> int:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sum(min(255, max(1, (q * scale + 50) // 100)) for q in _STD_LUMINANCE)


_TABLE_SUMS = {q: _libjpeg_table_sum(q) for q in range(1, 101)}


def estimate_jpeg_quality(im: Image.Image) -> int | None:
    """The libjpeg quality (1-100) whose scaled standard table is closest to the file's luminance table.

    libjpeg scales each entry of the standard table by ``5000/q`` (q < 50) or ``200 - 2q``
    percent and clamps it to [1, 255]; the table's sum is compared with the sum each quality
    gives (order-free, so the table's storage order does not matter). Exact for libjpeg-style
    encoders; for others an estimate of how coarsely the file was quantised. None when the
    file has no tables.
    """
    tables = getattr(im, "quantization", None)
    if not tables or 0 not in tables:
        return None
    return quality_from_table_sum(sum(tables[0]))


def quality_from_table_sum(total: int) -> int:
    """The libjpeg quality whose scaled standard luminance table's sum is closest to ``total``."""
    return min(_TABLE_SUMS, key=lambda q: (abs(_TABLE_SUMS[q] - total), q))
