"""The feature-cache format: what ``jobs.embed`` writes and training, evaluation and ablation read.

A cache is a folder (local or object store)::

    CACHE/data/*.parquet     one row per manifest row: uri, label, split, generator, caption,
                             image metadata, ``features`` (FixedSizeList<float32, d>, null
                             on error rows), ``feature_id`` (the extractor's id; ``clip_id`` in caches written before it was renamed), error columns
    CACHE/errors.parquet     rows that could not be used (manifest, read or decode stage)
    CACHE/_SUCCESS.json      written last: the cache key, counts, ``FeatureSpec`` fields,
                             ``feature_compute``, the resolved config

A cache without ``_SUCCESS.json`` is unfinished. The key hashes the manifest's columns that
change a row (uri, label, caption, generator, split) with the extractor's settings, so an
unchanged manifest finds its cache and embeds nothing.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from detector_core import schema as S
from detector_core.storage import arrow_fs, join, read_json

if TYPE_CHECKING:  # not at run time: readers of a cache (Ray tasks) need no torch
    from detector_core.method.extractors import FeatureSpec

__all__ = ["DATA", "ERRORS", "SUCCESS", "cache_key", "cache_spec", "features_matrix", "fixed_list", "labelled_arrays", "read_features", "read_marker"]

SUCCESS = "_SUCCESS.json"
DATA = "data"
ERRORS = "errors.parquet"


def cache_key(table: pa.Table, spec: FeatureSpec, perturb: str = "", perturb_seed: int = 0, jpeg_draft: bool = True) -> str:
    """The key of a validated manifest's features under a spec, a perturbation and a JPEG decode."""
    h = hashlib.sha256(spec.cache_prefix().encode())
    if not jpeg_draft:  # only when off, so that caches made before the option keep their keys
        h.update(b"jpeg_draft=0|")
    if perturb:
        h.update(f"perturb={perturb}|seed={perturb_seed}|".encode())
    for name in (S.URI, S.LABEL, S.CAPTION, S.GENERATOR, S.SPLIT):
        for chunk in table.column(name).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    return h.hexdigest()


def read_marker(cache: str, storage_options: dict | None = None) -> dict | None:
    """A finished cache's ``_SUCCESS.json``; None while the cache is absent or unfinished."""
    return read_json(join(cache, SUCCESS), storage_options)


def cache_spec(marker: dict) -> FeatureSpec:
    """The extractor spec a finished cache was made with (caches older than DNF: CLIP)."""
    from detector_core.method.extractors import FeatureSpec

    return FeatureSpec.from_dict(marker)


def read_features(cache: str, columns: list[str], storage_options: dict | None = None) -> pa.Table:
    """``columns`` of the usable rows (embedded, no error) of a finished feature cache."""
    fs, path = arrow_fs(join(cache, DATA), storage_options)
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=[*columns, S.ERROR_STAGE])
    return t.filter(pads.field(S.ERROR_STAGE).is_null()).drop_columns([S.ERROR_STAGE])


def fixed_list(matrix: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(n, d) float32 -> FixedSizeList<float32, d>, null where not ``valid``: the ``features`` column."""
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1], mask=pa.array(~valid))


def features_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``features`` column (no nulls expected) -> (n, d) float32 numpy."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)


def labelled_arrays(batch: pa.Table) -> dict[str, np.ndarray]:
    """An Arrow batch of a cache's rows -> ``{x: (n, d) float32, y: (n,) float32}``, what training reads.

    Here, beside the format, and free of torch: Ray Data runs it in reader tasks, and a fresh
    worker imports only numpy and pyarrow to do so.
    """
    return {"x": features_matrix(batch.column(S.FEATURES)), "y": batch.column(S.LABEL).to_numpy().astype(np.float32)}
