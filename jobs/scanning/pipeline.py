"""The read -> decode -> embed stages on Ray Data, shared by the embed and scan jobs.

One implementation for every job that turns object URIs into detector features, for
either feature family (``detector_core.method.extractors``: CLIP or DNF):

- ``load_images`` (CPU tasks, ``jobs/scanning/decoding.py``): read and decode each object once, one
  input column per extractor; a failure is recorded on the row, which goes on.
- ``Embedder`` (GPU actors, CPU here): normalises on the device and runs the frozen
  extractor; rows that failed earlier pass through with null features.
- ``Scorer`` (the scan's GPU actors): every detector of a scan on one device, each
  extractor run once, logit / score / decision per object and detector.

Columns are named in ``detector_core.schema``.
"""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pyarrow as pa
import torch
from scipy.special import expit

from detector_core import schema as S
from detector_core.devices import select_device
from detector_core.method.bundle import DetectorBundle, load_bundle
from detector_core.method.cache import fixed_list
from detector_core.method.extractors import FeatureSpec, build_extractor, draft_size_for, preprocess_for
from detector_core.method.features import FORWARDS
from detector_core.method.training import predict_logits
from detector_core.sources.device_decode import decode_inputs
from detector_core.sources.images import ImageDecodeError, decode_image
from detector_core.sources.provenance import flag_decision
from detector_core.tables.features import encode as encode_vectors
from detector_core.tables.state import todo_column
from jobs.scanning.decoding import ENCODED, INTERNAL_COLUMNS, ORIENTATION, PIXELS, has_error, pixel_column


