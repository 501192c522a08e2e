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


def validate_manifest(table: pa.Table, val_fraction: float = 0.2, require_labels: bool = True,
                      calib_fraction: float = 0.0) -> ValidatedManifest:
    """Split good rows from bad ones; normalise columns and types; assign missing splits.

    A row without a split goes, by a hash of its uri, to ``val`` (``val_fraction``: picks the
    best epoch), ``calib`` (``calib_fraction``: calibrates the threshold, so the false-positive
    rate is measured on images that chose nothing) or ``train``.
    """
    if not (0.0 <= val_fraction and 0.0 <= calib_fraction and val_fraction + calib_fraction < 1.0):
        raise ManifestError(f"validation ({val_fraction}) and calibration ({calib_fraction}) fractions must leave rows to train on")
    n = table.num_rows
    col = lambda name: table.column(name).to_pylist() if name in table.column_names else [None] * n  # noqa: E731
    uris, labels, captions, gens, splits = col(S.URI), col(S.LABEL), col(S.CAPTION), col(S.GENERATOR), col(S.SPLIT)
    if require_labels and S.LABEL not in table.column_names:
        raise ManifestError(f"manifest has no '{S.LABEL}' column (1 = generated, 0 = real)")
    good = {S.URI: [], S.LABEL: [], S.CAPTION: [], S.GENERATOR: [], S.SPLIT: []}
    bad = {S.URI: [], S.ERROR_TYPE: [], S.ERROR_MESSAGE: []}
    seen = set()
    for u, lab, cap, gen, split in zip(uris, labels, captions, gens, splits):
        reason = None
        if u is None or str(u).strip() == "":
            reason = ("missing_uri", "row has no uri")
        elif u in seen:
            reason = ("duplicate_uri", "uri appears more than once; the first row is kept")
        elif require_labels:
            try:
                lab_i = int(float(lab))
                if lab_i != float(lab) or lab_i not in (0, 1):
                    raise ValueError
            except (TypeError, ValueError):
                reason = ("bad_label", f"label {lab!r} is not 0 (real) or 1 (generated)")
        if reason:
            bad[S.URI].append(None if u is None else str(u))
            bad[S.ERROR_TYPE].append(reason[0])
            bad[S.ERROR_MESSAGE].append(reason[1])
            continue
        seen.add(u)
        lab_i = int(float(lab)) if require_labels else -1
        good[S.URI].append(str(u))
        good[S.LABEL].append(lab_i)
        good[S.CAPTION].append(None if cap is None else str(cap))
        good[S.GENERATOR].append(str(gen) if gen is not None else ("real" if lab_i == 0 else "unknown"))
        good[S.SPLIT].append(str(split).lower() if split not in (None, "") else _split_for(str(u), val_fraction, calib_fraction))
    out = pa.table(
        {
            S.URI: pa.array(good[S.URI], pa.string()),
            S.LABEL: pa.array(good[S.LABEL], pa.int8()),
            S.CAPTION: pa.array(good[S.CAPTION], pa.string()),
            S.GENERATOR: pa.array(good[S.GENERATOR], pa.string()),
            S.SPLIT: pa.array(good[S.SPLIT], pa.string()),
        }
    )
    bad_t = pa.table({k: pa.array(v, pa.string()) for k, v in bad.items()})
    if require_labels:
        n_gen = int(pc.sum(out.column(S.LABEL)).as_py() or 0)
        if n_gen == 0 or n_gen == out.num_rows:
            missing = "generated (label 1)" if n_gen == 0 else "real (label 0)"
            raise ManifestError(f"manifest has no {missing} examples among its {out.num_rows} valid rows; a detector needs both")
    return ValidatedManifest(out, bad_t)
