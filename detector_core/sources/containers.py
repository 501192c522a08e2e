"""The structure of the image containers a scan reads, walked with bounds and never through the pixels.

``jpeg_segments``: a JPEG's marker segments up to its first scan (APPn with EXIF, XMP and C2PA's
JUMBF boxes; the frame and quantisation tables); ``png_chunks``: a PNG's chunks up to ``IEND``.
Both the header router (``jpeg_header``) and the evidence readers (``provenance``) walk files
through these two functions, so a malformed length is handled in one place.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["PNG_SIGNATURE", "MalformedJpeg", "Segment", "jpeg_segments", "png_chunks", "png_without_text"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NO_LENGTH = (0xD8, 0x01, *range(0xD0, 0xD8))  # SOI, TEM, RSTn: markers without a length field


class MalformedJpeg(ValueError):
    """The marker structure breaks before the first scan: no marker where one must be, or a length under 2."""


class Segment(NamedTuple):
    """One JPEG marker segment: ``data[start:end]`` is the whole of it (marker, length, body); ``body`` starts at ``start + 4``."""

    marker: int
    start: int
    end: int


def jpeg_segments(data: bytes, limit: int | None = None) -> Iterator[Segment]:
    """The marker segments of a JPEG after its SOI, up to its first scan (SOS) or end marker, within ``limit`` bytes.

    Raises ``MalformedJpeg`` where the structure breaks; what was yielded before stays valid.
    """
    pos, n = 2, len(data) if limit is None else min(len(data), limit)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise MalformedJpeg(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: the header is over
            return
        if marker in _NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise MalformedJpeg(f"marker {marker:#04x} at byte {pos} has length {length}")
        yield Segment(marker, pos, pos + 2 + length)
        pos += 2 + length


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, data length) of each chunk of a PNG, up to and including ``IEND``; the chunk's data is
    ``data[offset + 8 : offset + 8 + length]`` and may be cut short where the file is."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        yield kind, pos, length
        if kind == b"IEND":
            return
        pos += 12 + length


def png_without_text(data: bytes) -> bytes:
    """The PNG ``data`` without its text chunks (``tEXt``, ``zTXt``, ``iTXt``): the same pixels, for a decoder that refuses
    the text (Pillow's limits on it), while the evidence reader has already read what the text declares."""
    parts, last = [data[:8]], 8
    for kind, pos, length in png_chunks(data):
        end = pos + 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            parts.append(data[last:pos])
            last = end
    parts.append(data[last:])
    return b"".join(parts)
