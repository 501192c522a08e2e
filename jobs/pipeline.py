"""The read -> decode -> embed stages on Ray Data, shared by the embed and scan jobs.

One implementation for every job that turns object URIs into detector features, for
either feature family (``detector_core.extractors``: CLIP or DNF):

- ``load_images`` (CPU tasks): fetch the objects' bytes concurrently through fsspec
  (s3fs issues the GETs in parallel), decode each image once with ``detector_core.images``
  and resize/crop it to the input of every extractor asked for, as uint8 (float32 for DNF reference values; ``pixels`` for
  the first, ``pixels_1`` ... for the others: an ensemble scan decodes once). A failure is
  recorded on the row (``error_stage`` / ``error_type`` / ``error_message``) and the row
  goes on, so that every object ends as exactly one output row.
- ``Embedder`` (GPU actors, CPU here): normalises on the device and runs the frozen
  extractor; rows that failed earlier pass through with null features.
- ``Scorer`` (the scan's GPU actors): every detector of a scan on one device, each
  extractor run once, logit / score / decision per object and detector.

Columns are named in ``detector_core.schema``.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from scipy.special import expit

from detector_core import schema as S
from detector_core.bundle import DetectorBundle, load_bundle
from detector_core.cache import fixed_list
from detector_core.devices import select_device
from detector_core.extractors import FeatureSpec, build_extractor, draft_size_for, preprocess_for
from detector_core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from detector_core.perturb import parse_perturbation
from detector_core.state import todo_column
from detector_core.storage import is_local_fs, is_remote, open_fs
from detector_core.training import predict_logits

PIXELS = "pixels"
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
    specs: list[FeatureSpec],
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool | list[bool] = True,
    perturbation: str = "",
    perturb_seed: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Read, decode and crop one batch of rows that have a ``uri`` column.

    ``perturbation`` (``jpeg:75``, ``blur:2`` …, ``detector_core.perturb``) is applied to
    the full-size decoded image before the model's resize and crop (no draft decoding then,
    so that JPEG re-compression and resizing act on the stored pixels). ``specs`` are
    resolved feature specs; each spec's images are decoded as ``feature_compute`` records (JPEG
    draft decoding where the spec allows it and ``draft`` -- one for all, or one per spec -- is on).
    """
    preps = [preprocess_for(spec) for spec in specs]
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
    quality = np.full(n, None, dtype=object)  # what the shortcut report reads (detector_core.shortcuts)
    exif = np.zeros(n, dtype=bool)
    errors = {c: np.full(n, None, dtype=object) for c in ERROR_COLUMNS}

    def record(i, stage, kind, message):
        errors[S.ERROR_STAGE][i], errors[S.ERROR_TYPE][i], errors[S.ERROR_MESSAGE][i] = stage, kind, message[:500]

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
        try:
            # JPEG DCT scaling: decode at >= 2x the model input, never below it.
            first = decode_image(data, max_pixels=max_pixels, draft_size=paths[0])
            # Draft sizes only change how a JPEG is decoded: other formats decode once.
            images = {d: first if (d == paths[0] or first.format != "JPEG") else decode_image(data, max_pixels=max_pixels, draft_size=d)
                      for d in paths}
            decoded = first
            views = {d: im.image if perturb is None else perturb.apply(im.image, uri, perturb_seed) for d, im in images.items()}
            for out, prep, d in zip(pixels, preps, draft_sizes):
                out[i] = prep.to_input(views[d])
        except ImageDecodeError as exc:
            record(i, "decode", exc.kind, exc.message)
            continue
        except Exception as exc:  # noqa: BLE001 - any other failure is still one error row
            record(i, "decode", type(exc).__name__, str(exc))
            continue
        width[i], height[i], fmt[i] = decoded.width, decoded.height, decoded.format
        quality[i], exif[i] = decoded.jpeg_quality, decoded.exif
    out = {k: v for k, v in batch.items()}
    out.update({pixel_column(j): p for j, p in enumerate(pixels)})
    out.update({S.SIZE: size, S.WIDTH: width, S.HEIGHT: height, S.FORMAT: fmt, S.JPEG_QUALITY: quality, S.EXIF: exif, **errors})
    return out


def _size_or_none(v) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return int(v)


