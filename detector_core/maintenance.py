"""Keeping a scan output's tables fast and whole for a year of nights: expiry, compaction, orphans, check and repair.

Every commit unit adds a snapshot to each table. Left alone, each commit rewrites an ever
larger ``metadata.json`` and every query opens one manifest per commit (docs/scaling.md:
the tables over a year). The table properties (``catalog.TABLE_PROPERTIES``) merge
manifests and bound the metadata log on every commit; this module does the rest, on
pyiceberg's public APIs, each step safe beside a scan that is committing (every change is
an optimistic Iceberg commit, tried again when a scan's commit wins the race):

- ``expire``: drops snapshots nobody needs (pyiceberg's ``expire_snapshots``): a finished
  scan's final snapshot (pinned by its ``completed`` runs row) stays for ``keep_days``;
  a unit's intermediate snapshot for ``unit_hours``; the newest runs row's snapshots, the
  current ones and the history the state has not folded yet always stay. Metadata only.
- ``compact``: rewrites each finished night's small data files into few large ones (one
  ``replace`` snapshot per table, marked ``detector.compaction`` so the state never counts
  its rows twice); ``runs`` and ``verdicts`` too.
- ``remove_orphans``: deletes files that no live snapshot references and that are older
  than a safety age: killed units' files, compaction leftovers, replaced state files, old
  metadata, stale lease temporaries. Files named by a pending intent are kept (recovery
  commits them).
- ``check`` / ``repair``: referenced files that are missing, and tables a lost catalog no
  longer knows. ``repair`` registers lost tables from their newest metadata, removes missing
  files from the tables (flagged rebuilt from scores where either lost rows), drops the
  state (rebuilt from history, so the lost objects are scored again) and commits a
  ``runs`` row of status ``repair`` that pins the repaired snapshots.

Nothing here imports Ray; ``jobs.maintain`` is the command.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core import tables as T
from detector_core.catalog import (
    HISTORY,
    OUTPUT_TABLES,
    PROP_COMPACTION,
    PROP_MARK,
    PROP_SCAN,
    PROP_UNIT,
    STATE,
    ScanOutput,
    data_file_path,
)
from detector_core.storage import join

__all__ = ["check", "compact", "expire", "register_lost", "remove_orphans", "repair"]

SNAPSHOT_COLUMNS = tuple(f"{t}_snapshot_id" for t in T.TABLES)
COMPACT_TARGET_ROWS = 5_000_000  # rows per compacted file (~0.5-1 GB of scores rows)
_EPOCH = dt.date(1970, 1, 1)
_SCHEMES = ("file://", "s3://", "s3a://", "gs://", "gcs://")


def _ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def _now_ms(now: dt.datetime | None) -> int:
    return _ms(now) if now is not None else int(time.time() * 1000)


def _retry(fn, what: str, attempts: int = 6):
    """``fn()`` again after a short sleep whenever another writer's commit won the race (Iceberg's optimistic commits;
    pyiceberg's own retry of a rewrite refuses when files were added meanwhile, a ``ValidationException``)."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    for attempt in range(attempts):
        try:
            return fn()
        except (CommitFailedException, ValidationException):
            if attempt == attempts - 1:
                raise RuntimeError(f"{what}: other writers kept committing first ({attempts} tries)") from None
            time.sleep(0.2 * 2**attempt)


# -- expiry ------------------------------------------------------------------------------------
def pinned(out: ScanOutput, keep_days: float, unit_hours: float, now: dt.datetime | None = None) -> dict[str, set[int]]:
    """Per result table, the snapshot ids that ``runs`` rows still pin: the newest row's always, a finished
    (or repaired) scan's for ``keep_days``, a unit's for ``unit_hours``."""
    keep: dict[str, set[int]] = {t: set() for t in T.TABLES}
    runs = out.read("runs", selected_fields=("status", "committed_at", *SNAPSHOT_COLUMNS))
    if runs.num_rows == 0:
        return keep
    now_ms = _now_ms(now)
    window, units = now_ms - keep_days * 86_400_000, now_ms - unit_hours * 3_600_000
    rows = runs.to_pylist()
    newest = max(rows, key=lambda r: r["committed_at"])
    for r in rows:
        ms = _ms(r["committed_at"])
        if r is newest or ms >= units or (ms >= window and r["status"] != "unit"):
            for t in T.TABLES:
                if r[f"{t}_snapshot_id"] is not None:
                    keep[t].add(int(r[f"{t}_snapshot_id"]))
    return keep


