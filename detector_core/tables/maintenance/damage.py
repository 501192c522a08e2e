"""Damage: referenced files that are missing, and tables a lost catalog no longer knows; found (``check``) and mended (``repair``)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables.catalog import HISTORY, OUTPUT_TABLES, STATE, ScanOutput, data_file_path
from detector_core.tables.maintenance.shared import (
    EPOCH,
    fs_path,
    listing,
    night_of,
    partition_key,
    pending_path,
    referenced,
)


def check(out: ScanOutput) -> dict[str, dict[str, list[str]]]:
    """Files that a live snapshot of each table references and the storage does not hold: {table: {kind: [paths]}}
    (and ``_repair`` when a repair was cut short: run it again)."""
    problems = {}
    if out.fs.exists(pending_path(out)):
        problems["_repair"] = {"pending": [pending_path(out)]}
    for name in OUTPUT_TABLES:
        table = out.find_table(name)
        if table is None:
            continue
        have = set(listing(out, fs_path(out.location(name))))
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
    from detector_core.tables.catalog import CatalogError

    out.catalog.create_namespace_if_not_exists(out.namespace)
    found = {}
    for name in OUTPUT_TABLES:
        if out.find_table(name) is not None:
            continue
        newest = _newest_metadata(out, name)
        if newest is None:
            continue
        location = str(json.loads(out.fs.cat_file(newest)).get("location", "")).rstrip("/")
        if fs_path(location) != fs_path(out.location(name)).rstrip("/"):
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
    gone = [t.file for t in table.scan().plan_files() if fs_path(t.file.file_path) in missing]
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
        night = night_of("flagged", (day, bucket)).isoformat()
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
    from detector_core.storage import write_atomic

    registered = register_lost(out)
    out.ensure_tables(lost_ok=True)
    problems = check(out) if problems is None else problems
    problems.pop("_repair", None)
    # A repair cut short (kill -9) left tables half mended, which check() no longer sees
    # (the missing files are out of the tables): what it was mending is saved first, and
    # the next repair finishes it.
    pending = pending_path(out)
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
            partitions |= {partition_key(name, df) for df in gone} | set(_partitions_of(missing))
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
            keys.append(((dt.date.fromisoformat(parts[S.SCAN_DATE]) - EPOCH).days, parts[S.BUCKET]))
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
            files = {fs_path(e.data_file.file_path) for m in snap.manifests(table.io)
                     for e in m.fetch_manifest_entry(table.io, discard_deleted=True)}
            if files & missing:
                bad.append(snap.snapshot_id)
        if bad:
            table.maintenance.expire_snapshots().by_ids(bad).commit()
