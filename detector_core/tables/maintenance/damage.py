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


def check(out: ScanOutput, deep: bool = True) -> dict[str, dict[str, list[str]]]:
    """Everything that blocks a scan or hides an object: {table: {kind: [what]}}.

    Kinds: ``data``/``manifests``/``metadata`` (a live snapshot references a file the storage
    does not hold), ``lineage`` (the catalog's table is not the one ``_catalog.json``
    recorded: a dropped table brought back), ``intents`` (a pending intent that cannot be
    finished; under ``_intents``), ``flagged`` (``deep``: a partition whose ``flagged`` rows are
    not the flagged rows of ``scores``), and ``_repair`` when a repair was cut short. Every
    kind is mended by ``repair``.
    """
    problems: dict = {}
    if out.fs.exists(pending_path(out)):
        problems["_repair"] = {"pending": [pending_path(out)]}
    for name, why in stale_tables(out).items():
        problems.setdefault(name, {})["lineage"] = [why]
    blocked = []
    for path, intent in out.pending_intents():
        why = "not a usable intent" if intent is None else out._unfinishable(intent)
        if why:
            blocked.append(f"{path} ({why})")
    if blocked:
        problems["_intents"] = {"intents": blocked}
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
            problems.setdefault(name, {}).update(missing)
    if deep and "scores" not in problems and "flagged" not in problems:
        bad = flagged_mismatch(out)
        if bad:
            problems["flagged"] = {"flagged": bad}
    return problems


def flagged_mismatch(out: ScanOutput) -> list[str]:
    """Partitions (``scan_date=…/bucket=…``) whose ``flagged`` row count differs from ``scores``' rows with flagged = true.

    flagged ⊆ scores is the tables' promise: a unit that committed its scores and not its flagged rows
    hides objects from every review queue. The flagged side is counted from metadata; the scores side
    reads the ``flagged`` column (pushed down, so files whose statistics say no row is flagged are skipped).
    """
    from pyiceberg.expressions import EqualTo

    if out.table("scores").current_snapshot() is None:
        return []
    flagged_counts: dict[tuple, int] = {}
    table = out.table("flagged")
    if table.current_snapshot() is not None:
        for task in table.scan().plan_files():
            key = partition_key("flagged", task.file)
            flagged_counts[key] = flagged_counts.get(key, 0) + task.file.record_count
    rows = out.read("scores", EqualTo(S.FLAGGED, True), selected_fields=(S.SCAN_DATE, S.BUCKET))
    scores_counts: dict[tuple, int] = {}
    for r in rows.group_by([S.SCAN_DATE, S.BUCKET]).aggregate([([], "count_all")]).to_pylist():
        scores_counts[((r[S.SCAN_DATE] - EPOCH).days, r[S.BUCKET])] = r["count_all"]
    bad = sorted(k for k in set(flagged_counts) | set(scores_counts) if flagged_counts.get(k, 0) != scores_counts.get(k, 0))
    return [f"scan_date={night_of('flagged', k).isoformat()}/bucket={k[1]} (flagged {flagged_counts.get(k, 0)}, "
            f"scores flagged {scores_counts.get(k, 0)})" for k in bad]


def _lineage_metadata(out: ScanOutput, name: str, recorded: str | None) -> tuple[str | None, str]:
    """The newest metadata file of table ``name``'s own lineage on storage, and '' or why none can be trusted.

    The lineage is the table uuid that ``_catalog.json`` recorded (``ScanOutput.record_tables``).
    Without a record, the metadata on disk must all be one table's; otherwise the choice is
    refused, except for ``state``, which is rebuilt rather than guessed. Version numbers only
    order one lineage's files: a dropped table's leftovers may have higher ones.
    """
    lineages: dict[str, tuple] = {}
    for path in out.metadata_files(name):
        try:
            meta = json.loads(out.fs.cat_file(path))
        except (ValueError, OSError):
            continue
        version = int(path.rsplit("/", 1)[-1].split("-", 1)[0])
        rank = (version, meta.get("last-updated-ms", 0))
        uuid_ = str(meta.get("table-uuid", ""))
        if uuid_ not in lineages or rank > lineages[uuid_][0]:
            lineages[uuid_] = (rank, path)
    if recorded:
        if recorded in lineages:
            return lineages[recorded][1], ""
        return None, f"no metadata of table uuid {recorded} (recorded in {out.root}/_catalog.json) is left"
    if len(lineages) == 1:
        return next(iter(lineages.values()))[1], ""
    if not lineages:
        return None, ""
    return None, (f"its metadata belongs to {len(lineages)} tables ({', '.join(sorted(lineages))}) and {out.root}/_catalog.json "
                  "records none: add \"tables\": {\"" + name + "\": \"<uuid>\"} to it to say which is the output's")


def _full(out: ScanOutput, fs_path: str) -> str:
    """A path as the output's filesystem names it -> as the tables name it (the scheme back on remote outputs)."""
    return f"{out.uri.split('://', 1)[0]}://{fs_path}" if "://" in out.uri else fs_path