class Embedder:
    """Ray Data actor: resized images (+ captions) -> features of one extractor, one model per actor.

    Output rows drop the pixels and gain ``features`` (fixed-size float32 list; null for
    rows that failed before) and ``feature_id`` (the extractor's id, ``FeatureSpec.id``).
    """

    def __init__(self, spec: FeatureSpec, storage_options: dict | None = None, precision: str = "auto", pixels: str = PIXELS,
                 device: torch.device | None = None, gpu: bool = False, cpu_decode_ok: bool = False, forward: str = "autocast",
                 static_batch: int = 0):
        # --gpu on a node where CUDA does not work fails here, in the actor's start, rather than run on the CPU.
        self.device = device if device is not None else select_device(gpu)
        self.spec = spec
        self.prep = preprocess_for(spec)
        if spec.decode == "nvjpeg" and self.device.type != "cuda" and not cpu_decode_ok:
            raise RuntimeError(f"detector features {spec.id} decode JPEGs on a GPU (decode nvjpeg) and this actor has no CUDA device "
                               f"({self.device}): run with --gpu on GPU nodes")
        kw = {}
        if forward != "autocast":  # a CLIP image tower's faster forward (features.FORWARDS); the scan refuses it elsewhere
            precision, mode = FORWARDS[forward]
            kw = dict(compile_mode=mode, static_batch=static_batch)
        self.extractor = build_extractor(spec, self.device, precision, storage_options, **kw)
        self.dim = spec.dim
        self.pixels = pixels

    def _device_pixels(self, batch: dict[str, np.ndarray]) -> torch.Tensor | None:
        """The nvjpeg rows' inputs, decoded on the device (None when the batch has none). A file the device's
        decoder refuses is decoded by Pillow here, the backend's CPU path; one neither decodes becomes a decode error row."""
        if self.spec.decode != "nvjpeg" or ENCODED not in batch:
            return None
        encoded = batch[ENCODED]
        rows = [i for i, e in enumerate(encoded) if e is not None and not isinstance(batch[S.ERROR_STAGE][i], str)]
        if not rows:
            return None
        decoded, failed = decode_inputs([encoded[i] for i in rows], [int(batch[ORIENTATION][i]) for i in rows], self.prep, self.device)
        if any(failed):  # Arrow-backed batch columns may be read-only: the rows changed here get copies
            for col in (S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE, S.DECODE_PATH):
                batch[col] = np.array(batch[col], dtype=object)
        for j, why in enumerate(failed):
            if why is None:
                continue
            i = rows[j]
            try:
                decoded[j] = torch.from_numpy(self.prep.to_input(decode_image(encoded[i]).image)).to(self.device)
                batch[S.DECODE_PATH][i] = "pil"
            except (ImageDecodeError, OSError, ValueError) as exc:
                batch[S.ERROR_STAGE][i], batch[S.ERROR_TYPE][i] = "decode", getattr(exc, "kind", "corrupt")
                batch[S.ERROR_MESSAGE][i] = f"GPU decoder: {why}; CPU decoder: {exc}"[:500]
        full = torch.zeros((len(encoded), *decoded.shape[1:]), dtype=decoded.dtype, device=self.device)
        full[torch.as_tensor(rows, device=self.device)] = decoded
        return full

    def extract(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """(features of the rows without an earlier error, on the device; the mask of those rows)."""
        on_device = self._device_pixels(batch)
        ok = ~has_error(batch)
        if not ok.any():
            return torch.zeros((0, self.dim), device=self.device), ok
        pixels = torch.from_numpy(np.ascontiguousarray(batch[self.pixels][ok]))
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        if on_device is not None:
            from_device = torch.as_tensor(np.asarray([e is not None for e in batch[ENCODED]])[ok], device=self.device)
            pixels = torch.where(from_device.view(-1, 1, 1, 1), on_device[torch.as_tensor(ok, device=self.device)],
                                 pixels.to(self.device, non_blocking=True))
        captions = None
        if self.spec.needs_captions:
            captions = [None if c is None else str(c) for c in batch[S.CAPTION][ok]]
        jpeg = np.asarray(batch[S.FORMAT][ok] == "JPEG", dtype=bool)  # DNF reference values round-trip a JPEG source's noise
        return self.extractor.extract(pixels.to(self.device, non_blocking=True), captions, jpeg), ok

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        feats, ok = self.extract(batch)
        matrix = np.zeros((len(ok), self.dim), dtype=np.float32)
        matrix[ok] = feats.cpu().numpy()
        return to_table(batch, {S.FEATURES: fixed_list(matrix, ok), S.FEATURE_ID: pa.array([self.spec.id] * len(ok), pa.string())})


# Fixed types, so that every block (and every Parquet file) has the same schema even
# when a batch's column is all null.
COLUMN_TYPES = {c: S.TYPES[c] for c in (S.URI, S.LABEL, S.CAPTION, S.GENERATOR, S.SPLIT, S.SIZE, S.ETAG, S.WIDTH, S.HEIGHT,
                                        S.FORMAT, S.JPEG_QUALITY, S.EXIF, S.DECODE_PATH, S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE,
                                        *S.EVIDENCE_COLUMNS)}


def vectors(x: torch.Tensor, ok: np.ndarray) -> pa.Array:
    """The head's input rows ``x`` (one per ``ok`` row) as the features table's ``vector`` cells (``tables.features.encode``):
    the same vector the head consumed, rounded to float16 (docs/method.md: what that changes in a score)."""
    return encode_vectors(x.detach().float().cpu().numpy(), ok)


def to_table(batch: dict[str, np.ndarray], extra: dict[str, pa.Array]) -> pa.Table:
    """The batch without pixels, plus ``extra`` columns, as an Arrow table."""
    cols = {}
    for k, v in batch.items():
        if k == PIXELS or k.startswith(PIXELS + "_") or k in INTERNAL_COLUMNS:
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


def check_decode(specs: list[FeatureSpec], gpu: bool) -> None:
    """Refuse, in one line, specs whose decode backends one pass cannot serve: ``nvjpeg`` without a GPU, or
    several backends at once (each object is read and decoded once a pass; two backends would be two
    decodes, and two routes, of one file)."""
    backends = {s.decode for s in specs}
    if len(backends) > 1:
        ids = ", ".join(f"{s.id} ({s.decode})" for s in specs)
        raise ValueError(f"these detectors decode images with different backends ({ids}): scan them in separate runs")
    if "nvjpeg" in backends and not gpu:
        ids = ", ".join(s.id for s in specs if s.decode == "nvjpeg")
        raise ValueError(f"{ids} decodes JPEGs on a GPU's hardware decoder (decode nvjpeg): it needs a GPU; pass --gpu on a cluster "
                         "with CUDA GPUs (features of a pil-decode detector are computed on any machine)")


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
                 load_counter=None, device: str | None = None, gpu: bool = False, flag_declared: bool = False, forward: str = "autocast",
                 batch_size: int = 0, keep_features: bool = False):
        self.crash_marker = crash_marker
        self.keep_features = keep_features  # each scored row carries its head's input vector (CLIP family), for the features table
        self.flag_declared = flag_declared  # declared-generated files are flagged whatever their score (flag_reason says so)
        self.device = torch.device(device) if device else select_device(gpu)
        self.bundles = [load_bundle(u, storage_options, device=self.device) for u in bundle_uris]
        self.embedders = {spec: Embedder(spec, storage_options, pixels=pixel_column(j), device=self.device,
                                         forward=forward if spec.extractor == "clip" else "autocast", static_batch=batch_size)
                          for j, spec in enumerate(feature_specs(self.bundles))}
        self.scan_id = scan_id
        if load_counter is not None:
            # Models are built once per actor and scan: the scan's summary reports how often that happened.
            load_counter.add.remote(scan_id)

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
            extra = {S.VECTOR: vectors(x, ok)} if self.keep_features and b.features.extractor == "clip" else {}
            scores = expit(logits)
            declared = batch.get(S.DECLARED, np.full(n, None, dtype=object))
            flagged, reason = flag_decision(logits >= b.threshold_logit, declared,
                                            batch.get(S.C2PA_STATE, np.full(n, None, dtype=object)), self.flag_declared)
            table = to_table(batch, {
                S.LOGIT: pa.array(logits, mask=~ok),
                S.SCORE: pa.array(scores, mask=~ok),
                S.THRESHOLD: pa.array(np.full(n, b.threshold)),
                S.FLAGGED: pa.array(flagged, mask=~ok),
                S.FLAG_REASON: pa.array(np.where(ok, reason, None), pa.string()),
                S.DETECTOR_ID: pa.array([b.detector_id] * n, pa.string()),
                S.DETECTOR_KIND: pa.array([b.kind] * n, pa.string()),
                S.FEATURE_ID: pa.array([b.features.id] * n, pa.string()),
                S.SCAN_ID: pa.array([self.scan_id] * n, pa.string()),
                S.SCANNED_AT: pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                **extra,
            })
            parts.append(table if rows.all() else table.filter(pa.array(rows)))
        # Never empty: a chunk holds only objects that some detector still needs.
        return pa.concat_tables(parts, promote_options="default")
