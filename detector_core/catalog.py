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

Catalogs (``--catalog``): empty = a SQLite catalog file ``OUT/catalog.db`` beside a
local output (no service; one machine); ``sqlite:///…``, ``postgresql://user@host/db``,
``mysql://…`` = pyiceberg's SQL catalog; ``http(s)://…`` = a REST catalog; ``glue`` =
AWS Glue; any other word = a catalog of that name in pyiceberg's own configuration
(``~/.pyiceberg.yaml`` or ``PYICEBERG_CATALOG__<NAME>__<KEY>`` variables): the place for
passwords and tokens, which ``--catalog`` refuses to carry.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from detector_core import schema as S
from detector_core import tables as T
from detector_core.state import DEFAULT_PARTITIONS, STATE_SCHEMA, URI_BUCKET
from detector_core.storage import is_remote, join, open_fs

__all__ = ["CatalogError", "ScanOutput", "read_table", "table_location", "data_file_path"]

STATE = "state"
HISTORY = ("scores", "errors")  # the tables the state is derived from
PROP_MARK = "detector.state-history-mark"
PROP_PARTITIONS = "detector.state-partitions"
PROP_SCAN = "detector.scan-id"
PROP_UNIT = "detector.unit"
PROP_SCHEMA_VERSION = "detector.schema-version"  # detector_core.tables.SCHEMA_VERSION of the table's columns
POINTER = "_catalog.json"
DEFAULT_NAMESPACE = "detector"
_SECRET_IN_URI = re.compile(r"://[^/@:]+:[^/@]+@")


class CatalogError(ValueError):
    """The catalog setting is unusable (missing for a remote output, a secret in it, a table elsewhere)."""


def _io_properties(output: str, storage_options: dict | None) -> dict:
    props: dict[str, str] = {}
    if is_remote(output):
        # The tables' files are read and written through fsspec, the same filesystem as the jobs.
        props["py-io-impl"] = "pyiceberg.io.fsspec.FsspecFileIO"
        endpoint = ((storage_options or {}).get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            props["s3.endpoint"] = endpoint
    return props


def _retrying(fn, attempts: int = 5):
    """``fn()``, tried again after a short sleep when a concurrent creator made it fail (never for a CatalogError)."""
    for attempt in range(attempts):
        try:
            return fn()
        except CatalogError:
            raise
        except Exception:  # noqa: BLE001 - a concurrent creator won: the next look finds what it made
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def load_catalog(spec: str, output: str, storage_options: dict | None = None):
    """The pyiceberg catalog that ``spec`` names for ``output`` (see the module docstring)."""
    from pyiceberg.catalog import load_catalog as _load

    if _SECRET_IN_URI.search(spec or ""):
        raise CatalogError("--catalog must not carry a password (it is logged and saved with the run): use a catalog named in "
                           "~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__URI / __PASSWORD variables, and pass --catalog NAME")
    props = _io_properties(output, storage_options)
    if not spec:
        if is_remote(output):
            raise CatalogError(f"--output {output} is in an object store: name the catalog that tracks its tables with --catalog "
                               "(postgresql://user@host/db, https://rest-catalog, glue, a pyiceberg catalog name, or "
                               "sqlite:////path/catalog.db for a single machine)")
        os.makedirs(os.path.abspath(output), exist_ok=True)
        spec = f"sqlite:///{os.path.abspath(join(output, 'catalog.db'))}"
    if spec.startswith(("sqlite:", "postgresql", "mysql")):
        kw = {"type": "sql", "uri": spec}
    elif spec.startswith(("http://", "https://")):
        kw = {"type": "rest", "uri": spec}
    elif spec == "glue":
        kw = {"type": "glue"}
    else:
        return _load(spec, **props)
    # Openers of a fresh SQL catalog race to create its own tables.
    return _retrying(lambda: _load("detector", **kw, **props))


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
        _retrying(self._ensure_tables, attempts)

    def _ensure_tables(self) -> None:
        from pyiceberg.exceptions import NoSuchTableError

        self.catalog.create_namespace_if_not_exists(self.namespace)
        for name in (*T.ALL_TABLES, STATE):
            try:
                table = self.catalog.load_table(self.identifier(name))
            except NoSuchTableError:
                self.create(name)
                continue
            except OSError as exc:
                if name != STATE:  # history is never recreated behind the user's back
                    raise
                self.reset_state(exc)
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
        self._commit("runs", scan_id, unit, rows=_runs_table(rows), check_first=check_first)
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


def _runs_table(rows: list[dict]) -> pa.Table:
    import datetime as dt

    conv = []
    for r in rows:
        r = dict(r)
        for k in ("started_at", "committed_at"):
            if isinstance(r.get(k), str):
                r[k] = dt.datetime.fromisoformat(r[k])
        if isinstance(r.get("scan_date"), str):
            r["scan_date"] = dt.date.fromisoformat(r["scan_date"])
        conv.append(r)
    return pa.Table.from_pylist(conv, schema=T.RUNS_SCHEMA)


def read_table(output: str, name: str, row_filter=None, catalog: str = "", namespace: str = "",
               storage_options: dict | None = None) -> pa.Table:
    """A committed scan table as a ``pyarrow.Table``, for scripts and notebooks.

    ``name``: scores, flagged, errors, runs, or state (what each detector has settled).
    ``row_filter``: a pyiceberg expression or string
    (``"scan_date = '2026-11-23' AND bucket = 'uploads'"``), pushed down to the
    partitions and files. ``catalog``/``namespace``: as the scan was given (default: what
    the output's ``_catalog.json`` recorded).
    """
    if name not in (*T.ALL_TABLES, STATE):
        raise ValueError(f"no table {name!r}; one of {', '.join((*T.ALL_TABLES, STATE))}")
    return ScanOutput.open(output, catalog, namespace, storage_options, create=False).read(name, row_filter)
