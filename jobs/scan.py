"""The nightly scan: score every image under a prefix (or in a manifest) with a detector.

    python -m jobs.scan --detector OUT/detector --input ./images --output ./scans      # local: SQLite catalog in ./scans
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.scan --detector s3://models/detector --input s3://uploads/ --output s3://audit/scans \\
        --catalog detector --gpu --actors 1-16
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.scan --detector s3://models/clip-detector --ensemble s3://models/dnf-detector \\
        --input s3://uploads/ --output s3://audit/scans --catalog detector --gpu --actors 8

The plan runs on the cluster (``jobs.planning``): the input (a prefix, a manifest or an S3
Inventory report) is listed by Ray tasks and anti-joined per ``uri_bucket`` partition with the
``state`` table; the driver gets counts and work-file paths only. Then one Ray Data stream:
work files -> read bytes + decode + crop (CPU tasks, ``load_images``) ->
features + classifier (``Scorer`` actors, GPUs in production; models built once per actor,
``--actors 1-16`` lets the pool grow into GPUs as they appear) -> ``write_results`` (CPU
tasks that write the rows as Parquet data files of the Iceberg tables and return only the
files' paths and counts). The driver consumes that stream of file records, never result
rows, and commits every ``--chunk-size`` rows' files as one Iceberg snapshot per table
(``detector_core.catalog``): the commit unit, while the stream keeps flowing.

Either detector kind (``clip-mlp``, ``dnf-resnet``) goes through the same code;
``--ensemble`` runs more bundles in the same pass (each object read and decoded once, each
extractor run once, one row per object and detector). Every listed object ends as exactly
one row per detector in ``scores`` or ``errors``; ``flagged`` is the subset of ``scores``
at or above the bundle's threshold.

Exact state: a scan holds a lease on the output (``detector_core.lease``; a second scan
refuses naming the holder, or waits with ``--wait``; a dead holder's lease expires after
``--lease-ttl``). What is committed is settled: a scan plans only objects that no committed
row of the same detector settles (same etag and size; read and list failures are retried;
the ``state`` table is caught up with every commit before planning), so a
scan killed at any moment is continued by the next run, whatever its input, and nothing
half-written is ever visible: uncommitted data files are unreferenced, and a unit whose
four table commits were cut short is finished from its intent before the next scan
plans. The run summary is ``runs`` rows in the catalog and ``OUT/runs/<scan_id>.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core import tables as T
from detector_core.bundle import BundleError, DetectorBundle, load_bundle
from detector_core.catalog import CatalogError, ScanOutput, data_file_path
from detector_core.extractors import feature_compute
from detector_core.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from detector_core.lease import Lease, LeaseHeldError, LeaseLostError
from detector_core.storage import open_fs, s3_storage_options
from jobs import planning
from jobs.common import (
    RayOptions,
    StorageOptions,
    check_connection,
    config_dict,
    fail,
    init_ray,
    join,
    new_run_id,
    opt,
    parse_config,
    require_weights,
    run_main,
    write_json,
    write_parquet,
)
from jobs.pipeline import feature_drafts, feature_specs, trained_draft
from jobs.planning import PlanError, refresh_state, remove_plan

# The only columns that reach the driver: one row per data file written by a worker.
FILE_RECORD = pa.schema([("call", pa.string()), ("table", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
                         ("counts", pa.string())])


@dataclass
class ScanConfig(RayOptions, StorageOptions):
    detector: str = opt("", "detector bundle folder (local or s3://), as written by jobs.train to OUT/detector; either kind (clip-mlp, dnf-resnet)")
    ensemble: str = opt("", "more detector bundles to run in the same pass, comma-separated (e.g. a DNF bundle next to a CLIP one): one row per object and detector")
    input: str = opt("", "what to scan: a prefix (s3://bucket/prefix, gs://…, a local folder), a .parquet/.csv manifest with a uri column (optional etag, size), or an S3 Inventory report: its manifest.json, that file's folder, or a glob of them (s3://inv/src/cfg/*/manifest.json: the newest of each)")
    output: str = opt("", "where the tables go: Iceberg tables OUT/scores, OUT/flagged, OUT/errors, OUT/runs (local or s3://)")
    catalog: str = opt("", "Iceberg catalog of the tables: empty = SQLite OUT/catalog.db (local outputs only); sqlite:///…, postgresql://user@host/db, https://rest, glue, or a pyiceberg catalog name (credentials in its config, never here)")
    namespace: str = opt("", "catalog namespace of this output's tables (default: as recorded in OUT/_catalog.json, else 'detector'); one per output in a shared catalog")
    full: bool = opt(False, "score everything again, not only new or changed objects")
    scan_date: str = opt("", "scan_date partition to write, YYYY-MM-DD (default: today, UTC); for backfills and re-runs of a missed night")
    captions: str = opt("", "manifest with uri,caption for detectors that use image+text features")
    batch_size: int = opt(64, "images per model batch", within="[1, inf)")
    actors: str = opt("1", "Scorer actors: a number, or a range MIN-MAX (e.g. 1-16) that grows into GPUs as they appear and shrinks when idle")
    gpu: bool = opt(False, "run the Scorer actors on GPUs (one each)")
    cpus_per_actor: float = opt(0.0, "CPUs reserved per Scorer actor, its torch threads (0 = 1 with --gpu, else half the cluster's CPUs shared by the actors, so decoding has the rest)", within="[0, inf)")
    chunk_size: int = opt(50_000, "result rows per commit unit (objects x detectors): each unit is one Iceberg snapshot per table", within="[1, inf)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this (decompression bombs)", within="[1, inf)")
    max_bytes: int = opt(DEFAULT_MAX_BYTES, "refuse objects larger than this many bytes (never read past it)", within="[1, inf)")
    state_compact_at: int = opt(8, "files per state partition at which a refresh merges them into one (compaction)", within="[1, inf)")
    list_fan_out: int = opt(64, "listing units a prefix is split into (its first levels of common prefixes), listed by parallel tasks", within="[1, inf)")
    resource_timeout: float = opt(900.0, "seconds to wait for the first Scorer actor to be placed before failing with the missing resource", within="(0, inf)")
    lease_ttl: float = opt(300.0, "seconds a scan's lease on the output lasts without renewal (a dead scan blocks the output this long)", within="(0, inf)")
    wait: bool = opt(False, "if another scan holds the output's lease, wait for it instead of refusing")
    crash_actor_once: str = opt("", "testing: the first Scorer batch kills its actor process if this marker file does not exist yet")
    kill_at: str = opt("", "testing: STEP:UNIT kills the driver with SIGKILL before commit step STEP (intent, errors, flagged, scores, runs, done) of unit UNIT")


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


def validate(cfg: ScanConfig) -> None:
    """Refuse bad settings before anything is listed, leased or started."""
    if not (cfg.detector and cfg.input and cfg.output):
        fail("--detector, --input and --output are required")
    # Numbers are checked against their fields' intervals by parse_config.
    try:
        parse_actors(cfg.actors)
    except ValueError as exc:
        fail(str(exc))
    if cfg.scan_date:
        try:
            dt.date.fromisoformat(cfg.scan_date)
        except ValueError:
            fail(f"--scan-date {cfg.scan_date!r} is not a date (YYYY-MM-DD)")
    if cfg.kill_at and (cfg.kill_at.count(":") != 1 or not cfg.kill_at.split(":")[1].isdigit()):
        fail(f"--kill-at {cfg.kill_at!r}: STEP:UNIT")


# -- the stream ------------------------------------------------------------------------------
def write_results(batch: pa.Table, output: str, scan_id: str, scan_date: str, storage_options: dict | None) -> pa.Table:
    """Ray Data task: Scorer rows -> Parquet data files of scores/flagged/errors (one per table and bucket).

    Returns one ``FILE_RECORD`` row per file: what the driver commits. The files are
    invisible until then; a retried task writes new files and the first attempt's are
    never referenced.
    """
    failed = pc.is_valid(batch[S.ERROR_STAGE])
    rows = batch.append_column(S.SCAN_DATE, pa.array([dt.date.fromisoformat(scan_date)] * batch.num_rows, pa.date32()))
    rows = rows.append_column(S.BUCKET, T.bucket_column(rows[S.URI]))
    scores = T.conform(rows.filter(pc.invert(failed)), "scores")
    parts = {"scores": scores, "flagged": scores.filter(pc.fill_null(scores[S.FLAGGED], False)), "errors": T.conform(rows.filter(failed), "errors")}
    records, call = [], uuid.uuid4().hex
    for name, table in parts.items():
        if table.num_rows == 0:
            continue
        for bucket in pc.unique(table[S.BUCKET]).to_pylist():
            part = table.filter(pc.equal(table[S.BUCKET], bucket))
            path = data_file_path(output, name, scan_date, bucket, scan_id)  # workers write; only the driver commits
            write_parquet(part, path, storage_options)
            counts = pc.value_counts(part[S.DETECTOR_ID]).to_pylist()
            records.append({"call": call, "table": name, "path": path, "rows": part.num_rows,
                            "counts": json.dumps({c["values"]: c["counts"] for c in counts})})
    return pa.Table.from_pylist(records, schema=FILE_RECORD)


def _actor_resources(cfg: ScanConfig) -> tuple[float, int]:
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


def build_stream(cfg: ScanConfig, work_files: list[str], n_work: int, uris: list[str], bundles: list[DetectorBundle], out: ScanOutput,
                 scan_id: str, scan_date: str, so: dict | None, counter):
    """One Ray Data pipeline over the whole plan: work files -> decode tasks -> Scorer actors -> file-writing tasks."""
    import ray

    from jobs.decoding import load_images
    from jobs.pipeline import Scorer

    rows = max(1, min(1024, -(-n_work // 64)))  # at least ~64 blocks, so that small scans still spread over the decoders
    ds = ray.data.from_items([{"path": p} for p in work_files], override_num_blocks=len(work_files))
    ds = ds.map_batches(read_work, fn_kwargs=dict(storage_options=so, rows=rows), batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(load_images, fn_kwargs=dict(specs=feature_specs(bundles), draft=feature_drafts(bundles), storage_options=so,
                                                    max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes),
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1)
    lo, hi = parse_actors(cfg.actors)
    cpus, gpus = _actor_resources(cfg)
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs=dict(bundle_uris=uris, scan_id=scan_id, storage_options=so, crash_marker=cfg.crash_actor_once,
                                           load_counter=counter, gpu=cfg.gpu),
        batch_size=cfg.batch_size, batch_format="numpy",
        # Ray Data restarts a dead actor and retries its batch (tests/test_scan.py kills one);
        # MIN < MAX is the autoscaling pool.
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), num_gpus=gpus, num_cpus=cpus,
    )
    return ds.map_batches(write_results, fn_kwargs=dict(output=out.uri, scan_id=scan_id, scan_date=scan_date, storage_options=so),
                          batch_size=cfg.chunk_size, batch_format="pyarrow", num_cpus=0.5)


def _load_counter():
    import ray

    @ray.remote(num_cpus=0)
    class LoadCounter:
        """How many times a Scorer built its models in this scan (the summary's ``model_loads``)."""

        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1

        def count(self) -> int:
            return self.n

    return LoadCounter.remote()


def _resource_message(cfg: ScanConfig) -> str:
    import ray

    cpus, gpus = _actor_resources(cfg)
    have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    need = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return (f"no Scorer actor could be placed within --resource-timeout {cfg.resource_timeout:g} s: each needs {need}, the cluster "
            f"has {have or 'nothing'} in total" + ("; no GPU is in the cluster (drop --gpu, or add GPU nodes)" if gpus and not have.get("GPU") else ""))


# -- the run ---------------------------------------------------------------------------------
def _kill_hook(cfg: ScanConfig, lease: Lease):
    step_at, _, unit_at = cfg.kill_at.partition(":")
    state = {"unit": 0}

    def before_each(step: str) -> None:
        lease.check()
        if cfg.kill_at and step == step_at and state["unit"] == int(unit_at):
            os.kill(os.getpid(), signal.SIGKILL)
    return before_each, state


def _run_row(base: dict, b: DetectorBundle, unit: int, status: str, counts: dict, extra: dict | None = None) -> dict:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return {**base, "unit": unit, "status": status, "detector_id": b.detector_id, "detector_kind": b.kind, "feature_id": b.features.id,
            "scored": counts.get("scores", 0), "flagged": counts.get("flagged", 0), "errors": counts.get("errors", 0),
            "committed_at": now, **(extra or {})}


def _check_feature_compute(bundles: list[DetectorBundle], gpu: bool) -> None:
    """Features computed as each detector's training computed them: another decode or resize is refused,
    another precision (bf16 on GPUs, fp32 on CPUs) warned about; the run summary records both sides."""
    for b in bundles:
        trained = b.feature_compute
        if not trained:  # bundles from before it was recorded
            continue
        ours = feature_compute(b.features, gpu, draft=trained_draft(b))
        for key in ("jpeg_draft_size", "resize"):
            if key in trained and trained[key] != ours[key]:
                fail(f"detector {b.detector_id} was trained on features computed with {key} {trained[key]!r}, and this scan "
                     f"would compute them with {ours[key]!r}: its scores would not mean what its threshold says; retrain it "
                     "with this version, or scan with the version that trained it")
        if trained.get("precision") and trained["precision"] != ours["precision"]:
            print(f"WARNING: detector {b.detector_id} was trained on {trained['precision']} features and this scan computes "
                  f"{ours['precision']} ({'--gpu' if gpu else 'no --gpu'}): scores may shift slightly near the threshold "
                  "(recorded in the run summary)", file=sys.stderr, flush=True)


def run_scan(cfg: ScanConfig) -> dict:
    validate(cfg)
    check_connection(cfg.ray_address or None)
    so = s3_storage_options(cfg.s3_endpoint or None)
    uris = [cfg.detector] + [u.strip() for u in cfg.ensemble.split(",") if u.strip()]
    try:
        bundles = [load_bundle(u, so) for u in uris]
    except BundleError as exc:
        fail(str(exc))
    for spec in feature_specs(bundles):  # a missing CLIP or UNet file: one line now, not a dead actor
        require_weights(spec, so)
    ids = [b.detector_id for b in bundles]
    if len(set(ids)) != len(ids):
        fail(f"the same detector is given twice ({', '.join(ids)}); each bundle may appear once")
    needing = [b.detector_id for b in bundles if b.needs_captions]
    if needing and not cfg.captions:
        fail(f"detector {', '.join(needing)} uses image+text features and needs captions; pass --captions with a uri,caption manifest")
    _check_feature_compute(bundles, cfg.gpu)
    try:
        feature_drafts(bundles)
    except ValueError as exc:
        fail(str(exc))
    scan_date = cfg.scan_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        out = ScanOutput.open(cfg.output, cfg.catalog, cfg.namespace, so)
    except CatalogError as exc:
        fail(str(exc))
    scan_id = new_run_id("scan")
    lease = Lease(out.fs, out.root, scan_id, cfg.lease_ttl)
    try:
        lease.acquire(wait=cfg.wait)
    except LeaseHeldError as exc:
        fail(str(exc))
    lease.start_renewing()
    try:
        return _scan_under_lease(cfg, so, uris, bundles, scan_date, out, scan_id, lease)
    except LeaseLostError as exc:
        fail(f"{exc}; nothing of this scan's uncommitted work is visible, run it again")
    finally:
        lease.release()


def _scan_under_lease(cfg, so, uris, bundles, scan_date, out: ScanOutput, scan_id: str, lease: Lease) -> dict:
    import ray

    started = time.time()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    before_each, unit_state = _kill_hook(cfg, lease)
    recovered = out.recover(before_each=lambda step: lease.check())
    if recovered:
        print(f"finished {len(recovered)} commit unit(s) a killed scan left half committed")
    init_ray(cfg.ray_address or None)
    remove_plan(out)  # work files of killed scans (the lease says none is running)
    # Catch the state up with everything committed (a killed scan's units; a deleted state is rebuilt).
    state_before = refresh_state(out, so, cfg.state_compact_at)
    lease.check()
    ids = [b.detector_id for b in bundles]
    try:
        work_files, plan_counts = planning.plan(out, cfg.input, ids, scan_id, cfg.full, cfg.captions, so, cfg.list_fan_out)
    except PlanError as exc:
        fail(str(exc))
    counts = {"listed": plan_counts["listed"], "skipped": plan_counts["listed"] - plan_counts["work"],
              "skipped_by_detector": plan_counts["skipped"]}
    print(f"plan: {plan_counts['listed']} listed ({plan_counts['input_kind']}), {plan_counts['work']} to score, "
          f"{plan_counts['duplicates']} duplicate uris, {plan_counts['list_errors']} unusable rows ({plan_counts['plan_seconds']} s)")
    base = {"scan_id": scan_id, "scan_date": scan_date, "input": cfg.input, "listed": None, "skipped": None, "model_loads": None,
            "seconds": None, "started_at": started_at, "config": json.dumps(config_dict(cfg)), "schema_version": T.SCHEMA_VERSION}
    totals = {b.detector_id: {t: 0 for t in T.TABLES} for b in bundles}
    units, commit_seconds, driver_rows, files = 0, [], 0, 0
    model_loads = 0
    if work_files:
        ctx = ray.data.DataContext.get_current()
        saved_wait = ctx.wait_for_min_actors_s  # the driver's context outlives this scan (notebooks, tests): restore it
        ctx.wait_for_min_actors_s = int(max(1, cfg.resource_timeout))
        counter = _load_counter()
        stream = build_stream(cfg, work_files, plan_counts["work"], uris, bundles, out, scan_id, scan_date, so, counter)
        pending_files: dict[str, list[str]] = {t: [] for t in T.TABLES}
        pending_counts: dict[str, dict[str, int]] = {b.detector_id: {t: 0 for t in T.TABLES} for b in bundles}
        pending_rows = 0

        def commit() -> None:
            nonlocal units, pending_rows, pending_files, pending_counts
            t0 = time.time()
            rows = [_run_row(base, b, units, "unit", pending_counts[b.detector_id]) for b in bundles]
            out.commit_unit({"scan_id": scan_id, "unit": units, "files": pending_files, "runs": rows}, before_each=before_each)
            commit_seconds.append(time.time() - t0)
            for d, c in pending_counts.items():
                for t in T.TABLES:
                    totals[d][t] += c[t]
            units += 1
            unit_state["unit"] = units
            print(f"unit {units}: {sum(c['scores'] for c in pending_counts.values())} scored, "
                  f"{sum(c['errors'] for c in pending_counts.values())} errors committed ({commit_seconds[-1]:.2f} s)", flush=True)
            pending_files = {t: [] for t in T.TABLES}
            pending_counts = {b.detector_id: {t: 0 for t in T.TABLES} for b in bundles}
            pending_rows = 0

        try:
            for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
                # The guard: only file records cross to the driver, never result rows.
                if batch.schema.names != FILE_RECORD.names:
                    raise RuntimeError(f"result rows reached the scan driver (columns {batch.schema.names}); only file records may")
                driver_rows += batch.num_rows
                call = None
                for rec in batch.to_pylist():
                    # Units end between write_results calls, so one call's scores, flagged and errors
                    # files (the same rows) always commit together.
                    if rec["call"] != call and pending_rows >= cfg.chunk_size:
                        commit()
                    call = rec["call"]
                    files += 1
                    pending_files[rec["table"]].append(rec["path"])
                    for d, n in json.loads(rec["counts"]).items():
                        pending_counts[d][rec["table"]] += n
                    if rec["table"] != "flagged":
                        pending_rows += rec["rows"]
                if pending_rows >= cfg.chunk_size:  # a block holds whole calls
                    commit()
            if pending_rows:
                commit()
        except ray.exceptions.GetTimeoutError:
            fail(_resource_message(cfg))
        finally:
            ctx.wait_for_min_actors_s = saved_wait
        model_loads = ray.get(counter.count.remote())
        ray.kill(counter)
    lease.check()
    state_after = refresh_state(out, so, cfg.state_compact_at) if units else {"history_files": 0}
    remove_plan(out)
    elapsed = time.time() - started
    n_read = counts["listed"] - counts["skipped"]
    summary_base = {**base, "listed": counts["listed"], "skipped": counts["skipped"], "model_loads": model_loads, "seconds": round(elapsed, 2)}
    final = [_run_row(summary_base, b, -1, "completed", totals[b.detector_id], {"skipped": counts["skipped_by_detector"][b.detector_id]})
             for b in bundles]
    snaps = out.commit_unit({"scan_id": scan_id, "unit": -1, "files": {}, "runs": final}, before_each=lambda step: lease.check())
    summary = {
        "scan_id": scan_id, "detector": cfg.detector, "detector_id": bundles[0].detector_id, "detector_kind": bundles[0].kind,
        "feature_id": bundles[0].features.id, "threshold": bundles[0].threshold, "input": cfg.input, "output": cfg.output,
        "catalog": out.catalog_spec or "sqlite (OUT/catalog.db)", "namespace": out.namespace, "scan_date": scan_date,
        "listed": counts["listed"], "skipped": counts["skipped"],
        "scored": sum(t["scores"] for t in totals.values()), "flagged": sum(t["flagged"] for t in totals.values()),
        "errors": sum(t["errors"] for t in totals.values()), "seconds": round(elapsed, 2),
        "images_per_second": round(n_read / elapsed, 2) if elapsed > 0 else None,  # objects read per second
        "commit_units": units, "commit_seconds": [round(s, 3) for s in commit_seconds], "model_loads": model_loads,
        "driver_rows_received": driver_rows, "data_files": files, "recovered_units": len(recovered), "plan": plan_counts,
        "state_refresh": {"before": state_before, "after": state_after},
        "snapshot_ids": snaps,
        "detectors": [{"detector": u, "detector_id": b.detector_id, "detector_kind": b.kind, "feature_id": b.features.id,
                       "threshold": b.threshold, "feature_compute": {"trained": b.feature_compute or None,
                                                                     "scanned": feature_compute(b.features, cfg.gpu, draft=trained_draft(b))},
                       "skipped": counts["skipped_by_detector"][b.detector_id],
                       "scored": totals[b.detector_id]["scores"], "flagged": totals[b.detector_id]["flagged"],
                       "errors": totals[b.detector_id]["errors"]} for u, b in zip(uris, bundles)],
        "started_at": started_at, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "schema_version": T.SCHEMA_VERSION, "config": config_dict(cfg),
    }
    write_json(join(cfg.output, "runs", f"{scan_id}.json"), summary, so)
    print(f"scan {scan_id}: listed {summary['listed']}, skipped {summary['skipped']} (unchanged), scored {summary['scored']}, "
          f"flagged {summary['flagged']}, errors {summary['errors']} in {elapsed:.1f} s ({units} commit units, {model_loads} model loads)")
    if len(bundles) > 1:
        for d in summary["detectors"]:
            print(f"  {d['detector_id']} ({d['detector_kind']}): skipped {d['skipped']}, scored {d['scored']}, "
                  f"flagged {d['flagged']}, errors {d['errors']}")
    print(f"  tables {', '.join(out.identifier(t) for t in T.ALL_TABLES)} under {cfg.output}")
    return summary


def main(argv=None) -> dict:
    return run_scan(parse_config(ScanConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
