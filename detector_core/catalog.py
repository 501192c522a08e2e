"""A scan output as Iceberg tables: open the catalog once, write data files anywhere, commit whole units.

``ScanOutput.open(output, catalog=…)`` resolves the output location (filesystem + root)
and the Iceberg catalog once; everything else takes that object. Workers write plain
Parquet data files under ``OUT/<table>/data/scan_date=…/bucket=…/`` (``data_path``) and
return only their paths; the driver commits a *unit* of files per table as one Iceberg
snapshot each (``commit_unit``), tagged with the snapshot properties
``detector.scan-id`` / ``detector.unit``. A unit spans four tables, and Iceberg commits
one table at a time, so before the first of its four commits the driver writes the
unit's file list as an intent (``OUT/_intents/<scan>-<unit>.json``); ``recover``
finishes every intent a killed driver left, skipping the tables whose snapshot for that
unit already exists. Each table on its own therefore only ever shows whole units to any
engine; ``runs`` rows, committed last, carry the three tables' snapshot ids for readers
that want all tables as of one unit.

The catalog that ``--catalog`` names is opened by ``detector_core.iceberg``. The
``verdicts`` table (reviewers' verdicts) lives beside the others but is no part of a unit:
``append_new`` appends to it on its own, comparing keys first.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from detector_core import schema as S
from detector_core import tables as T
from detector_core.iceberg import CatalogError, load_catalog, retrying
from detector_core.state import DEFAULT_PARTITIONS, STATE_SCHEMA, URI_BUCKET
from detector_core.storage import is_remote, join, open_fs

__all__ = ["CatalogError", "ScanOutput", "read_table", "table_location", "data_file_path"]

STATE = "state"
OUTPUT_TABLES = (*T.ALL_TABLES, T.VERDICTS, STATE)  # every table a scan output holds
HISTORY = ("scores", "errors")  # the tables the state is derived from
PROP_MARK = "detector.state-history-mark"
PROP_PARTITIONS = "detector.state-partitions"
PROP_SCAN = "detector.scan-id"
PROP_UNIT = "detector.unit"
PROP_SCHEMA_VERSION = "detector.schema-version"  # detector_core.tables.SCHEMA_VERSION of the table's columns
POINTER = "_catalog.json"
NO_REBASE = {"commit.retry.num-retries": "0"}  # tables appended to only after a key comparison (append_new)
DEFAULT_NAMESPACE = "detector"


def table_location(output: str, name: str) -> str:
    """The location of table ``name`` of a scan output (absolute for local outputs)."""
    return join(output if is_remote(output) else os.path.abspath(output), name)


def data_file_path(output: str, name: str, scan_date: str, bucket: str, stem: str) -> str:
    """A fresh data-file path in table ``name``'s data folder (what workers write before the driver commits)."""
    return join(table_location(output, name), "data", f"scan_date={scan_date}", f"bucket={bucket}", f"{stem}-{uuid.uuid4().hex}.parquet")


