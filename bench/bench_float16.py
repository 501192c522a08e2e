"""What keeping features in float16 changes: a detector's scores from the stored float16 vectors against the scan's own.

    python -m jobs.demo && python -m bench.bench_float16 --output demo_out/scans --detector demo_out/detector \\
        --out bench/results/bench_float16-demo-cpu2-2026-12-07.json

The scan scores each object from its float32 features; the features table keeps them as
float16. This re-scores every stored vector with the same bundle (``predict_logits`` on the
CPU) and reports the largest and 99th-percentile differences in score and logit, and whether
any decision (``logit >= threshold_logit``) flips, over every object the output holds.
"""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np
import torch
from scipy.special import expit

from detector_core import schema as S
from detector_core.method.bundle import load_bundle
from detector_core.method.training import predict_logits
from detector_core.tables.catalog import read_table
from detector_core.tables.features import decode
from jobs.common.outputs import write_json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="a scan output with a features table")
    ap.add_argument("--detector", required=True, help="the bundle that scanned it")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.detector, device=torch.device("cpu"))
    features = read_table(args.output, "features").sort_by(S.URI)
    scores = read_table(args.output, "scores", f"detector_id = '{bundle.detector_id}'").sort_by(S.URI)
    keyed = {u: i for i, u in enumerate(features[S.URI].to_pylist())}
    take = [keyed[u] for u in scores[S.URI].to_pylist()]
    matrix = decode(features[S.VECTOR].take(take))
    logits16 = predict_logits(bundle.model, torch.from_numpy(matrix)).double().numpy()
    logits32 = np.asarray(scores[S.LOGIT])
    dscore, dlogit = np.abs(expit(logits16) - expit(logits32)), np.abs(logits16 - logits32)
    flips = int(((logits16 >= bundle.threshold_logit) != (logits32 >= bundle.threshold_logit)).sum())
    result = {"objects": int(len(take)), "width": int(matrix.shape[1]), "bytes_per_vector": int(2 * matrix.shape[1]),
              "max_score_diff": float(dscore.max()), "p99_score_diff": float(np.quantile(dscore, 0.99)),
              "max_logit_diff": float(dlogit.max()), "p99_logit_diff": float(np.quantile(dlogit, 0.99)), "decision_flips": flips,
              "detector": bundle.detector_id, "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    print(result)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
