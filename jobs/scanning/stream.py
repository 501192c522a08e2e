"""The scan's one Ray Data stream, and the driver's loop that commits what it writes.

``build_stream``: the plan's work files -> ``read_work`` (CPU tasks: work rows) ->
``jobs.scanning.decoding.load_images`` (CPU tasks: read, decode, crop) -> ``jobs.scanning.pipeline.Scorer``
(actors, one GPU each in production; a MIN-MAX pool autoscales) -> ``write_results`` (CPU
tasks: Parquet data files of the Iceberg tables, returning one ``FILE_RECORD`` per file).
``commit_records`` is the driver's side: it reads only those file records, never result rows,
and hands each ``--chunk-size`` rows' files to a commit callback as one unit.

The task functions live here, not in ``jobs.scan``, because Ray pickles them by module: a
fresh worker that writes results imports this module (pyarrow and the table formats), not
the scan job with its bundles and torch.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.storage import open_fs
from detector_core.tables import definitions as T
from detector_core.tables.catalog import data_file_path
from jobs.common.outputs import write_parquet

if TYPE_CHECKING:
    from detector_core.method.bundle import DetectorBundle
    from detector_core.tables.catalog import ScanOutput
    from jobs.scanning.config import ScanConfig

__all__ = ["FILE_RECORD", "actor_resources", "build_stream", "commit_records", "load_counter", "parse_actors", "read_work",
           "resource_message", "work_rows", "write_results"]

# The only columns that reach the driver: one row per data file written by a worker.
FILE_RECORD = pa.schema([("call", pa.string()), ("table", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
                         ("counts", pa.string())])


def parse_actors(value: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"1-16"`` -> (1, 16); anything else raises ValueError."""
    text = str(value).strip()
    lo, sep, hi = text.partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"--actors {value!r} is not a number or a range MIN-MAX") from None
    if lo_n < 1 or hi_n < lo_n:
        raise ValueError(f"--actors {value!r}: need 1 <= MIN <= MAX")
    return lo_n, hi_n



def write_results(batch: pa.Table, output: str, scan_id: str, scan_date: str, storage_options: dict | None) -> pa.Table:
    """Ray Data task: Scorer rows -> Parquet data files of scores/flagged/errors (one per table and bucket).

    Returns one ``FILE_RECORD`` row per file: what the driver commits. The files are
    invisible until then; a retried task writes new files and the first attempt's are
    never referenced.
    """
    failed = pc.is_valid(batch[S.ERROR_STAGE])
    rows = batch.append_column(S.SCAN_DATE, pa.array([dt.date.fromisoformat(scan_date)] * batch.num_rows, pa.date32()))
    rows = rows.append_column(S.BUCKET, T.bucket_column(rows[S.URI]))
    scored = rows.filter(pc.invert(failed))
    scores = T.conform(scored, "scores")
    parts = {"scores": scores, "flagged": scores.filter(pc.fill_null(scores[S.FLAGGED], False)), "errors": T.conform(rows.filter(failed), "errors")}
    if S.VECTOR in scored.column_names:
        parts[T.FEATURES] = _features(scored)
    records, call = [], uuid.uuid4().hex
    for name, table in parts.items():
        if table.num_rows == 0:
            continue
        for bucket in pc.unique(table[S.BUCKET]).to_pylist():
            part = table.filter(pc.equal(table[S.BUCKET], bucket))
            path = data_file_path(output, name, scan_date, bucket, scan_id)  # workers write; only the driver commits
            write_parquet(part, path, storage_options)
            counts = pc.value_counts(part[S.DETECTOR_ID]).to_pylist() if S.DETECTOR_ID in part.column_names else []
            records.append({"call": call, "table": name, "path": path, "rows": part.num_rows,
                            "counts": json.dumps({c["values"]: c["counts"] for c in counts})})
    return pa.Table.from_pylist(records, schema=FILE_RECORD)


