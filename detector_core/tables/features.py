"""The features table's vectors: the head's input of each scored object, as little-endian float16 bytes.

A scan keeps, for every object a CLIP-family detector scores, the exact vector its head
consumed (``jobs.scan --keep-features``, on by default), one row per object and feature
extractor in the ``features`` table, committed in the same unit as its ``scores`` rows.
Iceberg has no float16 type, so a vector is a ``binary`` cell of ``2 × width`` bytes
(``encode``); any engine reads it, and ``decode`` (or ``numpy.frombuffer(cell, "<f2")``)
turns a column of them back into a matrix. float16 keeps 11 significant bits: a 768-d
vector is 1,536 bytes, and the score a head computes from it differs from the float32
one by the figure docs/method.md records.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["DTYPE", "decode", "encode"]

DTYPE = "<f2"  # little-endian IEEE half precision, whatever the machine


def encode(matrix: np.ndarray, ok: np.ndarray) -> pa.Array:
    """``matrix`` (one row per ``ok`` row, any float dtype) as ``vector`` cells for all ``len(ok)`` rows: null where not ``ok``."""
    n, dim = len(ok), int(matrix.shape[1])
    half = np.zeros((n, dim), dtype=DTYPE)
    half[ok] = np.asarray(matrix, dtype=np.float32).astype(DTYPE)
    valid = pa.py_buffer(np.packbits(np.asarray(ok, dtype=bool), bitorder="little").tobytes())
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), n, [valid, pa.py_buffer(half.tobytes())])
    return fixed.cast(pa.binary())


def decode(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """A column of non-null ``vector`` cells as an (n, width) matrix of ``dtype`` (float32 by default: what heads take)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} vector cells are null: filter them first")
    if len(column) == 0:
        return np.zeros((0, 0), dtype=dtype)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    widths = np.diff(offsets)
    if (widths != widths[0]).any() or widths[0] % 2:
        raise ValueError("vector cells of different widths: one feature_id at a time")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view(DTYPE).reshape(len(column), widths[0] // 2).astype(dtype)
