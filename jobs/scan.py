"""The nightly scan: score every image under a prefix (or in a manifest) with a detector.

    python -m jobs.scan --detector s3://models/detector --input s3://bucket/uploads/ --output s3://audit/scans
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.scan --detector s3://models/detector --input s3://bucket/uploads/ \\
        --output s3://audit/scans --gpu --actors 8

Pipeline (Ray Data, the same read/decode/embed code as training, ``jobs.pipeline``):
list -> read bytes + decode + crop on CPU tasks -> CLIP + MLP on GPU actors (``Scorer``)
-> Parquet. Every listed object ends as exactly one row, in ``scores`` or in ``errors``;
``flagged`` is the subset of ``scores`` at or above the bundle's threshold. Tables are
hive-partitioned by ``scan_date`` and ``bucket`` under ``OUT/scores``, ``OUT/flagged``,
``OUT/errors`` (schema and layout: ``detector_core.tables``).

Incremental: objects already scored (or found undecodable) by the same detector, with
the same etag and size, are skipped unless ``--full``; read failures (I/O, throttling)
are retried within the run and again on the next one.

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
import torch

from detector_core import schema as S
from detector_core import tables as T
from detector_core.bundle import BundleError, DetectorBundle, load_bundle
from detector_core.images import DEFAULT_MAX_PIXELS
from detector_core.manifest import ManifestError, read_manifest
from detector_core.storage import arrow_fs, is_remote, open_fs, s3_storage_options
from jobs.common import config_dict, fail, init_ray, join, new_run_id, opt, parse_config, read_json, run_main, write_json, write_parquet
from jobs.pipeline import ClipEmbedder, to_table

TABLES = T.TABLES


@dataclass
class ScanConfig:
    detector: str = opt("", "detector bundle folder (local or s3://), as written by jobs.train to OUT/detector")
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


class Scorer(ClipEmbedder):
    """Ray Data actor: crops -> CLIP features -> MLP logit, score, decision.

    Rows that failed to read or decode pass through with their error and no score.
    """

    def __init__(self, bundle_uri: str, scan_id: str, storage_options: dict | None = None, crash_marker: str = ""):
        self.crash_marker = crash_marker
        self.bundle = load_bundle(bundle_uri, storage_options)
        super().__init__(self.bundle.clip_model, self.bundle.pretrained, self.bundle.feature_mode, storage_options)
        self.mlp = self.bundle.model.to(self.device).eval()
        self.scan_id = scan_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os._exit(1)  # a hard actor death, as from an OOM kill or a lost node
        feats, ok = self.features(batch)
        logits = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            with torch.inference_mode():
                logits[ok] = self.mlp(torch.from_numpy(feats[ok]).to(self.device)).double().cpu().numpy()
        b = self.bundle
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-logits))
        n = len(ok)
        now = dt.datetime.now(dt.timezone.utc)
        return to_table(batch, {
            S.LOGIT: pa.array(logits, mask=~ok),
            S.SCORE: pa.array(scores, mask=~ok),
            S.THRESHOLD: pa.array(np.full(n, b.threshold)),
            S.FLAGGED: pa.array(logits >= b.threshold_logit, mask=~ok),
            S.DETECTOR_ID: pa.array([b.detector_id] * n, pa.string()),
            S.CLIP_ID: pa.array([self.clip_id] * n, pa.string()),
            S.SCAN_ID: pa.array([self.scan_id] * n, pa.string()),
            S.SCANNED_AT: pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        })


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


def _find_unfinished(output: str, detector_id: str, so: dict | None) -> str | None:
    fs, root = open_fs(join(output, "_staging"), so)
    if not fs.exists(root):
        return None
    for d in sorted(fs.ls(root, detail=False)):
        plan = read_json(join(output, "_staging", d.rstrip("/").rsplit("/", 1)[-1], "plan.json"), so)
        if plan and plan["detector_id"] == detector_id:
            return plan["scan_id"]
    return None


def _score_chunk(chunk: pa.Table, cfg: ScanConfig, bundle: DetectorBundle, scan_id: str, captions: pa.Table | None, so: dict | None) -> pa.Table:
    import ray

    from jobs.pipeline import load_images

    if captions is not None:
        chunk = chunk.join(captions, S.URI, join_type="left outer")
    rows = max(1, min(1024, -(-chunk.num_rows // 16)))
    ds = ray.data.from_arrow([chunk.slice(i, rows) for i in range(0, chunk.num_rows, rows)])
    ds = ds.map_batches(
        load_images,
        fn_kwargs=dict(clip_model=bundle.clip_model, pretrained=bundle.pretrained, storage_options=so, max_pixels=cfg.max_pixels),
        batch_size=cfg.batch_size, batch_format="numpy",
    )
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs=dict(bundle_uri=cfg.detector, scan_id=scan_id, storage_options=so, crash_marker=cfg.crash_actor_once),
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


def run_scan(cfg: ScanConfig) -> dict:
    so = s3_storage_options(cfg.s3_endpoint or None)
    if not (cfg.detector and cfg.input and cfg.output):
        fail("--detector, --input and --output are required")
    try:
        bundle: DetectorBundle = load_bundle(cfg.detector, so)
    except BundleError as exc:
        fail(str(exc))
    captions = None
    if bundle.needs_captions:
        if not cfg.captions:
            fail(f"detector {bundle.detector_id} uses image+text features and needs captions; pass --captions with a uri,caption manifest")
        captions = read_manifest(cfg.captions, so).select([S.URI, S.CAPTION])
    try:
        scan_date = dt.date.fromisoformat(cfg.scan_date).isoformat() if cfg.scan_date else dt.datetime.now(dt.timezone.utc).date().isoformat()
    except ValueError:
        fail(f"--scan-date {cfg.scan_date!r} is not a date (YYYY-MM-DD)")
    started = time.time()

    scan_id = _find_unfinished(cfg.output, bundle.detector_id, so)
    staging = None
    if scan_id:
        staging = join(cfg.output, "_staging", scan_id)
        plan = read_json(join(staging, "plan.json"), so)
        print(f"resuming unfinished scan {scan_id}")
    else:
        scan_id = new_run_id("scan")
        staging = join(cfg.output, "_staging", scan_id)
        listed = list_objects(cfg.input, so)
        done = pa.table({S.URI: pa.array([], pa.string())}) if cfg.full else _committed(cfg.output, bundle.detector_id, so)
        pending = listed if cfg.full else _pending(listed, done)
        n_chunks = max(1, -(-pending.num_rows // cfg.chunk_size)) if pending.num_rows else 0
        for i in range(n_chunks):
            write_parquet(pending.slice(i * cfg.chunk_size, cfg.chunk_size), join(staging, f"chunk-{i:05d}", "input.parquet"), so)
        plan = {"scan_id": scan_id, "detector_id": bundle.detector_id, "chunks": n_chunks, "listed": listed.num_rows,
                "skipped": listed.num_rows - pending.num_rows, "scan_date": scan_date,
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "config": config_dict(cfg)}
        write_json(join(staging, "plan.json"), plan, so)  # the plan is what a resumed scan continues
    fs, _ = open_fs(staging, so)
    counts = {t: 0 for t in TABLES}
    if plan["chunks"]:
        init_ray(cfg.ray_address or None)
    for i in range(plan["chunks"]):
        chunk_dir = join(staging, f"chunk-{i:05d}")
        done_marker = read_json(join(chunk_dir, "_DONE.json"), so)
        if done_marker is None:
            in_fs, in_path = arrow_fs(join(chunk_dir, "input.parquet"), so)
            chunk_in = pq.read_table(in_path, filesystem=in_fs)
            tables = _split(_score_chunk(chunk_in, cfg, bundle, scan_id, captions, so))
            if sum(t.num_rows for k, t in tables.items() if k != "flagged") != chunk_in.num_rows:
                fail(f"chunk {i}: {chunk_in.num_rows} objects in, a different number of rows out")
            for name, t in tables.items():
                for bucket, part in _by_bucket(t).items():
                    write_parquet(part, join(chunk_dir, name, f"{S.BUCKET}={bucket}", f"part-{scan_id}-{i:05d}.parquet"), so)
            done_marker = {name: t.num_rows for name, t in tables.items()}
            write_json(join(chunk_dir, "_DONE.json"), done_marker, so)
            print(f"chunk {i + 1}/{plan['chunks']}: {done_marker}")
            if cfg.fail_after_chunks >= 0 and i + 1 >= cfg.fail_after_chunks:
                fail(f"stopping after {i + 1} chunks (--fail-after-chunks)")
        for name in TABLES:
            counts[name] += done_marker[name]
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
    summary = {
        "scan_id": scan_id, "detector": cfg.detector, "detector_id": bundle.detector_id, "clip_model": bundle.clip_model,
        "threshold": bundle.threshold, "input": cfg.input, "output": cfg.output, "scan_date": plan["scan_date"],
        "listed": plan["listed"], "skipped": plan["skipped"], "scored": counts["scores"], "flagged": counts["flagged"],
        "errors": counts["errors"], "seconds": round(elapsed, 2),
        "images_per_second": round((counts["scores"] + counts["errors"]) / elapsed, 2) if elapsed > 0 else None,
        "started_at": plan["started_at"], "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "schema_version": T.SCHEMA_VERSION, "config": config_dict(cfg),
    }
    write_json(join(cfg.output, "runs", f"{scan_id}.json"), summary, so)
    fs.rm(open_fs(staging, so)[1], recursive=True)
    print(f"scan {scan_id}: listed {summary['listed']}, skipped {summary['skipped']} (unchanged), scored {summary['scored']}, "
          f"flagged {summary['flagged']}, errors {summary['errors']} in {elapsed:.1f} s")
    for name in TABLES:
        print(f"  {name:8s} {join(cfg.output, name)}/")
    return summary


def main(argv=None) -> dict:
    return run_scan(parse_config(ScanConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
