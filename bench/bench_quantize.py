"""What the DNF reference values cost on the extractor actor's CPU: ``dnf.quantize_noise`` per image.

The reference mode turns the UNet's noise into the reference's 8-bit feature after the UNet
(``save_image``'s arithmetic, and for JPEG sources a round trip through a JPEG file). This
times it on random noise of the bedroom UNet's shape, in batches, with and without the JPEG
round trip, on this machine's CPU.

    python -m bench.bench_quantize [--size 256] [--batch 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from detector_core.method.dnf import quantize_noise


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="side of the noise estimate (the UNet's sample size)")
    p.add_argument("--batch", type=int, default=64, help="images per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (after one warm-up call)")
    args = p.parse_args(argv)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.1
    out = {"size": args.size, "batch": args.batch, "threads": torch.get_num_threads()}
    for name, jpeg in (("ms_per_image_png_source", np.zeros(args.batch, bool)), ("ms_per_image_jpeg_source", np.ones(args.batch, bool))):
        quantize_noise(x, jpeg)
        t = time.perf_counter()
        for _ in range(args.repeats):
            quantize_noise(x, jpeg)
        out[name] = round((time.perf_counter() - t) / args.repeats / args.batch * 1000, 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