def stale_tables(out: ScanOutput) -> dict[str, str]:
    """Tables the catalog holds that are not the output's recorded lineage (a dropped table brought back): {table: why}."""
    recorded = out.pointer().get("tables", {})
    stale = {}
    for name in OUTPUT_TABLES:
        table = out.find_table(name)
        if table is not None and recorded.get(name) and str(table.metadata.table_uuid) != recorded[name]:
            stale[name] = (f"the catalog's table has uuid {table.metadata.table_uuid}, the output's is {recorded[name]} "
                           f"({out.root}/_catalog.json)")
    return stale


def register_lost(out: ScanOutput) -> list[str]:
    """Register every table the catalog lost (or holds stale) from the newest metadata of its own lineage; returns their names.

    A table's metadata names its location with absolute paths: metadata that names another
    location (an output copied or moved) is refused (``CatalogError``), not registered. A
    stale ``state`` (or one whose lineage is gone) is made anew instead: it is rebuilt from
    history, so nothing it held is lost.
    """
    from detector_core.tables.catalog import CatalogError

    out.catalog.create_namespace_if_not_exists(out.namespace)
    recorded = out.pointer().get("tables", {})
    for name in stale_tables(out):
        out.catalog.drop_table(out.identifier(name))  # the catalog entry only: the files stay, for the right lineage
    found = {}
    for name in OUTPUT_TABLES:
        if out.find_table(name) is not None:
            continue
        newest, why = _lineage_metadata(out, name, recorded.get(name))
        if newest is None:
            if why and name != STATE:
                raise CatalogError(f"table {name} of {out.uri} cannot be registered again: {why}")
            continue  # state: created empty below and rebuilt from history
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

    stale = stale_tables(out)
    registered = register_lost(out)
    out.ensure_tables(lost_ok=True)
    out.record_tables(override=True)
    problems = check(out) if problems is None else problems
    problems.pop("_repair", None)
    for name in stale:
        problems.get(name, {}).pop("lineage", None)
    # Intents that cannot be finished: set aside and their units rolled forward (flagged from their scores).
    intents = problems.pop("_intents", {}).get("intents", [])
    if intents:
        out.recover()
        flagged = check(out).get("flagged", {}).get("flagged", [])
        if flagged:
            problems.setdefault("flagged", {})["flagged"] = flagged
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
    done: dict = {"registered": registered, "stale": stale, "intents_set_aside": intents, "removed": {}, "flagged_rows_rebuilt": 0,
                  "flagged_partitions": [], "state_reset": STATE in stale, "unrepairable": {}}
    partitions: set[tuple] = set(_partitions_of({p.split(" (", 1)[0] for p in problems.get("flagged", {}).get("flagged", [])}))
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
        done["flagged_partitions"] = sorted(f"scan_date={night_of('flagged', k).isoformat()}/bucket={k[1]}" for k in partitions)
    if any(n in done["removed"] for n in HISTORY) or STATE in problems:
        out.reset_state(reason="is dropped, because files it was derived from (or its own) are missing")
        done["state_reset"] = True
    if done["removed"]:
        _expire_damaged(out, problems)
    if done["removed"] or partitions or intents or stale:
        nights = sorted({night_of(n, k).isoformat() for n, k in [("flagged", k) for k in partitions]}
                        | {k[0] for p in (q for v in done["removed"].values() for q in v) for k in [_night_bucket(p)] if k})
        now = dt.datetime.now(dt.timezone.utc)
        snaps = {t: (out.table(t).current_snapshot().snapshot_id if out.table(t).current_snapshot() else None) for t in T.TABLES}
        row = {"scan_id": f"repair-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}", "unit": -1, "status": "repair",
               "scan_date": now.date(), "started_at": now, "committed_at": now,
               "config": json.dumps({"removed": done["removed"], "nights": nights, "flagged_partitions": done["flagged_partitions"],
                                     "intents_set_aside": intents, "stale_tables": sorted(stale)}),
               "schema_version": T.SCHEMA_VERSION, **{f"{t}_snapshot_id": s for t, s in snaps.items()}}
        out.table("runs").append(T.runs_table([row]))
        done["nights"] = nights
    if out.fs.exists(pending):
        out.fs.rm_file(pending)
    return done


def _night_bucket(path: str) -> tuple[str, str] | None:
    """(scan_date, bucket) of a data file or partition by its path (``…/scan_date=D/bucket=B/…``)."""
    parts = dict(seg.split("=", 1) for seg in path.split("/") if "=" in seg and seg.split("=", 1)[0] in (S.SCAN_DATE, S.BUCKET))
    return (parts[S.SCAN_DATE], parts[S.BUCKET]) if len(parts) == 2 else None


def _partitions_of(paths: set[str]) -> list[tuple]:
    """(scan_date as days, bucket) of data files by their path (``…/scan_date=D/bucket=B/…``): partitions a cut-short repair
    already removed files of, whose ``DataFile`` entries are gone."""
    return [((dt.date.fromisoformat(d) - EPOCH).days, b) for p in paths if (k := _night_bucket(p)) for d, b in [k]]


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
