"""A scan output as Iceberg tables: open the catalog once, write data files anywhere, commit whole units.

``ScanOutput.open(output, catalog=…)`` resolves the output location (filesystem + root)
and the Iceberg catalog once; everything else takes that object. Workers write plain
Parquet data files under ``OUT/<table>/data/scan_date=…/bucket=…/`` (``data_path``) and
return only their paths; the driver commits a *unit* of files per table as one Iceberg
snapshot each (``commit_unit``, in ``units``), tagged with the snapshot properties
``detector.scan-id`` / ``detector.unit``. A unit spans four tables, and Iceberg commits
one table at a time, so before the first of its four commits the driver writes the
unit's file list as an intent (``OUT/_intents/<scan>-<unit>.json``, written whole or not
at all); ``recover`` finishes every intent a killed driver left, skipping the tables whose
snapshot for that unit already exists. Each table on its own therefore only ever shows
whole units to any engine. The order is errors, scores, flagged, runs: ``flagged`` is a
subset of ``scores``, and committing it after ``scores`` means that an engine reading the
tables' *current* snapshots, unpinned, never finds a flagged row without its scores row,
whenever the driver dies. ``runs`` rows, committed last, carry the three tables' snapshot
ids for readers that want all tables as of one unit (README: reading whole units).

Every table carries ``TABLE_PROPERTIES``: merged manifests and a bounded metadata log, so a
commit costs the same on the 365th night as on the first once ``detector_core.tables.maintenance``
expires old snapshots. A catalog that lost its tables while their metadata is still on disk
is refused (``LostCatalogError``; ``jobs.maintain repair`` registers them again), and a
folder that is not a scan output is refused before anything is created in it.

The catalog that ``--catalog`` names is opened by ``detector_core.tables.iceberg``. The
``verdicts`` table (reviewers' verdicts) lives beside the others but is no part of a unit:
``append_new`` appends to it on its own, comparing keys first.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import pyarrow as pa

from detector_core.storage import is_remote, open_fs, write_atomic
from detector_core.tables import definitions as T
from detector_core.tables.evolution import NO_REBASE, PROP_SCHEMA_VERSION, evolve_schema, table_properties, upgrade
from detector_core.tables.iceberg import CatalogError, load_catalog, retrying
from detector_core.tables.paths import data_file_path, table_location
from detector_core.tables.state import DEFAULT_PARTITIONS, STATE_SCHEMA, URI_BUCKET
from detector_core.tables.units import UnitCommits

__all__ = ["CatalogError", "LostCatalogError", "NotAScanOutputError", "ScanOutput", "read_table", "table_location", "data_file_path"]

STATE = "state"
OUTPUT_TABLES = (*T.ALL_TABLES, T.FEATURES, T.CHALLENGER, *T.REVIEW_TABLES, STATE)  # every table a scan output holds
HISTORY = ("scores", "errors")  # the tables the state is derived from
PROP_MARK = "detector.state-history-mark"
PROP_PARTITIONS = "detector.state-partitions"
POINTER = "_catalog.json"
PROP_COMPACTION = "detector.compaction"  # snapshots that only rewrite files (maintenance): no new history
DEFAULT_NAMESPACE = "detector"
_METADATA_FILE = re.compile(r"^(\d+)-[0-9a-f-]+\.metadata\.json$")


class LostCatalogError(CatalogError):
    """The catalog has none of an output's tables, but their metadata is on disk: it was lost or emptied."""


class NotAScanOutputError(CatalogError):
    """The folder holds no scan output (no catalog pointer, no table metadata)."""