def expire(out: ScanOutput, keep_days: float = 7.0, unit_hours: float = 12.0, now: dt.datetime | None = None) -> dict[str, int]:
    """Expire the snapshots of every table that nothing needs any more (see the module docstring); returns how many per table.

    Only metadata changes: the files stay until ``remove_orphans`` finds them unreferenced.
    """
    keep = pinned(out, keep_days, unit_hours, now)
    # A killed scan's half-committed unit: recovery finds which tables it reached by these
    # snapshots, so they stay until it has run (expired, the unit would be committed twice).
    pending = {(i["scan_id"], str(i["unit"])) for _, i in out.pending_intents() if i}
    now_ms = _now_ms(now)
    state = out.find_table(STATE)
    mark = json.loads(state.properties.get(PROP_MARK, "{}")) if state is not None else {}
    expired = {}
    for name in OUTPUT_TABLES:
        age_ms = (keep_days * 86_400_000) if name in T.REVIEW_TABLES else (unit_hours * 3_600_000)

        def once(name=name, age_ms=age_ms) -> int:
            table = out.find_table(name)
            if table is None or table.current_snapshot() is None:
                return 0
            current = table.current_snapshot().snapshot_id
            folded = int(mark.get(name, 0)) if name in HISTORY else None
            ids = [s.snapshot_id for s in table.metadata.snapshots
                   if s.snapshot_id != current and s.timestamp_ms < now_ms - age_ms and s.snapshot_id not in keep.get(name, ())
                   and (folded is None or (s.sequence_number or 0) <= folded)  # the state's refresh still walks the others
                   and _unit_of(s) not in pending]
            if ids:
                table.maintenance.expire_snapshots().by_ids(ids).commit()
            return len(ids)

        expired[name] = _retry(once, f"expiring snapshots of {out.identifier(name)}")
    return expired


def _unit_of(snapshot) -> tuple[str | None, str | None]:
    props = snapshot.summary.additional_properties if snapshot.summary else {}
    return props.get(PROP_SCAN), props.get(PROP_UNIT)


# -- compaction -------------------------------------------------------------------------------
def _partition_key(name: str, data_file) -> tuple:
    values = tuple(data_file.partition[i] for i in range(len(T.PARTITIONED.get(name, ()))))
    return values


def _night(name: str, key: tuple) -> dt.date | None:
    """The date a partition belongs to (scan_date, or review_date for verdicts), None for unpartitioned tables."""
    if not key:
        return None
    day = key[0]
    return _EPOCH + dt.timedelta(days=day) if isinstance(day, int) else day


def _with_field_ids(schema: pa.Schema, iceberg_schema) -> pa.Schema:
    """``schema`` with each field's Iceberg id in its Parquet metadata, so engines map the columns by id."""
    ids = {f.name: f.field_id for f in iceberg_schema.fields}
    return pa.schema([f.with_metadata({b"PARQUET:field_id": str(ids[f.name]).encode()}) for f in schema])


def _new_path(out: ScanOutput, name: str, key: tuple) -> str:
    if name in T.TABLES:
        return data_file_path(out.uri, name, _night(name, key).isoformat(), key[1], "compacted")
    if name in T.REVIEW_TABLES:
        return join(out.location(name), "data", f"{T.PARTITIONED[name][0]}={_night(name, key).isoformat()}",
                    f"compacted-{uuid.uuid4().hex}.parquet")
    return join(out.location(name), "data", f"compacted-{uuid.uuid4().hex}.parquet")


