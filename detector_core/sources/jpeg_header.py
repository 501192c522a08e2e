"""A JPEG's header, read without decoding it: which decoder may take the file, and what the file says of itself.

The GPU's hardware JPEG engine (nvJPEG's hardware backend, which torchvision's batched CUDA
``decode_jpeg`` uses) takes baseline Huffman JPEGs only: no progressive, arithmetic, lossless
or 12-bit files, no CMYK/YCCK or Adobe RGB, no 4:1:1. ``read_header`` walks the markers up to
the first scan (never the entropy-coded data) and ``route`` decides, from those bytes alone,
whether a file goes to the GPU (``nvjpeg``) or to Pillow on the CPU (``pil``): a deterministic
test of the header, never of load, so the same file always takes the same path
(docs/method.md section 12). Files that are not clearly whole (no end-of-image marker at the
end: truncated uploads) go to the CPU, whose decoder reports them as ``truncated`` rather than
padding them with grey.

The header also gives what the CPU decode records for every row (size, JPEG quality from the
quantisation table, EXIF present) and the EXIF orientation that the GPU path applies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from detector_core.sources.containers import MalformedJpeg, jpeg_segments

__all__ = ["GPU_MAX_SIDE", "JpegHeader", "read_header", "route"]

# nvJPEG's hardware decoder: 4:4:4, 4:2:2, 4:2:0 and 4:4:0 YCbCr (luma sampling over chroma 1x1).
_GPU_SAMPLING = {((1, 1), (1, 1), (1, 1)), ((2, 1), (1, 1), (1, 1)), ((2, 2), (1, 1), (1, 1)), ((1, 2), (1, 1), (1, 1))}
GPU_MAX_SIDE = 16384  # larger sides go to the CPU decoder (which applies --max-pixels as for any file)
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential", 0xC6: "differential",
        0xC7: "differential", 0xC9: "arithmetic", 0xCA: "arithmetic", 0xCB: "arithmetic", 0xCD: "arithmetic", 0xCE: "arithmetic",
        0xCF: "arithmetic"}
_MAX_HEADER = 1 << 20  # markers are searched in the first MiB only (a 50 MB APP segment is not read through)


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers before its first scan say."""

    process: str  # baseline, extended, progressive, lossless, differential, arithmetic
    precision: int
    width: int
    height: int
    components: int
    sampling: tuple  # (h, v) per component
    adobe_transform: int | None  # APP14: 0 = RGB/CMYK, 1 = YCbCr, 2 = YCCK; None without the segment
    orientation: int  # EXIF orientation, 1 (none) to 8
    exif: bool
    luma_table_sum: int | None  # sum of quantisation table 0 (images.estimate_jpeg_quality's input)
    whole: bool  # the bytes end with an end-of-image marker


def _exif_orientation(payload: bytes) -> int:
    """EXIF orientation (tag 0x0112 of IFD0) of an APP1 payload after ``Exif\\0\\0``; 1 when absent or unreadable."""
    if len(payload) < 8 or payload[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if payload[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", payload[4:8])
        (count,) = struct.unpack(end + "H", payload[ifd : ifd + 2])
        for i in range(min(count, 512)):
            at = ifd + 2 + 12 * i
            tag, typ = struct.unpack(end + "HH", payload[at : at + 4])
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack(end + "H", payload[at + 8 : at + 10])
                return int(value) if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def read_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG, or None when the bytes are not a JPEG whose markers can be walked to a frame header."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    frame = None
    adobe, orientation, exif, luma = None, 1, False, None
    try:
        segments = list(jpeg_segments(data, _MAX_HEADER))
    except MalformedJpeg:
        return None
    for marker, start, end in segments:
        body = data[start + 4 : end]
        if marker in _SOF and len(body) >= 6:
            precision, height, width, comps = body[0], *struct.unpack(">HH", body[1:5]), body[5]
            sampling = tuple((body[6 + 3 * i + 1] >> 4, body[6 + 3 * i + 1] & 15) for i in range(comps) if 6 + 3 * i + 2 < len(body))
            frame = (_SOF[marker], precision, width, height, comps, sampling)
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        elif marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            exif = True
            orientation = _exif_orientation(body[6:])
        elif marker == 0xDB:
            at = 0
            while at < len(body):
                pq, tq = body[at] >> 4, body[at] & 15
                size = 128 if pq else 64
                values = body[at + 1 : at + 1 + size]
                if tq == 0 and luma is None:
                    luma = sum(values) if not pq else sum(struct.unpack(">64H", values)) if len(values) == 128 else None
                at += 1 + size
    if frame is None:
        return None
    tail = data[-4096:].rstrip(b"\x00")  # some writers pad after the end marker (longer padding: the CPU path)
    return JpegHeader(*frame, adobe_transform=adobe, orientation=orientation, exif=exif, luma_table_sum=luma,
                      whole=tail[-2:] == b"\xff\xd9")


def route(header: JpegHeader | None, max_pixels: int) -> str:
    """``nvjpeg`` when the GPU's hardware decoder takes the file whole, else ``pil``; from the header alone."""
    if header is None or not header.whole or header.process != "baseline" or header.precision != 8:
        return "pil"
    if header.components != 3 or header.sampling not in _GPU_SAMPLING or header.adobe_transform in (0, 2):
        return "pil"
    if not (0 < header.width <= GPU_MAX_SIDE and 0 < header.height <= GPU_MAX_SIDE) or header.width * header.height > max_pixels:
        return "pil"
    return "nvjpeg"
