"""The scan's output tables, one versioned schema: ``scores``, ``flagged``, ``errors`` and ``runs``.

Since schema version 3 the tables are Apache Iceberg tables (``detector_core.tables.catalog``
opens and commits them): data files are Parquet under ``OUT/<table>/data/``, table
metadata under ``OUT/<table>/metadata/``, and a catalog (SQLite beside a local output,
or the one named with ``--catalog``) points at the current metadata. ``scores``,
``flagged`` and ``errors`` are partitioned by identity on ``scan_date`` (a DATE) and
``bucket``, which are stored columns, so "flagged last night" and "flagged in bucket X
this month" prune to those partitions in pyiceberg, DuckDB, Spark, Trino and Athena alike.
``verdicts`` (reviewers' verdicts, ``jobs.audit verdicts import``) is partitioned by
``review_date``; ``precision_sample`` (the rows of each night that the review page's
precision sample asks about, ``jobs.report``) by ``scan_date``; neither is part of a scan's commit units. ``runs`` holds one row per commit unit and detector (``status = 'unit'``) and one per
finished scan and detector (``status = 'completed'``), with the snapshot ids of the three
result tables as of that row, so a reader can pin all tables to one consistent point.

Column types are fixed here (never inferred from a batch). Versions 1-2 were
hive-partitioned Parquet folders (``OUT/<table>/scan_date=…/bucket=…/*.parquet``, partition
columns only in the directory names); ``legacy_dataset`` still reads them for
``jobs.audit migrate``.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from detector_core import schema as S

# 2: + detector_kind (files of version 1 read with it null). 3: Iceberg tables, scan_date/bucket stored.
# 4: clip_id renamed feature_id (S.RENAMED). 5: provenance evidence and flag_reason (S.EVIDENCE_COLUMNS),
# added to older tables when a scan opens them; their old files read the new columns as null.
SCHEMA_VERSION = "5"
ADDED_COLUMNS = (*S.EVIDENCE_COLUMNS, S.FLAG_REASON)  # nullable columns that rows of older versions lack
METADATA_KEY = b"diffusion_detector.schema_version"
TABLES = ("scores", "flagged", "errors")
ALL_TABLES = (*TABLES, "runs")
FEATURES = "features"
UNIT_TABLES = (FEATURES, *TABLES)  # what a commit unit adds data files to (jobs.scan); runs pins TABLES
CHALLENGER = "challenger_scores"  # jobs.rescore's rows, keyed by the challenger's detector_id; never production's
VERDICTS = "verdicts"
SAMPLE = "precision_sample"
REVIEW_TABLES = (VERDICTS, SAMPLE)  # written by people's tools (import, report), not by a scan's commit units
LOCAL_BUCKET = "local"  # the bucket partition of local-path objects
PARTITION_COLUMNS = (S.SCAN_DATE, S.BUCKET)

_TS = S.TYPES[S.SCANNED_AT]
SCORES_COLUMNS = (S.URI, S.ETAG, S.SIZE, S.WIDTH, S.HEIGHT, S.FORMAT, S.SCORE, S.LOGIT, S.THRESHOLD, S.FLAGGED, S.DETECTOR_ID,
                  S.DETECTOR_KIND, S.FEATURE_ID, S.SCAN_ID, S.SCANNED_AT, *S.EVIDENCE_COLUMNS, S.FLAG_REASON, *PARTITION_COLUMNS)
ERRORS_COLUMNS = (S.URI, S.ETAG, S.SIZE, S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE, S.DETECTOR_ID, S.DETECTOR_KIND, S.SCAN_ID,
                  S.SCANNED_AT, *S.EVIDENCE_COLUMNS, *PARTITION_COLUMNS)
SCORES_SCHEMA = pa.schema([(c, S.TYPES[c]) for c in SCORES_COLUMNS], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
# One row per object and feature extractor a scan embedded it with (CLIP family only): the object's version
# (etag, size) as the state keys it, and the vector its detectors' heads consumed.
FEATURES_COLUMNS = (S.URI, S.ETAG, S.SIZE, S.FEATURE_ID, S.SCAN_ID, S.SCANNED_AT, S.VECTOR, *PARTITION_COLUMNS)
FEATURES_SCHEMA = pa.schema([(c, S.TYPES[c]) for c in FEATURES_COLUMNS], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
ERRORS_SCHEMA = pa.schema([(c, S.TYPES[c]) for c in ERRORS_COLUMNS], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
RUNS_SCHEMA = pa.schema([
    ("scan_id", pa.string()), ("unit", pa.int32()), ("status", pa.string()), (S.SCAN_DATE, pa.date32()),
    ("detector_id", pa.string()), ("detector_kind", pa.string()), ("feature_id", pa.string()), ("input", pa.string()),
    ("listed", pa.int64()), ("skipped", pa.int64()), ("scored", pa.int64()), ("flagged", pa.int64()), ("errors", pa.int64()),
    ("model_loads", pa.int64()), ("seconds", pa.float64()), ("started_at", _TS), ("committed_at", _TS),
    ("scores_snapshot_id", pa.int64()), ("flagged_snapshot_id", pa.int64()), ("errors_snapshot_id", pa.int64()),
    ("config", pa.string()), ("schema_version", pa.string()),
], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
VERDICTS_COLUMNS = (S.URI, S.DETECTOR_ID, S.SCAN_ID, S.VERDICT, S.NOTE, S.REVIEWER, S.REVIEWED_AT, S.IMPORTED_AT, S.REVIEW_DATE)
VERDICTS_SCHEMA = pa.schema([(c, S.TYPES[c]) for c in VERDICTS_COLUMNS], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
SAMPLE_COLUMNS = (S.URI, S.DETECTOR_ID, S.SCAN_ID, S.SCORE, S.STRATUM, S.STRATUM_LOW, S.STRATUM_HIGH, S.STRATUM_FLAGGED,
                  S.NIGHT_FLAGGED, S.SAMPLE_SIZE, S.SAMPLE_ORDER, S.SAMPLE_SEED, S.DRAWN_AT, *PARTITION_COLUMNS)
SAMPLE_SCHEMA = pa.schema([(c, S.TYPES[c]) for c in SAMPLE_COLUMNS], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
TABLE_SCHEMAS = {"scores": SCORES_SCHEMA, "flagged": SCORES_SCHEMA, "errors": ERRORS_SCHEMA, "runs": RUNS_SCHEMA, FEATURES: FEATURES_SCHEMA, CHALLENGER: SCORES_SCHEMA,
                 VERDICTS: VERDICTS_SCHEMA, SAMPLE: SAMPLE_SCHEMA}
PARTITIONED = {"scores": PARTITION_COLUMNS, "flagged": PARTITION_COLUMNS, "errors": PARTITION_COLUMNS, "runs": (),
               FEATURES: PARTITION_COLUMNS, CHALLENGER: PARTITION_COLUMNS,
               VERDICTS: (S.REVIEW_DATE,), SAMPLE: (S.SCAN_DATE,)}

# What each table is, for the catalog (Iceberg's ``comment`` property: Glue, Athena and Spark show it).
TABLE_DOCS = {
    "scores": "one row per scanned object and detector: the score, the threshold and whether it flagged (diffusion-detector)",
    "flagged": "the rows of scores at or above the detector's threshold; committed after scores, so each has its scores row",
    "errors": "one row per object and detector that could not be scored: where and why it failed",
    FEATURES: "the feature vector each scored object's detector head consumed (CLIP family), float16, committed in the same "
              "unit as its scores: re-score, compare and train without reading the image again",
    CHALLENGER: "what a challenger detector says of the objects production scored: jobs.rescore's rows from the stored features, "
                "with the scores schema, keyed by the challenger's detector_id (query compare); never read as production",
    "runs": "one row per commit unit (status 'unit') and finished scan (status 'completed') and detector, with the snapshot ids "
            "of scores, flagged and errors as of that row: pin them to read whole units",
    VERDICTS: "reviewers' verdicts on flagged images (generated, real, unsure), imported from the review page's exports",
    SAMPLE: "a seeded random sample of each night's flagged rows, stratified by score band (jobs.report draws it once per night "
            "and detector): verdicts on these rows give an unbiased precision (query precision)",
    "state": "derived: the latest outcome of every object per detector, what the next scan skips (rebuilt from scores and errors)",
}
RUNS_DOCS = {
    "unit": "commit unit number within the scan (-1 for the scan's completed row)",
    "status": "'unit' (one commit unit), 'completed' (the finished scan) or 'repair' (jobs.maintain repair)",
    "input": "what the scan listed (prefix, manifest or inventory)",
    "listed": "objects listed", "skipped": "objects already settled by an earlier scan (unchanged)",
    "scored": "rows added to scores", "flagged": "rows added to flagged", "errors": "rows added to errors",
    "model_loads": "times a Scorer built its models", "seconds": "scan wall time", "started_at": "when the scan started (UTC)",
    "committed_at": "when this row was committed (UTC)",
    "scores_snapshot_id": "the scores snapshot as of this row (read with VERSION AS OF / snapshot_from_id)",
    "flagged_snapshot_id": "the flagged snapshot as of this row", "errors_snapshot_id": "the errors snapshot as of this row",
    "config": "the scan's resolved configuration (JSON)", "schema_version": "the tables' schema version that wrote the row",
}
STATE_DOCS = {"outcome": "scored, or failed (an error that settles the object)", "uri_bucket": "partition: Iceberg bucket[N](uri)"}


def column_docs(name: str) -> dict[str, str]:
    """Each column's documentation for table ``name`` (Iceberg field docs)."""
    docs = dict(S.COLUMN_DOCS)
    if name == "runs":
        docs.update({S.SCAN_DATE: S.COLUMN_DOCS[S.SCAN_DATE].replace("partition: ", ""), **RUNS_DOCS})
    if name == "state":
        docs.update(STATE_DOCS)
    return docs


