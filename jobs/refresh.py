"""Keeping a scan output's ``state`` current: the history committed since its mark, folded in by Ray tasks.

``refresh_state`` reads only file lists on the driver (``detector_core.state_table``): the
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

import pyarrow as pa
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core import state as ST
from detector_core.catalog import HISTORY, PROP_PARTITIONS, STATE, ScanOutput
from detector_core.state_table import commit_state, history_files_since, open_state, state_mark
from detector_core.storage import join, open_fs
from jobs.planning import read_state, shuffle_partitions, typed_udf

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
    from jobs.common import write_parquet

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


def refresh_state(out: ScanOutput, storage_options: dict | None = None, compact_at: int = 8) -> dict:
    """Fold the history committed since the state's mark into ``state``; returns what it did."""
    import ray

    t0 = time.time()
    table, existing_files = open_state(out)
    n = int(table.properties.get(PROP_PARTITIONS, ST.DEFAULT_PARTITIONS))
    mark = state_mark(table)
    new, top = {}, {}
    for name in HISTORY:
        new[name], top[name] = history_files_since(out, name, int(mark.get(name, 0)))
    items = [{"path": p, "table": name} for name in HISTORY for p in new[name]]
    if not items:
        if top != mark:
            commit_state(out, [], [], top)
        return {"history_files": 0, "state_files_written": 0, "state_files_replaced": 0, "seconds": round(time.time() - t0, 2)}
    existing = {b: [df.file_path for df in files] for b, files in existing_files.items()}
    by_path = {df.file_path: df for files in existing_files.values() for df in files}
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 256))
    ds = ds.map_batches(typed_udf(_history_rows, ST.STATE_SCHEMA), fn_kwargs=dict(n=n, storage_options=storage_options), batch_size=8,
                        batch_format="pyarrow")
    written = ds.groupby(ST.URI_BUCKET, num_partitions=shuffle_partitions(n)).map_groups(
        _write_state_partition, batch_format="pyarrow",
        fn_kwargs=dict(location=out.location(STATE), existing=existing, compact_at=compact_at, storage_options=storage_options))
    added, removed, rows = [], [], 0
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.to_pylist():
            added.append(r["path"])
            rows += r["rows"]
            removed.extend(by_path[p] for p in json.loads(r["replaced"]))
    commit_state(out, added, removed, top)
    return {"history_files": len(items), "state_rows_written": rows, "state_files_written": len(added),
            "state_files_replaced": len(removed), "seconds": round(time.time() - t0, 2)}