def _features(scored: pa.Table) -> pa.Table:
    """The features rows of a batch of scored rows: one per object and feature extractor (detectors that share an
    extractor carry the same vector), those with a vector only."""
    with_vector = scored.filter(pc.is_valid(scored[S.VECTOR]))
    if with_vector.num_rows == 0:
        return T.FEATURES_SCHEMA.empty_table()
    indexed = with_vector.append_column("_row", pa.array(np.arange(with_vector.num_rows)))
    first = indexed.group_by([S.URI, S.FEATURE_ID], use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return T.conform(with_vector.take(pc.take(first, pc.sort_indices(first))), T.FEATURES)


def actor_resources(cfg: ScanConfig) -> tuple[float, int]:
    import ray

    if cfg.cpus_per_actor > 0:
        return cfg.cpus_per_actor, 1 if cfg.gpu else 0
    if cfg.gpu:
        return 1.0, 1
    # A CPU scan uses the machine: the Scorers' torch threads get half the CPUs, decoding and
    # writing the rest (actors holding every CPU would starve the tasks that feed them).
    return max(1.0, float(int(ray.cluster_resources().get("CPU", 2)) // 2 // parse_actors(cfg.actors)[1])), 0


def read_work(batch: pa.Table, storage_options: dict | None, rows: int) -> Iterator[pa.Table]:
    """Ray task: a plan's work file -> blocks of ``rows`` work rows (streamed, however big the file)."""
    for path in batch["path"].to_pylist():
        fs, p = open_fs(path, storage_options)
        with fs.open(p, "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=rows):
                yield pa.Table.from_batches([b])


def work_rows(batch: pa.Table, work: pa.Table, rows: int) -> pa.Table:
    """Ray task: the ``rows`` work rows from ``start`` of a plan made in the driver (passed once, as a task argument)."""
    return work.slice(int(batch["start"][0].as_py()), rows)


def _read_table(path: str, storage_options: dict | None) -> pa.Table:
    fs, p = open_fs(path, storage_options)
    with fs.open(p, "rb") as f:
        return pq.read_table(f)


def build_stream(cfg: ScanConfig, work_files: list[str], n_work: int, uris: list[str], bundles: list[DetectorBundle], out: ScanOutput,
                 scan_id: str, scan_date: str, so: dict | None, counter, trust_pem: str | None = None, planned_in: str = "cluster"):
    """One Ray Data pipeline over the whole plan: work files -> decode tasks -> Scorer actors -> file-writing tasks."""
    import ray

    from detector_core.method.extractors import preprocess_for
    from jobs.scanning.decoding import load_images
    from jobs.scanning.pipeline import Scorer, feature_drafts, feature_specs

    rows = max(1, min(1024, -(-n_work // 64)))  # at least ~64 blocks, so that small scans still spread over the decoders
    if planned_in == "driver":
        # A plan made in the driver is bounded by --driver-plan-max: its rows go out as blocks from here. Read by
        # tasks, its one work file would be one task decoding everything on one core.
        work = pa.concat_tables([_read_table(p, so) for p in work_files])
        starts = list(range(0, work.num_rows, rows))
        # from_items, not from_arrow: from_arrow's first call runs a metadata task in a fresh worker (~3 s on 2 cores).
        ds = ray.data.from_items([{"start": i} for i in starts], override_num_blocks=len(starts))
        ds = ds.map_batches(work_rows, fn_kwargs=dict(work=work, rows=rows), batch_size=1, batch_format="pyarrow")
    else:
        ds = ray.data.from_items([{"path": p} for p in work_files], override_num_blocks=len(work_files))
        ds = ds.map_batches(read_work, fn_kwargs=dict(storage_options=so, rows=rows), batch_size=1, batch_format="pyarrow")
    # The CPU halves go by value (built here, where open_clip is loaded): decode tasks then import neither torch nor open_clip.
    preps = [preprocess_for(spec) for spec in feature_specs(bundles)]
    ds = ds.map_batches(load_images, fn_kwargs=dict(preps=preps, draft=feature_drafts(bundles), storage_options=so,
                                                    max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes, evidence=cfg.evidence,
                                                    trust_pem=trust_pem, watermarks=cfg.watermarks),
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1)
    lo, hi = parse_actors(cfg.actors)
    cpus, gpus = actor_resources(cfg)
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs=dict(bundle_uris=uris, scan_id=scan_id, storage_options=so, crash_marker=cfg.crash_actor_once,
                                           load_counter=counter, gpu=cfg.gpu, flag_declared=cfg.flag_declared,
                                           forward=cfg.forward, batch_size=cfg.batch_size, keep_features=cfg.keep_features),
        batch_size=cfg.batch_size, batch_format="numpy",
        # Ray Data restarts a dead actor and retries its batch (tests/test_scan_faults.py kills one);
        # MIN < MAX is the autoscaling pool.
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=gpus, num_cpus=cpus,
    )
    return ds.map_batches(write_results, fn_kwargs=dict(output=out.uri, scan_id=scan_id, scan_date=scan_date, storage_options=so),
                          batch_size=cfg.chunk_size, batch_format="pyarrow", num_cpus=0.5)


_COUNTERS: dict = {}


def load_counter():
    """The driver's model-load counter: how many times a Scorer built its models, per scan (the summary's ``model_loads``).

    One actor per driver (Ray job), kept here for every scan that driver runs: a notebook or a
    test process running many scans starts one process, not one per scan. The handle held here
    keeps it alive (an actor with no handle left is destroyed, and a name would not keep it).
    """
    import ray

    job = ray.get_runtime_context().get_job_id()
    if job not in _COUNTERS:
        @ray.remote(num_cpus=0)
        class LoadCounter:
            def __init__(self):
                self.n: dict[str, int] = {}

            def add(self, scan_id: str):
                self.n[scan_id] = self.n.get(scan_id, 0) + 1

            def pop(self, scan_id: str) -> int:
                return self.n.pop(scan_id, 0)

        _COUNTERS.clear()  # a driver joins one Ray at a time: handles of an earlier one are dead
        _COUNTERS[job] = LoadCounter.remote()
    return _COUNTERS[job]


def resource_message(cfg: ScanConfig) -> str:
    import ray

    cpus, gpus = actor_resources(cfg)
    have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    need = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return (f"no Scorer actor could be placed within --resource-timeout {cfg.resource_timeout:g} s: each needs {need}, the cluster "
            f"has {have or 'nothing'} in total" + ("; no GPU is in the cluster (drop --gpu, or add GPU nodes)" if gpus and not have.get("GPU") else ""))


def commit_records(stream, chunk_size: int, detector_ids: list[str],
                   commit: Callable[[dict[str, list[str]], dict[str, dict[str, int]]], None]) -> tuple[int, int]:
    """Consume the stream's file records; call ``commit(files by table, counts by detector and table)``
    for every ``chunk_size`` rows (scores + errors) and once for the rest. Returns (records, files).

    Units end between ``write_results`` calls, so one call's scores, flagged and errors files
    (the same rows) always commit together.
    """
    def empty():
        return {t: [] for t in T.UNIT_TABLES}, {d: {t: 0 for t in T.TABLES} for d in detector_ids}

    files, counts = empty()
    pending_rows = records = n_files = 0
    for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
        # The guard: only file records cross to the driver, never result rows.
        if batch.schema.names != FILE_RECORD.names:
            raise RuntimeError(f"result rows reached the scan driver (columns {batch.schema.names}); only file records may")
        records += batch.num_rows
        call = None
        for rec in batch.to_pylist():
            if rec["call"] != call and pending_rows >= chunk_size:
                commit(files, counts)
                (files, counts), pending_rows = empty(), 0
            call = rec["call"]
            n_files += 1
            files[rec["table"]].append(rec["path"])
            for d, n in json.loads(rec["counts"]).items():
                counts[d][rec["table"]] += n
            if rec["table"] in ("scores", "errors"):  # a unit's size: result rows, not their flagged copies or vectors
                pending_rows += rec["rows"]
        if pending_rows >= chunk_size:  # a block holds whole calls
            commit(files, counts)
            (files, counts), pending_rows = empty(), 0
    if pending_rows:
        commit(files, counts)
    return records, n_files
