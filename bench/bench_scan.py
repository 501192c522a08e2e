"""Benchmark: the streaming scan against the previous chunk-restart scan, a plain loop and the forward pass.

For each image set (full-size 3000x2000 JPEG photos; ~500 px JPEGs), on one machine in one run:

1. the scan of this checkout and the scan of ``bench.legacy.LEGACY_REF`` (one Ray Data
   execution per chunk, rows collected by the driver), each as ``python -m jobs.scan`` in a
   fresh process with its own local Ray and **default flags** except ``--chunk-size``
   (N/4, so both commit four units): end to end over all N images (timed inside the job,
   listing to commit: actor start, model loads and commits included, the local Ray's own
   start-up not, as on a cluster where Ray is up), and the steady-state rate
   N/2 / (t(N) - t(N/2)) from a second scan of the first half, which cancels the fixed
   costs; model loads per scan (old code: one pool start per chunk, 4, by construction: marked *),
   the driver's peak RSS, and (new code) seconds per commit;
   and (this checkout) the whole command as a user meets it: ``python -m jobs.scan`` with its own
   private Ray started inside it, wall time from launch to exit (``cmd``);
2. a plain loop: PIL decode at full resolution, open_clip preprocess, batched CLIP
   forward + MLP, one process;
3. the forward pass alone (CLIP + MLP) on pre-decoded, preprocessed tensors.

    python -m bench.bench_scan [--clip-model ViT-B-32] [--photos 240] [--small 480] [--skip-legacy | --against REF] [--also=FLAGS]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detector_core.demo import make_image
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.features import ClipEncoder, feature_dim
from detector_core.method.model import DetectorMLP


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = make_image(rng, "real", size=(size[1] // 8, size[0] // 8))
        im = small.resize(size, Image.BICUBIC)
        arr = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, size=(size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        p = folder / f"img_{i:04d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def plain_loop(paths, enc: ClipEncoder, mlp, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        x = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
        with torch.inference_mode():
            mlp(enc.encode(x, None, "image").to(enc.device))
    return len(paths) / (time.perf_counter() - start)


def forward_only(paths, enc: ClipEncoder, mlp, batch: int) -> float:
    xs = [torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch]]) for i in range(0, len(paths), batch)]
    start = time.perf_counter()
    for x in xs:
        with torch.inference_mode():
            mlp(enc.encode(x, None, "image").to(enc.device))
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random weights, saved to a file and loaded from it)")
    ap.add_argument("--photos", type=int, default=240, help="number of 3000x2000 photos")
    ap.add_argument("--small", type=int, default=480, help="number of ~500 px images")
    ap.add_argument("--batch-size", type=int, default=32, help="model batch of the plain loop and forward-only figures")
    ap.add_argument("--gpu", action="store_true", help="run the model on the GPU (scans get --gpu)")
    ap.add_argument("--skip-legacy", action="store_true", help="only this checkout's scan")
    ap.add_argument("--against", default="", help="the commit whose scan to compare with (default: bench.legacy.LEGACY_REF, the per-chunk scan)")
    ap.add_argument("--also", default="", help="this checkout's scan again with these extra flags, as its own row "
                    "(e.g. --also=--no-keep-features: what keeping features costs)")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    from bench.legacy import LEGACY_REF, legacy_tree, scan_process

    device = "cuda" if args.gpu else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    # Random CLIP weights, loaded from a file as production loads real ones (a Scorer then builds the model
    # without drawing its random init: that start-up cost is what production pays).
    weights = tmp / f"{args.clip_model}.pt"
    torch.save(ClipEncoder(args.clip_model, "none").model.state_dict(), weights)
    torch.manual_seed(0)
    mlp = DetectorMLP(feature_dim(args.clip_model, "image")).eval()
    save_bundle(DetectorBundle(model=mlp, features=FeatureSpec(clip_model=args.clip_model, pretrained=str(weights), feature_mode="image")),
                str(tmp / "detector"))
    mlp = mlp.to(device)
    enc = ClipEncoder(args.clip_model, str(weights), device=device)
    sets = {"photos 3000x2000": write_images(tmp / "photos", args.photos, (3000, 2000), 1),
            "small ~500px": write_images(tmp / "small", args.small, (500, 375), 2)}
    against = args.against or LEGACY_REF
    codes = {"new": None} if args.skip_legacy else {"new": None, f"old {against}": legacy_tree(against)}
    extra = {f"new {args.also}": args.also.split()} if args.also else {}
    codes.update({name: None for name in extra})
    rows = []

    def command(folder: Path, n: int) -> float:
        """Seconds of ``python -m jobs.scan`` from launch to exit, its private Ray's start included."""
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.scan", "--detector", str(tmp / "detector"), "--input", str(folder), "--output",
                        str(tmp / f"out-{uuid.uuid4().hex[:6]}"), *(["--gpu"] if args.gpu else [])], check=True, env=env,
                       capture_output=True, cwd=Path(__file__).resolve().parents[1])
        return time.perf_counter() - t0

    def run(tree, folder: Path, n: int, flags: list[str]) -> dict:
        return scan_process(["--detector", str(tmp / "detector"), "--input", str(folder), "--output", str(tmp / f"out-{uuid.uuid4().hex[:6]}"),
                             "--chunk-size", str(max(1, n // 4)), *(["--gpu"] if args.gpu else []), *flags], tree)

    for name, paths in sets.items():
        half = paths[0].parent.with_name(paths[0].parent.name + "-half")
        half.mkdir()
        for p in paths[: len(paths) // 2]:
            (half / p.name).symlink_to(p)
        loop = plain_loop(paths, enc, mlp, args.batch_size)
        fwd = forward_only(paths, enc, mlp, args.batch_size)
        for code, tree in codes.items():
            s_half = run(tree, half, len(paths) // 2, extra.get(code, []))
            s_full = run(tree, paths[0].parent, len(paths), extra.get(code, []))
            steady = (len(paths) - len(paths) // 2) / max(s_full["seconds"] - s_half["seconds"], 1e-9)
            cmd = len(paths) / command(paths[0].parent, len(paths)) if code == "new" else None
            rows.append({"images": name, "code": code, "e2e": len(paths) / s_full["seconds"], "steady": steady, "loop": loop, "fwd": fwd,
                         "cmd": cmd, "planned_in": s_full.get("plan", {}).get("planned_in"),
                         # The old scan started a new actor pool per chunk (4 here): loads = chunks x actors, by construction.
                         "model_loads": s_full.get("model_loads", "4*"), "units": s_full.get("commit_units"),
                         "rss_mb": s_full["driver_peak_rss_mb"],
                         "commit_s": statistics.median(s_full["commit_seconds"]) if s_full.get("commit_seconds") else None,
                         "t_full": s_full["seconds"], "t_half": s_half["seconds"]})
    print(f"\n=== bench_scan: {args.clip_model}, random weights from a file, device {device}, default scan flags, --chunk-size N/4 ===")
    print(f"{'images':18s} {'code':13s} {'e2e':>6s} {'steady':>7s} {'loop':>6s} {'fwd':>6s} {'e2e/loop':>9s} {'steady/fwd':>10s} "
          f"{'cmd/loop':>8s} {'loads':>5s} {'driver MB':>9s} {'commit s':>8s}   (images/s; scan s full/half)")
    for r in rows:
        commit = f"{r['commit_s']:.3f}" if r["commit_s"] is not None else "-"
        cmd = f"{r['cmd'] / r['loop']:.2f}" if r["cmd"] else "-"
        print(f"{r['images']:18s} {r['code']:13s} {r['e2e']:6.1f} {r['steady']:7.1f} {r['loop']:6.1f} {r['fwd']:6.1f} "
              f"{r['e2e'] / r['loop']:9.2f} {r['steady'] / r['fwd']:10.2f} {cmd:>8s} {str(r['model_loads']):>5s} {r['rss_mb']:9.0f} {commit:>8s}   "
              f"({r['t_full']:.1f} / {r['t_half']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
