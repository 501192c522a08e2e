"""Benchmark: a scan's ``Scorer`` actor from a cold process to its first batch: the imports, then the model build.

Each run is a fresh Python process, as a new actor's worker is: it imports what unpickling the
``Scorer`` class imports, then open_clip, then builds the ``Scorer`` of a bundle whose CLIP
loads its weights from a file (random weights saved once, as production loads real ones).
``--against REF`` times the same in the tree of commit ``REF`` (``bench.legacy.legacy_tree``),
alternating, so both codes meet the same machine.

    python -m bench.bench_actor_start [--clip-model ViT-B-32] [--runs 3] [--against 11e2d11] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.legacy import ROOT, legacy_tree

# Run in the tree under test (its own module paths: the wings, or the flat layout before them).
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
try:
    from jobs.scanning.pipeline import Scorer
    from detector_core.method.features import _open_clip
except ImportError:  # a tree from before the wings
    from jobs.pipeline import Scorer
    from detector_core.features import _open_clip
t1 = time.perf_counter()
_open_clip()
t2 = time.perf_counter()
Scorer([sys.argv[1]], "bench")
t3 = time.perf_counter()
print("ACTOR-START " + json.dumps({"imports_s": t1 - t0, "open_clip_s": t2 - t1, "build_s": t3 - t2, "total_s": t3 - t0}))
"""


def make_bundle(clip_model: str, folder: Path) -> Path:
    """A detector bundle on ``clip_model`` whose random CLIP weights are loaded from a file in ``folder``."""
    import torch

    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec
    from detector_core.method.features import ClipEncoder, feature_dim
    from detector_core.method.model import DetectorMLP

    weights = folder / f"{clip_model}.pt"
    torch.save(ClipEncoder(clip_model, "none").model.state_dict(), weights)
    torch.manual_seed(0)
    mlp = DetectorMLP(feature_dim(clip_model, "image")).eval()
    spec = FeatureSpec(clip_model=clip_model, pretrained=str(weights), feature_mode="image")
    save_bundle(DetectorBundle(model=mlp, features=spec), str(folder / "detector"))
    return folder / "detector"


def cold_start(bundle: Path, tree: Path) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(bundle)], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    for line in res.stdout.splitlines():
        if line.startswith("ACTOR-START "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"the cold start failed ({res.returncode}): {res.stderr[-2000:]}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random weights, saved to a file and loaded from it)")
    ap.add_argument("--runs", type=int, default=3, help="cold starts per code (alternating)")
    ap.add_argument("--against", default="", help="also time the tree of this commit (e.g. the last one before a change)")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    bundle = make_bundle(args.clip_model, Path(tempfile.mkdtemp(prefix="bench-actor-")))
    trees = {"this checkout": ROOT, **({f"commit {args.against}": legacy_tree(args.against)} if args.against else {})}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(cold_start(bundle, tree))
    out = {"clip_model": args.clip_model, "runs": runs,
           "median": {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in runs.items()}}
    print(f"\n=== bench_actor_start: {args.clip_model}, weights from a file, CPU, median of {args.runs} cold processes ===")
    print(f"{'code':22s} {'imports s':>9s} {'open_clip s':>11s} {'build s':>8s} {'total s':>8s}")
    for name, m in out["median"].items():
        print(f"{name:22s} {m['imports_s']:9.2f} {m['open_clip_s']:11.2f} {m['build_s']:8.2f} {m['total_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
