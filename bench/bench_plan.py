"""Benchmark: planning a scan of N objects, the driver's memory and time, the previous code and this one side by side.

N zero-byte files under a local prefix (100 folders; each one is settled as a decode error
``empty``, so a first scan runs the whole pipeline per object and a re-scan has nothing to do),
for N in 10⁴, 10⁵, 10⁶. For each N, each code runs as ``python -m jobs.scan`` in a fresh
process with its own local Ray (``bench.legacy.scan_process``; Ray started before the job's
clock, as on a cluster): a first scan into a fresh output, then a no-op re-scan. Reported: the
job's own seconds (listing to the last commit), the process's wall seconds (Python and
Ray start-up included, as a user waits for it), and the driver process's peak RSS (``ru_maxrss``: imports included, so the
growth from the smallest N is the figure that matters). "Previous" is ``PREVIOUS_REF``, the
commit before the plan moved onto the cluster (the driver listed with ``fs.find``, read the
settled keys from the tables and anti-joined in its own memory).

    python -m bench.bench_plan [--sizes 10000,100000,1000000] [--skip-previous] [--out bench/results/bench_plan.json]
    python -m bench.bench_plan --refresh 1000000,10,10000      # append + compaction against upsert, for the state table
    python -m bench.bench_plan --plan-only 1000,10000,100000,300000  # the plan alone, in the driver and on the cluster

``--plan-only``: ``jobs.scanning.planning.plan`` alone on N zero-byte files (fresh output, empty state), with
``where="driver"`` and ``where="cluster"`` in one process whose Ray is already up: seconds and the
peak of Arrow's memory pool in the driver; what ``--driver-plan-max`` is chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from bench.legacy import legacy_tree, scan_process
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.model import DetectorMLP
from jobs.common.outputs import write_json

PREVIOUS_REF = "d595109"


def make_objects(root: Path, n: int) -> None:
    """n zero-byte files in 100 folders."""
    for d in range(100):
        (root / f"d{d:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        fd = os.open(root / f"d{i % 100:02d}" / f"obj_{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


def run(code: str, tree, bundle: Path, objects: Path, out: Path) -> dict:
    args = ["--detector", str(bundle), "--input", str(objects), "--output", str(out)]
    row = {"code": code}
    for phase in ("first", "noop"):
        t0 = time.time()
        s = scan_process(args, tree, timeout=3600)
        row[phase] = {"seconds": s["seconds"], "wall_seconds": round(time.time() - t0, 1), "driver_peak_rss_mb": round(s["driver_peak_rss_mb"], 1), "listed": s["listed"],
                      "skipped": s["skipped"], "errors": s["errors"], "plan": s.get("plan", {}).get("plan_seconds")}
        print(json.dumps({"n": s["listed"], **row}), flush=True)
    return row


def _scores(uris: list[str], scan_id: str, etag: str) -> pa.Table:
    import datetime as dt

    from detector_core import schema as S
    from detector_core.tables import definitions as T

    n = len(uris)
    now = dt.datetime.now(dt.timezone.utc)
    cols = {S.URI: uris, S.ETAG: [etag] * n, S.SIZE: [1] * n, S.SCORE: [0.5] * n, S.THRESHOLD: [0.5] * n, S.FLAGGED: [False] * n,
            S.DETECTOR_ID: ["d"] * n, S.SCAN_ID: [scan_id] * n, S.SCANNED_AT: [now] * n, S.SCAN_DATE: [now.date()] * n,
            S.BUCKET: ["local"] * n}
    schema = T.SCORES_SCHEMA
    return pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)


def refresh_strategies(n: int, nights: int, per_night: int) -> list[dict]:
    """Keeping the state current: append + compaction every 8 files, against rewriting each touched partition (upsert).

    A history of n scored objects, then ``nights`` nights of ``per_night`` new ones committed
    through ``commit_unit``; after each night ``refresh_state`` folds them in. Reported per
    strategy: seconds per nightly refresh (median), state rows rewritten per night, state files.
    """
    import statistics

    from detector_core.tables.catalog import ScanOutput, data_file_path
    from detector_core.tables.state_table import open_state
    from jobs.common.outputs import write_parquet
    from jobs.scanning.refresh import refresh_state

    rows = []
    for name, compact_at in (("append+compact(8)", 8), ("upsert (rewrite touched partitions)", 1)):
        work = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
        out = ScanOutput.open(str(work / "out"))

        def night(i: int, uris: list[str], out=out) -> None:
            path = data_file_path(out.uri, "scores", "2026-11-27", "local", f"night{i}")
            for lo in range(0, len(uris), 1_000_000):
                write_parquet(_scores(uris[lo:lo + 1_000_000], f"night{i}", "e"), path.replace(".parquet", f"-{lo}.parquet"))
            files = [p for p in out.fs.ls(path.rsplit("/", 1)[0]) if f"night{i}-" in p]
            out.commit_unit({"scan_id": f"night{i}", "unit": 0, "files": {"scores": files}, "runs": []})

        night(0, [f"/objects/base/{j:09d}.jpg" for j in range(n)])
        first = refresh_state(out, compact_at=compact_at)
        seconds, written = [], []
        for i in range(1, nights + 1):
            night(i, [f"/objects/night{i}/{j:07d}.jpg" for j in range(per_night)])
            r = refresh_state(out, compact_at=compact_at)
            seconds.append(r["seconds"])
            written.append(r["state_rows_written"])
        files = sum(len(v) for v in open_state(out)[1].values())
        rows.append({"strategy": name, "state_rows": n + nights * per_night, "first_build_seconds": first["seconds"],
                     "nightly_refresh_seconds_median": statistics.median(seconds), "rows_written_per_night_median": statistics.median(written),
                     "state_files_after": files})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def plan_only(sizes: list[int]) -> list[dict]:
    import gc

    from detector_core.tables.catalog import ScanOutput
    from jobs.common.ray_setup import init_ray
    from jobs.scanning.planning import plan

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="bench-plan-only-"))
    rows = []
    try:
        for n in sizes:
            objects = work / f"objects-{n}"
            make_objects(objects, n)
            for where in ("cluster", "driver", "cluster", "driver"):  # twice each: the first cluster plan also warms Ray's workers
                out = ScanOutput.open(str(work / f"out-{n}-{where}"))
                gc.collect()
                pool = pa.default_memory_pool()
                base = pool.bytes_allocated()
                peak0 = pool.max_memory()
                t0 = time.perf_counter()
                paths, counts = plan(out, str(objects), ["d"], f"s-{where}", where=where)
                seconds = time.perf_counter() - t0
                import resource

                row = {"n": n, "where": where, "seconds": round(seconds, 3), "work": counts["work"],
                       "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       "arrow_peak_mb": round(max(0, pool.max_memory() - max(peak0, base)) / 2**20, 1) if where == "driver" else None}
                print(json.dumps(row), flush=True)
                rows.append(row)
            shutil.rmtree(objects, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated object counts")
    ap.add_argument("--skip-previous", action="store_true", help="measure only this checkout's code")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--refresh", default="", help="instead: compare state refresh strategies, N,NIGHTS,PER_NIGHT (e.g. 1000000,10,10000)")
    ap.add_argument("--plan-only", default="", help="instead: time jobs.scanning.planning.plan alone, in the driver and on the cluster, for these N")
    args = ap.parse_args(argv)
    if args.plan_only:
        report = {"cpus": os.cpu_count(), "plan_only": plan_only([int(x) for x in args.plan_only.split(",")])}
        if args.out:
            write_json(args.out, report)
        return report
    if args.refresh:
        from jobs.common.ray_setup import init_ray

        init_ray()
        n, nights, per_night = (int(x) for x in args.refresh.split(","))
        report = {"cpus": os.cpu_count(), "refresh": refresh_strategies(n, nights, per_night)}
        if args.out:
            write_json(args.out, report)
        return report
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    bundle = work / "detector"
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny", feature_mode="image"),
                               threshold_logit=0.0), str(bundle))
    previous = None if args.skip_previous else legacy_tree(PREVIOUS_REF)
    results = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            objects = work / f"objects-{n}"
            t0 = time.time()
            make_objects(objects, n)
            print(f"{n} objects written in {time.time() - t0:.1f} s", flush=True)
            for code, tree in (("previous", previous), ("new", None)):
                if code == "previous" and tree is None:
                    continue
                out = work / f"out-{code}-{n}"
                results.append({"n": n, **run(code, tree, bundle, objects, out)})
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(objects, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"cpus": os.cpu_count(), "previous_ref": PREVIOUS_REF, "results": results}
    for code in ("previous", "new"):
        rows = [r for r in results if r["code"] == code]
        if len(rows) > 1:
            report[f"{code}_growth_mb"] = {p: round(rows[-1][p]["driver_peak_rss_mb"] - rows[0][p]["driver_peak_rss_mb"], 1)
                                           for p in ("first", "noop")}
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
