"""Labelled manifests: read, validate, split.

A manifest is Parquet or CSV with ``uri``, ``label`` (1 generated, 0 real) and optional
``caption``, ``generator`` and ``split`` columns; or a directory tree ``real/…`` and
``generated/<generator>/…`` that ``manifest_from_tree`` turns into one. Relative URIs
are taken relative to the manifest's folder. ``validate_manifest`` separates bad rows
(no uri, label not 0/1, duplicate uri) with a reason each, refuses a manifest without
both classes up front, and assigns missing splits from a hash of the uri so that they
are stable across runs and machines.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.storage import is_remote, open_fs

__all__ = ["ManifestError", "ValidatedManifest", "read_manifest", "qualify_uri", "manifest_from_tree", "validate_manifest", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ManifestError(ValueError):
    """A manifest that cannot be used at all."""


@dataclass
class ValidatedManifest:
    table: pa.Table  # good rows: uri, label, caption, generator, split
    bad: pa.Table  # rejected rows: uri, error_type, error_message

    def counts(self) -> dict:
        labels = self.table.column(S.LABEL).to_pylist()
        return {"rows": self.table.num_rows, "real": labels.count(0), "generated": labels.count(1), "bad": self.bad.num_rows}


def qualify_uri(uri: str, base: str) -> str:
    """``uri`` as written in a manifest at ``base``: relative -> under ``base``; ``file://x`` -> the local path ``x``."""
    if uri.startswith("file://"):
        return uri[len("file://"):]  # a local path, not one relative to the manifest
    if is_remote(uri) or uri.startswith("/"):
        return uri
    return posixpath.join(base, uri) if is_remote(base) else posixpath.normpath(posixpath.join(base, uri))


def manifest_from_tree(root: str, storage_options: dict | None = None) -> pa.Table:
    """``real/**`` (label 0) and ``generated/<generator>/**`` (label 1) image files."""
    fs, path = open_fs(root, storage_options)
    scheme = root.split("://", 1)[0] + "://" if is_remote(root) else ""
    rows = {S.URI: [], S.LABEL: [], S.GENERATOR: []}
    for kind, label in (("real", 0), ("generated", 1)):
        base = f"{path.rstrip('/')}/{kind}"
        if not fs.exists(base):
            continue
        for f in sorted(fs.find(base)):
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = f[len(base) + 1 :]
            rows[S.URI].append(scheme + f)
            rows[S.LABEL].append(label)
            rows[S.GENERATOR].append("real" if label == 0 else (rel.split("/", 1)[0] if "/" in rel else "unknown"))
    if not rows[S.URI]:
        raise ManifestError(f"no images under {root}/real or {root}/generated")
    return pa.table(rows)


def read_manifest(uri: str, storage_options: dict | None = None) -> pa.Table:
    """Read a Parquet/CSV manifest, or build one from a ``real/``, ``generated/`` tree."""
    fs, path = open_fs(uri, storage_options)
    if fs.isdir(path) and (fs.exists(f"{path.rstrip('/')}/real") or fs.exists(f"{path.rstrip('/')}/generated")):
        return manifest_from_tree(uri, storage_options)
    try:
        if fs.isdir(path) or path.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(path, filesystem=fs)
        elif path.lower().endswith((".csv", ".csv.gz")):
            with fs.open(path, "rb", compression="infer") as f:
                table = pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        elif not fs.exists(path):
            raise ManifestError(f"manifest {uri} does not exist")
        else:
            raise ManifestError(f"manifest {uri}: expected .parquet, .csv, or a folder with real/ and generated/")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        # Arrow's message names the row and column of a bad CSV line, or what is wrong with a Parquet file.
        raise ManifestError(f"manifest {uri} cannot be read: {' '.join(str(exc).split())}") from exc
    if S.URI not in table.column_names:
        raise ManifestError(f"manifest {uri} has no '{S.URI}' column (columns: {table.column_names})")
    base = posixpath.dirname(uri.rstrip("/")) if not fs.isdir(path) else uri.rstrip("/")
    uris = [None if u is None else qualify_uri(str(u), base) for u in table.column(S.URI).to_pylist()]
    return table.set_column(table.column_names.index(S.URI), S.URI, pa.array(uris, pa.string()))


def _split_for(uri: str, val_fraction: float, calib_fraction: float = 0.0) -> str:
    h = int.from_bytes(hashlib.sha1(uri.encode()).digest()[:8], "big") / 2**64
    return S.SPLIT_VAL if h < val_fraction else S.SPLIT_CALIB if h < val_fraction + calib_fraction else S.SPLIT_TRAIN