@dataclass
class ScanOutput(UnitCommits):
    """A scan output prefix opened once: filesystem, root path, Iceberg catalog and namespace.

    Its unit commits, intents and recovery are ``units.UnitCommits``."""

    uri: str
    fs: object
    root: str
    catalog: object
    catalog_spec: str
    namespace: str
    storage_options: dict | None

    @classmethod
    def open(cls, output: str, catalog: str = "", namespace: str = "", storage_options: dict | None = None,
             create: bool = True, lost_ok: bool = False, adopt: bool = False) -> ScanOutput:
        """Open ``output``; ``catalog``/``namespace`` default to what the output's ``_catalog.json`` recorded.

        ``create``: make the tables (a scan); otherwise the folder must already be a scan
        output, and nothing is created in it (``NotAScanOutputError``). A catalog that lost
        the tables whose metadata is on disk raises ``LostCatalogError`` unless ``lost_ok``
        (``jobs.maintain repair``, which registers them again). A folder that holds files but no
        marker (``_catalog.json``) nor table metadata is someone else's: refused
        (``NotAScanOutputError``), unless ``adopt`` (``jobs.audit migrate``: an output of the
        hive layout, before schema 3).
        """
        fs, root = open_fs(output, storage_options)
        root = root.rstrip("/")
        pointer = {}
        try:
            pointer = json.loads(fs.cat_file(f"{root}/{POINTER}"))
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise NotAScanOutputError(f"{output} is a file, not a folder: give the folder of a scan output") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{output}/{POINTER} is unreadable ({type(exc).__name__}): write it again as "
                               '{"catalog": "<what --catalog was>", "namespace": "detector"}') from None
        catalog = catalog or pointer.get("catalog", "")
        namespace = namespace or pointer.get("namespace", DEFAULT_NAMESPACE)
        if not create:
            _refuse_non_output(fs, root, output)
        elif not pointer:
            _refuse_foreign(fs, root, output, adopt)
        if not lost_ok and not catalog and not is_remote(output):
            _refuse_lost_sqlite(fs, root, output)
        try:
            # A local output by its absolute path: workers in other processes (another working directory) write under it.
            uri = output.rstrip("/") if is_remote(output) else os.path.abspath(output.removeprefix("file://")).rstrip("/")
            out = cls(uri, fs, root, load_catalog(catalog, output, storage_options), catalog, namespace,
                      storage_options)
            if create:
                out.ensure_tables(lost_ok=lost_ok)
            elif not lost_ok:
                out.refuse_lost()
        except PermissionError as exc:
            raise CatalogError(f"{output} cannot be written ({exc.strerror or type(exc).__name__}: {exc.filename or root}): "
                               "give an --output this user may write") from None
        return out

    def pointer(self) -> dict:
        """``_catalog.json``: the catalog, the namespace, and each table's uuid (its lineage), or {} where there is none."""
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{POINTER}"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return {}

    def record_tables(self, pointer: dict | None = None, override: bool = False) -> None:
        """Write ``_catalog.json`` (the output's marker) with the catalog, namespace and the uuid of each table now in the catalog.

        The uuids are the tables' lineage: after a lost catalog, ``maintenance.register_lost``
        registers the metadata of these tables, never a dropped table's leftovers, whatever
        their version numbers say. A recorded uuid stays unless ``override`` (the state made
        anew, a repair that registered the recorded lineage).
        """
        pointer = self.pointer() if pointer is None else pointer
        tables = {n: str(t.metadata.table_uuid) for n in OUTPUT_TABLES if (t := self.find_table(n)) is not None}
        merged = {**pointer.get("tables", {}), **tables} if override else {**tables, **pointer.get("tables", {})}
        want = {"catalog": self.catalog_spec, "namespace": self.namespace, "tables": merged}
        if want != pointer:
            self.fs.makedirs(self.root, exist_ok=True)
            write_atomic(self.fs, f"{self.root}/{POINTER}", json.dumps(want, sort_keys=True).encode())

    def metadata_files(self, name: str) -> list[str]:
        """Table ``name``'s ``*.metadata.json`` files on storage, oldest version first (whatever the catalog says)."""
        return _metadata_files(self.fs, f"{self.root}/{name}/metadata")

    def refuse_lost(self, missing: list[str] | None = None) -> None:
        """``LostCatalogError`` when the catalog lacks a history table whose metadata is on disk (a lost or emptied catalog).

        ``missing``: the tables known to be missing from the catalog (default: looked up).
        The state is not history (it is rebuilt), so its leftovers never count.
        """
        history = (*T.ALL_TABLES, T.FEATURES, T.CHALLENGER, *T.REVIEW_TABLES)
        missing = [n for n in history if self.find_table(n) is None] if missing is None else [n for n in missing if n in history]
        lost = [n for n in missing if self.metadata_files(n)]
        if lost:
            where = self.catalog_spec or f"sqlite {self.root}/catalog.db"
            raise LostCatalogError(
                f"the catalog ({where}, namespace {self.namespace}) has no table {', '.join(lost)}, but {self.uri} holds their "
                f"metadata: the catalog was lost or emptied; nothing was written. Register them again with "
                f"'python -m jobs.maintain repair --output {self.uri}" + (f" --catalog {self.catalog_spec}'" if self.catalog_spec else "'"))

    # -- tables ----------------------------------------------------------------------------
    def identifier(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def location(self, name: str) -> str:
        return table_location(self.uri, name)

    def ensure_tables(self, attempts: int = 5, lost_ok: bool = False) -> None:
        """Create the namespace and the tables if missing; refuse tables of another output, and a lost catalog.

        Two scans opening a fresh output at once race to create them (before either holds the
        lease); the loser's create fails in catalog-specific ways, so it looks again.
        """
        retrying(lambda: self._ensure_tables(lost_ok), attempts)

    def _ensure_tables(self, lost_ok: bool = False) -> None:
        self.catalog.create_namespace_if_not_exists(self.namespace)
        found = {}
        for name in OUTPUT_TABLES:
            try:
                found[name] = self.find_table(name)
            except OSError as exc:
                if name != STATE:  # history is never recreated behind the user's back
                    raise
                self.reset_state(exc)
                found[name] = self.table(name)
        if not lost_ok:  # never start new tables beside the metadata of lost ones: history would vanish silently
            missing = [n for n, t in found.items() if t is None]
            for attempt in range(5):
                try:
                    self.refuse_lost(missing)
                    break
                except LostCatalogError:
                    if attempt == 4:
                        raise
                    # A concurrent opener of a fresh output writes a table's metadata a moment before the
                    # catalog lists it: look again before calling the catalog lost (a lost one stays lost).
                    time.sleep(0.5)
                    found.update({n: self.find_table(n) for n in missing})
                    missing = [n for n in missing if found[n] is None]
        recorded = self.pointer().get("tables", {})
        for name, table in found.items():
            if table is not None and recorded.get(name) and str(table.metadata.table_uuid) != recorded[name]:
                if name != STATE:
                    raise CatalogError(f"table {self.identifier(name)} in the catalog is not this output's (uuid "
                                       f"{table.metadata.table_uuid}, {self.uri}/{POINTER} records {recorded[name]}): nothing was "
                                       f"written; 'python -m jobs.maintain repair --output {self.uri}' registers the output's own")
                self.reset_state(reason=f"in the catalog is a dropped one (uuid {table.metadata.table_uuid}, not {recorded[name]})")
                continue
            if table is None:
                self.create(name)
                continue
            if table.location().rstrip("/") != self.location(name).rstrip("/"):
                raise CatalogError(f"table {self.identifier(name)} in this catalog belongs to {table.location()}, not to "
                                   f"{self.location(name)}: give this output its own --namespace")
            upgrade(self.table(name) if evolve_schema(table, name) else table, name)
        # Every table now is the recorded one (checked above), or new: the record follows the catalog.
        self.record_tables(override=True)

    def reset_state(self, exc: Exception | None = None, reason: str = "") -> None:
        """Drop an unreadable ``state`` table and create it empty: it is rebuilt from the history tables."""
        why = reason or f"is unreadable ({type(exc).__name__}: {exc})"
        print(f"state table {self.identifier(STATE)} {why}; it is rebuilt from the history tables")
        self.catalog.drop_table(self.identifier(STATE))
        self.create(STATE)
        self.record_tables(override=True)  # the new state's lineage: a lost catalog never brings the dropped one back

    def create(self, name: str) -> None:
        from pyiceberg.exceptions import TableAlreadyExistsError

        props = {"format-version": "2", PROP_SCHEMA_VERSION: T.SCHEMA_VERSION, **table_properties(name)}
        if name == STATE:
            props[PROP_PARTITIONS] = str(DEFAULT_PARTITIONS)
        docs = T.column_docs(name)
        schema = T.TABLE_SCHEMAS.get(name, STATE_SCHEMA)
        schema = pa.schema([f.with_metadata({b"doc": docs[f.name].encode()}) if f.name in docs else f for f in schema])
        try:
            with self.catalog.create_table_transaction(self.identifier(name), schema=schema,
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


def _metadata_files(fs, folder: str) -> list[str]:
    try:
        names = fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _METADATA_FILE.match(n.rstrip("/").rsplit("/", 1)[-1]))]
    return [n for _, n in sorted(found)]


