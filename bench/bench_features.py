"""Benchmark: DNF features/s against CLIP features/s on the same images and device.

Decodes the same photos once, prepares each extractor's uint8 input (CLIP: resize +
centre crop to 224; DNF: squash to the UNet's side) and times ``extract`` alone -- the
accelerator's share of a scan -- after one warm-up batch. Random weights throughout
(timing does not depend on them): CLIP ViT-B-32 and ViT-L-14 from open_clip's configs,
DNF with the DDPM 256 px UNet architecture (``bench/unet-ddpm-256.json``, the
LSUN-Bedroom UNet of the DNF paper) and the shipped ``test-tiny`` UNet. Also prints the
classifier heads' rows/s (MLP on CLIP features, ResNet-50 on 256 px noise).

    python -m bench.bench_features [--images 8] [--batch-size 4] [--device cuda] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_scan import write_images
from detector_core.method.dnf import DnfExtractor
from detector_core.method.extractors import FeatureSpec, build_extractor
from detector_core.method.model import DetectorMLP, NoiseResNet
from detector_core.sources.images import decode_image


def _ddpm_256(device: str, precision: str) -> DnfExtractor:
    """A DnfExtractor around a randomly initialised DDPM-256 UNet (no weights needed to time it)."""
    from diffusers import UNet2DModel

    cfg = {k: v for k, v in json.loads(Path(__file__).with_name("unet-ddpm-256.json").read_text()).items() if not k.startswith("_")}
    return DnfExtractor(UNet2DModel(**cfg), device=device, precision=precision)


def _rate(fn, batches: list[torch.Tensor], device: str) -> float:
    fn(batches[0])  # warm-up: lazy init, cuDNN autotuning, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    for b in batches:
        fn(b)
        n += b.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="photos (1024x768 JPEG) timed per extractor")
    ap.add_argument("--batch-size", type=int, default=4, help="images per extract call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA), fp32, bf16, fp16")
    ap.add_argument("--skip", default="", help="comma-separated extractor names to leave out (e.g. ViT-L-14)")
    args = ap.parse_args(argv)
    paths = write_images(Path(tempfile.mkdtemp()) / "photos", args.images, (1024, 768), 3)
    decoded = [decode_image(p.read_bytes()).image for p in paths]
    extractors = {
        "CLIP ViT-B-32": lambda: build_extractor(FeatureSpec(clip_model="ViT-B-32"), args.device, args.precision),
        "CLIP ViT-L-14": lambda: build_extractor(FeatureSpec(clip_model="ViT-L-14"), args.device, args.precision),
        "DNF DDPM-256 UNet": lambda: _ddpm_256(args.device, args.precision),
        "DNF test-tiny UNet": lambda: build_extractor(FeatureSpec(extractor="dnf").resolved(), args.device, args.precision),
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"=== bench_features: {args.images} photos, batch {args.batch_size}, device {args.device}, precision {args.precision} ===")
    rates = {}
    for name, make in extractors.items():
        if any(s in name for s in skip):
            continue
        torch.manual_seed(0)
        ex = make()
        prep = ex.prep
        pixels = torch.from_numpy(np.stack([prep.to_uint8(im) for im in decoded]))
        batches = list(pixels.split(args.batch_size))
        rates[name] = _rate(ex.extract, batches, args.device)
        print(f"  {name:20s} input {prep.size:3d} px  feature {int(ex.dim):7d} floats  {rates[name]:8.2f} features/s")
        del ex  # free its memory before the next model
    if "CLIP ViT-B-32" in rates and "DNF DDPM-256 UNet" in rates:
        print(f"  DNF (DDPM-256) / CLIP ViT-B-32: {rates['DNF DDPM-256 UNet'] / rates['CLIP ViT-B-32']:.3f}")
    if "CLIP ViT-L-14" in rates and "DNF DDPM-256 UNet" in rates:
        print(f"  DNF (DDPM-256) / CLIP ViT-L-14: {rates['DNF DDPM-256 UNet'] / rates['CLIP ViT-L-14']:.3f}")
    heads = {"MLP on ViT-L-14 image+text (1536)": (DetectorMLP(1536).eval(), (1536,)),
             "ResNet-50 on 256 px noise": (NoiseResNet("resnet50", (3, 256, 256)).eval(), (3 * 256 * 256,))}
    for name, (model, shape) in heads.items():
        model = model.to(args.device)
        x = torch.randn(args.images, *shape, device=args.device)
        with torch.inference_mode():
            r = _rate(lambda b: model(b), list(x.split(args.batch_size)), args.device)
        print(f"  head: {name:36s} {r:10.1f} rows/s")


if __name__ == "__main__":
    main()
