"""DuckDB views of a scan output's tables: what audit queries and the review page read.

``connect(out)`` gives a DuckDB connection with the views ``scores``, ``flagged``, ``errors``
(``iceberg_scan`` over the Iceberg tables, loaded from the ``duckdb-extension-iceberg`` pip
package, never downloaded) pinned to the snapshots the newest ``runs`` row records, so the
three agree even while a scan commits its next unit. They hold one row per object, night and
detector: the latest scan of the night wins (``current_rows``); ``scores_history``,
``flagged_history`` and ``errors_history`` keep every row committed. ``runs``: one row per
finished scan and detector, and the repairs and recoveries (``status``, ``committed_at``,
``nights``); ``verdicts`` (every reviewer's verdict, the table's latest snapshot,
unfiltered) and ``latest_verdicts`` (the latest one on each image); ``precision_sample``
(the report's seeded, stratified sample of each night's flagged rows, with the same filters
as the result tables). Filters on the partition columns (``scan_date``, ``bucket``) prune
manifests and files.

The connection is a sandbox: once the views exist, DuckDB may touch the tables' ``data/``
and ``metadata/`` folders only, loads nothing more, and its configuration is locked; SQL a
user types (``jobs.audit query sql``) passes ``read_only_sql`` (every statement, and what an
EXPLAIN runs, only reads), so it can neither write a file, attach a database, nor read
``catalog.db`` or ``/etc/…``; ``run_query`` stops it at a time limit, ``memory_limit`` bounds it.
"""

from __future__ import annotations

import re

import duckdb
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from detector_core import schema as S
from detector_core.storage import folder_prefix, is_remote, open_fs
from detector_core.tables import definitions as T
from detector_core.tables.catalog import CatalogError, ScanOutput

__all__ = ["FINISHED_RUNS_SCHEMA", "QueryTimeout", "ReadOnlyError", "connect", "current_rows", "duckdb_connection", "lock_down",
           "open_scan_output", "pinned_snapshots", "read_only_sql", "read_runs", "rescanned_nights", "run_query", "sql_quote"]

# What a user's SQL may be: queries, and EXPLAIN of them (PRAGMA and SHOW parse as SELECT).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALYZE\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


class ReadOnlyError(ValueError):
    """SQL that would do more than read the views."""


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# What audits read of the runs table: one row per finished scan and detector (tables.RUNS_SCHEMA is the table itself).
FINISHED_RUNS_SCHEMA = pa.schema([
    ("scan_id", pa.string()), ("scan_date", pa.string()), ("detector_id", pa.string()), ("detector_kind", pa.string()),
    ("input", pa.string()), ("listed", pa.int64()), ("skipped", pa.int64()), ("scored", pa.int64()), ("flagged", pa.int64()),
    ("errors", pa.int64()), ("model_loads", pa.int64()), ("seconds", pa.float64()), ("started_at", pa.string()),
    ("finished_at", pa.string()), ("status", pa.string()), ("committed_at", pa.string()), ("nights", pa.list_(pa.string())),
])
FINISHED_RUN_COLUMNS = FINISHED_RUNS_SCHEMA.names
# What the ``runs`` view shows: finished scans, and the repairs and recoveries that changed rows after them.
SHOWN_STATUSES = ("completed", "repair", "recovered")


def read_runs(out: ScanOutput, statuses: tuple[str, ...] = ("completed",)) -> pa.Table:
    """The finished scans, one row per scan and detector (an ensemble scan has several); with ``statuses``, those rows too.

    ``nights``: the scan dates a ``repair`` row changed (its config records them), else the row's own scan date.
    """
    import json

    where = " OR ".join(f"status = {sql_quote(st)}" for st in statuses)
    rows = out.read("runs", where).to_pylist()
    shown = []
    for r in rows:
        nights = [r["scan_date"].isoformat()]
        if r["status"] == "repair":
            try:
                nights = list(json.loads(r["config"] or "{}").get("nights", []))
            except ValueError:
                nights = []
        shown.append({**{k: r.get(k) for k in FINISHED_RUN_COLUMNS}, "scan_date": r["scan_date"].isoformat(),
                      "started_at": r["started_at"].isoformat(), "finished_at": r["committed_at"].isoformat(),
                      "committed_at": r["committed_at"].isoformat(), "nights": nights})
    return pa.Table.from_pylist(shown, schema=FINISHED_RUNS_SCHEMA)


