"""Keeping a scan output's ``state`` current: the history committed since its mark, folded in by Ray tasks.

``refresh_state`` reads only file lists on the driver (``detector_core.tables.state_table``): the
``scores``/``errors`` data files committed after the state's mark become state rows in Ray
tasks (``_history_rows``), shuffled by ``uri_bucket`` to one writer task per partition
(``_write_state_partition``, which merges a partition's files once it has ``compact_at`` of
them), then one commit records the new files, the replaced ones and the new mark. A scan runs
it before it plans (so a killed scan's units count) and after its last unit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.storage import join, open_fs
from detector_core.tables import state as ST
from detector_core.tables.catalog import HISTORY, PROP_PARTITIONS, STATE, ScanOutput
from detector_core.tables.state_table import commit_state, history_files_since, open_state, state_mark
from jobs.scanning.planning import DRIVER_PLAN_MAX, read_state, shuffle_partitions, typed_udf

__all__ = ["refresh_state"]

STATE_FILE_ROW = pa.schema([(ST.URI_BUCKET, pa.int32()), ("path", pa.string()), ("rows", pa.int64()), ("replaced", pa.string())])
HISTORY_COLUMNS = (S.DETECTOR_ID, S.URI, S.ETAG, S.SIZE, S.SCAN_ID, S.SCANNED_AT)


def _history_rows(batch: pa.Table, n: int, storage_options: dict | None) -> Iterator[pa.Table]:
    """Ray task: committed ``scores``/``errors`` data files -> state rows."""
    for path, name in zip(batch["path"].to_pylist(), batch["table"].to_pylist()):
        fs, p = open_fs(path, storage_options)
        cols = list(HISTORY_COLUMNS) + ([S.ERROR_STAGE] if name == "errors" else [])
        with fs.open(p, "rb") as f:
            rows = pq.read_table(f, columns=cols)
        yield ST.history_to_state(rows, name, n)


def _write_state_partition(group: pa.Table, location: str, existing: dict, compact_at: int, storage_options: dict | None) -> pa.Table:
    """Ray task: one partition's new state rows -> one new state file (merged with the old ones when compacting)."""
    from jobs.common.outputs import write_parquet

    bucket = int(group[ST.URI_BUCKET][0].as_py())
    old = existing.get(bucket, [])
    replaced = []
    rows = group.select(ST.STATE_SCHEMA.names).cast(ST.STATE_SCHEMA)
    if old and len(old) + 1 >= compact_at:
        rows = ST.latest(pa.concat_tables([read_state(old, None, storage_options), rows]))
        replaced = old
    else:
        rows = ST.latest(rows)
    path = join(location, "data", f"{ST.URI_BUCKET}={bucket}", f"{uuid.uuid4().hex}.parquet")
    write_parquet(rows.sort_by([(S.DETECTOR_ID, "ascending"), (S.URI, "ascending")]), path, storage_options)
    return pa.Table.from_pylist([{ST.URI_BUCKET: bucket, "path": path, "rows": rows.num_rows, "replaced": json.dumps(replaced)}],
                                schema=STATE_FILE_ROW)


def refresh_state(out: ScanOutput, storage_options: dict | None = None, compact_at: int = 8, where: str = "auto",
                  driver_max: int = DRIVER_PLAN_MAX) -> dict:
    """Fold the history committed since the state's mark into ``state``; returns what it did.

    ``where`` as for ``jobs.scanning.planning.plan``: ``auto`` folds in this process while the new history
    rows plus the state rows of the partitions it may compact stay within ``driver_max`` (the
    catalog's record counts; the same functions as the tasks, one partition at a time), else in
    Ray tasks.
    """
    t0 = time.time()
    table, existing_files = open_state(out)
    n = int(table.properties.get(PROP_PARTITIONS, ST.DEFAULT_PARTITIONS))
    mark = state_mark(table)
    new, top, counts = {}, {}, []
    for name in HISTORY:
        new[name], top[name] = history_files_since(out, name, int(mark.get(name, 0)), counts)
    items = [{"path": p, "table": name} for name in HISTORY for p in new[name]]
    if not items:
        if top != mark:
            commit_state(out, [], [], top)
        return {"history_files": 0, "state_files_written": 0, "state_files_replaced": 0, "seconds": round(time.time() - t0, 2)}
    existing = {b: [df.file_path for df in files] for b, files in existing_files.items()}
    by_path = {df.file_path: df for files in existing_files.values() for df in files}
    # Partitions a fold may compact read their old files: count them (all partitions; a bound, not a guess).
    compactable = sum(int(df.record_count) for files in existing_files.values() if len(files) + 1 >= compact_at for df in files)
    in_driver = where == "driver" or (where == "auto" and sum(counts) + compactable <= driver_max)
    written = _fold_in_driver(items, n, out.location(STATE), existing, compact_at, storage_options) if in_driver else \
        _fold_on_cluster(items, n, out.location(STATE), existing, compact_at, storage_options)
    added, removed, rows = [], [], 0
    for r in written:
        added.append(r["path"])
        rows += r["rows"]
        removed.extend(by_path[p] for p in json.loads(r["replaced"]))
    commit_state(out, added, removed, top)
    return {"history_files": len(items), "state_rows_written": rows, "state_files_written": len(added),
            "state_files_replaced": len(removed), "folded_in": "driver" if in_driver else "cluster", "seconds": round(time.time() - t0, 2)}


def _fold_on_cluster(items: list[dict], n: int, location: str, existing: dict, compact_at: int, storage_options: dict | None) -> Iterator[dict]:
    import ray

    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 256))
    ds = ds.map_batches(typed_udf(_history_rows, ST.STATE_SCHEMA), fn_kwargs=dict(n=n, storage_options=storage_options), batch_size=8,
                        batch_format="pyarrow")
    written = ds.groupby(ST.URI_BUCKET, num_partitions=shuffle_partitions(n)).map_groups(
        _write_state_partition, batch_format="pyarrow",
        fn_kwargs=dict(location=location, existing=existing, compact_at=compact_at, storage_options=storage_options))
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def _fold_in_driver(items: list[dict], n: int, location: str, existing: dict, compact_at: int, storage_options: dict | None) -> list[dict]:
    """The cluster's two steps in this process: history files -> state rows -> one file per partition (written concurrently)."""
    from concurrent.futures import ThreadPoolExecutor

    history = pa.Table.from_pylist(items)
    rows = pa.concat_tables([t for i in range(0, history.num_rows, 8) for t in _history_rows(history.slice(i, 8), n, storage_options)])
    rows = rows.sort_by(ST.URI_BUCKET)
    buckets = rows[ST.URI_BUCKET].to_numpy()
    starts = [0, *(np.flatnonzero(buckets[1:] != buckets[:-1]) + 1).tolist(), len(buckets)]
    groups = [rows.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:]) if b > a]
    with ThreadPoolExecutor(max_workers=16) as pool:  # one small Parquet file per partition: object-store PUTs in parallel
        return [t.to_pylist()[0] for t in pool.map(lambda g: _write_state_partition(g, location, existing, compact_at, storage_options), groups)]
