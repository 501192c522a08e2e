"""Where a scan output's files go: each table's location, and a fresh data-file path in a table's data folder.

A leaf of the ``tables`` wing: ``units`` (which writes a rolled-forward unit's files) and
``catalog`` (which re-exports both names) import it, and it imports nothing of the wing.
"""

from __future__ import annotations

import os
import uuid

from detector_core.storage import is_remote, join

__all__ = ["data_file_path", "table_location"]


def table_location(output: str, name: str) -> str:
    """The location of table ``name`` of a scan output (absolute for local outputs)."""
    return join(output if is_remote(output) else os.path.abspath(output), name)


def data_file_path(output: str, name: str, scan_date: str, bucket: str, stem: str) -> str:
    """A fresh data-file path in table ``name``'s data folder (what workers write before the driver commits)."""
    return join(table_location(output, name), "data", f"scan_date={scan_date}", f"bucket={bucket}", f"{stem}-{uuid.uuid4().hex}.parquet")
