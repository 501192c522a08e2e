"""One-shot GPU check: the figures a session lent a GPU records first, as one JSON file.

    bash bench/gpu_check.sh [OUT_DIR]          # on the GPU machine; writes OUT_DIR/gpu_check.json
    python -m bench.gpu_check --out gpu_check.json [--seconds 20]

Random weights throughout (timings do not depend on them), no network, well under 8
minutes on one H100:

1. ``vit_l14_forward``: the ViT-L-14 image tower (``ClipEncoder``, bf16 autocast) on
   preprocessed 224 px batches already on the GPU: images/s, the ceiling of a scan.
2. ``scan_steady``: the scan's own stages on synthetic 3000x2000 JPEG photos with a
   ViT-L-14 bundle: ``jobs.scanning.decoding.load_images`` (read, draft decode, crop) in a pool of
   CPU processes feeding ``jobs.scanning.pipeline.Scorer`` (features + MLP + decision), timed after
   a warm-up; the same functions Ray Data runs as tasks and actors. Ray itself is not used
   here: its wheel (79 MB) is larger than what may travel to the GPU machine, so this is
   the pipeline's rate without Ray's scheduling, and the JSON says so. It also records the
   steady phase's share inside the ``Scorer``, the pool's decode rate with nobody scoring,
   and the ``Scorer`` alone on one decoded batch: which side bounds the rate.
   ``scan_steady_nvjpeg``: the same with the bundle's decode backend ``nvjpeg``: the pool reads
   bytes and parses headers, the ``Scorer`` decodes baseline JPEGs on the GPU in batches.
3. ``decode_rates``: decode only, on the same 6 MP photos: the CPU paths on one core (``pil``:
   draft decode + Pillow resize; ``nvjpeg`` fallback: full decode + tensor resize), the GPU's
   hardware path (``device_decode.decode_inputs`` on CUDA) at batch 64/128/256, and how far its
   inputs and ViT-L-14 features are from the CPU path's, and whether two runs give the same bits.
4. ``forward_variants``: the ViT-L-14 tower under each ``features.FORWARDS`` setting (autocast,
   bf16 weights, torch.compile, CUDA graphs) and a batch sweep, each with its largest score
   difference from autocast on the same inputs (a random MLP head): the tolerance a bundle would
   record.
5. ``dnf_features``: the DNF extractor with the DDPM-256 UNet architecture, bf16.
6. ``sam_step``: one cvar_auc + SAM step at batch 2048 x 1536 with the exact on-device
   loss, and the loss alone against the reference's per-batch CPU scalar search.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def vit_l14_forward(device: str, batch: int, seconds: float) -> dict:
    from detector_core.method.features import ClipEncoder

    torch.manual_seed(0)
    enc = ClipEncoder("ViT-L-14", "none", device=device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        for _ in range(3):
            enc.encode(x, None, "image")
        _sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc.encode(x, None, "image")
            n += batch
        _sync()
        dt = time.perf_counter() - t0
    return {"images_per_s": round(n / dt, 1), "batch": batch, "precision": enc.precision if hasattr(enc, "precision") else "auto"}


def _photo(args) -> str:
    from bench.bench_scan import write_images

    folder, i = args
    p = write_images(Path(folder) / f"p{i:04d}", 1, (3000, 2000), 1000 + i)[0]
    return str(p)


def _load(uris: list[str]) -> dict:
    from jobs.scanning.decoding import ENCODED, load_images

    out = load_images({"uri": np.array(uris, dtype=object)}, preps=_PREPS)
    if ENCODED in out:  # the bytes stay out of the pool's pipe (Ray's object store shares them; a pipe would copy ~2 MB each)
        out[ENCODED] = np.array([None if e is None else u for e, u in zip(out[ENCODED], uris)], dtype=object)
    return out


def _with_bytes(loaded: dict) -> dict:
    from jobs.scanning.decoding import ENCODED

    if ENCODED in loaded:
        loaded[ENCODED] = np.array([None if u is None else Path(u).read_bytes() for u in loaded[ENCODED]], dtype=object)
    return loaded


_PREPS: list = []


def _init_worker(preps):
    global _PREPS
    _PREPS = preps
    torch.set_num_threads(1)


def _photos(tmp: Path, photos: int, workers: int) -> list[str]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_photo, [(str(tmp), i) for i in range(photos)])


def scan_steady(device: str, photos: int, objects: int, batch: int, workers: int, decode: str = "pil", forward: str = "autocast") -> dict:
    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec, preprocess_for
    from detector_core.method.model import DetectorMLP
    from jobs.scanning.decoding import ENCODED
    from jobs.scanning.pipeline import Scorer, feature_specs

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    torch.manual_seed(0)
    save_bundle(DetectorBundle(model=DetectorMLP(768).eval(), features=FeatureSpec(clip_model="ViT-L-14", feature_mode="image", decode=decode)),
                str(tmp / "detector"))
    ctx = mp.get_context("spawn")
    paths = _photos(tmp, photos, workers)
    # The device is passed, as the scan passes gpu=cfg.gpu: a Scorer picks none on its own (it would run on the CPU).
    scorer = Scorer([str(tmp / "detector")], scan_id="gpu-check", device=device, forward=forward, batch_size=batch)
    uris = [paths[i % len(paths)] for i in range(objects)]
    batches = [uris[i:i + batch] for i in range(0, len(uris), batch)]
    warm = max(2, len(batches) // 5)
    preps = [preprocess_for(spec) for spec in feature_specs(scorer.bundles)]
    with ctx.Pool(workers, initializer=_init_worker, initargs=(preps,)) as pool:
        t0 = t_warm = time.perf_counter()
        n_warm, score_s = 0, 0.0
        for i, loaded in enumerate(map(_with_bytes, pool.imap(_load, batches))):
            if len(loaded["uri"]) == batch:
                one = loaded  # a full batch for the Scorer-alone figure below (a Scorer does not change its input)
            ts = time.perf_counter()
            out = scorer(loaded)  # returns host arrays, so the GPU work is done when it returns
            assert out.num_rows == len(loaded["uri"])
            if i + 1 > warm:
                score_s += time.perf_counter() - ts
            if i + 1 == warm:
                _sync()
                t_warm, n_warm = time.perf_counter(), sum(len(b) for b in batches[:warm])
        _sync()
        t1 = time.perf_counter()
        # Which side bounds the steady rate: the same pool decoding with nobody scoring, and
        # the Scorer alone on one decoded batch again and again.
        some = batches[warm:warm + max(4, 2 * workers)]
        td = time.perf_counter()
        n_dec = sum(len(d["uri"]) for d in pool.imap(_load, some))
        decode_only = n_dec / (time.perf_counter() - td)
    ts, reps = time.perf_counter(), 8
    for _ in range(reps):
        scorer(one)
    _sync()
    score_only = reps * len(one["uri"]) / (time.perf_counter() - ts)
    steady_s = t1 - t_warm
    return {"images_per_s_steady": round((objects - n_warm) / steady_s, 1), "images_per_s_all": round(objects / (t1 - t0), 1),
            "steady_share_in_scorer": round(score_s / steady_s, 3), "decode_only_images_per_s": round(decode_only, 1),
            "scorer_only_images_per_s": round(score_only, 1),
            "scorer_device": str(scorer.device), "decode": decode, "forward": forward,
            "gpu_decoded_share": round(float(np.mean([e is not None for e in one.get(ENCODED, [None])])), 3), "objects": objects, "distinct_photos": photos, "batch": batch, "decode_processes": workers,
            "note": "jobs.scanning.decoding.load_images in a process pool -> jobs.scanning.pipeline.Scorer in one process; no Ray (wheel too large to carry)"}


def decode_rates(device: str, photos: int, workers: int) -> dict:
    """Decode-only rates on 6 MP baseline JPEGs, and the hardware path's distance from the CPU path."""
    from detector_core.method.features import ClipEncoder, clip_input
    from detector_core.sources.device_decode import decode_inputs
    from detector_core.sources.images import decode_image
    from detector_core.sources.jpeg_header import read_header
    from jobs.scanning.decoding import load_images

    tmp = Path(tempfile.mkdtemp(prefix="gpu-decode-"))
    paths = _photos(tmp, photos, workers)
    datas = [Path(p).read_bytes() for p in paths]
    torch.set_num_threads(1)
    res: dict = {"photos": photos, "megapixels": 6.0, "mean_file_mb": round(sum(map(len, datas)) / len(datas) / 2**20, 2)}
    for name, prep in (("cpu_pil_draft_per_core", clip_input("ViT-L-14", "none")),
                       ("cpu_nvjpeg_fallback_per_core", clip_input("ViT-L-14", "none", decode="nvjpeg"))):
        some = paths[: min(24, photos)]
        t = time.perf_counter()
        if prep.decode == "pil":
            load_images({"uri": np.array(some, dtype=object)}, preps=[prep])
        else:  # what a CPU task does with a file the router keeps on the CPU: full decode, tensor resize
            for d in datas[: len(some)]:
                prep.to_input(decode_image(d).image)
        res[name] = round(len(some) / (time.perf_counter() - t), 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if device != "cuda":
        return {**res, "gpu": "no CUDA device: hardware path not measured"}
    prep = clip_input("ViT-L-14", "none", decode="nvjpeg")
    orients = [read_header(d).orientation for d in datas]
    for b in (64, 128, 256):
        batch = [datas[i % len(datas)] for i in range(b)]
        o = [orients[i % len(datas)] for i in range(b)]
        decode_inputs(batch[:8], o[:8], prep, device)
        _sync()
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 5:
            decode_inputs(batch, o, prep, device)
            n += b
        _sync()
        res[f"gpu_hardware_batch{b}"] = round(n / (time.perf_counter() - t), 1)
    gpu1, _ = decode_inputs(datas, orients, prep, device)
    gpu2, _ = decode_inputs(datas, orients, prep, device)
    cpu = torch.from_numpy(np.stack([prep.to_input(decode_image(d).image) for d in datas])).to(device)
    diff = (gpu1.int() - cpu.int()).abs()
    enc = ClipEncoder("ViT-L-14", "none", device=device)
    with torch.inference_mode():
        fg, fc = enc.encode_images(prep.normalize(gpu1)), enc.encode_images(prep.normalize(cpu))
    rel = ((fg - fc).norm(dim=1) / fc.norm(dim=1)).max().item()
    res.update({"gpu_vs_cpu_input_max_abs": int(diff.max()), "gpu_vs_cpu_input_mean_abs": round(float(diff.float().mean()), 4),
                "gpu_vs_cpu_feature_max_rel": round(rel, 5), "gpu_bit_stable_two_runs": bool(torch.equal(gpu1, gpu2))})
    return res


def forward_variants(device: str, seconds: float, batches: tuple = (64, 128, 256, 512), model: str = "ViT-L-14") -> dict:
    """ViT-L-14 images/s per FORWARDS setting (autocast and bf16 at every batch; compiled ones at 256), and each one's
    largest |score| difference from autocast on the same 256 inputs through a random MLP head."""
    from detector_core.method.features import FORWARDS, ClipEncoder, clip_input, feature_dim
    from detector_core.method.model import DetectorMLP

    torch.manual_seed(0)
    head = DetectorMLP(feature_dim(model, "image")).eval().to(device)
    side = clip_input(model, "none").size
    x_ref = torch.randn(256, 3, side, side, device=device)
    out: dict = {}
    ref_scores = None
    for name, (precision, mode) in FORWARDS.items():
        sweep = batches if not mode else (256,)
        try:
            torch.manual_seed(0)
            enc = ClipEncoder(model, "none", device=device, precision=precision, compile_mode=mode, static_batch=256)
            with torch.inference_mode():
                scores = torch.sigmoid(head(enc.encode_images(x_ref))).float()
                if ref_scores is None:
                    ref_scores = scores
                rates = {}
                for b in sweep:
                    x = x_ref[:b] if b <= 256 else torch.cat([x_ref, x_ref])[:b]
                    enc.static_batch = b if mode else 0
                    for _ in range(3):
                        enc.encode_images(x)
                    _sync()
                    t, n = time.perf_counter(), 0
                    while time.perf_counter() - t < seconds / len(sweep):
                        enc.encode_images(x)
                        n += b
                    _sync()
                    rates[b] = round(n / (time.perf_counter() - t), 1)
            out[name] = {"images_per_s_by_batch": rates, "max_abs_score_diff_vs_autocast": round(float((scores - ref_scores).abs().max()), 6)}
        except Exception as exc:  # noqa: BLE001 - a variant that does not compile here is a figure too
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print("forward", name, json.dumps(out[name]), flush=True)
    return out


def dnf_features(device: str, batch: int, seconds: float) -> dict:
    from bench.bench_features import _ddpm_256

    torch.manual_seed(0)
    ex = _ddpm_256(device, "auto")
    x = torch.randint(0, 256, (batch, ex.prep.size, ex.prep.size, 3), dtype=torch.uint8, device=device)
    ex.extract(x)
    _sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ex.extract(x)
        n += batch
    _sync()
    return {"features_per_s": round(n / (time.perf_counter() - t0), 1), "batch": batch, "input_px": ex.prep.size,
            "precision": ex.precision, "values": ex.values}


def sam_step(device: str) -> dict:
    import torch.nn.functional as F  # noqa: F401

    from bench.bench_step import reference_style_loss, timeit
    from detector_core.method.losses import detector_loss
    from detector_core.method.model import DetectorMLP
    from detector_core.method.training import OptimConfig, build_optimizer, training_step

    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(2048, 1536, device=dev)
    y = (torch.rand(2048, device=dev) < 0.8).long()
    model = DetectorMLP(1536).to(dev)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)
    step = timeit(lambda: training_step(model, opt, x, y, cfg), dev, 20)
    logits = model(x).detach().requires_grad_(True)
    t_exact = timeit(lambda: detector_loss(logits, y, "cvar_auc").backward(), dev, 20)
    t_ref = timeit(lambda: reference_style_loss(logits, y).backward(), dev, 20)
    return {"sam_step_ms": round(step * 1e3, 3), "examples_per_s": round(2048 / step), "loss_exact_ms": round(t_exact * 1e3, 3),
            "loss_reference_cpu_search_ms": round(t_ref * 1e3, 3), "batch": 2048, "width": 1536}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="where to write the JSON")
    ap.add_argument("--seconds", type=float, default=15.0, help="timed seconds per forward-only figure")
    ap.add_argument("--photos", type=int, default=96, help="distinct synthetic 3000x2000 photos for the scan figure")
    ap.add_argument("--objects", type=int, default=6144, help="objects the scan figure scores (photos repeated)")
    ap.add_argument("--batch-size", type=int, default=256, help="model batch for the scan and ViT figures")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="decode processes")
    ap.add_argument("--forward", default="autocast", help="features.FORWARDS setting of the scan figures' Scorer")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: vit,decode,forward,scan,scan-nvjpeg,dnf,sam")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    parts = {"vit_l14_forward": ("vit", lambda: vit_l14_forward(device, args.batch_size, args.seconds)),
             "decode_rates": ("decode", lambda: decode_rates(device, min(args.photos, 48), args.workers)),
             "forward_variants": ("forward", lambda: forward_variants(device, args.seconds)),
             "scan_steady_nvjpeg": ("scan-nvjpeg", lambda: scan_steady(device, args.photos, args.objects, args.batch_size, args.workers,
                                                                        decode="nvjpeg", forward=args.forward)),
             "sam_step": ("sam", lambda: sam_step(device)),
             "dnf_features": ("dnf", lambda: dnf_features(device, 32, args.seconds)),
             "scan_steady": ("scan", lambda: scan_steady(device, args.photos, args.objects, args.batch_size, args.workers,
                                                          forward=args.forward))}
    for name, (key, fn) in parts.items():
        if key in skip:
            continue
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res[name]["wall_s"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(res[name]), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
