"""The nightly scan: score every image under a prefix (or in a manifest) with a detector.

    python -m jobs.scan --detector s3://models/detector --input s3://bucket/uploads/ --output s3://audit/scans
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.scan --detector s3://models/detector --input s3://bucket/uploads/ \\
        --output s3://audit/scans --gpu --actors 8
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.scan --detector s3://models/clip-detector --ensemble s3://models/dnf-detector \\
        --input s3://bucket/uploads/ --output s3://audit/scans --gpu --actors 8

Pipeline (Ray Data, the same read/decode/embed code as training, ``jobs.pipeline``):
list -> read bytes + decode + crop on CPU tasks -> features + classifier on GPU actors
(``Scorer``) -> Parquet. Either detector kind (``clip-mlp``: CLIP + MLP; ``dnf-resnet``:
diffusion noise + ResNet) goes through the same code. ``--ensemble`` runs more bundles in
the same pass: each object is read and decoded once, each extractor runs once, and every
detector records its own row. Every listed object ends as exactly one row per detector,
in ``scores`` or in ``errors``; ``flagged`` is the subset of ``scores`` at or above the
bundle's threshold. Tables are hive-partitioned by ``scan_date`` and ``bucket`` under
``OUT/scores``, ``OUT/flagged``, ``OUT/errors`` (schema and layout: ``detector_core.tables``).

Incremental: objects already scored (or found undecodable) by the same detector, with
the same etag and size, are skipped unless ``--full`` (per detector: a bundle added to an
ensemble later scores the whole bucket once, the others only what changed); read
failures (I/O, throttling) are retried within the run and again on the next one.

Resumable and atomic: the work is cut into chunks; each chunk's tables are staged
under ``OUT/_staging/<scan_id>/`` with a ``_DONE`` marker. A scan started again finds
the unfinished one, keeps its plan and finished chunks, and does the rest. Only when
every chunk is done are the files moved into the tables, and ``OUT/runs/<scan_id>.json``
(the run summary) is written last: a reader that trusts ``runs/`` never sees part of a
scan, and a re-run that finds a half-done move finishes it.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core import tables as T
from detector_core.bundle import BundleError, DetectorBundle, load_bundle
from detector_core.extractors import FeatureSpec
from detector_core.images import DEFAULT_MAX_PIXELS
from detector_core.manifest import ManifestError, read_manifest
from detector_core.storage import arrow_fs, is_remote, open_fs, s3_storage_options
from detector_core.training import predict_logits
from jobs.common import (
    config_dict,
    fail,
    init_ray,
    join,
    new_run_id,
    opt,
    parse_config,
    read_json,
    run_main,
    write_json,
    write_parquet,
)
from jobs.pipeline import Embedder, default_device, pixel_column, to_table

TABLES = T.TABLES


@dataclass
class ScanConfig:
    detector: str = opt("", "detector bundle folder (local or s3://), as written by jobs.train to OUT/detector; either kind (clip-mlp, dnf-resnet)")
    ensemble: str = opt("", "more detector bundles to run in the same pass, comma-separated (e.g. a DNF bundle next to a CLIP one): one row per object and detector")
    input: str = opt("", "what to scan: a prefix (s3://bucket/prefix, gs://…, a local folder) or a .parquet/.csv manifest with a uri column")
    output: str = opt("", "where the tables go: OUT/scores, OUT/flagged, OUT/errors, OUT/runs (local or s3://)")
    full: bool = opt(False, "score everything again, not only new or changed objects")
    scan_date: str = opt("", "scan_date partition to write, YYYY-MM-DD (default: today, UTC); for backfills and re-runs of a missed night")
    captions: str = opt("", "manifest with uri,caption for detectors that use image+text features")
    batch_size: int = opt(64, "images per model batch")
    actors: int = opt(1, "Scorer actors (one GPU each with --gpu)")
    gpu: bool = opt(False, "run the Scorer actors on GPUs")
    cpus_per_actor: float = opt(1.0, "CPUs reserved per Scorer actor; Ray gives its torch that many threads (raise it for CPU-only scans)")
    chunk_size: int = opt(50_000, "objects per committed chunk (the unit of resume)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this (decompression bombs)")
    s3_endpoint: str = opt("", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    ray_address: str = opt("", "Ray cluster address (default: the job's cluster, or a local Ray)")
    fail_after_chunks: int = opt(-1, "testing: stop with an error after this many chunks are staged")
    crash_actor_once: str = opt("", "testing: the first Scorer batch kills its actor process if this marker file does not exist yet")


def feature_specs(bundles: list[DetectorBundle]) -> list[FeatureSpec]:
    """The distinct extractors of some detectors, in order (``load_images`` makes one input column each)."""
    return list(dict.fromkeys(b.features for b in bundles))


def todo_column(i: int) -> str:
    """Chunk-input column: does detector ``i`` still need this object (ensembles, where detectors differ)?"""
    return f"_todo_{i}"


class Scorer:
    """Ray Data actor: input images -> each detector's features -> logit, score, decision.

    Holds every detector of the scan on one device; an extractor shared by several
    detectors runs once. Rows that failed to read or decode pass through with their
    error and no score, once per detector.
    """

    def __init__(self, bundle_uris: list[str], scan_id: str, storage_options: dict | None = None, crash_marker: str = ""):
        self.crash_marker = crash_marker
        self.device = default_device()
        self.bundles = [load_bundle(u, storage_options, device=self.device) for u in bundle_uris]
        self.embedders = {spec: Embedder(spec, storage_options, pixels=pixel_column(j))
                          for j, spec in enumerate(feature_specs(self.bundles))}
        self.scan_id = scan_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os._exit(1)  # a hard actor death, as from an OOM kill or a lost node
        n = len(batch[S.URI])
        todo = [np.asarray(batch[todo_column(i)], dtype=bool) if todo_column(i) in batch else np.ones(n, dtype=bool)
                for i in range(len(self.bundles))]
        feats = {}
        for spec, embedder in self.embedders.items():
            if any(t.any() for b, t in zip(self.bundles, todo) if b.features == spec):
                feats[spec] = embedder.extract(batch)
        now = dt.datetime.now(dt.timezone.utc)
        parts = []
        for b, rows in zip(self.bundles, todo):
            if not rows.any():
                continue
            x, ok = feats[b.features]
            logits = np.full(n, np.nan, dtype=np.float64)
            if ok.any():
                logits[ok] = predict_logits(b.model, x).double().cpu().numpy()
            with np.errstate(over="ignore"):
                scores = 1.0 / (1.0 + np.exp(-logits))
            table = to_table(batch, {
                S.LOGIT: pa.array(logits, mask=~ok),
                S.SCORE: pa.array(scores, mask=~ok),
                S.THRESHOLD: pa.array(np.full(n, b.threshold)),
                S.FLAGGED: pa.array(logits >= b.threshold_logit, mask=~ok),
                S.DETECTOR_ID: pa.array([b.detector_id] * n, pa.string()),
                S.DETECTOR_KIND: pa.array([b.kind] * n, pa.string()),
                S.CLIP_ID: pa.array([b.features.id] * n, pa.string()),
                S.SCAN_ID: pa.array([self.scan_id] * n, pa.string()),
                S.SCANNED_AT: pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            })
            parts.append(table if rows.all() else table.filter(pa.array(rows)))
        # Never empty: a chunk holds only objects that some detector still needs.
        return pa.concat_tables(parts, promote_options="default")


def list_objects(source: str, so: dict | None) -> pa.Table:
    """uri, etag, size of every object under a prefix, or the rows of a manifest."""
    fs, path = open_fs(source, so)
    if fs.isfile(path) and path.lower().endswith((".parquet", ".csv", ".csv.gz", ".pq")):
        try:
            t = read_manifest(source, so)
        except ManifestError as exc:
            fail(str(exc))
        cols = {S.URI: t.column(S.URI).cast(pa.string())}
        cols[S.ETAG] = t.column(S.ETAG).cast(pa.string()) if S.ETAG in t.column_names else pa.nulls(t.num_rows, pa.string())
        cols[S.SIZE] = t.column(S.SIZE).cast(pa.int64()) if S.SIZE in t.column_names else pa.nulls(t.num_rows, pa.int64())
        return pa.table(cols)
    if not fs.exists(path):
        fail(f"--input {source} does not exist (or is not reachable with these credentials)")
    scheme = source.split("://", 1)[0] + "://" if is_remote(source) else ""
    uris, etags, sizes = [], [], []
    for p, info in sorted(fs.find(path, detail=True).items()):
        if info.get("type") == "directory":
            continue
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        if etag is None and "mtime" in info:
            etag = f"mtime:{info['mtime']}"
        uris.append(scheme + p if scheme else p)
        etags.append(None if etag is None else str(etag).strip('"'))
        sizes.append(int(info.get("size") or 0))
    return pa.table({S.URI: pa.array(uris, pa.string()), S.ETAG: pa.array(etags, pa.string()), S.SIZE: pa.array(sizes, pa.int64())})


def _committed(output: str, detector_id: str, so: dict | None) -> pa.Table:
    """(uri, etag, size) the detector has already settled: scored, or failed for good."""
    parts = []
    for table, retry_filter in (("scores", None), ("errors", pads.field(S.ERROR_STAGE) != "read")):
        ds = T.open_table(output, table, so)
        if ds is None:
            continue
        flt = pads.field(S.DETECTOR_ID) == detector_id
        if retry_filter is not None:
            flt = flt & retry_filter
        parts.append(ds.to_table(columns=[S.URI, S.ETAG, S.SIZE], filter=flt))
    return pa.concat_tables(parts) if parts else pa.table({S.URI: pa.array([], pa.string()), S.ETAG: pa.array([], pa.string()), S.SIZE: pa.array([], pa.int64())})


def _pending(listed: pa.Table, done: pa.Table) -> pa.Table:
    """Listed objects the detector has not settled.

    An object is settled when a committed row has its uri and agrees on the etag and
    size the listing gives; a manifest without etag or size columns compares on what it
    has (so a uri-only manifest skips every uri already scored).
    """
    if done.num_rows == 0:
        return listed
    seen = done.rename_columns([S.URI, "etag_done", "size_done"])
    pairs = listed.select([S.URI, S.ETAG, S.SIZE]).join(seen, keys=S.URI, join_type="inner")

    def agrees(listed_col, done_col):
        return pc.or_(pc.is_null(pairs[listed_col]), pc.fill_null(pc.equal(pairs[listed_col], pairs[done_col]), False))

    settled = pairs.filter(pc.and_(agrees(S.ETAG, "etag_done"), agrees(S.SIZE, "size_done")))[S.URI].unique()
    return listed.filter(pc.invert(pc.is_in(listed[S.URI], value_set=settled)))


def _find_unfinished(output: str, detector_key: str, so: dict | None) -> str | None:
    fs, root = open_fs(join(output, "_staging"), so)
    if not fs.exists(root):
        return None
    for d in sorted(fs.ls(root, detail=False)):
        plan = read_json(join(output, "_staging", d.rstrip("/").rsplit("/", 1)[-1], "plan.json"), so)
        if plan and plan.get("detector_key", plan["detector_id"]) == detector_key:
            return plan["scan_id"]
    return None


def _score_chunk(chunk: pa.Table, cfg: ScanConfig, bundles: list[DetectorBundle], uris: list[str], scan_id: str,
                 captions: pa.Table | None, so: dict | None) -> pa.Table:
    import ray

    from jobs.pipeline import load_images

    if captions is not None:
        chunk = chunk.join(captions, S.URI, join_type="left outer")
    rows = max(1, min(1024, -(-chunk.num_rows // 16)))
    ds = ray.data.from_arrow([chunk.slice(i, rows) for i in range(0, chunk.num_rows, rows)])
    ds = ds.map_batches(
        load_images,
        fn_kwargs=dict(specs=feature_specs(bundles), storage_options=so, max_pixels=cfg.max_pixels),
        batch_size=cfg.batch_size, batch_format="numpy",
    )
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs=dict(bundle_uris=uris, scan_id=scan_id, storage_options=so, crash_marker=cfg.crash_actor_once),
        batch_size=cfg.batch_size, batch_format="numpy",
        # Ray Data's actor pools restart a dead actor and retry its batch by default
        # (max_restarts=-1, max_task_retries=-1); tests/test_scan.py kills one to check.
        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_gpus=1 if cfg.gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs()), promote_options="default")


def _split(out: pa.Table) -> dict[str, pa.Table]:
    failed = pc.is_valid(out[S.ERROR_STAGE])
    scores = T.conform(out.filter(pc.invert(failed)), "scores")
    return {
        "scores": scores,
        "flagged": scores.filter(pc.equal(scores[S.FLAGGED], True)),
        "errors": T.conform(out.filter(failed), "errors"),
    }


def _by_bucket(table: pa.Table) -> dict[str, pa.Table]:
    """Rows of ``table`` grouped by their bucket partition."""
    buckets = np.array([T.bucket_of(u) for u in table[S.URI].to_pylist()], dtype=object)
    return {b: table.filter(pa.array(buckets == b)) for b in sorted(set(buckets))}


def _load_detectors(cfg: ScanConfig, so: dict | None) -> tuple[list[str], list[DetectorBundle]]:
    uris = [cfg.detector] + [u.strip() for u in cfg.ensemble.split(",") if u.strip()]
    bundles = []
    for uri in uris:
        try:
            bundles.append(load_bundle(uri, so))
        except BundleError as exc:
            fail(str(exc))
    ids = [b.detector_id for b in bundles]
    if len(set(ids)) != len(ids):
        fail(f"the same detector is given twice ({', '.join(ids)}); each bundle may appear once")
    return uris, bundles


def _plan(cfg: ScanConfig, bundles: list[DetectorBundle], scan_id: str, staging: str, scan_date: str, so: dict | None) -> dict:
    """List, find what each detector still needs, and stage the chunk inputs; returns the plan."""
    listed = list_objects(cfg.input, so)
    todo = []
    for b in bundles:
        pending = listed if cfg.full else _pending(listed, _committed(cfg.output, b.detector_id, so))
        todo.append(pc.is_in(listed[S.URI], value_set=pending[S.URI]))
    need = todo[0]
    for t in todo[1:]:
        need = pc.or_(need, t)
    work = listed
    if len(bundles) > 1:
        for i, t in enumerate(todo):
            work = work.append_column(todo_column(i), t)
    work = work.filter(need)
    n_chunks = max(1, -(-work.num_rows // cfg.chunk_size)) if work.num_rows else 0
    for i in range(n_chunks):
        write_parquet(work.slice(i * cfg.chunk_size, cfg.chunk_size), join(staging, f"chunk-{i:05d}", "input.parquet"), so)
    n_todo = [int(pc.sum(t).as_py() or 0) for t in todo]
    return {"scan_id": scan_id, "detector_id": bundles[0].detector_id, "detector_key": _detector_key(bundles),
            "detectors": [b.detector_id for b in bundles], "chunks": n_chunks, "listed": listed.num_rows,
            "skipped": listed.num_rows - work.num_rows,
            "skipped_by_detector": {b.detector_id: listed.num_rows - n for b, n in zip(bundles, n_todo)},
            "scan_date": scan_date,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "config": config_dict(cfg)}


def _detector_key(bundles: list[DetectorBundle]) -> str:
    """What a resumed scan must match: the same detectors (a lone detector's key is its id)."""
    return "+".join(b.detector_id for b in bundles)


def run_scan(cfg: ScanConfig) -> dict:
    so = s3_storage_options(cfg.s3_endpoint or None)
    if not (cfg.detector and cfg.input and cfg.output):
        fail("--detector, --input and --output are required")
    uris, bundles = _load_detectors(cfg, so)
    captions = None
    needing = [b.detector_id for b in bundles if b.needs_captions]
    if needing:
        if not cfg.captions:
            fail(f"detector {', '.join(needing)} uses image+text features and needs captions; pass --captions with a uri,caption manifest")
        captions = read_manifest(cfg.captions, so).select([S.URI, S.CAPTION])
    try:
        scan_date = dt.date.fromisoformat(cfg.scan_date).isoformat() if cfg.scan_date else dt.datetime.now(dt.timezone.utc).date().isoformat()
    except ValueError:
        fail(f"--scan-date {cfg.scan_date!r} is not a date (YYYY-MM-DD)")
    started = time.time()

    scan_id = _find_unfinished(cfg.output, _detector_key(bundles), so)
    if scan_id:
        staging = join(cfg.output, "_staging", scan_id)
        plan = read_json(join(staging, "plan.json"), so)
        print(f"resuming unfinished scan {scan_id}")
    else:
        scan_id = new_run_id("scan")
        staging = join(cfg.output, "_staging", scan_id)
        plan = _plan(cfg, bundles, scan_id, staging, scan_date, so)
        write_json(join(staging, "plan.json"), plan, so)  # the plan is what a resumed scan continues
    fs, _ = open_fs(staging, so)
    counts = {t: 0 for t in TABLES}
    by_detector = {b.detector_id: {t: 0 for t in TABLES} for b in bundles}
    if plan["chunks"]:
        init_ray(cfg.ray_address or None)
    for i in range(plan["chunks"]):
        chunk_dir = join(staging, f"chunk-{i:05d}")
        done_marker = read_json(join(chunk_dir, "_DONE.json"), so)
        if done_marker is None:
            in_fs, in_path = arrow_fs(join(chunk_dir, "input.parquet"), so)
            chunk_in = pq.read_table(in_path, filesystem=in_fs)
            tables = _split(_score_chunk(chunk_in, cfg, bundles, uris, scan_id, captions, so))
            todo = [chunk_in[todo_column(j)] for j in range(len(bundles))] if len(bundles) > 1 else []
            expected = sum(int(pc.sum(t).as_py() or 0) for t in todo) if todo else chunk_in.num_rows
            if sum(t.num_rows for k, t in tables.items() if k != "flagged") != expected:
                fail(f"chunk {i}: {expected} (object, detector) pairs in, a different number of rows out")
            for name, t in tables.items():
                for bucket, part in _by_bucket(t).items():
                    write_parquet(part, join(chunk_dir, name, f"{S.BUCKET}={bucket}", f"part-{scan_id}-{i:05d}.parquet"), so)
            done_marker = {name: t.num_rows for name, t in tables.items()}
            done_marker["by_detector"] = {d: {name: int(pc.sum(pc.equal(t[S.DETECTOR_ID], d)).as_py() or 0) for name, t in tables.items()}
                                          for d in by_detector}
            write_json(join(chunk_dir, "_DONE.json"), done_marker, so)
            print(f"chunk {i + 1}/{plan['chunks']}: {({k: v for k, v in done_marker.items() if k != 'by_detector'})}")
            if cfg.fail_after_chunks >= 0 and i + 1 >= cfg.fail_after_chunks:
                fail(f"stopping after {i + 1} chunks (--fail-after-chunks)")
        for name in TABLES:
            counts[name] += done_marker[name]
        for d, c in done_marker.get("by_detector", {}).items():
            for name in TABLES:
                by_detector[d][name] += c[name]
    # Commit: move every staged file into its table partition, then write the run summary
    # last. A re-run after a crash here finds the plan, all chunks done, and moves the rest.
    for i in range(plan["chunks"]):
        for name in TABLES:
            src_root = open_fs(join(staging, f"chunk-{i:05d}", name), so)[1]
            if not fs.exists(src_root):
                continue
            for src_path in fs.find(src_root):
                bucket_dir = src_path[len(src_root):].strip("/").split("/", 1)[0]
                bucket = bucket_dir.split("=", 1)[1]
                dst = join(cfg.output, name, T.partition_dir(plan["scan_date"], bucket), src_path.rsplit("/", 1)[1])
                dst_path = open_fs(dst, so)[1]
                fs.makedirs(dst_path.rsplit("/", 1)[0], exist_ok=True)
                fs.mv(src_path, dst_path)
    elapsed = time.time() - started
    skipped_by = plan.get("skipped_by_detector", {plan["detector_id"]: plan["skipped"]})
    summary = {
        "scan_id": scan_id, "detector": cfg.detector, "detector_id": bundles[0].detector_id, "clip_model": bundles[0].clip_model,
        "detector_kind": bundles[0].kind, "feature_id": bundles[0].features.id,
        "threshold": bundles[0].threshold, "input": cfg.input, "output": cfg.output, "scan_date": plan["scan_date"],
        "listed": plan["listed"], "skipped": plan["skipped"], "scored": counts["scores"], "flagged": counts["flagged"],
        "errors": counts["errors"], "seconds": round(elapsed, 2),
        # objects read per second (an ensemble writes several rows per object)
        "images_per_second": round((plan["listed"] - plan["skipped"]) / elapsed, 2) if elapsed > 0 else None,
        "detectors": [
            {"detector": uri, "detector_id": b.detector_id, "detector_kind": b.kind, "feature_id": b.features.id,
             "threshold": b.threshold, "skipped": skipped_by.get(b.detector_id, 0), "scored": by_detector[b.detector_id]["scores"],
             "flagged": by_detector[b.detector_id]["flagged"], "errors": by_detector[b.detector_id]["errors"]}
            for uri, b in zip(uris, bundles)
        ],
        "started_at": plan["started_at"], "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "schema_version": T.SCHEMA_VERSION, "config": config_dict(cfg),
    }
    write_json(join(cfg.output, "runs", f"{scan_id}.json"), summary, so)
    fs.rm(open_fs(staging, so)[1], recursive=True)
    print(f"scan {scan_id}: listed {summary['listed']}, skipped {summary['skipped']} (unchanged), scored {summary['scored']}, "
          f"flagged {summary['flagged']}, errors {summary['errors']} in {elapsed:.1f} s")
    if len(bundles) > 1:
        for d in summary["detectors"]:
            print(f"  {d['detector_id']} ({d['detector_kind']}): skipped {d['skipped']}, scored {d['scored']}, "
                  f"flagged {d['flagged']}, errors {d['errors']}")
    for name in TABLES:
        print(f"  {name:8s} {join(cfg.output, name)}/")
    return summary


def main(argv=None) -> dict:
    return run_scan(parse_config(ScanConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