def _rewrite(out: ScanOutput, name: str, key: tuple, files: list, target_rows: int, iceberg_schema) -> tuple[list[str], int]:
    """Stream ``files`` into new files of at most ``target_rows`` rows; returns their paths and the rows written."""
    schema = _with_field_ids(T.TABLE_SCHEMAS[name], iceberg_schema)
    paths, writer, rows_in_file, total = [], None, 0, 0
    try:
        for df in files:
            with out.fs.open(_fs_path(df.file_path), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                    part = T.conform(pa.Table.from_batches([batch]), name).cast(schema)
                    if writer is None or rows_in_file >= target_rows:
                        if writer is not None:
                            writer.close()
                        paths.append(_new_path(out, name, key))
                        out.fs.makedirs(_fs_path(paths[-1]).rsplit("/", 1)[0], exist_ok=True)
                        writer, rows_in_file = pq.ParquetWriter(out.fs.open(_fs_path(paths[-1]), "wb"), schema), 0
                    writer.write_table(part)
                    rows_in_file += part.num_rows
                    total += part.num_rows
    finally:
        if writer is not None:
            writer.close()
    return paths, total


def compact(out: ScanOutput, before: dt.date | None = None, min_files: int = 4, target_rows: int = COMPACT_TARGET_ROWS,
            tables: tuple[str, ...] = (*T.ALL_TABLES, *T.REVIEW_TABLES)) -> dict[str, int]:
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
                key = _partition_key(name, task.file)
                night = _night(name, key)
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
                    out.fs.rm_file(_fs_path(p))
                raise
            return len(old)

        replaced[name] = _retry(once, f"compacting {out.identifier(name)}")
    return replaced


# -- what the tables reference -------------------------------------------------------------------
def _fs_path(path: str) -> str:
    """A table's file path as the output's fsspec filesystem names it (no scheme)."""
    for scheme in _SCHEMES:
        if path.startswith(scheme):
            return path[len(scheme):]
    return path


def referenced(table) -> dict[str, set[str]]:
    """Every file that the table's live snapshots need: ``data``, ``manifests`` (+ lists) and ``metadata``."""
    io, meta = table.io, table.metadata
    data, manifests = set(), set()
    for snap in meta.snapshots:
        manifests.add(_fs_path(snap.manifest_list))
        for m in snap.manifests(io):
            path = _fs_path(m.manifest_path)
            if path in manifests:
                continue
            manifests.add(path)
            for entry in m.fetch_manifest_entry(io, discard_deleted=True):
                data.add(_fs_path(entry.data_file.file_path))
    metadata = {_fs_path(table.metadata_location)} | {_fs_path(e.metadata_file) for e in meta.metadata_log}
    metadata |= {_fs_path(s.statistics_path) for s in meta.statistics}
    return {"data": data, "manifests": manifests, "metadata": metadata}


def _listing(out: ScanOutput, folder: str) -> dict[str, dict]:
    out.fs.invalidate_cache(folder)  # s3fs caches listings: this must be what the store holds now
    try:
        return out.fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return float(value)
    return time.time()  # unknown age: treated as new, never removed


def remove_orphans(out: ScanOutput, older_than_s: float, dry_run: bool = False, now: float | None = None) -> dict[str, list[str]]:
    """Delete the files under the output's tables (and lease/intent temporaries) that no live snapshot
    references and that are older than ``older_than_s``; returns them per table.

    The age is the guard against a commit in flight: a scan's workers write data files before
    the driver commits them, and a commit writes its manifests and metadata before the
    catalog points at them. Keep it well above a commit unit's duration (default 3 days).
    """
    now = time.time() if now is None else now
    removed: dict[str, list[str]] = {}
    for name in OUTPUT_TABLES:
        # In this order: the files, then the pending intents, then the table's metadata. A file
        # listed here is either named by an intent still pending when read, or committed
        # before its intent went, so in the metadata loaded after (or young: see the age).
        listed = _listing(out, _fs_path(out.location(name)))
        keep = {_fs_path(p) for _, intent in out.pending_intents() if intent for paths in intent["files"].values() for p in paths}
        table = out.find_table(name)
        if table is None:
            continue
        refs = referenced(table)
        live = refs["data"] | refs["manifests"] | refs["metadata"] | keep
        removed[name] = sorted(p for p, info in listed.items()
                               if info.get("type") != "directory" and p not in live and now - _mtime(info) > older_than_s)
    temporaries = {**_listing(out, f"{out.root}/_lease"), **_listing(out, f"{out.root}/_intents")}
    removed["_temporary"] = sorted(p for p, info in temporaries.items()
                                   if p.endswith(".tmp") and now - _mtime(info) > older_than_s)
    if not dry_run:
        for paths in removed.values():
            for p in paths:
                try:
                    out.fs.rm_file(p)
                except FileNotFoundError:
                    pass
    return removed


# -- check and repair -----------------------------------------------------------------------------
def _pending_path(out: ScanOutput) -> str:
    return f"{out.root}/_maintenance/repair-pending.json"


def check(out: ScanOutput) -> dict[str, dict[str, list[str]]]:
    """Files that a live snapshot of each table references and the storage does not hold: {table: {kind: [paths]}}
    (and ``_repair`` when a repair was cut short: run it again)."""
    problems = {}
    if out.fs.exists(_pending_path(out)):
        problems["_repair"] = {"pending": [_pending_path(out)]}
    for name in OUTPUT_TABLES:
        table = out.find_table(name)
        if table is None:
            continue
        have = set(_listing(out, _fs_path(out.location(name))))
        try:
            refs = referenced(table)
        except (FileNotFoundError, OSError) as exc:  # a manifest list or manifest itself is gone
            problems[name] = {"manifests": [str(getattr(exc, "filename", None) or exc)]}
            continue
        missing = {kind: sorted(p for p in paths if p not in have) for kind, paths in refs.items()}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            problems[name] = missing
    return problems


def _newest_metadata(out: ScanOutput, name: str) -> str | None:
    """The newest readable metadata file of table ``name`` on storage (the highest version; among equals, the latest update)."""
    best = None
    for path in out.metadata_files(name):
        try:
            meta = json.loads(out.fs.cat_file(path))
        except (ValueError, OSError):
            continue
        version = int(path.rsplit("/", 1)[-1].split("-", 1)[0])
        rank = (version, meta.get("last-updated-ms", 0))
        if best is None or rank > best[0]:
            best = (rank, path)
    return None if best is None else best[1]


def _full(out: ScanOutput, fs_path: str) -> str:
    """A path as the output's filesystem names it -> as the tables name it (the scheme back on remote outputs)."""
    return f"{out.uri.split('://', 1)[0]}://{fs_path}" if "://" in out.uri else fs_path


def register_lost(out: ScanOutput) -> list[str]:
    """Register every table the catalog lost from its newest metadata on storage; returns their names.

    A table's metadata names its location with absolute paths: metadata that names another
    location (an output copied or moved) is refused (``CatalogError``), not registered.
    """
    from detector_core.catalog import CatalogError

    out.catalog.create_namespace_if_not_exists(out.namespace)
    found = {}
    for name in OUTPUT_TABLES:
        if out.find_table(name) is not None:
            continue
        newest = _newest_metadata(out, name)
        if newest is None:
            continue
        location = str(json.loads(out.fs.cat_file(newest)).get("location", "")).rstrip("/")
        if _fs_path(location) != _fs_path(out.location(name)).rstrip("/"):
            raise CatalogError(f"the metadata of table {name} under {out.uri} says the table lives at {location}: this output was "
                               "copied or moved, and Iceberg metadata holds absolute paths; repair it where it was written, or "
                               "copy it with an Iceberg-aware tool")
        found[name] = newest
    for name, newest in found.items():
        out.catalog.register_table(out.identifier(name), _full(out, newest))
    return list(found)


def _drop_missing(out: ScanOutput, name: str, missing: set[str]) -> list:
    """Remove the current snapshot's entries of missing files from table ``name``; returns the removed DataFiles."""
    table = out.table(name)
    gone = [t.file for t in table.scan().plan_files() if _fs_path(t.file.file_path) in missing]
    if gone:
        with table.transaction() as tx:
            with tx.update_snapshot(snapshot_properties={"detector.repair": "missing files"}).overwrite() as ow:
                for df in gone:
                    ow.delete_data_file(df)
    return gone


def _rebuild_flagged(out: ScanOutput, keys: set[tuple]) -> int:
    """Make the flagged partitions ``keys`` exactly the flagged rows of scores again; returns the rows written."""
    from pyiceberg.expressions import And, EqualTo
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    from detector_core.storage import open_fs

    rows = 0
    for day, bucket in sorted(keys):
        night = _night("flagged", (day, bucket)).isoformat()
        where = And(EqualTo(S.SCAN_DATE, night), EqualTo(S.BUCKET, bucket))
        flagged = out.read("scores", And(where, EqualTo(S.FLAGGED, True)))
        flagged = T.conform(flagged, "flagged")
        table = out.table("flagged")
        old = [t.file for t in table.scan(row_filter=where).plan_files()]
        path = data_file_path(out.uri, "flagged", night, bucket, "repaired")
        if flagged.num_rows:
            fs, p = open_fs(path, out.storage_options)
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(p, "wb") as f:
                pq.write_table(flagged, f)
        if not old and not flagged.num_rows:
            continue
        with table.transaction() as tx:
            with tx.update_snapshot(snapshot_properties={"detector.repair": "flagged from scores"}).overwrite() as ow:
                for df in old:
                    ow.delete_data_file(df)
                if flagged.num_rows:
                    ow.append_data_file(parquet_file_to_data_file(table.io, table.metadata, path))
        rows += flagged.num_rows
    return rows


def repair(out: ScanOutput, problems: dict | None = None) -> dict:
    """Mend what ``check`` found (and a lost catalog); returns what was done. See the module docstring."""
    from detector_core.catalog import write_atomic

    registered = register_lost(out)
    out.ensure_tables(lost_ok=True)
    problems = check(out) if problems is None else problems
    problems.pop("_repair", None)
    # A repair cut short (kill -9) left tables half mended, which check() no longer sees
    # (the missing files are out of the tables): what it was mending is saved first, and
    # the next repair finishes it.
    pending = _pending_path(out)
    if out.fs.exists(pending):
        for name, kinds in json.loads(out.fs.cat_file(pending)).items():
            for kind, paths in kinds.items():
                merged = set(problems.setdefault(name, {}).get(kind, [])) | set(paths)
                problems[name][kind] = sorted(merged)
    if problems:
        out.fs.makedirs(pending.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(out.fs, pending, json.dumps(problems).encode())
    done: dict = {"registered": registered, "removed": {}, "flagged_rows_rebuilt": 0, "state_reset": False, "unrepairable": {}}
    partitions: set[tuple] = set()
    for name, kinds in problems.items():
        if name == STATE:
            continue
        if kinds.get("manifests") or kinds.get("metadata"):
            done["unrepairable"][name] = kinds.get("manifests", []) + kinds.get("metadata", [])
        missing = set(kinds.get("data", []))
        if not missing:
            continue
        gone = _drop_missing(out, name, missing)
        done["removed"][name] = sorted(missing)
        if name in ("scores", "flagged"):
            partitions |= {_partition_key(name, df) for df in gone} | set(_partitions_of(missing))
    if partitions:
        done["flagged_rows_rebuilt"] = _rebuild_flagged(out, partitions)
    if any(n in done["removed"] for n in HISTORY) or STATE in problems:
        out.reset_state(reason="files it was derived from, or its own, are missing")
        done["state_reset"] = True
    if done["removed"]:
        _expire_damaged(out, problems)
        now = dt.datetime.now(dt.timezone.utc)
        snaps = {t: (out.table(t).current_snapshot().snapshot_id if out.table(t).current_snapshot() else None) for t in T.TABLES}
        row = {"scan_id": f"repair-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}", "unit": -1, "status": "repair",
               "scan_date": now.date(), "started_at": now, "committed_at": now,
               "config": json.dumps({"removed": done["removed"]}), "schema_version": T.SCHEMA_VERSION,
               **{f"{t}_snapshot_id": s for t, s in snaps.items()}}
        out.table("runs").append(T.runs_table([row]))
    if out.fs.exists(pending):
        out.fs.rm_file(pending)
    return done


def _partitions_of(paths: set[str]) -> list[tuple]:
    """(scan_date as days, bucket) of data files by their path (``…/scan_date=D/bucket=B/…``): partitions a cut-short repair
    already removed files of, whose ``DataFile`` entries are gone."""
    keys = []
    for p in paths:
        parts = dict(seg.split("=", 1) for seg in p.split("/") if "=" in seg and seg.split("=", 1)[0] in (S.SCAN_DATE, S.BUCKET))
        if len(parts) == 2:
            keys.append(((dt.date.fromisoformat(parts[S.SCAN_DATE]) - _EPOCH).days, parts[S.BUCKET]))
    return keys


def _expire_damaged(out: ScanOutput, problems: dict) -> None:
    """Expire the older snapshots that still reference a missing file: nobody can read them any more."""
    for name, kinds in problems.items():
        missing = set(kinds.get("data", []))
        table = out.find_table(name)
        if not missing or table is None:
            continue
        current = table.current_snapshot().snapshot_id
        bad = []
        for snap in table.metadata.snapshots:
            if snap.snapshot_id == current:
                continue
            files = {_fs_path(e.data_file.file_path) for m in snap.manifests(table.io)
                     for e in m.fetch_manifest_entry(table.io, discard_deleted=True)}
            if files & missing:
                bad.append(snap.snapshot_id)
        if bad:
            table.maintenance.expire_snapshots().by_ids(bad).commit()

