"""The read and decode stage of the Ray Data pipelines (CPU tasks), shared by the embed, evaluate and scan jobs.

``load_images`` fetches a batch's objects concurrently through fsspec (s3fs issues the GETs
in parallel; local files are read directly, never a FIFO or a device), decodes each image
once with ``detector_core.sources.images`` (JPEG draft decoding where a spec's training used it) and
resizes/crops it to the input of every extractor asked for: one column per extractor
(``pixels``, ``pixels_1`` ...), uint8, or float32 for DNF reference values. A failure is
recorded on the row (``error_stage`` / ``error_type`` / ``error_message``) and the row goes
on, so that every object ends as exactly one output row. ``jobs.scanning.pipeline`` runs the
extractors and detectors on what this stage makes.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

import numpy as np

from detector_core import schema as S
from detector_core.method.perturb import parse_perturbation
from detector_core.sources.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    quality_from_table_sum,
)
from detector_core.sources.inputs import draft_size_for
from detector_core.sources.jpeg_header import read_header, route
from detector_core.sources.provenance import read_evidence
from detector_core.sources.watermark import with_watermark
from detector_core.storage import is_local_fs, is_remote, open_fs

__all__ = ["ENCODED", "ERROR_COLUMNS", "ORIENTATION", "PIXELS", "ReadRefused", "has_error", "load_images", "pixel_column"]


PIXELS = "pixels"
# The nvjpeg backend's rows that the GPU decodes: the file's bytes and its EXIF orientation travel
# instead of pixels (internal columns, like the pixels: never written to a table).
ENCODED = "encoded"
ORIENTATION = "orientation"
INTERNAL_COLUMNS = (ENCODED, ORIENTATION)
ERROR_COLUMNS = (S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE)


def pixel_column(i: int) -> str:
    """The input column of the ``i``-th extractor of a ``load_images`` call."""
    return PIXELS if i == 0 else f"{PIXELS}_{i}"


class ReadRefused(OSError):
    """An object not read at all: too large, or not a regular file (a FIFO, a device)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _fetch_one_fs(fs, paths: list[str], listed: list, max_bytes: int, retries: int) -> dict[str, Any]:
    got: dict[str, Any] = {}
    todo = []
    for p, size in zip(paths, listed):
        if size is not None and size > max_bytes:
            got[p] = ReadRefused("too_large", f"{size} bytes, over --max-bytes {max_bytes}: not read")
            continue
        if is_local_fs(fs):
            try:
                st = os.stat(p)
            except OSError as exc:
                got[p] = FileNotFoundError(str(exc)) if isinstance(exc, FileNotFoundError) else exc
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never end
                got[p] = ReadRefused("not_regular_file", f"{p} is not a regular file: not read")
                continue
        todo.append(p)
    if todo:
        # Never more than max_bytes + 1 bytes of any object, whatever its listing said.
        try:
            fetched = fs.cat(todo, on_error="return", start=0, end=max_bytes + 1)
        except Exception:  # noqa: BLE001 - a failing batch call: fall back per object
            fetched = {}
            for p in todo:
                try:
                    fetched[p] = fs.cat_file(p, start=0, end=max_bytes + 1)
                except Exception as inner:  # noqa: BLE001
                    fetched[p] = inner
        if not isinstance(fetched, dict):  # a single path returns bytes
            fetched = {todo[0]: fetched}
        got.update({p: fetched.get(p, FileNotFoundError(p)) for p in todo})
    # Transient read failures (throttling, resets) get a few more tries with backoff;
    # a missing object does not.
    for attempt in range(retries):
        again = [p for p in todo if isinstance(got.get(p), Exception)
                 and not isinstance(got[p], (FileNotFoundError, PermissionError, ReadRefused))]
        if not again:
            break
        time.sleep(0.5 * 2**attempt)
        for p in again:
            try:
                got[p] = fs.cat_file(p, start=0, end=max_bytes + 1)
            except Exception as exc:  # noqa: BLE001 - recorded as the row's read error
                got[p] = exc
    for p in todo:
        if isinstance(got[p], bytes) and len(got[p]) > max_bytes:
            got[p] = ReadRefused("too_large", f"more than --max-bytes {max_bytes} bytes: not read further")
    return got


