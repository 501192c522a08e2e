"""Questions audit teams ask of the scan tables, answered with DuckDB over the Iceberg tables.

    python -m jobs.audit query per-day    --scan s3://audit/scans --since 2026-11-01
    python -m jobs.audit query per-prefix --scan s3://audit/scans --bucket uploads --depth 2
    python -m jobs.audit query top        --scan s3://audit/scans --date 2026-11-23 --limit 100
    python -m jobs.audit query detectors  --scan s3://audit/scans
    python -m jobs.audit query diff       --scan s3://audit/scans --detector-id OLD_ID --against-id NEW_ID
    python -m jobs.audit query recut      --scan s3://audit/scans --threshold 0.9 [--rows --out flagged_0.9.parquet]
    python -m jobs.audit query errors     --scan s3://audit/scans --date 2026-11-23
    python -m jobs.audit query sql        --scan OUT --sql "SELECT bucket, count(*) FROM flagged GROUP BY ALL"
    python -m jobs.audit migrate --output s3://audit/scans --catalog detector     # hive Parquet (schema 1-2) -> Iceberg
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \
        python -m jobs.audit query per-day --scan s3://audit/scans

The views ``scores``, ``flagged``, ``errors`` (with the partition columns ``scan_date``, a
DATE, and ``bucket``) are DuckDB ``iceberg_scan`` over the Iceberg tables (the extension is
loaded from the ``duckdb-extension-iceberg`` pip package, never downloaded), pinned to the
snapshots that the newest ``runs`` row records, so the three agree even while a scan commits
its next unit; ``runs`` has one row per finished scan and detector. ``--date``,
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
from scipy.special import logit as scipy_logit

from detector_core import schema as S
from detector_core import tables as T
from detector_core.catalog import CatalogError, ScanOutput
from detector_core.storage import open_fs, s3_storage_options
from detector_core.views import connect, read_runs, sql_quote
from jobs.common import JobError, open_output, parse_date, run_main, write_parquet
from jobs.flags import StorageOptions, opt, parse_config

QUESTIONS = ("per-day", "per-prefix", "top", "detectors", "diff", "recut", "errors", "sql")
FORMATS = ("table", "csv", "json", "parquet")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class AuditConfig(StorageOptions):
    question: str = opt("", "what to ask: " + ", ".join(QUESTIONS), choices=QUESTIONS)
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("", "only this scan date, YYYY-MM-DD ('last' = the newest date in the tables)")
    since: str = opt("", "only scan dates on or after this one, YYYY-MM-DD")
    until: str = opt("", "only scan dates on or before this one, YYYY-MM-DD")
    bucket: str = opt("", "only objects in this bucket ('local' for local paths)")
    detector_id: str = opt("", "only rows of this detector id (diff: the old detector)")
    against_id: str = opt("", "diff: the new detector id to compare --detector-id with")
    threshold: float = opt(float("nan"), "recut: the new threshold on the score scale (0..1)", within="[0, 1]")
    rows: bool = opt(False, "recut: list the rows flagged at --threshold instead of counts per day")
    depth: int = opt(1, "per-prefix: how many folder levels below the bucket make a prefix", within="[1, inf)")
    limit: int = opt(100, "rows to list for top / diff / recut --rows (0 = all)", within="[0, inf)")
    sql: str = opt("", "sql: a query over the views scores, flagged, errors, runs")
    format: str = opt("table", "output format: " + ", ".join(FORMATS), choices=FORMATS)
    out: str = opt("", "write the answer to this file (local or s3://) instead of stdout; required for parquet")
    catalog: str = opt("", "Iceberg catalog of the tables (default: the one OUT/_catalog.json records; see jobs.scan --catalog)")
    namespace: str = opt("", "catalog namespace of the output's tables (default: as recorded)")


def _where(cfg: AuditConfig) -> str:
    parts = []
    if cfg.detector_id and cfg.question != "diff":
        parts.append(f"detector_id = {sql_quote(cfg.detector_id)}")
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
        return """SELECT detector_id, any_value(detector_kind) AS detector_kind, any_value(feature_id) AS feature_id,
                         any_value(threshold) AS threshold,
                         count(DISTINCT scan_id) AS scans, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                         min(scan_date) AS first_scan_date, max(scan_date) AS last_scan_date
                  FROM scores GROUP BY detector_id ORDER BY last_scan_date DESC, detector_id"""
    if q == "diff":
        if not (cfg.detector_id and cfg.against_id):
            raise JobError("diff needs --detector-id OLD_ID --against-id NEW_ID (list them with: query detectors)")
        latest = "SELECT uri, arg_max(score, scanned_at) AS score, arg_max(flagged, scanned_at) AS flagged FROM scores WHERE detector_id = {} GROUP BY uri"
        return f"""
            WITH a AS ({latest.format(sql_quote(cfg.detector_id))}), b AS ({latest.format(sql_quote(cfg.against_id))})
            SELECT CASE WHEN b.flagged THEN 'newly flagged' ELSE 'no longer flagged' END AS change,
                   uri, a.score AS score_old, b.score AS score_new
            FROM a JOIN b USING (uri) WHERE a.flagged <> b.flagged
            ORDER BY change, abs(b.score - a.score) DESC, uri{_limit(cfg)}"""
    if q == "recut":
        if not (0.0 < cfg.threshold < 1.0):
            raise JobError("recut needs --threshold T with 0 < T < 1 (a score)")
        logit = float(scipy_logit(cfg.threshold))  # decisions are made on the logit, as in the scan
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
            raise JobError("sql needs --sql 'SELECT … FROM scores|flagged|errors|runs'")
        return cfg.sql
    raise JobError(f"unknown question {q!r}; one of {', '.join(QUESTIONS)}")


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
    sql = question_sql(cfg)
    try:
        con = connect(out, _where(cfg), since, until, cfg.bucket, runs)
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise JobError(f"query failed: {str(exc).splitlines()[0]}")


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
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from detector_core.catalog import data_file_path
    from detector_core.storage import arrow_fs

    if not cfg.output:
        raise JobError("--output (the scan output to migrate) is required")
    so = s3_storage_options(cfg.s3_endpoint or None)
    try:
        out = ScanOutput.open(cfg.output, cfg.catalog, cfg.namespace, so)
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
