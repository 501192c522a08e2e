"""The scan's incremental state: the latest outcome of every object per detector, and the plan's anti-join.

A scan scores only the objects that no committed row of the same detector settles. At 10⁹
objects that question cannot be answered in one process, so the answer is kept as a compact
table, ``state`` (``STATE_SCHEMA``: ``detector_id, uri, etag, size, outcome, scan_id,
scanned_at, uri_bucket``), beside the audit tables. It is *derived*: every row comes from a
committed ``scores`` row (outcome ``scored``) or ``errors`` row that failed for good
(outcome ``failed``: decode and embed errors; read and list errors are retried), so it can
be deleted and rebuilt from that history at any time.

The table is partitioned by ``uri_bucket``, Iceberg's ``bucket[N](uri)`` (murmur3 of the
UTF-8 uri, ``uri_bucket_column``) stored as a column, so that one partition is one unit of
work: the listing is shuffled by the same function and each partition's anti-join
(``anti_join``) reads only its own state files. (A stored column with an identity partition,
not Iceberg's bucket transform, because data files written by workers are attached to the
table by their statistics, which a hash transform cannot be inferred from.)

Everything here is plain pyarrow on one partition's rows; ``jobs.scanning.planning`` runs it in Ray
tasks.
"""

from __future__ import annotations

import json

import mmh3
import pyarrow as pa
import pyarrow.compute as pc

from detector_core import schema as S
from detector_core.schema import LIST_SCHEMA

__all__ = ["STATE_SCHEMA", "UNSETTLED_STAGES", "URI_BUCKET", "anti_join", "dedupe_uris", "history_to_state",
           "latest", "todo_column", "uri_bucket_column"]

URI_BUCKET = "uri_bucket"
OUTCOME = "outcome"
DEFAULT_PARTITIONS = 256
# Failures that are tried again on the next scan (the object may come back); any other error settles the object.
UNSETTLED_STAGES = ("read", "list")
_TS = pa.timestamp("us", tz="UTC")

STATE_SCHEMA = pa.schema([
    (S.DETECTOR_ID, pa.string()), (S.URI, pa.string()), (S.ETAG, pa.string()), (S.SIZE, pa.int64()), (OUTCOME, pa.string()),
    (S.SCAN_ID, pa.string()), (S.SCANNED_AT, _TS), (URI_BUCKET, pa.int32()),
])

def uri_bucket_column(uris: pa.Array | pa.ChunkedArray, n: int) -> pa.Array:
    """Iceberg's ``bucket[n]`` of each uri: ``(murmur3_32(utf8) & 0x7fffffff) % n``; null uris go to bucket 0."""
    h = mmh3.hash
    return pa.array([0 if u is None else (h(u.encode()) & 0x7FFFFFFF) % n for u in uris.to_pylist()], pa.int32())


def todo_column(i: int) -> str:
    """Work-row column: does detector ``i`` of an ensemble still need this object (detectors' states differ)?"""
    return f"_todo_{i}"


def _first_per(table: pa.Table, keys: list[str]) -> pa.Table:
    """The first row (in table order) of every distinct ``keys``."""
    if table.num_rows == 0:
        return table
    idx = table.select(keys).append_column("_i", pa.array(range(table.num_rows), pa.int64()))
    first = idx.group_by(keys, use_threads=False).aggregate([("_i", "min")])["_i_min"]
    return table.take(pc.take(first, pc.sort_indices(first)))  # the first rows, in table order


def history_to_state(rows: pa.Table, table_name: str, n: int) -> pa.Table:
    """``scores`` or ``errors`` rows -> state rows (errors only where they settle the object)."""
    if table_name == "errors":
        rows = rows.filter(pc.invert(pc.is_in(rows[S.ERROR_STAGE], pa.array(UNSETTLED_STAGES))))
        outcome = "failed"
    else:
        outcome = "scored"
    rows = rows.filter(pc.is_valid(rows[S.URI]))
    cols = {c: rows[c] for c in (S.DETECTOR_ID, S.URI, S.ETAG, S.SIZE)}
    cols[OUTCOME] = pa.array([outcome] * rows.num_rows, pa.string())
    cols[S.SCAN_ID] = rows[S.SCAN_ID]
    cols[S.SCANNED_AT] = rows[S.SCANNED_AT]
    cols[URI_BUCKET] = uri_bucket_column(rows[S.URI], n)
    return pa.table(cols).cast(STATE_SCHEMA)


def latest(state: pa.Table) -> pa.Table:
    """One row per (detector_id, uri): the most recently written."""
    if state.num_rows == 0:
        return state
    ordered = state.take(pc.sort_indices(state, [(S.SCANNED_AT, "descending")]))
    return _first_per(ordered, [S.DETECTOR_ID, S.URI])


