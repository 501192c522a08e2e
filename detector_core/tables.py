"""The scan's output tables as one versioned, partitioned schema: ``scores``, ``flagged``, ``errors``.

Every table lives under a scan output prefix as hive-style partitions
``OUT/<table>/scan_date=YYYY-MM-DD/bucket=<bucket>/part-<scan_id>-<chunk>.parquet``, so that
"everything flagged last night" and "everything flagged in bucket X this month" open only
the files of those partitions, in pyarrow, DuckDB (``hive_partitioning = true``), Spark and
Athena alike. The partition columns are not repeated inside the files. Column types are
fixed here (not inferred from a batch), so every file of a table has the same schema, and
each file carries ``SCHEMA_VERSION`` in its Parquet key-value metadata; a change of a
column's meaning or type bumps it. ``scan_id`` and the run summaries under ``OUT/runs/``
tie rows to the scan that wrote them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from detector_core import schema as S
from detector_core.storage import arrow_fs, is_remote, join

# 2: + detector_kind (files of version 1 read with it null).
SCHEMA_VERSION = "2"
METADATA_KEY = b"diffusion_detector.schema_version"
TABLES = ("scores", "flagged", "errors")
LOCAL_BUCKET = "local"  # the bucket partition of local-path objects

_TS = pa.timestamp("us", tz="UTC")
SCORES_SCHEMA = pa.schema([
    (S.URI, pa.string()), (S.ETAG, pa.string()), (S.SIZE, pa.int64()), (S.WIDTH, pa.int32()), (S.HEIGHT, pa.int32()),
    (S.FORMAT, pa.string()), (S.SCORE, pa.float64()), (S.LOGIT, pa.float64()), (S.THRESHOLD, pa.float64()),
    (S.FLAGGED, pa.bool_()), (S.DETECTOR_ID, pa.string()), (S.DETECTOR_KIND, pa.string()), (S.CLIP_ID, pa.string()), (S.SCAN_ID, pa.string()),
    (S.SCANNED_AT, _TS),
], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
ERRORS_SCHEMA = pa.schema([
    (S.URI, pa.string()), (S.ETAG, pa.string()), (S.SIZE, pa.int64()), (S.ERROR_STAGE, pa.string()),
    (S.ERROR_TYPE, pa.string()), (S.ERROR_MESSAGE, pa.string()), (S.DETECTOR_ID, pa.string()), (S.DETECTOR_KIND, pa.string()),
    (S.SCAN_ID, pa.string()),
    (S.SCANNED_AT, _TS),
], metadata={METADATA_KEY: SCHEMA_VERSION.encode()})
TABLE_SCHEMAS = {"scores": SCORES_SCHEMA, "flagged": SCORES_SCHEMA, "errors": ERRORS_SCHEMA}
PARTITION_SCHEMA = pa.schema([(S.SCAN_DATE, pa.string()), (S.BUCKET, pa.string())])
PARTITIONING = pads.partitioning(PARTITION_SCHEMA, flavor="hive")


def bucket_of(uri: str) -> str:
    """The bucket partition of an object: the bucket of ``s3://``/``gs://`` URIs, else ``local``."""
    if is_remote(uri):
        return uri.split("://", 1)[1].split("/", 1)[0] or LOCAL_BUCKET
    return LOCAL_BUCKET


def partition_dir(scan_date: str, bucket: str) -> str:
    return f"{S.SCAN_DATE}={scan_date}/{S.BUCKET}={bucket}"


def conform(table: pa.Table, name: str) -> pa.Table:
    """``table`` with exactly the columns, order, types and metadata of table ``name``."""
    schema = TABLE_SCHEMAS[name]
    return table.select(schema.names).cast(schema)


def open_table(output: str, name: str, storage_options: dict | None = None) -> pads.Dataset | None:
    """The committed table ``name`` under a scan output prefix, or None when nothing was committed yet.

    Partition columns ``scan_date`` and ``bucket`` appear as string columns, so filters on
    them (``pads.field("scan_date") == "2026-11-23"``) prune whole directories.
    """
    fs, path = arrow_fs(join(output, name), storage_options)
    try:
        return pads.dataset(path, schema=TABLE_SCHEMAS[name].append(PARTITION_SCHEMA.field(0)).append(PARTITION_SCHEMA.field(1)),
                            filesystem=fs, format="parquet", partitioning=PARTITIONING)
    except (FileNotFoundError, OSError):
        return None