class Embedder:
    """Ray Data actor: resized images (+ captions) -> features of one extractor, one model per actor.

    Output rows drop the pixels and gain ``features`` (fixed-size float32 list; null for
    rows that failed before) and ``clip_id`` (the extractor's id, ``FeatureSpec.id``).
    """

    def __init__(self, spec: FeatureSpec, storage_options: dict | None = None, precision: str = "auto", pixels: str = PIXELS,
                 device: torch.device | None = None, gpu: bool = False):
        # --gpu on a node where CUDA does not work fails here, in the actor's start, rather than run on the CPU.
        self.device = device if device is not None else select_device(gpu)
        self.spec = spec
        self.extractor = build_extractor(spec, self.device, precision, storage_options)
        self.dim = spec.dim
        self.pixels = pixels

    def extract(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """(features of the rows without an earlier error, on the device; the mask of those rows)."""
        ok = ~has_error(batch)
        if not ok.any():
            return torch.zeros((0, self.dim), device=self.device), ok
        pixels = torch.from_numpy(np.ascontiguousarray(batch[self.pixels][ok]))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        captions = None
        if self.spec.needs_captions:
            captions = [None if c is None else str(c) for c in batch[S.CAPTION][ok]]
        jpeg = np.asarray(batch[S.FORMAT][ok] == "JPEG", dtype=bool)  # DNF reference values round-trip a JPEG source's noise
        return self.extractor.extract(pixels.to(self.device, non_blocking=True), captions, jpeg), ok

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        feats, ok = self.extract(batch)
        matrix = np.zeros((len(ok), self.dim), dtype=np.float32)
        matrix[ok] = feats.cpu().numpy()
        return to_table(batch, {S.FEATURES: fixed_list(matrix, ok), S.CLIP_ID: pa.array([self.spec.id] * len(ok), pa.string())})


def has_error(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Rows that failed in an earlier stage (error_stage set)."""
    return np.array([isinstance(e, str) for e in batch[S.ERROR_STAGE]], dtype=bool)


# Fixed types, so that every block (and every Parquet file) has the same schema even
# when a batch's column is all null.
COLUMN_TYPES = {c: S.TYPES[c] for c in (S.URI, S.LABEL, S.CAPTION, S.GENERATOR, S.SPLIT, S.SIZE, S.ETAG, S.WIDTH, S.HEIGHT,
                                        S.FORMAT, S.JPEG_QUALITY, S.EXIF, S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE)}


def to_table(batch: dict[str, np.ndarray], extra: dict[str, pa.Array]) -> pa.Table:
    """The batch without pixels, plus ``extra`` columns, as an Arrow table."""
    cols = {}
    for k, v in batch.items():
        if k == PIXELS or k.startswith(PIXELS + "_"):
            continue
        typ = COLUMN_TYPES.get(k)
        if typ == pa.string() and v.dtype != object:
            # An all-null column comes back from Arrow as float NaN (or null type).
            cols[k] = pa.nulls(len(v), pa.string())
            continue
        # A nullable integer column may come back from Arrow as float with NaN for its nulls.
        cols[k] = pa.array(list(v) if v.dtype == object else v, type=typ,
                           from_pandas=v.dtype.kind == "f" and typ is not None and pa.types.is_integer(typ))
    cols.update(extra)
    return pa.table(cols)


def feature_specs(bundles: list[DetectorBundle]) -> list[FeatureSpec]:
    """The distinct extractors of some detectors, in order (``load_images`` makes one input column each)."""
    return list(dict.fromkeys(b.features for b in bundles))


def trained_draft(bundle: DetectorBundle) -> bool:
    """Whether the bundle's training decoded JPEGs with DCT scaling (bundles from before it was recorded: yes)."""
    size = (bundle.feature_compute or {}).get("jpeg_draft_size")
    return size is None or size > 0 or draft_size_for(preprocess_for(bundle.features)) is None


def feature_drafts(bundles: list[DetectorBundle]) -> list[bool]:
    """Per ``feature_specs`` entry, whether to draft-decode its JPEGs: as its detectors' training did.

    Raises ``ValueError`` when two detectors of one extractor were trained with different decodes.
    """
    out = []
    for spec in feature_specs(bundles):
        ways = {b.detector_id: trained_draft(b) for b in bundles if b.features == spec}
        if len(set(ways.values())) > 1:
            raise ValueError(f"detectors {', '.join(ways)} share the extractor {spec.id} but their training decoded JPEGs "
                             "differently (--jpeg-draft / --no-jpeg-draft); scan them in separate runs")
        out.append(next(iter(ways.values())))
    return out


class Scorer:
    """Ray Data actor: input images -> each detector's features -> logit, score, decision.

    Holds every detector of the scan on one device; an extractor shared by several
    detectors runs once. Rows that failed to read or decode pass through with their
    error and no score, once per detector.
    """

    def __init__(self, bundle_uris: list[str], scan_id: str, storage_options: dict | None = None, crash_marker: str = "",
                 load_counter=None, device: str | None = None, gpu: bool = False):
        self.crash_marker = crash_marker
        self.device = torch.device(device) if device else select_device(gpu)
        self.bundles = [load_bundle(u, storage_options, device=self.device) for u in bundle_uris]
        self.embedders = {spec: Embedder(spec, storage_options, pixels=pixel_column(j), device=self.device)
                          for j, spec in enumerate(feature_specs(self.bundles))}
        self.scan_id = scan_id
        if load_counter is not None:
            # Models are built once per actor and scan: the scan's summary reports how often that happened.
            load_counter.add.remote()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os._exit(1)  # a hard actor death, as from an OOM kill or a lost node
        n = len(batch[S.URI])
        todo = [np.asarray(batch[todo_column(i)], dtype=bool) if todo_column(i) in batch else np.ones(n, dtype=bool)
                for i in range(len(self.bundles))]
        feats = {}
        for spec, embedder in self.embedders.items():
            if any(t.any() for b, t in zip(self.bundles, todo) if b.features == spec):
                feats[spec] = embedder.extract(batch)
        now = dt.datetime.now(dt.timezone.utc)
        parts = []
        for b, rows in zip(self.bundles, todo):
            if not rows.any():
                continue
            x, ok = feats[b.features]
            logits = np.full(n, np.nan, dtype=np.float64)
            if ok.any():
                logits[ok] = predict_logits(b.model, x).double().cpu().numpy()
            scores = expit(logits)
            table = to_table(batch, {
                S.LOGIT: pa.array(logits, mask=~ok),
                S.SCORE: pa.array(scores, mask=~ok),
                S.THRESHOLD: pa.array(np.full(n, b.threshold)),
                S.FLAGGED: pa.array(logits >= b.threshold_logit, mask=~ok),
                S.DETECTOR_ID: pa.array([b.detector_id] * n, pa.string()),
                S.DETECTOR_KIND: pa.array([b.kind] * n, pa.string()),
                S.CLIP_ID: pa.array([b.features.id] * n, pa.string()),
                S.SCAN_ID: pa.array([self.scan_id] * n, pa.string()),
                S.SCANNED_AT: pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            })
            parts.append(table if rows.all() else table.filter(pa.array(rows)))
        # Never empty: a chunk holds only objects that some detector still needs.
        return pa.concat_tables(parts, promote_options="default")
