"""Benchmark: how much JPEG draft (DCT-domain) downscaling moves detector inputs and scores.

The scan decodes JPEGs with Pillow's ``draft`` at no less than twice the model's input
size. This compares, on the same photos, the CLIP features and MLP logits from a draft
decode against a full-resolution decode (random ViT-B-32 and MLP unless given), and the
decode time of each.

    python -m bench.bench_draft [--clip-model ViT-B-32] [--photos 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_scan import write_images
from detector_core.features import ClipEncoder, SplitPreprocess, feature_dim
from detector_core.images import decode_image
from detector_core.model import DetectorMLP


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random weights)")
    ap.add_argument("--photos", type=int, default=16, help="3000x2000 JPEG photos")
    args = ap.parse_args(argv)
    paths = write_images(Path(tempfile.mkdtemp()) / "photos", args.photos, (3000, 2000), 3)
    enc = ClipEncoder(args.clip_model, "none")
    prep = SplitPreprocess(args.clip_model, "none")
    torch.manual_seed(0)
    mlp = DetectorMLP(feature_dim(args.clip_model, "image")).eval()
    out = {}
    for name, draft in (("full", None), ("draft", 2 * prep.size)):
        t = time.perf_counter()
        crops = [prep.to_uint8(decode_image(p.read_bytes(), draft_size=draft).image) for p in paths]
        dt = (time.perf_counter() - t) / len(paths)
        with torch.inference_mode():
            f = enc.encode_images(prep.normalize(torch.from_numpy(np.stack(crops))))
            out[name] = (dt, f, mlp(f).numpy(), np.stack(crops).astype(np.float64))
    (t_full, f_full, z_full, c_full), (t_draft, f_draft, z_draft, c_draft) = out["full"], out["draft"]
    cos = torch.nn.functional.cosine_similarity(f_full, f_draft).numpy()
    print(f"{args.photos} photos 3000x2000, {args.clip_model} random weights")
    print(f"  decode+crop per photo: full {t_full * 1e3:.0f} ms, draft {t_draft * 1e3:.0f} ms ({t_full / t_draft:.1f}x faster)")
    print(f"  crop pixels: mean |diff| {np.abs(c_full - c_draft).mean():.2f} of 255")
    print(f"  features: cosine similarity min {cos.min():.5f}, mean {cos.mean():.5f}")
    print(f"  logits: max |diff| {np.abs(z_full - z_draft).max():.4f} (logit std over photos {z_full.std():.4f})")


if __name__ == "__main__":
    main()
