"""Benchmark: scan images/s against a plain single-process loop and the forward pass alone.

Three figures per image set, same model (default ViT-B-32 with random weights and a
random MLP bundle), same machine:

1. ``jobs.scan`` (local Ray: CPU decode tasks + Scorer actors), timed inside the job
   from listing to commit (Ray start-up excluded): end to end over all N images, and
   the steady-state rate N/2 / (t(N) - t(N/2)) from a scan over the first half, which
   cancels the fixed costs (listing, actor start, model load, commit) that a nightly scan
   of millions of images pays once per chunk (both timed after a warm-up scan, since
   Ray's first tasks of a session also start worker processes);
2. a plain loop: PIL decode at full resolution, open_clip preprocess, batched CLIP
   forward + MLP, one process;
3. the forward pass alone (CLIP + MLP) on pre-decoded, preprocessed tensors.

Image sets: full-size photos (3000x2000 JPEG) and small images (~500 px JPEG).

    python -m bench.bench_scan [--clip-model ViT-B-32] [--photos 48] [--small 160] [--gpu]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detector_core.bundle import DetectorBundle, save_bundle
from detector_core.demo import make_image
from detector_core.extractors import FeatureSpec
from detector_core.features import ClipEncoder, feature_dim
from detector_core.model import DetectorMLP


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
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random weights)")
    ap.add_argument("--photos", type=int, default=48, help="number of 3000x2000 photos")
    ap.add_argument("--small", type=int, default=160, help="number of ~500 px images")
    ap.add_argument("--batch-size", type=int, default=32, help="model batch")
    ap.add_argument("--actors", type=int, default=1, help="Scorer actors")
    ap.add_argument("--cpus-per-actor", type=float, default=2.0, help="CPUs (torch threads) per Scorer actor")
    ap.add_argument("--gpu", action="store_true", help="run the model on the GPU")
    args = ap.parse_args(argv)
    from jobs import scan
    from jobs.common import init_ray

    device = "cuda" if args.gpu else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    torch.manual_seed(0)
    mlp = DetectorMLP(feature_dim(args.clip_model, "image")).eval()
    save_bundle(DetectorBundle(model=mlp, features=FeatureSpec(clip_model=args.clip_model, feature_mode="image")), str(tmp / "detector"))
    mlp = mlp.to(device)
    enc = ClipEncoder(args.clip_model, "none", device=device)
    sets = {"photos 3000x2000": write_images(tmp / "photos", args.photos, (3000, 2000), 1),
            "small ~500px": write_images(tmp / "small", args.small, (500, 375), 2)}
    init_ray()
    rows = []

    def run_scan(folder: Path) -> float:
        summary = scan.main(["--detector", str(tmp / "detector"), "--input", str(folder), "--output", str(tmp / f"out-{uuid.uuid4().hex[:6]}"),
                             "--batch-size", str(args.batch_size), "--actors", str(args.actors), "--cpus-per-actor", str(args.cpus_per_actor),
                             "--chunk-size", "1000000", *(["--gpu"] if args.gpu else [])])
        return summary["seconds"]

    for name, paths in sets.items():
        half = paths[0].parent.with_name(paths[0].parent.name + "-half")
        half.mkdir()
        for p in paths[: len(paths) // 2]:
            (half / p.name).symlink_to(p)
        run_scan(half)  # warm-up: Ray's first tasks start worker processes (torch imports) once per session
        t_half = run_scan(half)
        t_full = run_scan(paths[0].parent)
        job = len(paths) / t_full
        steady = (len(paths) - len(paths) // 2) / max(t_full - t_half, 1e-9)
        loop = plain_loop(paths, enc, mlp, args.batch_size)
        fwd = forward_only(paths, enc, mlp, args.batch_size)
        rows.append((name, job, steady, loop, fwd, t_full, t_half))
    print(f"\n=== bench_scan: {args.clip_model}, random weights, device {device}, batch {args.batch_size}, "
          f"{args.actors} actor(s) x {args.cpus_per_actor:g} CPU ===")
    print(f"{'images':20s} {'job e2e':>8s} {'job steady':>11s} {'plain loop':>11s} {'fwd only':>9s} {'steady/loop':>12s} "
          f"{'steady/fwd':>11s}   (images/s; scan seconds full/half)")
    for name, job, steady, loop, fwd, t_full, t_half in rows:
        print(f"{name:20s} {job:8.1f} {steady:11.1f} {loop:11.1f} {fwd:9.1f} {steady / loop:12.2f} {steady / fwd:11.2f}   "
              f"({t_full:.1f} / {t_half:.1f})")


if __name__ == "__main__":
    main()
