"""Compaction: each finished night's small data files rewritten into few large ones, one ``replace`` snapshot per table."""

from __future__ import annotations

import datetime as dt
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from detector_core.storage import join
from detector_core.tables import definitions as T
from detector_core.tables.catalog import PROP_COMPACTION, ScanOutput, data_file_path
from detector_core.tables.maintenance.shared import (
    fs_path,
    night_of,
    partition_key,
    retry_commit,
)

COMPACT_TARGET_ROWS = 5_000_000  # rows per compacted file (~0.5-1 GB of scores rows)


def _with_field_ids(schema: pa.Schema, iceberg_schema) -> pa.Schema:
    """``schema`` with each field's Iceberg id in its Parquet metadata, so engines map the columns by id."""
    ids = {f.name: f.field_id for f in iceberg_schema.fields}
    return pa.schema([f.with_metadata({b"PARQUET:field_id": str(ids[f.name]).encode()}) for f in schema])


def _new_path(out: ScanOutput, name: str, key: tuple) -> str:
    if name in (*T.UNIT_TABLES, T.CHALLENGER):
        return data_file_path(out.uri, name, night_of(name, key).isoformat(), key[1], "compacted")
    if name in T.REVIEW_TABLES:
        return join(out.location(name), "data", f"{T.PARTITIONED[name][0]}={night_of(name, key).isoformat()}",
                    f"compacted-{uuid.uuid4().hex}.parquet")
    return join(out.location(name), "data", f"compacted-{uuid.uuid4().hex}.parquet")


def _rewrite(out: ScanOutput, name: str, key: tuple, files: list, target_rows: int, iceberg_schema) -> tuple[list[str], int]:
    """Stream ``files`` into new files of at most ``target_rows`` rows; returns their paths and the rows written."""
    schema = _with_field_ids(T.TABLE_SCHEMAS[name], iceberg_schema)
    paths, writer, rows_in_file, total = [], None, 0, 0
    try:
        for df in files:
            with out.fs.open(fs_path(df.file_path), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                    part = T.conform(pa.Table.from_batches([batch]), name).cast(schema)
                    if writer is None or rows_in_file >= target_rows:
                        if writer is not None:
                            writer.close()
                        paths.append(_new_path(out, name, key))
                        out.fs.makedirs(fs_path(paths[-1]).rsplit("/", 1)[0], exist_ok=True)
                        writer, rows_in_file = pq.ParquetWriter(out.fs.open(fs_path(paths[-1]), "wb"), schema), 0
                    writer.write_table(part)
                    rows_in_file += part.num_rows
                    total += part.num_rows
    finally:
        if writer is not None:
            writer.close()
    return paths, total


def compact(out: ScanOutput, before: dt.date | None = None, min_files: int = 4, target_rows: int = COMPACT_TARGET_ROWS,
            tables: tuple[str, ...] = (*T.ALL_TABLES, T.FEATURES, T.CHALLENGER, *T.REVIEW_TABLES)) -> dict[str, int]:
    """Rewrite the small files of each finished night's partitions into few large ones; returns files replaced per table.

    A night is finished when its date is before ``before`` (default: yesterday, UTC, so a scan
    running past midnight is never compacted under). A partition is rewritten once it holds
    ``min_files`` files; ``runs`` (unpartitioned) likewise. Each table's rewrite is one
    snapshot that replaces files with the same rows (checked before the commit).
    """
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    before = before or (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1))
    replaced = {}
    for name in tables:
        def once(name=name) -> int:
            table = out.find_table(name)
            if table is None or table.current_snapshot() is None:
                return 0
            groups: dict[tuple, list] = {}
            for task in table.scan().plan_files():
                key = partition_key(name, task.file)
                night = night_of(name, key)
                if night is None or night < before:
                    groups.setdefault(key, []).append(task.file)
            groups = {k: v for k, v in groups.items() if len(v) >= min_files}
            if not groups:
                return 0
            old, new = [], []
            for key, files in groups.items():
                paths, rows = _rewrite(out, name, key, files, target_rows, table.schema())
                if rows != sum(df.record_count for df in files):
                    raise RuntimeError(f"compacting {out.identifier(name)} {key}: wrote {rows} rows of "
                                       f"{sum(df.record_count for df in files)}; nothing committed")
                old.extend(files)
                new.extend(paths)
            try:
                with table.transaction() as tx:
                    with tx.update_snapshot(snapshot_properties={PROP_COMPACTION: "1"}).overwrite() as ow:
                        for df in old:
                            ow.delete_data_file(df)
                        for p in new:
                            ow.append_data_file(parquet_file_to_data_file(table.io, table.metadata, p))
            except Exception:
                for p in new:  # never referenced: gone now rather than at the next orphan removal
                    out.fs.rm_file(fs_path(p))
                raise
            return len(old)

        replaced[name] = retry_commit(once, f"compacting {out.identifier(name)}")
    return replaced