@dataclass
class ScanOutput:
    """A scan output prefix opened once: filesystem, root path, Iceberg catalog and namespace."""

    uri: str
    fs: object
    root: str
    catalog: object
    catalog_spec: str
    namespace: str
    storage_options: dict | None

    @classmethod
    def open(cls, output: str, catalog: str = "", namespace: str = "", storage_options: dict | None = None,
             create: bool = True) -> ScanOutput:
        """Open ``output``; ``catalog``/``namespace`` default to what the output's ``_catalog.json`` recorded."""
        fs, root = open_fs(output, storage_options)
        pointer = {}
        try:
            pointer = json.loads(fs.cat_file(f"{root.rstrip('/')}/{POINTER}"))
        except FileNotFoundError:
            pass
        catalog = catalog or pointer.get("catalog", "")
        namespace = namespace or pointer.get("namespace", DEFAULT_NAMESPACE)
        out = cls(output.rstrip("/"), fs, root.rstrip("/"), load_catalog(catalog, output, storage_options), catalog, namespace,
                  storage_options)
        if create:
            out.ensure_tables()
            if pointer.get("catalog", "") != catalog or pointer.get("namespace") != namespace:
                fs.makedirs(out.root, exist_ok=True)
                fs.pipe_file(f"{out.root}/{POINTER}", json.dumps({"catalog": catalog, "namespace": namespace}).encode())
        return out

    # -- tables ----------------------------------------------------------------------------
    def identifier(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def location(self, name: str) -> str:
        return table_location(self.uri, name)

    def ensure_tables(self, attempts: int = 5) -> None:
        """Create the namespace and the four tables if missing; refuse tables of another output.

        Two scans opening a fresh output at once race to create them (before either holds the
        lease); the loser's create fails in catalog-specific ways, so it looks again.
        """
        retrying(self._ensure_tables, attempts)

    def _ensure_tables(self) -> None:
        self.catalog.create_namespace_if_not_exists(self.namespace)
        for name in OUTPUT_TABLES:
            try:
                table = self.find_table(name)
            except OSError as exc:
                if name != STATE:  # history is never recreated behind the user's back
                    raise
                self.reset_state(exc)
                continue
            if table is None:
                self.create(name)
                continue
            self._rename_old_columns(table)
            if table.location().rstrip("/") != self.location(name).rstrip("/"):
                raise CatalogError(f"table {self.identifier(name)} in this catalog belongs to {table.location()}, not to "
                                   f"{self.location(name)}: give this output its own --namespace")

    @staticmethod
    def _rename_old_columns(table) -> None:
        """Schema evolution to this version's names (``S.RENAMED``): a metadata-only commit; the field
        keeps its id, and files written under the old name are read through the table's name mapping."""
        names = {f.name for f in table.schema().fields}
        todo = {old: new for old, new in S.RENAMED.items() if old in names and new not in names}
        if not todo:
            return
        with table.transaction() as tx:
            with tx.update_schema() as update:
                for old, new in todo.items():
                    update.rename_column(old, new)
            tx.set_properties({PROP_SCHEMA_VERSION: T.SCHEMA_VERSION})

    def reset_state(self, exc: Exception) -> None:
        """Drop an unreadable ``state`` table and create it empty: it is rebuilt from the history tables."""
        print(f"state table {self.identifier(STATE)} is unreadable ({type(exc).__name__}: {exc}); it is rebuilt from the history tables")
        self.catalog.drop_table(self.identifier(STATE))
        self.create(STATE)

    def create(self, name: str) -> None:
        from pyiceberg.exceptions import TableAlreadyExistsError

        props = {"format-version": "2", PROP_SCHEMA_VERSION: T.SCHEMA_VERSION}
        if name == STATE:
            props[PROP_PARTITIONS] = str(DEFAULT_PARTITIONS)
        if name == T.VERDICTS:
            props.update(NO_REBASE)
        try:
            with self.catalog.create_table_transaction(self.identifier(name), schema=T.TABLE_SCHEMAS.get(name, STATE_SCHEMA),
                                                       location=self.location(name), properties=props) as tx:
                cols = (URI_BUCKET,) if name == STATE else T.PARTITIONED[name]
                if cols:
                    with tx.update_spec() as spec:
                        for col in cols:
                            spec.add_identity(col)
        except TableAlreadyExistsError:  # created by a concurrent opener
            pass

    def table(self, name: str):
        return self.catalog.load_table(self.identifier(name))

    def find_table(self, name: str):
        """The table ``name``, or None where this output has none (one written before the table existed)."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.table(name)
        except NoSuchTableError:
            return None

    def append_new(self, name: str, rows: pa.Table, key: tuple[str, ...], retries: int = 8) -> int:
        """Append the rows of ``rows`` whose ``key`` columns the table does not hold yet; returns how many.

        Idempotent, and exact under concurrency: the append asserts the snapshot whose keys it
        compared against, so when another writer commits first the commit fails, and the
        rows are compared again with what that writer added. pyiceberg would otherwise rebase a
        failed append onto the new snapshot by itself (``commit.retry.num-retries``, 4 by
        default), appending rows that the other writer just added: the table says 0 retries.
        """
        from pyiceberg.exceptions import CommitFailedException

        for attempt in range(retries):
            table = self.table(name)
            if any(table.properties.get(k) != v for k, v in NO_REBASE.items()):
                with table.transaction() as tx:
                    tx.set_properties(NO_REBASE)
                table = self.table(name)
            have = table.scan(selected_fields=key).to_arrow() if table.current_snapshot() else None
            new = rows if have is None or have.num_rows == 0 else T.new_rows(rows, have, key)
            if new.num_rows == 0:
                return 0
            try:
                table.append(new.cast(T.TABLE_SCHEMAS[name]))
            except CommitFailedException:
                time.sleep(0.2 * 2**attempt)
                continue
            return new.num_rows
        raise RuntimeError(f"could not append to {self.identifier(name)} after {retries} tries (other writers kept winning)")

    # -- commits ---------------------------------------------------------------------------
    @staticmethod
    def find_commit(table, scan_id: str, unit: int) -> int | None:
        """The snapshot id that committed (scan_id, unit) to ``table``, if any."""
        for snap in reversed(table.metadata.snapshots):
            props = snap.summary.additional_properties if snap.summary else {}
            if props.get(PROP_SCAN) == scan_id and props.get(PROP_UNIT) == str(unit):
                return snap.snapshot_id
        return None

    def _commit(self, name: str, scan_id: str, unit: int, paths: list[str] | None = None, rows: pa.Table | None = None,
                check_first: bool = False, retries: int = 5) -> int | None:
        """Commit one table's share of a unit (files or rows) as one snapshot; idempotent when ``check_first``."""
        from pyiceberg.exceptions import CommitFailedException

        props = {PROP_SCAN: scan_id, PROP_UNIT: str(unit)}
        for attempt in range(retries):
            table = self.table(name)
            if check_first or attempt:
                done = self.find_commit(table, scan_id, unit)
                if done is not None:
                    return done
            if not paths and rows is None:
                return table.current_snapshot().snapshot_id if table.current_snapshot() else None
            try:
                if rows is not None:
                    table.append(rows, snapshot_properties=props)
                else:
                    table.add_files(paths, snapshot_properties=props, check_duplicate_files=False)
            except CommitFailedException:
                time.sleep(0.2 * 2**attempt)  # another commit won the race: reload and try again
                continue
            return self.find_commit(self.table(name), scan_id, unit)
        raise RuntimeError(f"could not commit unit {unit} of scan {scan_id} to {self.identifier(name)} after {retries} tries")

    def intent_path(self, scan_id: str, unit: int) -> str:
        return f"{self.root}/_intents/{scan_id}-{unit:06d}.json"

    def commit_unit(self, intent: dict, check_first: bool = False, before_each=None) -> dict:
        """Commit a unit: intent first, then errors, flagged, scores, then its ``runs`` rows; returns snapshot ids.

        ``intent``: ``scan_id``, ``unit``, ``files`` ({table: [paths]}) and ``runs`` (rows, as
        dicts without the snapshot ids). ``before_each(step)`` runs before every commit (the
        lease check, and the tests' kill points).
        """
        scan_id, unit = intent["scan_id"], int(intent["unit"])
        path = self.intent_path(scan_id, unit)
        before_each = before_each or (lambda step: None)
        if not check_first:
            before_each("intent")
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, json.dumps(intent).encode())
        snapshots = {}
        for name in ("errors", "flagged", "scores"):
            before_each(name)
            snapshots[name] = self._commit(name, scan_id, unit, paths=intent["files"].get(name, []), check_first=check_first)
        before_each("runs")
        rows = [{**r, **{f"{n}_snapshot_id": snapshots[n] for n in T.TABLES}} for r in intent["runs"]]
        self._commit("runs", scan_id, unit, rows=T.runs_table(rows), check_first=check_first)
        before_each("done")
        self.fs.rm_file(path)
        return snapshots

    def recover(self, before_each=None) -> list[str]:
        """Finish the commits a killed driver left half done; returns the intents completed."""
        root = f"{self.root}/_intents"
        try:
            paths = sorted(self.fs.ls(root, detail=False))
        except FileNotFoundError:
            return []
        done = []
        for p in paths:
            if not p.endswith(".json"):
                continue
            intent = json.loads(self.fs.cat_file(p))
            self.commit_unit(intent, check_first=True, before_each=before_each)
            done.append(p)
        return done

    # -- reads -----------------------------------------------------------------------------
    def read(self, name: str, row_filter=None, selected_fields: tuple[str, ...] = ("*",), snapshot_id: int | None = None) -> pa.Table:
        from pyiceberg.expressions import AlwaysTrue

        scan = self.table(name).scan(row_filter=row_filter if row_filter is not None else AlwaysTrue(),
                                     selected_fields=selected_fields, snapshot_id=snapshot_id)
        return T.current_names(scan.to_arrow())  # a snapshot from before a rename has the old names


def read_table(output: str, name: str, row_filter=None, catalog: str = "", namespace: str = "",
               storage_options: dict | None = None) -> pa.Table:
    """A committed scan table as a ``pyarrow.Table``, for scripts and notebooks.

    ``name``: scores, flagged, errors, runs, verdicts (reviewers'), or state (what each detector has settled).
    ``row_filter``: a pyiceberg expression or string
    (``"scan_date = '2026-11-23' AND bucket = 'uploads'"``), pushed down to the
    partitions and files. ``catalog``/``namespace``: as the scan was given (default: what
    the output's ``_catalog.json`` recorded).
    """
    if name not in OUTPUT_TABLES:
        raise ValueError(f"no table {name!r}; one of {', '.join(OUTPUT_TABLES)}")
    return ScanOutput.open(output, catalog, namespace, storage_options, create=False).read(name, row_filter)