# Versions 1-2: hive folders, partition columns only in the paths.
LEGACY_PARTITION_SCHEMA = pa.schema([(S.SCAN_DATE, pa.string()), (S.BUCKET, pa.string())])


def bucket_of(uri: str) -> str:
    """The bucket partition of an object: the bucket of ``s3://``/``gs://`` URIs, else ``local``."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.split("://", 1)[1].split("/", 1)[0] or LOCAL_BUCKET
    return LOCAL_BUCKET


def bucket_column(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``bucket_of`` for a whole column, vectorised (one regex pass, no Python loop per row)."""
    bucket = pc.struct_field(pc.extract_regex(uris, r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<b>[^/]+)"), "b")
    remote = pc.and_(pc.match_substring_regex(uris, r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]+"),
                     pc.invert(pc.starts_with(uris, "file://")))
    return pc.if_else(pc.fill_null(remote, False), bucket, pa.scalar(LOCAL_BUCKET))


def current_names(table: pa.Table) -> pa.Table:
    """``table`` with columns of their old names (``S.RENAMED``: rows of older versions) under today's names."""
    if not any(old in table.column_names for old in S.RENAMED):
        return table
    return table.rename_columns([S.RENAMED.get(c, c) if S.RENAMED.get(c, c) not in table.column_names else c for c in table.column_names])


def conform(table: pa.Table, name: str) -> pa.Table:
    """``table`` with exactly the columns, order, types and metadata of table ``name`` (old column names renamed)."""
    schema = TABLE_SCHEMAS[name]
    table = current_names(table)
    for col in ADDED_COLUMNS:  # rows of an older version (a compaction of old files, a migration)
        if col in schema.names and col not in table.column_names:
            table = table.append_column(col, pa.nulls(table.num_rows, S.TYPES[col]))
    return table.select(schema.names).cast(schema)


def legacy_dataset(fs, root: str, name: str) -> pads.Dataset | None:
    """A version 1-2 hive-partitioned table ``name`` under ``root`` (pyarrow filesystem), or None."""
    old_name = {new: old for old, new in S.RENAMED.items()}  # versions 1-2 wrote the old names
    legacy = pa.schema([f.with_name(old_name.get(f.name, f.name)) for f in TABLE_SCHEMAS[name] if f.name not in PARTITION_COLUMNS])
    try:
        files = [i.path for i in fs.get_file_info(pa.fs.FileSelector(f"{root.rstrip('/')}/{name}", recursive=True))
                 if i.type == pa.fs.FileType.File and i.path.endswith(".parquet") and "/data/" not in i.path
                 and f"/{S.SCAN_DATE}=" in i.path]
    except (FileNotFoundError, OSError):
        return None
    if not files:
        return None
    return pads.dataset(files, schema=legacy.append(LEGACY_PARTITION_SCHEMA.field(0)).append(LEGACY_PARTITION_SCHEMA.field(1)),
                        filesystem=fs, format="parquet",
                        partitioning=pads.partitioning(LEGACY_PARTITION_SCHEMA, flavor="hive"),
                        partition_base_dir=f"{root.rstrip('/')}/{name}")


def runs_table(rows: list[dict]) -> pa.Table:
    """Rows of the ``runs`` table (dicts; times and dates may be ISO strings) as a table of ``RUNS_SCHEMA``."""
    conv = []
    for r in rows:
        r = dict(r)
        for k in ("started_at", "committed_at"):
            if isinstance(r.get(k), str):
                r[k] = dt.datetime.fromisoformat(r[k])
        if isinstance(r.get("scan_date"), str):
            r["scan_date"] = dt.date.fromisoformat(r["scan_date"])
        conv.append(r)
    return pa.Table.from_pylist(conv, schema=RUNS_SCHEMA)


def _keyed(t: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """``t``'s key columns as strings (pyiceberg reads large_string), nulls as one value so they compare equal."""
    return pa.table({c: pc.fill_null(t[c].cast(pa.string()), "\x00") for c in key})


def in_keys(rows: pa.Table, have: pa.Table, key: tuple[str, ...]) -> pa.Array:
    """Per row of ``rows``, whether ``have`` holds a row with the same ``key`` columns."""
    left = _keyed(rows, key).append_column("_i", pa.array(range(rows.num_rows), pa.int64()))
    hits = left.join(_keyed(have, key).group_by(list(key)).aggregate([]), list(key), join_type="left semi")["_i"]
    return pc.is_in(pa.array(range(rows.num_rows), pa.int64()), value_set=hits.combine_chunks())


def new_rows(rows: pa.Table, have: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """The rows of ``rows`` whose ``key`` is not in ``have``, in their order."""
    return rows.filter(pc.invert(in_keys(rows, have, key)))


def first_of_keys(rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """``rows`` without the later repeats of a ``key``, in their order."""
    keyed = _keyed(rows, key).append_column("_i", pa.array(range(rows.num_rows), pa.int64()))
    first = keyed.group_by(list(key)).aggregate([("_i", "min")])["_i_min"]
    return rows.take(first.take(pc.sort_indices(first)))
