"""Questions audit teams ask of the scan tables, answered with DuckDB over the Parquet partitions.

    python -m jobs.audit query per-day    --scan s3://audit/scans --since 2026-11-01
    python -m jobs.audit query per-prefix --scan s3://audit/scans --bucket uploads --depth 2
    python -m jobs.audit query top        --scan s3://audit/scans --date 2026-11-23 --limit 100
    python -m jobs.audit query detectors  --scan s3://audit/scans
    python -m jobs.audit query diff       --scan s3://audit/scans --detector OLD_ID --against NEW_ID
    python -m jobs.audit query recut      --scan s3://audit/scans --threshold 0.9 [--rows --out flagged_0.9.parquet]
    python -m jobs.audit query errors     --scan s3://audit/scans --date 2026-11-23
    python -m jobs.audit query sql        --scan OUT --sql "SELECT bucket, count(*) FROM flagged GROUP BY ALL"
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.audit query per-day --scan s3://audit/scans

The views ``scores``, ``flagged``, ``errors`` (with the partition columns ``scan_date`` as a
DATE and ``bucket``) and ``runs`` (one row per committed scan, from ``OUT/runs/*.json``)
are DuckDB ``read_parquet(..., hive_partitioning = true)`` over the tables, so ``--date``,
``--since``/``--until`` and ``--bucket`` open only the files of those partitions. Rows of a
scan whose run summary is not written yet (a scan still committing) are left out: readers
see whole scans only. Object stores are read through the same fsspec filesystem as the
jobs (``--s3-endpoint`` or ``AWS_ENDPOINT_URL``); no DuckDB extension is needed. Nothing
here needs Ray: it runs on a laptop against the bucket, or as a job on the cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from detector_core import schema as S
from detector_core import tables as T
from detector_core.storage import is_remote, join, open_fs, s3_storage_options
from jobs.common import fail, opt, parse_config, run_main, write_parquet

QUESTIONS = ("per-day", "per-prefix", "top", "detectors", "diff", "recut", "errors", "sql")
FORMATS = ("table", "csv", "json", "parquet")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class AuditConfig:
    question: str = opt("", "what to ask: " + ", ".join(QUESTIONS), choices=QUESTIONS)
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("", "only this scan date, YYYY-MM-DD ('last' = the newest date in the tables)")
    since: str = opt("", "only scan dates on or after this one, YYYY-MM-DD")
    until: str = opt("", "only scan dates on or before this one, YYYY-MM-DD")
    bucket: str = opt("", "only objects in this bucket ('local' for local paths)")
    detector: str = opt("", "only rows of this detector id (diff: the old detector)")
    against: str = opt("", "diff: the new detector id to compare --detector with")
    threshold: float = opt(float("nan"), "recut: the new threshold on the score scale (0..1)")
    rows: bool = opt(False, "recut: list the rows flagged at --threshold instead of counts per day")
    depth: int = opt(1, "per-prefix: how many folder levels below the bucket make a prefix")
    limit: int = opt(100, "rows to list for top / diff / recut --rows (0 = all)")
    sql: str = opt("", "sql: a query over the views scores, flagged, errors, runs")
    format: str = opt("table", "output format: " + ", ".join(FORMATS), choices=FORMATS)
    out: str = opt("", "write the answer to this file (local or s3://) instead of stdout; required for parquet")
    s3_endpoint: str = opt("", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


def parse_date(value: str, flag: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        fail(f"{flag} {value!r} is not a date (YYYY-MM-DD)")


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


RUNS_SCHEMA = pa.schema([
    ("scan_id", pa.string()), ("scan_date", pa.string()), ("detector_id", pa.string()), ("detector_kind", pa.string()),
    ("input", pa.string()), ("listed", pa.int64()), ("skipped", pa.int64()), ("scored", pa.int64()), ("flagged", pa.int64()),
    ("errors", pa.int64()), ("seconds", pa.float64()), ("started_at", pa.string()), ("finished_at", pa.string()),
])
RUN_COLUMNS = RUNS_SCHEMA.names


def read_runs(scan: str, so: dict | None) -> pa.Table:
    """The committed scans' summaries, one row per scan and detector (an ensemble scan has several)."""
    fs, root = open_fs(join(scan, "runs"), so)
    rows = []
    paths = sorted(fs.glob(root.rstrip("/") + "/*.json")) if fs.exists(root) else []
    for p in paths:
        r = json.loads(fs.cat_file(p))
        base = {k: r.get(k) for k in RUN_COLUMNS}
        # Summaries older than ensembles describe their one detector at the top level.
        for d in r.get("detectors") or [{}]:
            rows.append({**base, **{k: d[k] for k in RUN_COLUMNS if k in d}})
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def _partition_globs(fs, scan: str, root: str, since: str = "", until: str = "", bucket: str = "") -> list[str]:
    """One glob per scan_date partition in [since, until] (and bucket) that holds files.

    Partitions are chosen from one listing of the table's top level, so a query over last
    night neither lists nor opens a year of older partitions.
    """
    if not fs.exists(root):
        return []
    globs = []
    for d in sorted(fs.ls(root, detail=False)):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(f"{S.SCAN_DATE}="):
            continue
        date = name.split("=", 1)[1]
        if (since and date < since) or (until and date > until):
            continue
        pattern = f"{name}/{S.BUCKET}={bucket}/*.parquet" if bucket else f"{name}/*/*.parquet"
        if fs.glob(f"{root.rstrip('/')}/{pattern}"):
            globs.append(f"{scan.rstrip('/')}/{pattern}")
    return globs


