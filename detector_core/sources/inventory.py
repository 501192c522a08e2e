"""S3 Inventory reports as scan input: the report's data files, and their rows as ``LIST_SCHEMA`` rows.

An Inventory report is ``manifest.json`` (or its folder, or a glob of dated report folders,
of which the newest of each configuration is read) listing the report's data files (CSV.gz,
Parquet, ORC) and, for CSV, the column names. ``inventory_files`` reads the manifest(s);
Ray tasks read the data files and ``inventory_rows`` maps each block to uris (CSV keys are
URL-encoded by S3 and decoded here; delete markers and non-current versions are dropped).
A bucket of 10^9 objects is listed this way without one LIST call.
"""

from __future__ import annotations

import json
import posixpath
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from detector_core.sources.listing import list_rows, uri_scheme
from detector_core.storage import open_fs

__all__ = ["INVENTORY_COLUMNS", "InventoryFiles", "inventory_files", "inventory_rows", "is_inventory"]

INVENTORY_COLUMNS = {"bucket": "bucket", "key": "key", "size": "size", "etag": "e_tag", "e_tag": "e_tag",
                     "lastmodifieddate": "last_modified_date", "last_modified_date": "last_modified_date",
                     "islatest": "is_latest", "is_latest": "is_latest", "isdeletemarker": "is_delete_marker",
                     "is_delete_marker": "is_delete_marker", "versionid": "version_id", "version_id": "version_id"}


@dataclass
class InventoryFiles:
    """The data files of one or more Inventory reports, grouped by format, with their column names (CSV only)."""

    csv: list[str]
    parquet: list[str]
    orc: list[str]
    csv_columns: list[str]
    manifests: list[str]


def is_inventory(source: str, storage_options: dict | None = None) -> bool:
    """``manifest.json``, a glob ending in it, or a folder holding one."""
    if source.rstrip("/").endswith("manifest.json"):
        return True
    fs, path = open_fs(source, storage_options)
    return fs.isfile(f"{path.rstrip('/')}/manifest.json")


def _manifest_paths(source: str, fs, path: str) -> list[str]:
    if any(c in path for c in "*?["):
        found = sorted(fs.glob(path))
        # A glob over a report's dated folders: only the newest report of each configuration.
        newest: dict[str, str] = {}
        for p in found:
            parent = posixpath.dirname(p)
            newest[posixpath.dirname(parent)] = max(newest.get(posixpath.dirname(parent), ""), p)
        return sorted(newest.values())
    if path.rstrip("/").endswith("manifest.json"):
        return [path]
    return [f"{path.rstrip('/')}/manifest.json"]


def inventory_files(source: str, storage_options: dict | None = None) -> InventoryFiles:
    """Read the Inventory manifest(s) at ``source``: their data files (uris) and CSV column names."""
    fs, path = open_fs(source, storage_options)
    scheme = uri_scheme(source)
    out = InventoryFiles([], [], [], [], [])
    paths = _manifest_paths(source, fs, path)
    if not paths:
        raise ValueError(f"no S3 Inventory manifest.json matches {source}")
    for p in paths:
        try:
            m = json.loads(fs.cat_file(p))
        except FileNotFoundError:
            raise ValueError(f"S3 Inventory manifest {scheme}{p} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"S3 Inventory manifest {scheme}{p} is not JSON: {exc}") from None
        fmt = str(m.get("fileFormat", "")).lower()
        if fmt not in ("csv", "parquet", "orc") or not m.get("files"):
            raise ValueError(f"S3 Inventory manifest {scheme}{p}: expected fileFormat CSV, Parquet or ORC and a files list")
        dest = str(m.get("destinationBucket", "")).removeprefix("arn:aws:s3:::")
        for f in m["files"]:
            key = f["key"]
            if scheme:
                uri = f"{scheme}{dest}/{key}"
            else:  # a local copy of a report: data files beside the manifest's folder, as S3 lays them out
                uri = posixpath.normpath(posixpath.join(posixpath.dirname(p), "..", "data", posixpath.basename(key)))
            getattr(out, fmt).append(uri)
        if fmt == "csv":
            cols = [INVENTORY_COLUMNS.get(c.strip().lower(), c.strip().lower()) for c in str(m.get("fileSchema", "")).split(",")]
            if out.csv_columns and cols != out.csv_columns:
                raise ValueError(f"S3 Inventory manifests under {source} disagree on the CSV columns: {out.csv_columns} vs {cols}")
            out.csv_columns = cols
        out.manifests.append(scheme + p)
    if out.csv and not {"bucket", "key"} <= set(out.csv_columns):
        raise ValueError(f"S3 Inventory fileSchema {out.csv_columns} has no Bucket and Key")
    return out


def inventory_rows(block: pa.Table, scheme: str = "s3://", url_encoded: bool = False) -> pa.Table:
    """One block of Inventory data -> ``LIST_SCHEMA`` (``url_encoded``: CSV reports, whose keys S3 URL-encodes)."""
    names = {INVENTORY_COLUMNS.get(c.lower(), c.lower()): c for c in block.column_names}
    if "is_delete_marker" in names:
        block = block.filter(pc.invert(pc.fill_null(_bool(block[names["is_delete_marker"]]), False)))
    if "is_latest" in names:
        block = block.filter(pc.fill_null(_bool(block[names["is_latest"]]), True))
    keys = block[names["key"]].to_pylist()
    buckets = block[names["bucket"]].to_pylist()
    if url_encoded:
        keys = [None if k is None else urllib.parse.unquote_plus(k) for k in keys]
    uris = [None if (k is None or b is None) else f"{scheme}{b}/{k}" for b, k in zip(buckets, keys)]
    etags = block[names["e_tag"]].cast(pa.string()).to_pylist() if "e_tag" in names else [None] * len(uris)
    sizes = block[names["size"]].cast(pa.int64()).to_pylist() if "size" in names else [None] * len(uris)
    kinds = ["missing_uri" if u is None else None for u in uris]
    msgs = ["an S3 Inventory row has no bucket or key" if k else None for k in kinds]
    return list_rows(uris, [None if e is None else e.strip('"') for e in etags], sizes, kinds, msgs)


def _bool(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_boolean(col.type):
        return col
    return pc.equal(pc.utf8_lower(col.cast(pa.string())), "true")
