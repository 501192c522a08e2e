"""Local paths and object-store URIs behind one fsspec interface.

Every byte the product reads or writes (images, manifests, feature caches, bundles,
scan tables) goes through ``open_fs``, so ``s3://`` (AWS or any S3-compatible store,
endpoint from the argument or ``AWS_ENDPOINT_URL``), ``gs://`` and local paths behave
alike. Credentials come from the usual environment / instance profile, never from
files in this repository.
"""

from __future__ import annotations

import json
import os
import uuid

import fsspec
from fsspec import AbstractFileSystem

__all__ = ["is_remote", "is_local_fs", "protocols", "open_fs", "arrow_fs", "s3_storage_options", "folder_prefix", "join", "fetch_cached", "read_json", "write_atomic"]


def is_remote(uri: str) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of an fsspec filesystem (``("s3", "s3a")``, ``("file", "local")``)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local_fs(fs: AbstractFileSystem) -> bool:
    return "file" in protocols(fs)


def s3_storage_options(endpoint_url: str | None = None) -> dict:
    """s3fs options for an S3-compatible endpoint (argument, else ``AWS_ENDPOINT_URL``)."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}


def open_fs(uri: str, storage_options: dict | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for a URI or local path."""
    options = dict(storage_options or {})
    if uri.startswith("s3://") and not options:
        options = s3_storage_options()
    return fsspec.core.url_to_fs(uri, **options)


def folder_prefix(uri: str) -> str:
    """``uri`` as the prefix its objects' uris start with (absolute for local paths, one trailing slash)."""
    return (uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))).rstrip("/") + "/"


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI with '/'."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def read_json(uri: str, storage_options: dict | None = None) -> dict | None:
    """A JSON object at a local path or URI; None when there is none."""
    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def arrow_fs(uri: str, storage_options: dict | None = None):
    """A pyarrow filesystem and path for a URI, backed by the same fsspec filesystem.

    pyarrow datasets and Ray Data's readers/writers take this pair, so that they reach
    the same endpoint with the same credentials as everything else.
    """
    import os.path

    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if not is_remote(uri):
        return LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    fs, path = open_fs(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs)), path


def fetch_cached(uri: str, kind: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """Copy an object-store file or folder (model weights) to a local cache once; returns the local path.

    The copy lands under ``<cache>/<kind>/<hash of uri>/`` (cache: ``cache_dir``, else
    ``DETECTOR_CACHE``, else ``~/.cache/detector``) and is renamed into place only when
    complete, so concurrent workers on one node never read a half-copied file. Raises
    ``FileNotFoundError`` when nothing is at ``uri``.
    """
    import hashlib
    from pathlib import Path

    cache = Path(cache_dir or os.environ.get("DETECTOR_CACHE", Path.home() / ".cache" / "detector"))
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    local = cache / kind / hashlib.sha256(uri.encode()).hexdigest()[:16] / name
    if local.exists():
        return str(local)
    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{name}.part{os.getpid()}")
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    else:
        fs.get(path, str(tmp))
    try:
        tmp.replace(local)
    except OSError:  # another process on this node finished first (a non-empty folder cannot be replaced)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(local)


def write_atomic(fs, path: str, data: bytes, sync: bool = True) -> None:
    """``data`` at ``path``, whole or not at all: a local file through a temporary file and a rename; an
    object store's PUT is atomic already. ``sync=False`` skips the fsync (whole after a killed
    process, not necessarily after a power loss: for files that are made again when missing)."""
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