def connect(scan: str, storage_options: dict | None = None, where: str = "", since: str = "", until: str = "",
            bucket: str = "", runs: pa.Table | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``scores``, ``flagged``, ``errors`` and ``runs`` of a scan output.

    ``since``/``until``/``bucket`` choose the partitions the views read; ``where`` (SQL
    over the columns) is part of every table view. ``runs`` is ``read_runs(scan)`` when
    the caller has it already.
    """
    con = duckdb.connect()
    fs, _ = open_fs(scan, storage_options)
    if is_remote(scan):
        con.register_filesystem(fs)
    con.register("_runs", read_runs(scan, storage_options) if runs is None else runs)
    con.execute("CREATE VIEW runs AS SELECT * REPLACE (CAST(scan_date AS DATE) AS scan_date) FROM _runs")
    committed = "scan_id IN (SELECT scan_id FROM runs)"
    cond = f"{committed} AND ({where})" if where else committed
    for name in T.TABLES:
        table_uri = join(scan, name)
        globs = _partition_globs(fs, table_uri, open_fs(table_uri, storage_options)[1], since, until, bucket)
        if globs:
            files = "[" + ", ".join(sql_quote(g) for g in globs) + "]"
            # union_by_name: files of an older schema version (fewer columns) read with those columns null.
            src = (f"read_parquet({files}, hive_partitioning = true, union_by_name = true, "
                   f"hive_types = {{'scan_date': DATE, 'bucket': VARCHAR}})")
        else:
            empty = T.TABLE_SCHEMAS[name].append(pa.field(S.SCAN_DATE, pa.date32())).append(pa.field(S.BUCKET, pa.string()))
            con.register(f"_empty_{name}", empty.empty_table())
            src = f"_empty_{name}"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {src} WHERE {cond}")
    return con


def _where(cfg: AuditConfig) -> str:
    parts = []
    if cfg.detector and cfg.question != "diff":
        parts.append(f"detector_id = {sql_quote(cfg.detector)}")
    return " AND ".join(parts)


def _limit(cfg: AuditConfig) -> str:
    return f" LIMIT {int(cfg.limit)}" if cfg.limit > 0 else ""


def question_sql(cfg: AuditConfig) -> str:
    """The SQL that answers ``cfg.question`` over the views (shown by the README as examples)."""
    q = cfg.question
    if q == "per-day":
        return """
            WITH s AS (SELECT scan_date, detector_id, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged
                       FROM scores GROUP BY ALL),
                 e AS (SELECT scan_date, detector_id, count(*) AS errors FROM errors GROUP BY ALL)
            SELECT scan_date, detector_id, coalesce(scored, 0) AS scored, coalesce(flagged, 0) AS flagged,
                   coalesce(errors, 0) AS errors, round(coalesce(flagged, 0) / nullif(scored, 0), 4) AS flagged_rate
            FROM s FULL OUTER JOIN e USING (scan_date, detector_id) ORDER BY scan_date, detector_id"""
    if q == "per-prefix":
        depth = max(0, int(cfg.depth))
        return f"""
            WITH k AS (SELECT bucket, flagged,
                              string_split(regexp_replace(uri, '^([a-z0-9]+://[^/]*/|/)', ''), '/') AS parts FROM scores)
            SELECT bucket, array_to_string(list_slice(parts, 1, least(len(parts) - 1, {depth})), '/') AS prefix,
                   count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                   round(count(*) FILTER (WHERE flagged) / count(*), 4) AS flagged_rate
            FROM k GROUP BY ALL ORDER BY flagged DESC, scored DESC, bucket, prefix"""
    if q == "top":
        return f"""SELECT scan_date, bucket, uri, score, threshold, detector_id, scan_id FROM flagged
                   ORDER BY score DESC, uri{_limit(cfg)}"""
    if q == "detectors":
        return """SELECT detector_id, any_value(detector_kind) AS detector_kind, any_value(clip_id) AS clip_id,
                         any_value(threshold) AS threshold,
                         count(DISTINCT scan_id) AS scans, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                         min(scan_date) AS first_scan_date, max(scan_date) AS last_scan_date
                  FROM scores GROUP BY detector_id ORDER BY last_scan_date DESC, detector_id"""
    if q == "diff":
        if not (cfg.detector and cfg.against):
            fail("diff needs --detector OLD_ID --against NEW_ID (list them with: query detectors)")
        latest = "SELECT uri, arg_max(score, scanned_at) AS score, arg_max(flagged, scanned_at) AS flagged FROM scores WHERE detector_id = {} GROUP BY uri"
        return f"""
            WITH a AS ({latest.format(sql_quote(cfg.detector))}), b AS ({latest.format(sql_quote(cfg.against))})
            SELECT CASE WHEN b.flagged THEN 'newly flagged' ELSE 'no longer flagged' END AS change,
                   uri, a.score AS score_old, b.score AS score_new
            FROM a JOIN b USING (uri) WHERE a.flagged <> b.flagged
            ORDER BY change, abs(b.score - a.score) DESC, uri{_limit(cfg)}"""
    if q == "recut":
        if not (0.0 < cfg.threshold < 1.0):
            fail("recut needs --threshold T with 0 < T < 1 (a score)")
        logit = math.log(cfg.threshold / (1.0 - cfg.threshold))  # decisions are made on the logit, as in the scan
        if cfg.rows:
            return f"""SELECT scan_date, bucket, uri, score, logit, flagged AS flagged_at_bundle, detector_id, scan_id FROM scores
                       WHERE logit >= {logit!r} ORDER BY score DESC, uri{_limit(cfg)}"""
        return f"""SELECT scan_date, detector_id, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged_at_bundle,
                          count(*) FILTER (WHERE logit >= {logit!r}) AS flagged_at_threshold,
                          count(*) FILTER (WHERE logit >= {logit!r} AND NOT flagged) AS newly_flagged,
                          count(*) FILTER (WHERE logit < {logit!r} AND flagged) AS no_longer_flagged
                   FROM scores GROUP BY ALL ORDER BY scan_date, detector_id"""
    if q == "errors":
        return """SELECT scan_date, error_stage, error_type, count(*) AS objects, any_value(uri) AS example_uri,
                         any_value(error_message) AS example_message
                  FROM errors GROUP BY ALL ORDER BY scan_date, objects DESC, error_stage, error_type"""
    if q == "sql":
        if not cfg.sql:
            fail("sql needs --sql 'SELECT … FROM scores|flagged|errors|runs'")
        return cfg.sql
    fail(f"unknown question {q!r}; one of {', '.join(QUESTIONS)}")


def answer(cfg: AuditConfig) -> pa.Table:
    """The answer to ``cfg.question`` as an Arrow table."""
    if not cfg.scan:
        fail("--scan (the scan output prefix) is required")
    so = s3_storage_options(cfg.s3_endpoint or None)
    fs, root = open_fs(cfg.scan, so)
    if not fs.exists(root):
        fail(f"--scan {cfg.scan} does not exist (or is not reachable with these credentials)")
    runs = read_runs(cfg.scan, so)
    if cfg.date == "last":
        if runs.num_rows == 0:
            fail(f"no committed scans under {cfg.scan}/runs/")
        cfg.date = max(runs["scan_date"].to_pylist())
    elif cfg.date:
        cfg.date = parse_date(cfg.date, "--date")
    since = cfg.date or (parse_date(cfg.since, "--since") if cfg.since else "")
    until = cfg.date or (parse_date(cfg.until, "--until") if cfg.until else "")
    if cfg.bucket and not _BUCKET_RE.match(cfg.bucket):
        fail(f"--bucket {cfg.bucket!r} is not a bucket name")
    sql = question_sql(cfg)
    try:
        con = connect(cfg.scan, so, _where(cfg), since, until, cfg.bucket, runs)
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        fail(f"query failed: {str(exc).splitlines()[0]}")


def _emit(table: pa.Table, cfg: AuditConfig) -> None:
    import pandas as pd

    so = s3_storage_options(cfg.s3_endpoint or None)
    if cfg.format == "parquet":
        if not cfg.out:
            fail("--format parquet needs --out FILE")
        write_parquet(table, cfg.out, so)
        print(f"{table.num_rows} rows -> {cfg.out}", file=sys.stderr)
        return
    df = table.to_pandas()
    if cfg.format == "csv":
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


def main(argv=None) -> pa.Table:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `query QUESTION` is the documented form; `--question QUESTION` works too.
    if argv[:1] == ["query"]:
        argv = argv[1:]
        if argv and not argv[0].startswith("-"):
            argv = ["--question", argv[0], *argv[1:]]
    cfg = parse_config(AuditConfig, argv, __doc__)
    if not cfg.question:
        fail("say what to ask: python -m jobs.audit query {" + ",".join(QUESTIONS) + "} --scan OUT …")
    table = answer(cfg)
    _emit(table, cfg)
    return table


if __name__ == "__main__":
    run_main(main)
