"""DuckDB views of a scan output's tables: what audit queries and the review page read.

``connect(out)`` gives a DuckDB connection with the views ``scores``, ``flagged``, ``errors``
(``iceberg_scan`` over the Iceberg tables, loaded from the ``duckdb-extension-iceberg`` pip
package, never downloaded) pinned to the snapshots the newest ``runs`` row records, so the
three agree even while a scan commits its next unit; ``runs`` (one row per finished
scan and detector, ``read_runs``); ``verdicts`` (every reviewer's verdict, the table's
latest snapshot, unfiltered) and ``latest_verdicts`` (the latest one on each image);
``precision_sample`` (the report's seeded, stratified sample of each night's flagged rows,
with the same filters as the result tables). Filters
on the partition columns (``scan_date``, ``bucket``) prune manifests and files.

The connection is read-only towards everything outside it: once the views exist, DuckDB may
read files under the output only, load nothing more, and its configuration is locked, so
SQL a user types (``jobs.audit query sql``, checked by ``read_only_sql`` too) can neither
write a file, attach a database, nor read ``/etc/…``.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from detector_core import schema as S
from detector_core.storage import folder_prefix, is_remote, open_fs
from detector_core.tables import definitions as T
from detector_core.tables.catalog import CatalogError, ScanOutput

__all__ = ["FINISHED_RUNS_SCHEMA", "ReadOnlyError", "connect", "duckdb_connection", "lock_down", "open_scan_output",
           "pinned_snapshots", "read_only_sql", "read_runs", "sql_quote"]

# What a user's SQL may be: queries, and EXPLAIN of them (PRAGMA and SHOW parse as SELECT).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


class ReadOnlyError(ValueError):
    """SQL that would do more than read the views."""


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# What audits read of the runs table: one row per finished scan and detector (tables.RUNS_SCHEMA is the table itself).
FINISHED_RUNS_SCHEMA = pa.schema([
    ("scan_id", pa.string()), ("scan_date", pa.string()), ("detector_id", pa.string()), ("detector_kind", pa.string()),
    ("input", pa.string()), ("listed", pa.int64()), ("skipped", pa.int64()), ("scored", pa.int64()), ("flagged", pa.int64()),
    ("errors", pa.int64()), ("model_loads", pa.int64()), ("seconds", pa.float64()), ("started_at", pa.string()),
    ("finished_at", pa.string()),
])
FINISHED_RUN_COLUMNS = FINISHED_RUNS_SCHEMA.names


def read_runs(out: ScanOutput) -> pa.Table:
    """The finished scans, one row per scan and detector (an ensemble scan has several)."""
    rows = out.read("runs", "status = 'completed'").to_pylist()
    return pa.Table.from_pylist([{**{k: r.get(k) for k in FINISHED_RUN_COLUMNS}, "scan_date": r["scan_date"].isoformat(),
                                  "started_at": r["started_at"].isoformat(), "finished_at": r["committed_at"].isoformat()}
                                 for r in rows], schema=FINISHED_RUNS_SCHEMA)


def duckdb_connection(out: ScanOutput) -> duckdb.DuckDBPyConnection:
    """DuckDB with the Iceberg extension loaded from its pip package (no download) and the output's filesystem."""
    import glob
    import os

    import duckdb_extension_avro
    import duckdb_extension_iceberg

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for mod in (duckdb_extension_avro, duckdb_extension_iceberg):
        found = glob.glob(os.path.join(os.path.dirname(mod.__file__), "extensions", f"v{duckdb.__version__}", "*.duckdb_extension"))
        if not found:
            raise RuntimeError(f"{mod.__name__} has no extension for DuckDB {duckdb.__version__}: install the matching versions "
                               "(pip install -e . pins them)")
        con.execute(f"LOAD {sql_quote(found[0])}")
    if is_remote(out.uri):
        con.register_filesystem(out.fs)
    return con


def pinned_snapshots(out: ScanOutput) -> dict[str, int | None]:
    """The result tables' snapshot ids as of the newest committed unit (the ``runs`` row committed last).

    Reading every table at these snapshots gives one consistent point, even while a scan
    is committing its next unit table by table.
    """
    runs = out.read("runs", selected_fields=("committed_at", *[f"{t}_snapshot_id" for t in T.TABLES]))
    if runs.num_rows == 0:
        return {t: None for t in T.TABLES}
    last = runs.sort_by([("committed_at", "descending")]).slice(0, 1).to_pylist()[0]
    return {t: last[f"{t}_snapshot_id"] for t in T.TABLES}


