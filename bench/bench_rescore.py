"""What re-scoring the history from stored features costs: ``jobs.rescore`` over 10⁶ stored 768-d vectors.

    python -m bench.bench_rescore --rows 1000000 --out bench/results/bench_rescore-cpu2-2026-12-07.json

Builds a scan output whose ``features`` table holds ``--rows`` float16 vectors of ViT-L/14's
width (768; synthetic, normal σ 0.5) in files of 250,000 rows, committed through the real
unit path, and a detector bundle with a head of the paper's size (three 768×768 blocks). Then:
the steady state of one ``Rescorer`` (one process, one file, its torch threads), and the whole
``python -m jobs.rescore --all`` as a user runs it, in its own process (Ray's start, planning,
the actors, the commit), timed from outside.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from detector_core import schema as S
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.model import DetectorMLP
from detector_core.tables import definitions as T
from detector_core.tables.catalog import ScanOutput, data_file_path
from detector_core.tables.features import encode
from jobs.common.outputs import write_json

FILE_ROWS = 250_000
DAY = dt.date(2026, 11, 23)


def build(folder: str, rows: int) -> tuple[ScanOutput, str]:
    out = ScanOutput.open(f"{folder}/out")
    spec = FeatureSpec(clip_model="ViT-L-14", pretrained="openai", feature_mode="image")
    torch.manual_seed(0)
    bundle_dir = f"{folder}/detector"
    save_bundle(DetectorBundle(model=DetectorMLP(spec.dim).eval(), features=spec), bundle_dir)
    rng = np.random.default_rng(0)
    when = dt.datetime.combine(DAY, dt.time(2), dt.timezone.utc)
    for unit, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        x = rng.normal(0, 0.5, (n, spec.dim)).astype(np.float32)
        table = pa.table({S.URI: [f"s3://b/{i:09d}.jpg" for i in range(start, start + n)], S.ETAG: pa.nulls(n, pa.string()),
                          S.SIZE: pa.nulls(n, pa.int64()), S.FEATURE_ID: [spec.id] * n, S.SCAN_ID: ["scan-1"] * n,
                          S.SCANNED_AT: pa.array([when] * n, pa.timestamp("us", tz="UTC")), S.VECTOR: encode(x, np.ones(n, bool)),
                          S.SCAN_DATE: pa.array([DAY] * n, pa.date32()), S.BUCKET: ["b"] * n})
        path = data_file_path(out.uri, T.FEATURES, DAY.isoformat(), "b", "scan-1")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(T.conform(table, T.FEATURES), path)
        out.commit_unit({"scan_id": "scan-1", "unit": unit, "files": {T.FEATURES: [path]}, "runs": []})
    return out, bundle_dir


def main(argv=None) -> dict:
    from jobs.rescore import Rescorer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="stored vectors")
    ap.add_argument("--actors", type=int, default=2, help="jobs.rescore --actors")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-rescore-")
    t0 = time.perf_counter()
    out, bundle_dir = build(folder, args.rows)
    built = round(time.perf_counter() - t0, 1)
    first = next(t.file.file_path for t in out.table(T.FEATURES).scan().plan_files())
    spec_id = FeatureSpec(clip_model="ViT-L-14", pretrained="openai", feature_mode="image").id
    scorer = Rescorer(bundle_dir, out.uri, "rescore-bench", spec_id, 65_536)
    t0 = time.perf_counter()
    scorer(pa.table({"path": [first]}))
    one = time.perf_counter() - t0
    steady = round(FILE_ROWS / one, 1)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.rescore", "--detector", bundle_dir, "--output", out.uri, "--all",
                           "--actors", str(args.actors)], capture_output=True, text=True)
    whole = round(time.perf_counter() - t0, 1)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    result = {"rows": args.rows, "width": 768, "build_s": built, "torch_threads": torch.get_num_threads(),
              "steady_state_one_rescorer_rows_per_s": steady, "steady_state_per_core_rows_per_s": round(steady / torch.get_num_threads(), 1),
              "whole_command_s": whole, "whole_command_rows_per_s": round(args.rows / whole, 1), "actors": args.actors,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
