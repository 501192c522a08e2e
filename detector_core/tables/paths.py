"""Where a scan output's files go: each table's location, a fresh data-file path in a table's data folder, and a
table's path as the output's filesystem names it.

A leaf of the ``tables`` wing: ``units`` (which writes a rolled-forward unit's files) and
``catalog`` (which re-exports both names) import it, and it imports nothing of the wing.
"""

from __future__ import annotations

import os
import uuid

from detector_core.storage import is_remote, join

__all__ = ["data_file_path", "fs_path", "table_location"]

_SCHEMES = ("file://", "s3://", "s3a://", "gs://", "gcs://")


def table_location(output: str, name: str) -> str:
    """The location of table ``name`` of a scan output (absolute for local outputs)."""
    return join(output if is_remote(output) else os.path.abspath(output), name)


def data_file_path(output: str, name: str, scan_date: str, bucket: str, stem: str) -> str:
    """A fresh data-file path in table ``name``'s data folder (what workers write before the driver commits)."""
    return join(table_location(output, name), "data", f"scan_date={scan_date}", f"bucket={bucket}", f"{stem}-{uuid.uuid4().hex}.parquet")


def fs_path(path: str) -> str:
    """A table's file path as the output's fsspec filesystem names it (no scheme)."""
    for scheme in _SCHEMES:
        if path.startswith(scheme):
            return path[len(scheme):]
    return path
