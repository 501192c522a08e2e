"""Questions audit teams ask of the scan tables, answered with DuckDB over the Iceberg tables.

    python -m jobs.audit query per-day    --scan s3://audit/scans --since 2026-11-01
    python -m jobs.audit query per-prefix --scan s3://audit/scans --bucket uploads --depth 2
    python -m jobs.audit query top        --scan s3://audit/scans --date 2026-11-23 --limit 100
    python -m jobs.audit query detectors  --scan s3://audit/scans
    python -m jobs.audit query diff       --scan s3://audit/scans --detector-id OLD_ID --against-id NEW_ID
    python -m jobs.audit query recut      --scan s3://audit/scans --threshold 0.9 [--rows --out flagged_0.9.parquet]
    python -m jobs.audit query errors     --scan s3://audit/scans --date 2026-11-23
    python -m jobs.audit query sql        --scan OUT --sql "SELECT bucket, count(*) FROM flagged GROUP BY ALL"
    python -m jobs.audit query precision  --scan s3://audit/scans --since 2026-11-01      # reviewers' verdicts vs flags
    python -m jobs.audit query drift      --scan s3://audit/scans --nights 28
    python -m jobs.audit query threshold  --scan s3://audit/scans --target-daily-flags 200
    python -m jobs.audit query provenance --scan s3://audit/scans --since 2026-11-01      # what files declare, by source
    python -m jobs.audit query agreement  --scan s3://audit/scans                          # recall on declared-generated files
    python -m jobs.audit query compare    --scan s3://audit/scans --challenger NEW_ID [--rows]   # after jobs.rescore
    python -m jobs.audit verdicts import verdicts-2026-11-23.csv --scan s3://audit/scans --reviewer alice
    python -m jobs.audit migrate --output s3://audit/scans --catalog detector     # hive Parquet (schema 1-2) -> Iceberg
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.audit query per-day --scan s3://audit/scans

The views ``scores``, ``flagged``, ``errors`` (with the partition columns ``scan_date``, a
DATE, and ``bucket``) are DuckDB ``iceberg_scan`` over the Iceberg tables (the extension is
loaded from the ``duckdb-extension-iceberg`` pip package, never downloaded), pinned to the
snapshots that the newest ``runs`` row records, so the three agree even while a scan commits
its next unit; ``runs`` has one row per finished scan and detector; ``verdicts`` holds the
reviewers' verdicts that ``verdicts import`` added from the review page's exports
(``detector_core.tables.verdicts``; the questions' SQL is ``detector_core.tables.questions``). ``--date``,
``--since``/``--until`` and ``--bucket`` are filters on the partition columns, which the
extension uses to skip manifests and files. The catalog is the one the scan recorded in
``OUT/_catalog.json`` unless ``--catalog`` names it. Object stores are read through the same
fsspec filesystem as the jobs (``--s3-endpoint`` or ``AWS_ENDPOINT_URL``). Nothing here
needs Ray: it runs on a laptop against the bucket, or as a job on the cluster.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from detector_core import schema as S
from detector_core.storage import open_fs, s3_storage_options
from detector_core.tables import definitions as T
from detector_core.tables.catalog import CatalogError, ScanOutput
from detector_core.tables.csv_cells import neutralise
from detector_core.tables.questions import QUESTIONS, QuestionError, finish, question_sql, where_clause
from detector_core.tables.views import QueryTimeout, ReadOnlyError, connect, read_only_sql, read_runs, run_query
from jobs.common.errors import JobError, parse_date, query_failed, run_main
from jobs.common.flags import CatalogOptions, StorageOptions, opt, parse_config
from jobs.common.outputs import open_output, write_parquet

FORMATS = ("table", "csv", "json", "parquet")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class AuditConfig(CatalogOptions, StorageOptions):
    question: str = opt("", "what to ask: " + ", ".join(QUESTIONS), choices=QUESTIONS)
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("", "only this scan date, YYYY-MM-DD ('last' = the newest date in the tables)")
    since: str = opt("", "only scan dates on or after this one, YYYY-MM-DD")
    until: str = opt("", "only scan dates on or before this one, YYYY-MM-DD")
    bucket: str = opt("", "only objects in this bucket ('local' for local paths)")
    detector_id: str = opt("", "only rows of this detector id (diff: the old detector)")
    against_id: str = opt("", "diff: the new detector id to compare --detector-id with")
    challenger: str = opt("", "compare: the challenger's detector id (what jobs.rescore wrote); --detector-id: production's")
    threshold: float = opt(float("nan"), "recut: the new threshold on the score scale (0..1)", within="[0, 1]")
    rows: bool = opt(False, "recut: list the rows flagged at --threshold instead of counts per day; compare: the disagreements")
    depth: int = opt(1, "per-prefix: how many folder levels below the bucket make a prefix", within="[1, inf)")
    limit: int = opt(100, "rows to list for top / diff / recut --rows (0 = all)", within="[0, inf)")
    nights: int = opt(28, "drift: the trailing calendar days a night is compared with; threshold: the days of scans it looks at", within="[1, inf)")
    target_daily_flags: int = opt(0, "threshold: the objects a night the threshold should flag (about)", within="[0, inf)")
    sql: str = opt("", "sql: a query over the views scores, flagged, errors (current rows), scores_history, flagged_history, "
                   "errors_history (every row), runs, verdicts, latest_verdicts, precision_sample")
    timeout: float = opt(60.0, "seconds a query may run before it is stopped (0 = no limit)", within="[0, inf)")
    memory_limit: str = opt("4GB", "the most memory a query may hold (DuckDB's memory_limit, e.g. 4GB); it spills to a private "
                            "temporary folder beyond")
    format: str = opt("table", "output format: " + ", ".join(FORMATS), choices=FORMATS)
    out: str = opt("", "write the answer to this file (local or s3://) instead of stdout; required for parquet")


def answer(cfg: AuditConfig) -> pa.Table:
    """The answer to ``cfg.question`` as an Arrow table."""
    if not cfg.scan:
        raise JobError("--scan (the scan output prefix) is required")
    so = s3_storage_options(cfg.s3_endpoint or None)
    out = open_output(cfg.scan, cfg.catalog, cfg.namespace, so)
    runs = read_runs(out)
    if cfg.date == "last":
        if runs.num_rows == 0:
            raise JobError(f"no finished scans in {cfg.scan}")
        cfg.date = max(runs["scan_date"].to_pylist())
    elif cfg.date:
        cfg.date = parse_date(cfg.date, "--date")
    since = cfg.date or (parse_date(cfg.since, "--since") if cfg.since else "")
    until = cfg.date or (parse_date(cfg.until, "--until") if cfg.until else "")
    if cfg.bucket and not _BUCKET_RE.match(cfg.bucket):
        raise JobError(f"--bucket {cfg.bucket!r} is not a bucket name")
    try:
        sql = question_sql(cfg)
        if cfg.question == "sql":
            read_only_sql(sql)
    except (QuestionError, ReadOnlyError) as exc:
        raise JobError(str(exc))
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", cfg.memory_limit.strip(), re.IGNORECASE):
        raise JobError(f"--memory-limit {cfg.memory_limit!r} is not a size (e.g. 4GB, 512MB)")
    try:
        con = connect(out, where_clause(cfg), since, until, cfg.bucket, memory_limit=cfg.memory_limit)
        return finish(cfg, run_query(con, sql, cfg.timeout))
    except QueryTimeout as exc:
        raise JobError(str(exc))
    except duckdb.OutOfMemoryException as exc:
        raise JobError(f"the query needs more memory than --memory-limit {cfg.memory_limit} ({str(exc).splitlines()[0][:120]})")
    except duckdb.PermissionException as exc:
        raise JobError(f"refused: the audit reads the tables of {cfg.scan} only ({str(exc).splitlines()[0]})")
    except duckdb.Error as exc:
        raise query_failed(exc, cfg.scan)


def _emit(table: pa.Table, cfg: AuditConfig) -> None:
    import pandas as pd

    so = s3_storage_options(cfg.s3_endpoint or None)
    if cfg.format == "parquet":
        if not cfg.out:
            raise JobError("--format parquet needs --out FILE")
        write_parquet(table, cfg.out, so)
        print(f"{table.num_rows} rows -> {cfg.out}", file=sys.stderr)
        return
    df = table.to_pandas()
    if cfg.format == "csv":  # text cells a spreadsheet would run as formulas are neutralised (numbers are not)
        for col in df.columns:
            if df[col].dtype == object or pd.api.types.is_string_dtype(df[col].dtype):
                df[col] = df[col].map(lambda v: neutralise(v) if isinstance(v, str) else v)
        text = df.to_csv(index=False)
    elif cfg.format == "json":
        text = df.to_json(orient="records", lines=True, date_format="iso")
    else:
        with pd.option_context("display.max_colwidth", 120, "display.width", 250):
            text = (df.to_string(index=False) if len(df) else "(no rows)") + "\n"
    if cfg.out:
        fs, path = open_fs(cfg.out, so)
        with fs.open(path, "w") as f:
            f.write(text)
        print(f"{table.num_rows} rows -> {cfg.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


@dataclass
class VerdictsConfig(CatalogOptions, StorageOptions):
    file: str = opt("", "the verdicts file the review page exported (CSV or JSON), local or s3://")
    scan: str = opt("", "the scan output the verdicts are about (the --output of jobs.scan, that the review page was built from)")
    reviewer: str = opt("", "reviewer name for the verdicts that carry none")


def import_verdicts(cfg: VerdictsConfig) -> dict:
    """Append a review page's export to the output's ``verdicts`` table; verdicts already there are not added again.

    Every verdict must be about an object this output scored (its uri, detector_id and
    scan_id are a row of ``scores``); the others are refused and counted, the rest imported.
    A file with an unusable row (an unknown verdict, no time, no reviewer) imports nothing.
    """
    from pyiceberg.expressions import And, In

    from detector_core.tables.verdicts import KEY, VerdictError, known, parse_verdicts

    if not (cfg.file and cfg.scan):
        raise JobError("usage: python -m jobs.audit verdicts import FILE --scan OUT [--reviewer NAME]")
    so = s3_storage_options(cfg.s3_endpoint or None)
    fs, path = open_fs(cfg.file, so)
    try:
        data = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise JobError(f"no verdicts file {cfg.file} ({type(exc).__name__})")
    try:
        rows = parse_verdicts(data, cfg.file, cfg.reviewer)
    except VerdictError as exc:
        raise JobError(str(exc))
    out = open_output(cfg.scan, cfg.catalog, cfg.namespace, so)
    if out.find_table(T.VERDICTS) is None:  # an output written before verdicts existed
        out.create(T.VERDICTS)
    ids = sorted(set(rows[S.SCAN_ID].to_pylist()))
    dates = sorted({r["scan_date"] for r in read_runs(out).to_pylist() if r["scan_id"] in ids})
    scored = (out.read("scores", And(And(In(S.SCAN_ID, ids), In(S.SCAN_DATE, dates)), In(S.URI, set(rows[S.URI].to_pylist()))),
                       selected_fields=(S.URI, S.DETECTOR_ID, S.SCAN_ID)) if dates else T.SCORES_SCHEMA.empty_table())
    ok = known(rows, scored)
    unknown = rows.filter(pc.invert(ok))
    if unknown.num_rows == rows.num_rows:
        raise JobError(f"none of the {rows.num_rows} verdicts in {cfg.file} is about an object {cfg.scan} scored (uri, detector_id "
                       f"and scan_id of a scores row; e.g. {unknown[S.URI][0]}): is --scan the output the review page was built from?")
    added = out.append_new(T.VERDICTS, rows.filter(ok), KEY)
    result = {"verdicts": rows.num_rows, "added": added, "already_there": rows.num_rows - unknown.num_rows - added,
              "refused_unknown": unknown.num_rows, "table": out.identifier(T.VERDICTS)}
    print(f"{added} verdicts added to {result['table']}, {result['already_there']} already there"
          + (f"; {unknown.num_rows} refused: about objects this output never scored (e.g. {unknown[S.URI][0]})" if unknown.num_rows else ""))
    return result


@dataclass
class MigrateConfig(StorageOptions):
    output: str = opt("", "scan output written before schema 3 (hive-partitioned Parquet + runs/*.json), local or s3://")
    catalog: str = opt("", "Iceberg catalog for its tables (as jobs.scan --catalog; empty = SQLite OUT/catalog.db for local outputs)")
    namespace: str = opt("", "catalog namespace for its tables (default: as recorded, else 'detector')")


def migrate(cfg: MigrateConfig) -> dict:
    """Copy every finished scan of the old layout into the Iceberg tables, one commit per scan; idempotent.

    Rows keep their scan ids and timestamps; a scan already in ``runs`` is skipped, so a
    second run (or one cut short and started again) adds nothing twice. Only scans whose
    run summary exists are copied: the old protocol never showed the others to readers.
    The old files are left where they are (delete ``OUT/<table>/scan_date=*`` afterwards).
    """
    import pyarrow.dataset as pads

    from detector_core.storage import arrow_fs
    from detector_core.tables.catalog import data_file_path

    if not cfg.output:
        raise JobError("--output (the scan output to migrate) is required")
    so = s3_storage_options(cfg.s3_endpoint or None)
    try:
        out = ScanOutput.open(cfg.output, cfg.catalog, cfg.namespace, so, adopt=True)
    except CatalogError as exc:
        raise JobError(str(exc))
    afs, aroot = arrow_fs(cfg.output, so)
    legacy = {name: T.legacy_dataset(afs, aroot, name) for name in T.TABLES}
    have = set(out.read("runs", selected_fields=("scan_id",))["scan_id"].to_pylist())
    summaries = []
    try:  # ls, not glob: an output path may hold glob characters ("out[1]")
        listed = sorted(p for p in out.fs.ls(f"{out.root}/runs", detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        listed = []
    for p in listed:
        r = json.loads(out.fs.cat_file(p))
        if int(r.get("schema_version", "1")) < 3 and r["scan_id"] not in have:
            summaries.append(r)
    copied = {t: 0 for t in T.TABLES}
    for r in summaries:
        files: dict[str, list[str]] = {t: [] for t in T.TABLES}
        for name, ds in legacy.items():
            if ds is None:
                continue
            rows = ds.to_table(filter=pads.field(S.SCAN_ID) == r["scan_id"])
            if rows.num_rows == 0:
                continue
            if S.DETECTOR_KIND not in rows.column_names:  # schema 1
                rows = rows.append_column(S.DETECTOR_KIND, pa.nulls(rows.num_rows, pa.string()))
            rows = rows.set_column(rows.schema.get_field_index(S.SCAN_DATE), S.SCAN_DATE, pc.cast(rows[S.SCAN_DATE], pa.date32()))
            rows = T.conform(rows, name)
            for key in rows.group_by([S.SCAN_DATE, S.BUCKET]).aggregate([]).to_pylist():
                part = rows.filter(pc.and_(pc.equal(rows[S.SCAN_DATE], key[S.SCAN_DATE]), pc.equal(rows[S.BUCKET], key[S.BUCKET])))
                path = data_file_path(out.uri, name, key[S.SCAN_DATE].isoformat(), key[S.BUCKET], f"migrated-{r['scan_id']}")
                write_parquet(part, path, so)
                files[name].append(path)
                copied[name] += part.num_rows
        base = {"scan_id": r["scan_id"], "unit": 0, "status": "completed", "scan_date": r["scan_date"], "input": r.get("input"),
                "listed": r.get("listed"), "skipped": r.get("skipped"), "model_loads": None, "seconds": r.get("seconds"),
                "started_at": r["started_at"], "committed_at": r["finished_at"], "config": json.dumps(r.get("config", {})),
                "schema_version": r.get("schema_version", "1")}
        dets = r.get("detectors") or [{"detector_id": r["detector_id"], "detector_kind": r.get("detector_kind"),
                                        "feature_id": r.get("feature_id"), "scored": r["scored"], "flagged": r["flagged"],
                                        "errors": r["errors"]}]
        rows = [{**base, **{k: d.get(k) for k in ("detector_id", "detector_kind", "feature_id", "scored", "flagged", "errors")}}
                for d in dets]
        out.commit_unit({"scan_id": r["scan_id"], "unit": 0, "files": files, "runs": rows})
    result = {"scans_migrated": len(summaries), "scans_already_there": len(have), **{f"{t}_rows": n for t, n in copied.items()}}
    print(f"migrated {len(summaries)} scan(s) of {cfg.output} into {', '.join(out.identifier(t) for t in T.ALL_TABLES)}: {copied}")
    return result


def main(argv=None) -> pa.Table | dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["migrate"]:
        return migrate(parse_config(MigrateConfig, argv[1:], migrate.__doc__))
    if argv[:2] == ["verdicts", "import"]:
        rest = argv[2:]
        if rest and not rest[0].startswith("-"):
            rest = ["--file", rest[0], *rest[1:]]
        return import_verdicts(parse_config(VerdictsConfig, rest, import_verdicts.__doc__))
    # `query QUESTION` is the documented form; `--question QUESTION` works too.
    if argv[:1] == ["query"]:
        argv = argv[1:]
        if argv and not argv[0].startswith("-"):
            argv = ["--question", argv[0], *argv[1:]]
    cfg = parse_config(AuditConfig, argv, __doc__)
    if not cfg.question:
        raise JobError("say what to ask: python -m jobs.audit query {" + ",".join(QUESTIONS) + "} --scan OUT …")
    table = answer(cfg)
    _emit(table, cfg)
    return table


if __name__ == "__main__":
    run_main(main)