def _tables_on_disk(fs, root: str) -> list[str]:
    """The result tables (and runs) whose metadata files are under ``root``, whatever a catalog says."""
    return [n for n in T.ALL_TABLES if _metadata_files(fs, f"{root}/{n}/metadata")]


def _refuse_non_output(fs, root: str, output: str) -> None:
    """Before a reader opens ``output``: refuse a folder that is no scan output, without creating anything in it.

    Every catalog keeps the tables' metadata files under the output (``OUT/<table>/metadata``),
    so a folder without them holds no scan tables, whatever the catalog says.
    """
    if not _tables_on_disk(fs, root):
        legacy = fs.exists(f"{root}/scores") or fs.exists(f"{root}/runs")
        raise NotAScanOutputError(f"{output} is not a scan output (no table metadata under it): give the --output of jobs.scan"
                                  + (f"; one written before schema 3 needs 'python -m jobs.audit migrate --output {output}'" if legacy else ""))


def _refuse_foreign(fs, root: str, output: str, adopt: bool) -> None:
    """Before a scan creates tables in ``output``: refuse a folder that holds files but is no scan output.

    Only a folder with the marker (``_catalog.json``) or table metadata is an output; a new or
    empty one becomes one. Anything else holds someone's files, which maintenance would one
    day call orphans.
    """
    if fs.exists(root) and not fs.isdir(root):
        raise NotAScanOutputError(f"--output {output} is a file, not a folder: give a folder for the scan output")
    try:
        entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    mine = {"_lease", "_intents", "_maintenance", "_plan", POINTER}

    def ours(entry: str) -> bool:
        if entry in mine or entry.startswith("catalog.db"):  # the SQLite catalog and its -journal/-wal of a concurrent opener
            return True
        if entry not in OUTPUT_TABLES:
            return False
        try:  # a table folder a concurrent opener is creating: nothing in it but its metadata/data folders yet
            return all(c.rstrip("/").rsplit("/", 1)[-1] in ("metadata", "data") for c in fs.ls(f"{root}/{entry}", detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return False

    if _tables_on_disk(fs, root) or all(ours(e) for e in entries):
        return
    if adopt and fs.exists(f"{root}/runs"):
        return
    raise NotAScanOutputError(f"--output {output} holds files ({', '.join(sorted(entries)[:3])}…) but is not a scan output "
                              f"(no {POINTER}): give a new or empty folder, or the --output of an earlier scan")


def _refuse_lost_sqlite(fs, root: str, output: str) -> None:
    """The default SQLite catalog beside a local output is missing or empty while its tables' metadata is there:
    refused before opening it (which would create it, empty)."""
    db = f"{root}/catalog.db"
    if fs.exists(db) and fs.size(db) > 0:
        return
    on_disk = _tables_on_disk(fs, root)
    if on_disk:
        raise LostCatalogError(f"{output}/catalog.db is missing or empty, but {output} holds the metadata of its tables "
                               f"({', '.join(on_disk)}): nothing was written; register them again with "
                               f"'python -m jobs.maintain repair --output {output}'")