def rescanned_nights(out: ScanOutput) -> pa.Table:
    """(scan_date, detector_id) that more than one scan wrote rows for: the only nights whose rows need the current-row rule.

    From ``runs`` (every unit commits a row there, recovered ones too), so it costs nothing per object.
    """
    runs = out.read("runs", selected_fields=("scan_id", "scan_date", "detector_id", "status"))
    runs = runs.filter(pa.compute.is_in(runs["status"], pa.array(["unit", "completed", "recovered"])))
    if runs.num_rows == 0:
        return pa.table({"scan_date": pa.array([], pa.date32()), "detector_id": pa.array([], pa.string())})
    counts = runs.group_by(["scan_date", "detector_id"]).aggregate([("scan_id", "count_distinct")])
    many = counts.filter(pa.compute.greater(counts["scan_id_count_distinct"], 1))
    return many.select(["scan_date", "detector_id"])


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
            memory_limit: str = "") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``scores``, ``flagged``, ``errors`` and ``runs`` of a scan output.

    The table views are DuckDB ``iceberg_scan`` over the Iceberg tables, pinned to the
    snapshots of the newest committed unit; ``since``/``until``/``bucket`` are filters on
    the partition columns, which prune manifests and files; ``where`` (SQL over the
    columns) is part of every table view. ``scores``, ``flagged`` and ``errors`` hold each
    object's current row per night and detector (``current_rows``); ``*_history`` every row.
    ``runs``: the finished scans, and the repairs and recoveries after them (``status``,
    ``committed_at``, and ``nights``: the scan dates a repair changed).
    """
    con = duckdb_connection(out)
    con.register("_runs", read_runs(out, SHOWN_STATUSES))
    con.execute("""CREATE VIEW runs AS SELECT * REPLACE (CAST(scan_date AS DATE) AS scan_date, CAST(nights AS DATE[]) AS nights,
                                                CAST(committed_at AS TIMESTAMPTZ) AS committed_at) FROM _runs""")
    conds = [f"({where})"] if where else []
    if since:
        conds.append(f"scan_date >= DATE {sql_quote(since)}")
    if until:
        conds.append(f"scan_date <= DATE {sql_quote(until)}")
    if bucket:
        conds.append(f"bucket = {sql_quote(bucket)}")
    cond = " AND ".join(conds) or "true"
    nights = " AND ".join(conds[1:] if where else conds) or "true"  # the partition filters alone: not production's detector
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
        con.execute(f"CREATE VIEW {name}_history AS SELECT {star} FROM {src} WHERE {cond}")
    current_rows(con, rescanned_nights(out))
    # Verdicts are about images, not one scan: every verdict, whatever the filters. The precision
    # sample: the nights in range, as the report drew them. (An output older than a table has none.)
    # The challengers' rows (jobs.rescore): the nights in range, every challenger (query compare picks one).
    for name, view, where_ in ((T.VERDICTS, "verdicts", "true"), (T.SAMPLE, "precision_sample", cond), (T.CHALLENGER, T.CHALLENGER, nights)):
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
    lock_down(con, out, memory_limit)
    return con


def current_rows(con: duckdb.DuckDBPyConnection, rescanned: pa.Table) -> None:
    """The views ``scores``, ``flagged``, ``errors``: one row per object, night and detector, over the ``*_history`` views.

    The current row of an (object, night, detector) is the one the latest scan of that night wrote,
    in ``scores`` or ``errors`` (latest ``scanned_at``, then ``scan_id``): a ``--full`` re-scan
    supersedes what the night's earlier scans said, and a flagged row counts only while its
    scores row is current. Only the nights that ``rescanned`` lists (``rescanned_nights``) hold
    more than one scan's rows; every other row is current as it is, so the rule costs nothing
    on nights scanned once. Every question, the review queue, the precision sample and exports
    read these views; the ``*_history`` views keep every row ever committed.
    """
    if rescanned.num_rows == 0:
        for name in T.TABLES:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM {name}_history")
        return
    con.register("_rescanned_input", rescanned)
    con.execute("CREATE TABLE _rescanned AS SELECT CAST(scan_date AS DATE) AS scan_date, detector_id FROM _rescanned_input")
    con.unregister("_rescanned_input")
    keys = "uri, scan_date, detector_id"
    con.execute(f"""CREATE VIEW _current_scan AS
        SELECT {keys}, arg_max(scan_id, (scanned_at, scan_id)) AS scan_id FROM (
            SELECT {keys}, scan_id, scanned_at FROM scores_history SEMI JOIN _rescanned USING (scan_date, detector_id)
            UNION ALL
            SELECT {keys}, scan_id, scanned_at FROM errors_history SEMI JOIN _rescanned USING (scan_date, detector_id))
        GROUP BY ALL""")
    for name in T.TABLES:
        con.execute(f"""CREATE VIEW {name} AS
            SELECT * FROM {name}_history ANTI JOIN _rescanned USING (scan_date, detector_id)
            UNION ALL BY NAME
            SELECT * FROM {name}_history SEMI JOIN _current_scan USING ({keys}, scan_id)""")


def lock_down(con: duckdb.DuckDBPyConnection, out: ScanOutput, memory_limit: str = "") -> None:
    """From now on ``con`` reads the tables' data and metadata folders only, writes nowhere, loads no extension, and
    cannot be reconfigured; ``memory_limit`` (DuckDB's, e.g. ``4GB``) bounds what a query may hold.

    DuckDB lets a connection read *and write* under ``allowed_directories``: only the tables' own
    ``data/`` and ``metadata/`` folders are listed (never the output's root, ``catalog.db`` or
    ``_catalog.json``), and ``read_only_sql`` refuses every statement that writes. Spills go to a
    private temporary folder (``temp_directory``), never ``.tmp`` under the working directory.
    """
    import shutil
    import tempfile
    import weakref

    from detector_core.tables.catalog import OUTPUT_TABLES

    folders = [folder_prefix(f"{out.location(n)}/{sub}") for n in OUTPUT_TABLES for sub in ("data", "metadata")]
    spill = tempfile.mkdtemp(prefix="audit-duckdb-")
    weakref.finalize(con, shutil.rmtree, spill, True)  # gone with the connection (or at exit)
    con.execute(f"SET temp_directory = {sql_quote(spill)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {sql_quote(memory_limit)}")
    con.execute(f"SET allowed_directories = [{', '.join(sql_quote(f) for f in folders)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


class QueryTimeout(RuntimeError):
    """A query ran past its time limit and was interrupted."""


def run_query(con: duckdb.DuckDBPyConnection, sql: str, timeout_s: float) -> pa.Table:
    """``sql``'s answer as an Arrow table, interrupted (``QueryTimeout``) after ``timeout_s`` seconds (0: no limit)."""
    import threading

    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.InterruptException:
        raise QueryTimeout(f"the query ran past its time limit of {timeout_s:g} s and was stopped (--timeout)") from None
    finally:
        if timer is not None:
            timer.cancel()


def read_only_sql(sql: str) -> str:
    """``sql`` when every statement in it only reads (``READ_ONLY_STATEMENTS``), else ``ReadOnlyError`` naming the first that does not."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlyError(f"the SQL does not parse: {str(exc).splitlines()[0]}") from None
    for st in statements:
        kind = st.type.name
        if kind == "EXPLAIN":  # EXPLAIN [ANALYZE] runs what it explains: that must only read too
            inner = _EXPLAIN.sub("", st.query, count=1)
            if inner == st.query:
                raise ReadOnlyError(f"query sql only reads: this EXPLAIN is refused ({' '.join(st.query.split())[:80]!r})")
            read_only_sql(inner)
            continue
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
