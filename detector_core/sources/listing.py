"""What a scan reads: prefix listings split for fan-out, manifests, and S3 Inventory reports, as ``LIST_SCHEMA`` rows.

Three inputs, one output shape (``detector_core.schema.LIST_SCHEMA``: ``uri, etag, size`` and,
for a row that cannot be used, ``error_type, error_message``):

- **A prefix** (``s3://bucket/p/``, ``gs://…``, a local folder). ``split_prefix`` walks its first
  levels of common prefixes (delimiter listings, holding only the prefixes' names) until it has
  enough of them, and returns *listing units*: a prefix listed recursively, or a folder whose
  own files only are listed. ``list_unit`` lists one unit as a stream of Arrow tables (S3:
  ``ListObjectsV2`` pages; local: ``os.scandir``), so Ray tasks list the units in parallel and
  nothing holds the whole listing. Locally only regular files are listed: a FIFO, device or
  socket (or a link to one, such as ``/dev/zero``) is an error row, never read.
- **A manifest** (``.parquet``/``.csv``/``.csv.gz`` with a ``uri`` column, optional ``etag``,
  ``size``): ``manifest_rows`` normalises one block of it. Relative uris are taken relative to
  the manifest's folder, ``file://`` uris are local paths, and a row without a usable uri or
  with a ``size`` that is no whole number becomes an error row that names the column and file.
- **An S3 Inventory report**: ``detector_core.sources.inventory``.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from detector_core import schema as S
from detector_core.schema import LIST_SCHEMA
from detector_core.sources.manifest import qualify_uri
from detector_core.storage import is_local_fs, is_remote, open_fs, protocols

__all__ = ["ListingUnit", "split_prefix", "list_unit", "flat_listing", "manifest_rows", "is_manifest", "list_rows", "local_path",
           "uri_scheme"]

ROWS_PER_TABLE = 50_000


def local_path(uri: str) -> str:
    """A local path for a local uri (``file:///x`` -> ``/x``)."""
    return uri.removeprefix("file://")


def uri_scheme(uri: str) -> str:
    """``s3://``, ``gs://`` ... for an object-store uri, ``""`` for a local one."""
    return uri.split("://", 1)[0] + "://" if is_remote(uri) else ""


def list_rows(uris: list, etags: list, sizes: list, kinds: list | None = None, messages: list | None = None) -> pa.Table:
    """Columns of listing rows -> a ``LIST_SCHEMA`` table (``kinds``/``messages``: the error of each unusable row)."""
    n = len(uris)
    return pa.table({S.URI: pa.array(uris, pa.string()), S.ETAG: pa.array(etags, pa.string()), S.SIZE: pa.array(sizes, pa.int64()),
                     S.ERROR_TYPE: pa.array(kinds or [None] * n, pa.string()),
                     S.ERROR_MESSAGE: pa.array(messages or [None] * n, pa.string())}, schema=LIST_SCHEMA)


# -- prefixes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListingUnit:
    """One task's share of a listing: ``prefix`` listed recursively, or only its own files (``recursive=False``)."""

    prefix: str
    recursive: bool


def _s3_pages(fs, path: str, delimiter: bool) -> Iterator[dict]:
    bucket, _, key = path.partition("/")
    kw = {"Bucket": bucket, "Prefix": key}
    if delimiter:
        kw["Delimiter"] = "/"
    while True:
        page = fs.call_s3("list_objects_v2", **kw)
        yield page
        if not page.get("IsTruncated"):
            return
        kw["ContinuationToken"] = page["NextContinuationToken"]


def _is_s3(fs) -> bool:
    return "s3" in protocols(fs)


def _subfolders(fs, path: str) -> list[str]:
    """The folders (common prefixes) directly under ``path``; its files are not kept."""
    if _is_s3(fs):
        subs = []
        for page in _s3_pages(fs, path.rstrip("/") + "/", delimiter=True):
            subs.extend(f"{path.split('/', 1)[0]}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", []))
        return subs
    if is_local_fs(fs):
        with os.scandir(path) as it:
            return sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
    return sorted(i["name"] for i in fs.ls(path, detail=True) if i.get("type") == "directory")