def connect(out: ScanOutput, where: str = "", since: str = "", until: str = "", bucket: str = "",
            runs: pa.Table | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``scores``, ``flagged``, ``errors`` and ``runs`` of a scan output.

    The table views are DuckDB ``iceberg_scan`` over the Iceberg tables, pinned to the
    snapshots of the newest committed unit; ``since``/``until``/``bucket`` are filters on
    the partition columns, which prune manifests and files; ``where`` (SQL over the
    columns) is part of every table view. ``runs`` is ``read_runs(out)`` when the caller
    has it already.
    """
    con = duckdb_connection(out)
    con.register("_runs", read_runs(out) if runs is None else runs)
    con.execute("CREATE VIEW runs AS SELECT * REPLACE (CAST(scan_date AS DATE) AS scan_date) FROM _runs")
    conds = [f"({where})"] if where else []
    if since:
        conds.append(f"scan_date >= DATE {sql_quote(since)}")
    if until:
        conds.append(f"scan_date <= DATE {sql_quote(until)}")
    if bucket:
        conds.append(f"bucket = {sql_quote(bucket)}")
    cond = " AND ".join(conds) or "true"
    pins = pinned_snapshots(out)
    for name in T.TABLES:
        if pins[name] is not None:
            src = f"iceberg_scan({sql_quote(out.table(name).metadata_location)}, snapshot_from_id = {int(pins[name])})"
        else:
            con.register(f"_empty_{name}", T.TABLE_SCHEMAS[name].empty_table())
            src = f"_empty_{name}"
        # A snapshot from before a column rename (S.RENAMED) has the old name: the view shows today's.
        cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        renames = ", ".join(f"{old} AS {new}" for old, new in S.RENAMED.items() if old in cols and new not in cols)
        star = f"* RENAME ({renames})" if renames else "*"
        con.execute(f"CREATE VIEW {name} AS SELECT {star} FROM {src} WHERE {cond}")
    # Verdicts are about images, not one scan: every verdict, whatever the filters. The precision
    # sample: the nights in range, as the report drew them. (An output older than a table has none.)
    for name, view, where_ in ((T.VERDICTS, "verdicts", "true"), (T.SAMPLE, "precision_sample", cond)):
        table = out.find_table(name)
        if table is not None and table.current_snapshot() is not None:
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM iceberg_scan({sql_quote(table.metadata_location)}) WHERE {where_}")
        else:
            con.register(f"_empty_{view}", T.TABLE_SCHEMAS[name].empty_table())
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM _empty_{view}")
    # The latest verdict on each image counts (one row's verdict, reviewer and time together).
    con.execute("""CREATE VIEW latest_verdicts AS
                   SELECT uri, v.verdict AS verdict, v.reviewer AS reviewer, v.reviewed_at AS reviewed_at
                   FROM (SELECT uri, arg_max({'verdict': verdict, 'reviewer': reviewer, 'reviewed_at': reviewed_at}, reviewed_at) AS v
                         FROM verdicts GROUP BY uri)""")
    lock_down(con, out)
    return con


def lock_down(con: duckdb.DuckDBPyConnection, out: ScanOutput) -> None:
    """From now on ``con`` reads files under the output only, loads no extension, and cannot be reconfigured."""
    con.execute(f"SET allowed_directories = [{sql_quote(folder_prefix(out.uri))}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def read_only_sql(sql: str) -> str:
    """``sql`` when every statement in it only reads (``READ_ONLY_STATEMENTS``), else ``ReadOnlyError`` naming the first that does not."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlyError(f"the SQL does not parse: {str(exc).splitlines()[0]}") from None
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise ReadOnlyError(f"query sql only reads: a {kind} statement is refused ({' '.join(st.query.split())[:80]!r}); "
                                "use SELECT over the views scores, flagged, errors, runs, verdicts, precision_sample")
    return sql


def open_scan_output(scan: str, catalog: str = "", namespace: str = "", storage_options: dict | None = None) -> ScanOutput:
    """The scan output ``scan`` as its tables; ``CatalogError`` with a one-line reason when it cannot be opened."""
    fs, root = open_fs(scan, storage_options)
    if not scan or not fs.exists(root):
        raise CatalogError(f"--scan {scan!r} does not exist (or is not reachable with these credentials)")
    try:
        return ScanOutput.open(scan, catalog, namespace, storage_options, create=False)
    except CatalogError:
        raise
    except Exception as exc:  # noqa: BLE001 - NoSuchTable / NoSuchNamespace from any catalog
        if type(exc).__name__.startswith("NoSuch"):
            raise CatalogError(f"no scan tables for {scan} in its catalog ({exc}); was it written by jobs.scan, or does it need "
                               f"'python -m jobs.audit migrate --output {scan}'?") from exc
        raise