def _fetch(uris: list[str], storage_options: dict | None, retries: int = 3, max_bytes: int = DEFAULT_MAX_BYTES,
           sizes: list | None = None) -> dict[str, Any]:
    """uri -> bytes or the exception, each object through its own filesystem, concurrently where it can."""
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uris):
        groups.setdefault(u.split("://", 1)[0] if is_remote(u) else "", []).append(i)
    sizes = sizes or [None] * len(uris)
    out: dict[str, Any] = {}
    for members in groups.values():
        fs, _ = open_fs(uris[members[0]], storage_options)
        paths = [open_fs(uris[i], storage_options)[1] if is_remote(uris[i]) else uris[i] for i in members]
        got = _fetch_one_fs(fs, paths, [sizes[i] for i in members], max_bytes, retries)
        out.update({uris[i]: got[p] for i, p in zip(members, paths)})
    return out


def load_images(
    batch: dict[str, np.ndarray],
    specs: list | None = None,
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool | list[bool] = True,
    perturbation: str = "",
    perturb_seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    evidence: bool = False,
    trust_pem: str | None = None,
    watermarks: bool = False,
    preps: list | None = None,
) -> dict[str, np.ndarray]:
    """Read, decode and crop one batch of rows that have a ``uri`` column.

    ``perturbation`` (``jpeg:75``, ``blur:2`` …, ``detector_core.method.perturb``) is applied to
    the full-size decoded image before the model's resize and crop (no draft decoding then,
    so that JPEG re-compression and resizing act on the stored pixels). ``specs`` are
    resolved feature specs; each spec's images are decoded as ``feature_compute`` records (JPEG
    draft decoding where the spec allows it and ``draft`` -- one for all, or one per spec -- is on).
    ``evidence``: also read what each object's bytes declare about their origin
    (``detector_core.sources.provenance``; C2PA trust anchors ``trust_pem``) into the evidence
    columns, whether or not the image then decodes; ``watermarks``: also the invisible
    watermark, from a full-resolution decode (a JPEG decoded in draft is decoded again in full).
    ``preps``: the specs' CPU halves (``extractors.preprocess_for``) built by the caller, so that
    the task imports neither torch nor open_clip for a CLIP spec (jobs pass them; else built here).

    A spec whose input decodes with ``nvjpeg`` gets, for each JPEG that ``jpeg_header.route``
    sends to the GPU, the file's bytes (``ENCODED``) and EXIF orientation instead of pixels, and
    its metadata from the header; every other file is decoded here, in full. ``decode_path`` says
    which (``nvjpeg`` or ``pil``) for every decoded row.
    """
    if preps is None:
        from detector_core.method.extractors import preprocess_for

        preps = [preprocess_for(spec) for spec in specs]
    on_gpu = [getattr(p, "decode", "pil") == "nvjpeg" for p in preps]
    perturb = parse_perturbation(perturbation) if perturbation else None
    # Each spec's images are decoded as its training decoded them (feature_compute): a JPEG at
    # twice the spec's input where it allows draft, in full otherwise. An ensemble of specs that
    # disagree decodes a JPEG once per decode path (a draft decode is cheap next to a full one).
    drafts = draft if isinstance(draft, list) else [draft] * len(preps)
    draft_sizes = [draft_size_for(p, d and perturb is None) for p, d in zip(preps, drafts)]
    paths = list(dict.fromkeys(draft_sizes))
    n = len(batch[S.URI])
    # Rows the plan already failed (error_stage = list: no usable uri, a FIFO, a bad manifest value) are not read.
    preset = has_error(batch) if S.ERROR_STAGE in batch else np.zeros(n, dtype=bool)
    uris = [None if u is None else str(u) for u in batch[S.URI]]
    listed_sizes = [_size_or_none(v) for v in batch[S.SIZE]] if S.SIZE in batch else [None] * n
    read = [i for i in range(n) if not preset[i]]
    fetched = _fetch([uris[i] for i in read], storage_options, max_bytes=max_bytes, sizes=[listed_sizes[i] for i in read])
    pixels = [np.zeros((n, p.size, p.size, 3), dtype=p.dtype) for p in preps]
    size = np.full(n, -1, dtype=np.int64)
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    fmt = np.full(n, None, dtype=object)
    quality = np.full(n, None, dtype=object)  # what the shortcut report reads (detector_core.method.shortcuts)
    exif = np.zeros(n, dtype=bool)
    errors = {c: np.full(n, None, dtype=object) for c in ERROR_COLUMNS}
    found = {c: np.full(n, None, dtype=object) for c in S.EVIDENCE_COLUMNS} if evidence else {}
    path_taken = np.full(n, None, dtype=object)
    encoded = np.full(n, None, dtype=object) if any(on_gpu) else None
    orientation = np.ones(n, dtype=np.int8) if any(on_gpu) else None

    def record(i, stage, kind, message):
        errors[S.ERROR_STAGE][i], errors[S.ERROR_TYPE][i], errors[S.ERROR_MESSAGE][i] = stage, kind, message[:500]

    def keep_evidence(i, ev):
        if ev is not None:
            for col, value in zip(S.EVIDENCE_COLUMNS, (ev.declared, ev.source, ev.generator, ev.c2pa_state, ev.error, ev.watermark)):
                found[col][i] = value

    for i in np.flatnonzero(preset):
        record(i, str(batch[S.ERROR_STAGE][i]), str(batch[S.ERROR_TYPE][i]), str(batch[S.ERROR_MESSAGE][i]))
        size[i] = listed_sizes[i] if listed_sizes[i] is not None else -1
    for i in read:
        uri = uris[i]
        data = fetched[uri]
        if isinstance(data, BaseException):
            kind = data.kind if isinstance(data, ReadRefused) else "not_found" if isinstance(data, FileNotFoundError) else type(data).__name__
            record(i, "read", kind, f"{type(data).__name__}: {data}")
            size[i] = listed_sizes[i] if listed_sizes[i] is not None else -1
            continue
        # The listing's size is what the next scan compares with: keep it, so an object whose manifest
        # size is wrong is still settled (the bytes read are what was decoded either way).
        size[i] = listed_sizes[i] if listed_sizes[i] is not None else len(data)
        ev = read_evidence(data, trust_pem) if evidence else None  # from the bytes already here; never raises
        header = read_header(data) if encoded is not None and perturb is None else None
        if header is not None and route(header, max_pixels) == "nvjpeg":
            encoded[i], orientation[i], path_taken[i] = data, header.orientation, "nvjpeg"
            width[i], height[i], fmt[i], exif[i] = header.width, header.height, "JPEG", header.exif
            quality[i] = quality_from_table_sum(header.luma_table_sum) if header.luma_table_sum is not None else None
            if all(on_gpu) and not (ev is not None and watermarks):
                keep_evidence(i, ev)
                continue
        try:
            # JPEG DCT scaling: decode at >= 2x the model input, never below it.
            first = decode_image(data, max_pixels=max_pixels, draft_size=paths[0])
            # Draft sizes only change how a JPEG is decoded: other formats decode once.
            images = {d: first if (d == paths[0] or first.format != "JPEG") else decode_image(data, max_pixels=max_pixels, draft_size=d)
                      for d in paths}
            decoded = first
            views = {d: im.image if perturb is None else perturb.apply(im.image, uri, perturb_seed) for d, im in images.items()}
            for out, prep, d, gpu in zip(pixels, preps, draft_sizes, on_gpu):
                if not (gpu and encoded[i] is not None):
                    out[i] = prep.to_input(views[d])
            if ev is not None and watermarks:  # the mark lives in the stored pixels: a full-resolution decode
                full = first if first.format != "JPEG" or not paths[0] else decode_image(data, max_pixels=max_pixels)
                ev = with_watermark(ev, np.asarray(full.image))
        except ImageDecodeError as exc:
            record(i, "decode", exc.kind, exc.message)
            continue
        except Exception as exc:  # noqa: BLE001 - any other failure is still one error row
            record(i, "decode", type(exc).__name__, str(exc))
            continue
        finally:
            keep_evidence(i, ev)
        width[i], height[i], fmt[i] = decoded.width, decoded.height, decoded.format
        quality[i], exif[i] = decoded.jpeg_quality, decoded.exif
        if path_taken[i] is None:
            path_taken[i] = "pil"
    out = {k: v for k, v in batch.items()}
    out.update({pixel_column(j): p for j, p in enumerate(pixels)})
    out.update({S.SIZE: size, S.WIDTH: width, S.HEIGHT: height, S.FORMAT: fmt, S.JPEG_QUALITY: quality, S.EXIF: exif, **errors, **found,
                S.DECODE_PATH: path_taken})
    if encoded is not None:
        out.update({ENCODED: encoded, ORIENTATION: orientation})
    return out


def _size_or_none(v) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return int(v)


def has_error(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Rows that failed in an earlier stage (error_stage set)."""
    return np.array([isinstance(e, str) for e in batch[S.ERROR_STAGE]], dtype=bool)
