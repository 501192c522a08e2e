"""Benchmark: how much JPEG draft (DCT-domain) downscaling moves detector inputs and scores.

The scan decodes JPEGs with Pillow's ``draft`` at no less than twice the model's input
size. This compares, on the same photos, the CLIP features and MLP logits from a draft
decode against a full-resolution decode (random ViT-B-32 and MLP unless given), and the
decode time of each. Then the same pictures as JPEG q100 4:4:4 (draft decode, as a scan
does) against PNG copies reduced by the same power of two with several pixel-domain filters:
whether any of them makes a JPEG and a PNG of one picture go through the same function of the
pixels, which a class-correlated container (D3: real JPEG, generated PNG) would need.

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
from detector_core.method.features import ClipEncoder, clip_input, feature_dim
from detector_core.method.model import DetectorMLP
from detector_core.sources.images import decode_image, draft_factor


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (random weights)")
    ap.add_argument("--photos", type=int, default=16, help="3000x2000 JPEG photos")
    args = ap.parse_args(argv)
    paths = write_images(Path(tempfile.mkdtemp()) / "photos", args.photos, (3000, 2000), 3)
    enc = ClipEncoder(args.clip_model, "none")
    prep = clip_input(args.clip_model, "none")
    torch.manual_seed(0)
    mlp = DetectorMLP(feature_dim(args.clip_model, "image")).eval()
    out = {}
    for name, draft in (("full", None), ("draft", 2 * prep.size)):
        t = time.perf_counter()
        crops = [prep.to_input(decode_image(p.read_bytes(), draft_size=draft).image) for p in paths]
        dt = (time.perf_counter() - t) / len(paths)
        with torch.inference_mode():
            f = enc.encode_images(prep.normalize(torch.from_numpy(np.stack(crops))))
            out[name] = (dt, f, mlp(f).numpy(), np.stack(crops).astype(np.float64))
    import io

    from PIL import Image

    # One picture in two containers: each photo's pixels saved as PNG and as JPEG quality 100, 4:4:4.
    # A scan decodes the JPEG with DCT scaling and the PNG in full; could a pixel-domain reduction
    # of the PNG by the same factor make the two containers one function of the pixels?
    pictures = [Image.open(p).convert("RGB") for p in paths]
    jpegs = []
    for picture in pictures:
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=100, subsampling=0)
        jpegs.append(buf.getvalue())
    for name, images in (("jpeg100_full", [decode_image(b).image for b in jpegs]),
                         ("jpeg100_draft", [decode_image(b, draft_size=2 * prep.size).image for b in jpegs])):
        with torch.inference_mode():
            f = enc.encode_images(prep.normalize(torch.from_numpy(np.stack([prep.to_input(i) for i in images]))))
            out[name] = (0.0, f, mlp(f).numpy(), None)
    reductions = {}
    for filt in ("none (full decode: what a scan does)", "box (Image.reduce)", "bicubic", "hamming", "lanczos"):
        images = []
        for picture in pictures:
            k = draft_factor(*picture.size, 2 * prep.size)
            size = (-(-picture.size[0] // k), -(-picture.size[1] // k))
            images.append(picture if filt.startswith("none") else picture.reduce(k) if filt.startswith("box")
                          else picture.resize(size, getattr(Image.Resampling, filt.upper())))
        with torch.inference_mode():
            f = enc.encode_images(prep.normalize(torch.from_numpy(np.stack([prep.to_input(i) for i in images]))))
            reductions[filt] = (f, mlp(f).numpy())
    (t_full, f_full, z_full, c_full), (t_draft, f_draft, z_draft, c_draft) = out["full"], out["draft"]
    cos = torch.nn.functional.cosine_similarity(f_full, f_draft).numpy()
    print(f"{args.photos} photos 3000x2000, {args.clip_model} random weights")
    print(f"  decode+crop per photo: full {t_full * 1e3:.0f} ms, draft {t_draft * 1e3:.0f} ms ({t_full / t_draft:.1f}x faster)")
    print(f"  crop pixels: mean |diff| {np.abs(c_full - c_draft).mean():.2f} of 255")
    print(f"  features: cosine similarity min {cos.min():.5f}, mean {cos.mean():.5f}")
    print(f"  logits: max |diff| {np.abs(z_full - z_draft).max():.4f} (logit std over photos {z_full.std():.4f})")

    ref_f, ref_z = out["jpeg100_draft"][1], out["jpeg100_draft"][2]
    print("  the same pictures as JPEG q100 4:4:4 (draft decode) and as PNG reduced by the same factor with:")
    gap = np.abs(out["jpeg100_full"][2] - ref_z).max()
    print(f"    (reference gap, JPEG q100 full vs draft: logit max |diff| {gap:.4f})")
    for filt, (f, z) in reductions.items():
        c = torch.nn.functional.cosine_similarity(f, ref_f).numpy()
        print(f"    {filt}: cosine min {c.min():.5f}; logit max |diff| {np.abs(z - ref_z).max():.4f}")


if __name__ == "__main__":
    main()