def _labels(column: pa.Array) -> pa.Array:
    """A label column of any type -> int8 0/1, null where the value is not 0 or 1 (``"1"``, ``1.0`` and ``True`` are 1)."""
    if pa.types.is_boolean(column.type):
        return column.cast(pa.int8())
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        x = column.cast(pa.float64())
    else:
        text = pc.utf8_trim_whitespace(column.cast(pa.string()))
        numeric = pc.fill_null(pc.match_substring_regex(text, r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"), False)
        x = pc.if_else(numeric, text, pa.scalar(None, pa.string())).cast(pa.float64())
    ok = pc.fill_null(pc.or_(pc.equal(x, 0.0), pc.equal(x, 1.0)), False)
    return pc.if_else(ok, x, pa.scalar(None, pa.float64())).cast(pa.int8())


def _repr_strings(table: pa.Table, name: str, as_text: pa.Array) -> pa.Array:
    """How a Python ``repr`` shows each value of column ``name`` (the bad-label message quotes it)."""
    c = table.column(name).combine_chunks()
    if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
        return pc.binary_join_element_wise("'", c, "'", "")
    if pa.types.is_boolean(c.type):
        return pc.if_else(c, "True", "False")
    return as_text


def validate_manifest(table: pa.Table, val_fraction: float = 0.2, require_labels: bool = True,
                      calib_fraction: float = 0.0) -> ValidatedManifest:
    """Split good rows from bad ones; normalise columns and types; assign missing splits.

    A row without a split goes, by a hash of its uri, to ``val`` (``val_fraction``: picks the
    best epoch), ``calib`` (``calib_fraction``: calibrates the threshold, so the false-positive
    rate is measured on images that chose nothing) or ``train``.
    """
    if not (0.0 <= val_fraction and 0.0 <= calib_fraction and val_fraction + calib_fraction < 1.0):
        raise ManifestError(f"validation ({val_fraction}) and calibration ({calib_fraction}) fractions must leave rows to train on")
    if require_labels and S.LABEL not in table.column_names:
        raise ManifestError(f"manifest has no '{S.LABEL}' column (1 = generated, 0 = real)")
    n = table.num_rows

    def col(name: str) -> pa.Array:
        if name not in table.column_names:
            return pa.nulls(n, pa.string())
        c = table.column(name).combine_chunks()
        return c if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else c.cast(pa.string())

    # Column operations (pyarrow.compute), not a Python loop: training manifests run to 10^7 rows.
    uri = col(S.URI)
    idx = pa.array(np.arange(n, dtype=np.int64))
    missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(uri), ""), True)
    label = _labels(table.column(S.LABEL).combine_chunks()) if require_labels else pa.repeat(pa.scalar(-1, pa.int8()), n)
    label_ok = pc.is_valid(label) if require_labels else pa.repeat(True, n)
    # A uri's first row that is otherwise good is kept; every later row of that uri is a duplicate
    # (a row with a bad label before it does not count: it is reported as a bad label).
    keep_candidate = pc.and_(pc.invert(missing), label_ok)
    cand = pa.table({"u": uri, "i": idx}).filter(keep_candidate)
    first = cand.group_by("u").aggregate([("i", "min")])
    first_of = pa.table({"u": uri, "i": idx}).join(first, "u", join_type="left outer").sort_by("i")["i_min"].combine_chunks()
    duplicate = pc.and_(pc.invert(missing), pc.fill_null(pc.greater(idx, first_of), False))
    good_mask = pc.and_(keep_candidate, pc.fill_null(pc.equal(idx, first_of), False))
    bad_type = pc.if_else(missing, "missing_uri", pc.if_else(duplicate, "duplicate_uri", "bad_label"))
    bad_mask = pc.invert(good_mask)
    shown = _repr_strings(table, S.LABEL, col(S.LABEL)) if S.LABEL in table.column_names else pa.nulls(n, pa.string())
    bad_msg = pc.if_else(missing, "row has no uri", pc.if_else(
        duplicate, "uri appears more than once; the first row is kept",
        pc.binary_join_element_wise("label ", pc.fill_null(shown, "None"), " is not 0 (real) or 1 (generated)", "")))
    bad_t = pa.table({S.URI: uri.filter(bad_mask), S.ERROR_TYPE: bad_type.filter(bad_mask), S.ERROR_MESSAGE: bad_msg.filter(bad_mask)})
    good_uri = uri.filter(good_mask)
    lab = label.filter(good_mask).cast(pa.int8())
    gen = col(S.GENERATOR).filter(good_mask)
    gen = pc.if_else(pc.is_valid(gen), gen, pc.if_else(pc.equal(lab, 0), "real", "unknown"))
    given = col(S.SPLIT).filter(good_mask)
    given = pc.if_else(pc.equal(given, ""), pa.scalar(None, pa.string()), given)
    split = pc.utf8_lower(given)
    need = pc.is_null(given)
    if pc.any(need).as_py():  # the hash is per row (sha1 of the uri: the splits of existing manifests stay where they are)
        hashed = [_split_for(u, val_fraction, calib_fraction) for u in good_uri.filter(need).to_pylist()]
        split = pc.replace_with_mask(split, need, pa.array(hashed, pa.string()))
    out = pa.table({S.URI: good_uri, S.LABEL: lab, S.CAPTION: col(S.CAPTION).filter(good_mask), S.GENERATOR: gen, S.SPLIT: split})
    if require_labels:
        n_gen = int(pc.sum(out.column(S.LABEL)).as_py() or 0)
        if n_gen == 0 or n_gen == out.num_rows:
            missing = "generated (label 1)" if n_gen == 0 else "real (label 0)"
            raise ManifestError(f"manifest has no {missing} examples among its {out.num_rows} valid rows; a detector needs both")
    return ValidatedManifest(out, bad_t)