def dedupe_uris(listed: pa.Table) -> tuple[pa.Table, int]:
    """Each uri once (a manifest that names an object twice scores it once); rows without a uri are kept as they are."""
    no_uri = pc.or_(pc.is_null(listed[S.URI]), pc.equal(pc.utf8_trim_whitespace(pc.fill_null(listed[S.URI], "")), ""))
    named = listed.filter(pc.invert(no_uri))
    # Prefer a row the listing could use over an error row for the same uri.
    named = named.take(pc.sort_indices(named.append_column("_bad", pc.is_valid(named[S.ERROR_TYPE])), [("_bad", "ascending")]))
    unique = _first_per(named, [S.URI])
    return pa.concat_tables([unique, listed.filter(no_uri)]), named.num_rows - unique.num_rows


def _agrees(listed: pa.ChunkedArray, done: pa.ChunkedArray) -> pa.ChunkedArray:
    # A listing without etag (or size) compares on what it has.
    return pc.or_(pc.is_null(listed), pc.fill_null(pc.equal(listed, done), False))


def anti_join(listed: pa.Table, state: pa.Table, detector_ids: list[str], full: bool = False,
              captions: pa.Table | None = None) -> tuple[pa.Table, dict]:
    """One partition's plan: the listed objects some detector has not settled, and the counts.

    ``listed``: ``LIST_SCHEMA`` rows of one ``uri_bucket``; ``state``: that partition's state
    rows (any number of versions per object: the latest counts). Returns the work rows
    (``uri, etag, size, error_stage, error_type, error_message``, ``caption`` when captions are
    given, and ``_todo_<i>`` per detector when there are several) and ``{listed, duplicates,
    list_errors, work, skipped: {detector_id: n}}``.
    """
    listed, duplicates = dedupe_uris(listed.select(LIST_SCHEMA.names).cast(LIST_SCHEMA))
    bad = pc.is_valid(listed[S.ERROR_TYPE])
    n = listed.num_rows
    todo = []
    current = latest(state) if (state is not None and state.num_rows and not full) else None
    for d in detector_ids:
        if current is None:
            todo.append(pa.chunked_array([pa.array([True] * n, pa.bool_())]))
            continue
        done = current.filter(pc.equal(current[S.DETECTOR_ID], d)).select([S.URI, S.ETAG, S.SIZE])
        done = done.rename_columns([S.URI, "_etag", "_size"])
        j = listed.append_column("_i", pa.array(range(n), pa.int64())).join(done, keys=S.URI, join_type="left outer")
        j = j.sort_by("_i")
        settled = pc.and_(_has_row(j, done), pc.and_(_agrees(j[S.ETAG], j["_etag"]), _agrees(j[S.SIZE], j["_size"])))
        todo.append(pc.or_(pc.invert(pc.fill_null(settled, False)), bad))
    any_todo = todo[0]
    for t in todo[1:]:
        any_todo = pc.or_(any_todo, t)
    stage = pc.if_else(bad, pa.scalar("list"), pa.scalar(None, pa.string()))
    work = pa.table({S.URI: listed[S.URI], S.ETAG: listed[S.ETAG], S.SIZE: listed[S.SIZE], S.ERROR_STAGE: stage,
                     S.ERROR_TYPE: listed[S.ERROR_TYPE], S.ERROR_MESSAGE: listed[S.ERROR_MESSAGE]})
    if len(detector_ids) > 1:
        for i, t in enumerate(todo):
            work = work.append_column(todo_column(i), t)
    work = work.filter(any_todo)
    if captions is not None:
        caps = _first_per(captions.select([S.URI, S.CAPTION]).cast(pa.schema([(S.URI, pa.string()), (S.CAPTION, pa.string())])),
                          [S.URI])
        work = work.append_column("_i", pa.array(range(work.num_rows), pa.int64())).join(caps, keys=S.URI, join_type="left outer")
        work = work.sort_by("_i").drop_columns(["_i"])
    counts = {"listed": n, "duplicates": duplicates, "list_errors": int(pc.sum(bad).as_py() or 0), "work": work.num_rows,
              "skipped": {d: n - int(pc.sum(t).as_py() or 0) for d, t in zip(detector_ids, todo)}}
    return work, counts


def _has_row(joined: pa.Table, done: pa.Table) -> pa.ChunkedArray:
    """Rows of the left join that found a state row (the uri is in ``done``)."""
    return pc.is_in(joined[S.URI], value_set=done[S.URI].combine_chunks() if done.num_rows else pa.array([], pa.string()))


def counts_json(counts: dict) -> str:
    return json.dumps(counts, sort_keys=True)
