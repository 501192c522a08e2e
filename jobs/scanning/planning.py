"""A scan's plan: list (or read an inventory), anti-join against the state; on the cluster, or in the driver for small inputs.

The scan job (``jobs.scan``) calls ``plan`` (and ``jobs.scanning.refresh.refresh_state``). On the cluster
they are Ray Data executions whose per-object work runs in tasks; the driver handles listing
units, file paths and counts, never object rows, so its memory does not grow with the number of
objects (``bench/bench_plan.py``). Below ``DRIVER_PLAN_MAX`` listed and state rows (``--plan
auto``) the same readers and the same ``anti_join`` run in the driver instead: a folder of a few
hundred images does not pay two shuffles' start-up for it (docs/scaling.md, "Small scans").

- ``plan``: the input as a stream of ``LIST_SCHEMA`` rows (``listing``: a prefix split into
  units listed by parallel tasks, a manifest read by tasks, or the data files of an S3 Inventory
  report read by tasks; ``detector_core.sources.listing``) -> each row's ``uri_bucket`` -> grouped by it
  (Ray Data's shuffle) -> one task per partition reads that partition's state files, removes
  duplicates, anti-joins (``detector_core.tables.state.anti_join``), joins captions, writes the work
  rows to ``OUT/_plan/<scan_id>/`` and returns one row of counts. The scan then streams those
  work files into decoding and scoring.
- ``refresh_state`` (``jobs/scanning/refresh.py``) keeps the state current: run before planning
  (catching up after a killed scan) and after each scan.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.sources.inventory import inventory_files, inventory_rows, is_inventory
from detector_core.sources.listing import ListingUnit, is_manifest, list_unit, manifest_rows, split_prefix
from detector_core.sources.manifest import qualify_uri
from detector_core.storage import folder_prefix, is_remote, join, open_fs
from detector_core.tables import state as ST
from detector_core.tables.catalog import PROP_PARTITIONS, ScanOutput
from detector_core.tables.state_table import open_state

__all__ = ["DRIVER_PLAN_MAX", "PLAN_WHERE", "PlanError", "listing", "plan", "read_state", "remove_plan", "shuffle_partitions", "typed_udf"]

CAPTION_ROW = "_caption_row"
CAPTIONS_SCHEMA = pa.schema([(S.URI, pa.string()), (S.CAPTION, pa.string())])
PLAN_ROW = pa.schema([(ST.URI_BUCKET, pa.int32()), ("path", pa.string()), ("counts", pa.string())])
PLAN_WHERE = ("auto", "driver", "cluster")
# Listed rows + state rows of their partitions up to which ``plan`` (auto) runs in the driver, and so at most what it holds
# there (~0.85 KB of driver RSS a row). Measured on 2 cores (docs/scaling.md, "Small scans"; bench_plan --plan-only): the driver
# plan takes ~9 µs a row (1.0 s at 10⁵), under the cluster plan's fixed 2.8 s warm (10.7 s cold, a fresh Ray's first Ray Data
# job) even where the cluster's per-row share runs on many CPUs.
DRIVER_PLAN_MAX = 200_000


class PlanError(ValueError):
    """The input cannot be planned (a missing prefix, a malformed inventory manifest)."""


# -- reading inputs (Ray tasks) --------------------------------------------------------------
def typed_udf(fn, schema: pa.Schema, transform=None):
    """A Ray Data generator UDF: ``fn``'s non-empty tables (through ``transform``), or one empty table of ``schema``.

    Ray Data turns a task output without rows into a block without columns, and the shuffle
    cannot concatenate that with the others (``ArrowInvalid: Schema at index 1 was different``).
    """
    transform = transform or (lambda t: t)

    @functools.wraps(fn)
    def wrapper(batch: pa.Table, **kw) -> Iterator[pa.Table]:
        empty = True
        for t in fn(batch, **kw):
            if t.num_rows:
                empty = False
                yield transform(t)
        if empty:
            yield transform(schema.empty_table())
    return wrapper


def _bucketed(fn, n: int, caption: bool = False):
    """``typed_udf`` for listing (or caption) rows, with their ``uri_bucket`` added in the same task, not by a later map."""
    return typed_udf(fn, CAPTIONS_SCHEMA if caption else S.LIST_SCHEMA, functools.partial(_with_bucket, n=n, caption=caption))


def _list_units(batch: pa.Table, storage_options: dict | None, exclude: str = "", exclude_real: str = "") -> Iterator[pa.Table]:
    """Ray task: listing units -> ``LIST_SCHEMA`` rows, without the output's own files (``exclude``; on local disks also any
    path that reaches the output through a symlink, ``exclude_real``)."""
    for prefix, recursive in zip(batch["prefix"].to_pylist(), batch["recursive"].to_pylist()):
        for rows in list_unit(ListingUnit(prefix, recursive), storage_options):
            if exclude:
                rows = rows.filter(pc.invert(pc.fill_null(pc.starts_with(rows[S.URI], exclude), False)))
            if exclude_real and rows.num_rows:
                keep = [not os.path.realpath(u.removeprefix("file://")).startswith(exclude_real) for u in rows[S.URI].to_pylist()]
                rows = rows.filter(pa.array(keep))
            yield rows


def _open(path: str, storage_options: dict | None):
    fs, p = open_fs(path, storage_options)
    return fs.open(p, "rb", compression="infer" if path.endswith(".gz") else None)


def _read_source_files(batch: pa.Table, storage_options: dict | None, csv_columns: list[str] | None, scheme: str,
                       rows: int = 50_000) -> Iterator[pa.Table]:
    """Ray task: a manifest or Inventory data file -> ``LIST_SCHEMA`` tables, streamed (never the whole file at once)."""
    for path, kind in zip(batch["path"].to_pylist(), batch["kind"].to_pylist()):
        inventory = kind.startswith("inventory")
        fmt = kind.split("-", 1)[1]
        rows_of = functools.partial(inventory_rows, scheme=scheme, url_encoded=fmt == "csv") if inventory else \
            functools.partial(manifest_rows, manifest=path)
        with _open(path, storage_options) as f:
            if fmt == "parquet":
                for b in pq.ParquetFile(f).iter_batches(batch_size=rows):
                    yield rows_of(pa.Table.from_batches([b]))
            elif fmt == "orc":
                from pyarrow import orc

                reader = orc.ORCFile(f)
                for i in range(reader.nstripes):
                    yield rows_of(pa.Table.from_batches([reader.read_stripe(i)]))
            else:
                # Every column as text: a manifest's bad value is then one error row, not a failed read.
                names = csv_columns if inventory else None
                types = {c: pa.string() for c in (csv_columns if inventory else (S.URI, S.ETAG, S.SIZE))}
                read = pacsv.ReadOptions(column_names=names, block_size=1 << 22)
                convert = pacsv.ConvertOptions(strings_can_be_null=True, column_types=types)
                for b in pacsv.open_csv(f, read_options=read, convert_options=convert):
                    yield rows_of(pa.Table.from_batches([b]))


def _source_kind(source: str, storage_options: dict | None) -> str:
    fs, path = open_fs(source, storage_options)
    if is_inventory(source, storage_options):
        return "inventory"
    if fs.isfile(path):
        if is_manifest(path):
            return "manifest"
        raise PlanError(f"--input {source} is a file but not a manifest (.parquet, .csv, .csv.gz) or an S3 Inventory manifest.json")
    if not fs.isdir(path):
        raise PlanError(f"--input {source} does not exist (or is not reachable with these credentials)")
    return "prefix"


def _sources(source: str, storage_options: dict | None, fan_out: int, exclude: str) -> tuple[list[dict], object, dict, dict]:
    """What listing the input reads: (items, the reader each item goes through, its keyword arguments, how it was read).

    Items are listing units of a prefix (``_list_units``) or manifest / Inventory data files
    (``_read_source_files``); the cluster plan maps them in Ray tasks, the driver plan in a loop.
    """
    kind = _source_kind(source, storage_options)
    if kind == "prefix":
        # On local disks a symlink may lead into the output from anywhere: compared after resolving links.
        local = bool(exclude) and not is_remote(source) and not is_remote(exclude)
        real = folder_prefix(os.path.realpath(exclude.removeprefix("file://"))) if local else ""
        if exclude and (folder_prefix(source).startswith(exclude)
                        or (local and folder_prefix(os.path.realpath(source.removeprefix("file://"))).startswith(real))):
            raise PlanError(f"--input {source} is the output or inside it: scan another prefix, or write the tables elsewhere")
        inside = bool(exclude) and exclude.startswith(folder_prefix(source))
        units = [u for u in split_prefix(source, storage_options, target=fan_out)
                 if not (exclude and folder_prefix(u.prefix).startswith(exclude))]
        items = [{"prefix": u.prefix, "recursive": u.recursive} for u in units]
        return items, _list_units, dict(storage_options=storage_options, exclude=exclude if inside else "", exclude_real=real), \
            {"input_kind": "prefix", "listing_units": len(units), "output_left_out": inside}
    if kind == "manifest":
        fmt = "parquet" if source.lower().endswith((".parquet", ".pq")) else "csv"
        columns = _manifest_columns(source, fmt, storage_options)
        if S.URI not in columns:  # refused here, before any task, not as a task failure
            raise PlanError(f"manifest {source} has no '{S.URI}' column (columns: {columns})")
        items = [{"path": source, "kind": f"manifest-{fmt}"}]
        csv_columns, scheme, info = None, "", {"input_kind": "manifest", "source_files": 1}
    else:
        try:
            inv = inventory_files(source, storage_options)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        items = [{"path": p, "kind": f"inventory-{fmt}"} for fmt in ("csv", "parquet", "orc") for p in getattr(inv, fmt)]
        csv_columns, scheme = inv.csv_columns, "s3://"
        info = {"input_kind": "inventory", "source_files": len(items), "inventory_manifests": inv.manifests}
    return items, _read_source_files, dict(storage_options=storage_options, csv_columns=csv_columns, scheme=scheme), info


def listing(source: str, storage_options: dict | None, fan_out: int = 64, n: int = ST.DEFAULT_PARTITIONS, exclude: str = ""):
    """The input as a Ray dataset of ``LIST_SCHEMA`` rows with their ``uri_bucket`` of ``n``, and how it was read.

    ``exclude``: a prefix (``folder_prefix`` of the scan's output) whose objects a prefix
    listing leaves out: an output inside its own input would otherwise scan its own tables.
    """
    items, reader, kwargs, info = _sources(source, storage_options, fan_out, exclude)
    return _listing_dataset(items, reader, kwargs, n), info


def _listing_dataset(items: list[dict], reader, kwargs: dict, n: int):
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_bucketed(reader, n), fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow")


def _manifest_columns(source: str, fmt: str, storage_options: dict | None) -> list[str]:
    with _open(source, storage_options) as f:
        if fmt == "parquet":
            return pq.read_schema(f).names
        try:
            return pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
        except pa.ArrowInvalid as exc:
            raise PlanError(f"manifest {source} is not a readable CSV: {exc}") from None


def _with_bucket(batch: pa.Table, n: int, caption: bool) -> pa.Table:
    rows = batch.select(S.LIST_SCHEMA.names).cast(S.LIST_SCHEMA) if not caption else pa.table({
        S.URI: batch[S.URI].cast(pa.string()), S.ETAG: pa.nulls(batch.num_rows, pa.string()), S.SIZE: pa.nulls(batch.num_rows, pa.int64()),
        S.ERROR_TYPE: pa.nulls(batch.num_rows, pa.string()), S.ERROR_MESSAGE: pa.nulls(batch.num_rows, pa.string())})
    cap = batch[S.CAPTION].cast(pa.string()) if caption else pa.nulls(batch.num_rows, pa.string())
    return rows.append_column(S.CAPTION, cap).append_column(CAPTION_ROW, pa.array([caption] * batch.num_rows, pa.bool_())) \
        .append_column(ST.URI_BUCKET, ST.uri_bucket_column(rows[S.URI], n))


# -- the plan --------------------------------------------------------------------------------
def read_state(paths: list[str], detector_ids: list[str] | None, storage_options: dict | None) -> pa.Table:
    """State files of one or more partitions (rows of ``detector_ids`` only, or all), read concurrently
    (object stores answer each GET in tens of ms; the driver plan reads every touched partition's)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str) -> pa.Table:
        fs, fp = open_fs(p, storage_options)
        with fs.open(fp, "rb") as f:
            t = pq.read_table(f, columns=list(ST.STATE_SCHEMA.names))
        return t if detector_ids is None else t.filter(pc.is_in(t[S.DETECTOR_ID], pa.array(detector_ids, pa.string())))

    if not paths:
        return ST.STATE_SCHEMA.empty_table()
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return pa.concat_tables(list(pool.map(one, paths))).cast(ST.STATE_SCHEMA)


def _plan_rows(group: pa.Table, state: pa.Table | None, detector_ids: list[str], full: bool, with_captions: bool) -> tuple[pa.Table, dict]:
    """Listing (and caption) rows of one or more ``uri_bucket`` partitions and their state rows -> work rows and counts."""
    is_caption = group[CAPTION_ROW]
    listed = group.filter(pc.invert(is_caption))
    captions = group.filter(is_caption).select([S.URI, S.CAPTION]) if with_captions else None
    return ST.anti_join(listed, state, detector_ids, full, captions)


def _write_work(work: pa.Table, plan_dir: str, name: str, storage_options: dict | None) -> str:
    from jobs.common.outputs import write_parquet

    if not work.num_rows:
        return ""
    path = join(plan_dir, f"part-{name}-{uuid.uuid4().hex[:8]}.parquet")
    write_parquet(work, path, storage_options)
    return path


def _plan_partition(group: pa.Table, state_files: dict, detector_ids: list[str], full: bool, plan_dir: str, with_captions: bool,
                    storage_options: dict | None) -> pa.Table:
    """Ray task: one ``uri_bucket`` partition of the listing -> its work file and counts."""
    bucket = int(group[ST.URI_BUCKET][0].as_py())
    state = None if full else read_state(state_files.get(bucket, state_files.get(str(bucket), [])), detector_ids, storage_options)
    work, counts = _plan_rows(group, state, detector_ids, full, with_captions)
    path = _write_work(work, plan_dir, f"{bucket:05d}", storage_options)
    return pa.Table.from_pylist([{ST.URI_BUCKET: bucket, "path": path, "counts": json.dumps(counts)}], schema=PLAN_ROW)


# -- the plan in the driver (small inputs) -----------------------------------------------------
def _driver_rows(items: list[dict], reader, kwargs: dict, n: int, limit: int | None, captions: str,
                 storage_options: dict | None) -> pa.Table | None:
    """The listing (and caption) rows with their ``uri_bucket``, read in this process; None as soon as
    they pass ``limit`` (what was read is dropped: at most ``limit`` rows were held)."""
    tables, rows = [], 0
    sources = [(reader, item, kwargs, False) for item in items]
    if captions:
        sources.append((_read_captions, {"path": captions}, dict(storage_options=storage_options), True))
    for fn, item, kw, caption in sources:
        for t in fn(pa.Table.from_pylist([item]), **kw):
            if not t.num_rows:
                continue
            rows += t.num_rows
            if limit is not None and rows > limit:
                return None
            tables.append(_with_bucket(t, n, caption))
    if not tables:
        tables = [_with_bucket(S.LIST_SCHEMA.empty_table(), n, False)]
    return pa.concat_tables(tables)


def _plan_in_driver(rows: pa.Table, files: dict, detector_ids: list[str], full: bool, plan_dir: str, with_captions: bool,
                    storage_options: dict | None, limit: int | None) -> tuple[list[str], dict] | None:
    """The plan of a small input in this process: the same ``anti_join`` over the same rows as the cluster's
    partition tasks, in one call, one work file. None when the listed rows and the state rows of their
    partitions (the catalog's record counts, no file read) pass ``limit``."""
    buckets = set(pc.unique(rows[ST.URI_BUCKET]).to_pylist()) if rows.num_rows else set()
    touched = [df for b, dfs in files.items() if int(b) in buckets for df in dfs]
    if limit is not None and not full and rows.num_rows + sum(int(df.record_count) for df in touched) > limit:
        return None
    state = None if full else read_state([df.file_path for df in touched], detector_ids, storage_options)
    work, counts = _plan_rows(rows, state, detector_ids, full, with_captions)
    path = _write_work(work, plan_dir, "driver", storage_options)
    return ([path] if path else []), counts


def plan(out: ScanOutput, source: str, detector_ids: list[str], scan_id: str, full: bool = False, captions: str = "",
         storage_options: dict | None = None, fan_out: int = 64, where: str = "auto",
         driver_max: int = DRIVER_PLAN_MAX) -> tuple[list[str], dict]:
    """This scan's work files (``OUT/_plan/<scan_id>/``) and counts.

    ``where``: ``cluster`` (per-object work in Ray tasks only), ``driver`` (in this process,
    whatever the size: tests), or ``auto``: in this process while the listed rows plus the
    state rows of their partitions stay within ``driver_max`` (which also bounds what the
    driver holds), else on the cluster. Both give the same work rows (``tests/test_plan.py``
    runs on both). The cluster's groupby uses Ray Data's default (hash) shuffle: the
    sort-based one sampled and held blocks in the driver, whose peak grew by ~100 MB per
    3·10⁵ objects; the hash shuffle's did not grow (2-core machine, ``bench/bench_plan.py``).
    """
    if where not in PLAN_WHERE:
        raise ValueError(f"plan where must be one of {PLAN_WHERE}, got {where!r}")
    t0 = time.time()
    table, files = open_state(out)
    n = int(table.properties.get(PROP_PARTITIONS, ST.DEFAULT_PARTITIONS))
    items, reader, kwargs, info = _sources(source, storage_options, fan_out, folder_prefix(out.uri))
    plan_dir = join(out.uri, "_plan", scan_id)
    if where != "cluster":
        limit = None if where == "driver" else driver_max
        rows = _driver_rows(items, reader, kwargs, n, limit, captions, storage_options)
        done = None if rows is None else _plan_in_driver(rows, files, detector_ids, full, plan_dir, bool(captions), storage_options, limit)
        if done is not None:
            paths, counts = done
            return paths, {**counts, **info, "state_partitions": n, "planned_in": "driver", "plan_seconds": round(time.time() - t0, 2)}
        print(f"plan: more than --driver-plan-max {driver_max} listed and state rows: planning on the cluster", flush=True)
    state_files = {b: [df.file_path for df in fs] for b, fs in files.items()}
    ds = _listing_dataset(items, reader, kwargs, n)
    if captions:
        ds = ds.union(_caption_dataset(captions, storage_options, n))
    parts = ds.groupby(ST.URI_BUCKET, num_partitions=shuffle_partitions(n)).map_groups(
        _plan_partition, batch_format="pyarrow",
        fn_kwargs=dict(state_files=state_files, detector_ids=detector_ids, full=full, plan_dir=plan_dir, with_captions=bool(captions),
                       storage_options=storage_options))
    totals = {"listed": 0, "duplicates": 0, "list_errors": 0, "work": 0, "skipped": {d: 0 for d in detector_ids}}
    paths = []
    for batch in parts.iter_batches(batch_size=None, batch_format="pyarrow"):  # one small row per partition
        for row in batch.to_pylist():
            c = json.loads(row["counts"])
            for k in ("listed", "duplicates", "list_errors", "work"):
                totals[k] += c[k]
            for d, v in c["skipped"].items():
                totals["skipped"][d] += v
            if row["path"]:
                paths.append(row["path"])
    return sorted(paths), {**totals, **info, "state_partitions": n, "planned_in": "cluster", "plan_seconds": round(time.time() - t0, 2)}


def shuffle_partitions(n: int) -> int:
    """Reduce tasks of the shuffle by uri_bucket: one per CPU of the cluster (each handles several state partitions), at most n."""
    import ray

    return max(1, min(n, int(ray.cluster_resources().get("CPU", 1))))


def _read_captions(batch: pa.Table, storage_options: dict | None) -> Iterator[pa.Table]:
    """Ray task: a ``uri,caption`` manifest -> its rows, uris qualified as in scan manifests."""
    for path in batch["path"].to_pylist():
        base = path.rsplit("/", 1)[0] if "/" in path else "."
        with _open(path, storage_options) as f:
            if path.lower().endswith((".csv", ".csv.gz")):
                blocks = (pa.Table.from_batches([b]) for b in pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={S.URI: pa.string(), S.CAPTION: pa.string()}, strings_can_be_null=True)))
            else:
                blocks = (pa.Table.from_batches([b]) for b in pq.ParquetFile(f).iter_batches(columns=[S.URI, S.CAPTION]))
            for t in blocks:
                uris = [None if u is None else qualify_uri(str(u), base) for u in t[S.URI].to_pylist()]
                yield pa.table({S.URI: pa.array(uris, pa.string()), S.CAPTION: t[S.CAPTION].cast(pa.string())})


def _caption_dataset(captions: str, storage_options: dict | None, n: int):
    import ray

    ds = ray.data.from_items([{"path": captions}])
    return ds.map_batches(_bucketed(_read_captions, n, caption=True), fn_kwargs=dict(storage_options=storage_options), batch_size=1,
                          batch_format="pyarrow")


def remove_plan(out: ScanOutput, keep: str = "") -> None:
    """Delete the work files of finished or killed scans (all but ``keep``'s)."""
    root = f"{out.root}/_plan"
    try:
        for p in out.fs.ls(root, detail=False):
            if not keep or not p.rstrip("/").endswith(keep):
                out.fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass
