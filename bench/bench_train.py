"""Benchmark: training examples/s on cached 1536-d features (1 vs 2 Ray Train workers), and
the embedding stage's images/s.

Writes a synthetic feature cache in the jobs.embed format (ViT-L-14 image+text width,
1536), trains on it with ``jobs.train --features`` for a few epochs per worker count, and
reports the median examples/s of the epochs after the first (the first streams the shard
from Ray Data; later ones run from memory). Then embeds demo images with ``jobs.embed``
and reports its images/s.

    python -m bench.bench_train [--rows 16384] [--epochs 4] [--embed-images 512] [--clip-model test-tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector_core.method.cache import fixed_list
from jobs.common.outputs import write_json


def synthetic_cache(root: Path, rows: int, dim: int = 1536) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(rows) < 0.8).astype(np.int8)
    x = rng.normal(size=(rows, dim)).astype(np.float32) + y[:, None] * 0.05
    split = np.where(rng.random(rows) < 0.1, "val", "train")
    n = rows
    t = pa.table({
        "uri": [f"synthetic/{i}" for i in range(n)], "label": pa.array(y, pa.int8()), "split": split.tolist(),
        "error_stage": pa.nulls(n, pa.string()), "features": fixed_list(x, np.ones(n, bool)),
    })
    (root / "data").mkdir(parents=True)
    for i in range(0, n, 4096):
        pq.write_table(t.slice(i, 4096), root / "data" / f"part-{i:08d}.parquet")
    write_json(str(root / "_SUCCESS.json"), {"clip_model": "ViT-L-14", "pretrained": "none", "feature_mode": "image+text", "feature_dim": dim})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384, help="rows in the synthetic 1536-d cache")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run")
    ap.add_argument("--batch-size", type=int, default=2048, help="global batch (paper: 2048)")
    ap.add_argument("--embed-images", type=int, default=512, help="demo images for the embedding figure")
    ap.add_argument("--clip-model", default="test-tiny", help="CLIP for the embedding figure")
    ap.add_argument("--gpu", action="store_true", help="GPU workers and actors")
    args = ap.parse_args(argv)
    from jobs import embed, train
    from jobs.common.ray_setup import init_ray

    init_ray()
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    synthetic_cache(tmp / "cache", args.rows)
    results = {}
    for workers in (1, 2):
        out = tmp / f"run{workers}"
        train.main(["--features", str(tmp / "cache"), "--output", str(out), "--epochs", str(args.epochs), "--workers", str(workers),
                    "--batch-size", str(args.batch_size), *(["--gpu"] if args.gpu else [])])
        hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        results[workers] = statistics.median(h["train_examples_per_s"] for h in hist[1:])
    from detector_core.demo import write_dataset

    rows = write_dataset(tmp / "images", args.embed_images // 2, args.embed_images - args.embed_images // 2)
    pq.write_table(pa.Table.from_pylist(rows), tmp / "manifest.parquet")
    summary = embed.main(["--manifest", str(tmp / "manifest.parquet"), "--output", str(tmp / "emb"), "--clip-model", args.clip_model,
                          "--batch-size", "128", *(["--gpu"] if args.gpu else [])])
    print("\n=== bench_train ===")
    for w, v in results.items():
        print(f"training, {w} worker(s), batch {args.batch_size}, width 1536, cvar_auc + SAM: {v:10.0f} examples/s")
    print(f"embedding {args.embed_images} demo images with {args.clip_model}: {summary['images_per_second']:.1f} images/s "
          f"(whole stage incl. Ray start-up: {summary['seconds']} s)")


if __name__ == "__main__":
    main()