def split_prefix(source: str, storage_options: dict | None = None, target: int = 64, max_depth: int = 3) -> list[ListingUnit]:
    """Listing units that cover ``source`` exactly once: expand common prefixes level by level until ``target`` units."""
    fs, path = open_fs(source, storage_options)
    path = path.rstrip("/") if path != "/" else path
    units: list[ListingUnit] = []
    frontier = [path]
    for _ in range(max_depth):
        if len(units) + len(frontier) >= target:
            break
        deeper = []
        for folder in frontier:
            subs = _subfolders(fs, folder)
            units.append(ListingUnit(folder, recursive=False))  # the folder's own files
            deeper.extend(subs)
        frontier = deeper
        if not frontier:
            break
    units.extend(ListingUnit(f, recursive=True) for f in frontier)
    scheme = uri_scheme(source)
    return [ListingUnit(scheme + u.prefix, u.recursive) for u in units]


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def _local_rows(root: str, recursive: bool, rows: int) -> Iterator[pa.Table]:
    cols: tuple[list, ...] = ([], [], [], [], [])  # uri, etag, size, error_type, error_message

    def add(*row) -> None:
        for col, value in zip(cols, row):
            col.append(value)

    def flush() -> pa.Table:
        t = list_rows(*cols)
        for col in cols:
            col.clear()
        return t

    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            add(folder, None, None, "permission_denied", str(exc))
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(e.path)
                continue
            try:
                st = os.stat(e.path)  # follows a link: what a read would open
            except OSError as exc:
                add(e.path, None, None, "not_found", f"{type(exc).__name__}: {exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # a link to a folder: not followed (no cycles, no escaping the prefix)
            if stat.S_ISREG(st.st_mode):
                add(e.path, f"mtime:{st.st_mtime}", st.st_size, None, None)
            else:
                add(e.path, None, None, "not_regular_file", f"{e.path} is a {_special_kind(st.st_mode)}, not a regular file: not read")
            if len(cols[0]) >= rows:
                yield flush()
    if cols[0]:
        yield flush()


def list_unit(unit: ListingUnit, storage_options: dict | None = None, rows: int = ROWS_PER_TABLE) -> Iterator[pa.Table]:
    """The objects of one listing unit, ``rows`` at a time (``LIST_SCHEMA``)."""
    fs, path = open_fs(unit.prefix, storage_options)
    if is_local_fs(fs):
        yield from _local_rows(local_path(path), unit.recursive, rows)
        return
    scheme = uri_scheme(unit.prefix)
    uris, etags, sizes = [], [], []
    if _is_s3(fs):
        bucket = path.split("/", 1)[0]
        for page in _s3_pages(fs, path.rstrip("/") + "/", delimiter=not unit.recursive):  # a prefix is a folder
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # a folder marker
                uris.append(f"{scheme}{bucket}/{obj['Key']}")
                etags.append(str(obj.get("ETag", "")).strip('"') or None)
                sizes.append(int(obj.get("Size") or 0))
            if len(uris) >= rows:
                yield list_rows(uris, etags, sizes)
                uris, etags, sizes = [], [], []
    else:
        infos = fs.find(path, detail=True) if unit.recursive else {i["name"]: i for i in fs.ls(path, detail=True)}
        for p, info in sorted(infos.items()):
            if info.get("type") == "directory":
                continue
            etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
            uris.append(scheme + p), etags.append(None if etag is None else str(etag).strip('"')), sizes.append(int(info.get("size") or 0))
            if len(uris) >= rows:
                yield list_rows(uris, etags, sizes)
                uris, etags, sizes = [], [], []
    if uris:
        yield list_rows(uris, etags, sizes)


def flat_listing(source: str, storage_options: dict | None = None) -> pa.Table:
    """The whole prefix in one ``fs.find`` (the reference the fan-out is tested against; small prefixes only)."""
    fs, path = open_fs(source, storage_options)
    scheme = uri_scheme(source)
    rows = [(scheme + p, int(i.get("size") or 0)) for p, i in sorted(fs.find(path, detail=True).items())
            if i.get("type") != "directory" and not p.endswith("/")]
    return pa.table({S.URI: [r[0] for r in rows], S.SIZE: pa.array([r[1] for r in rows], pa.int64())})


# -- manifests -------------------------------------------------------------------------------
def is_manifest(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq", ".csv", ".csv.gz"))


def manifest_rows(block: pa.Table, manifest: str) -> pa.Table:
    """One block of a scan manifest -> ``LIST_SCHEMA`` (bad rows become error rows that say why)."""
    if S.URI not in block.column_names:
        raise ValueError(f"manifest {manifest} has no '{S.URI}' column (columns: {block.column_names})")
    base = posixpath.dirname(manifest.rstrip("/"))
    n = block.num_rows
    raw_uris = block[S.URI].to_pylist()
    raw_etags = block[S.ETAG].to_pylist() if S.ETAG in block.column_names else [None] * n
    raw_sizes = block[S.SIZE].to_pylist() if S.SIZE in block.column_names else [None] * n
    uris, etags, sizes, kinds, messages = [], [], [], [], []
    for u, e, s in zip(raw_uris, raw_etags, raw_sizes):
        kind = msg = None
        size = None
        if u is None or str(u).strip() == "":
            kind, msg = "missing_uri", f"a row of manifest {manifest} has no uri"
            u = None
        else:
            u = qualify_uri(str(u).strip(), base)
        if s is not None and kind is None:
            try:
                size = int(s) if not isinstance(s, float) or s.is_integer() else None
                if size is None or size < 0:
                    raise ValueError
            except (TypeError, ValueError):
                kind, msg, size = "bad_size", f"manifest {manifest}, column '{S.SIZE}': {s!r} is not a whole number of bytes", None
        uris.append(u), etags.append(None if e is None else str(e).strip('"')), sizes.append(size), kinds.append(kind), messages.append(msg)
    return list_rows(uris, etags, sizes, kinds, messages)
