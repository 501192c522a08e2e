"""What jobs write and hold: run ids, whole JSON and Parquet files, the resolved config, a scan output and its lease.

``write_json``/``write_parquet`` (whole files, never half), ``config_dict`` (the resolved
config saved beside every artifact), ``open_output`` (a scan output's tables, or one line
why not), ``output_lease`` (an output's write lease for a job's whole run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import uuid

from detector_core.storage import open_fs, write_atomic
from jobs.common.errors import JobError


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def write_json(uri: str, payload: dict, storage_options: dict | None = None) -> None:
    """Write JSON to a local path or URI, whole or not at all (``detector_core.storage.write_atomic``)."""
    fs, path = open_fs(uri, storage_options)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_parquet(table, uri: str, storage_options: dict | None = None) -> None:
    """Write one Parquet file to a local path or URI, making its folder."""
    import pyarrow.parquet as pq

    fs, path = open_fs(uri, storage_options)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


@contextlib.contextmanager
def output_lease(out, run_id: str, ttl_s: float, wait: bool):
    """The write lease of scan output ``out`` for a job's whole run, renewed in the background; the job
    ends naming the holder when another writer has it (unless ``wait``). Released at the end whatever
    happened; a release that fails only warns, since the job's own error is what its user must read."""
    from detector_core.tables.lease import Lease, LeaseHeldError

    lease = Lease(out.fs, out.root, run_id, ttl_s)
    try:
        lease.acquire(wait=wait)
    except LeaseHeldError as exc:
        raise JobError(str(exc))
    lease.start_renewing()
    try:
        yield lease
    finally:
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            print(f"warning: the lease of {out.uri} could not be released ({type(exc).__name__}: {exc}); it expires after "
                  f"{ttl_s:g} s", file=sys.stderr, flush=True)


def open_output(scan: str, catalog: str, namespace: str, storage_options: dict | None):
    """A scan output's tables (``detector_core.tables.views.open_scan_output``), or the job ends with the reason."""
    from detector_core.tables.catalog import CatalogError
    from detector_core.tables.views import open_scan_output

    try:
        return open_scan_output(scan, catalog, namespace, storage_options)
    except CatalogError as exc:
        raise JobError(str(exc))
