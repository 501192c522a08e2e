"""Benchmark: one cvar_auc + SAM training step at the paper's batch and width.

Times (median of repeats, after warm-up) the whole SAM step (two forward/backward
passes and the AdamW update) at batch 2048 and width 1536, the loss alone with the
exact on-device CVaR (top-k) and O(n log n) AUC term, the same loss in the reference
style (lambda found by a CPU scalar search every batch, one host sync per step),
and the dense n_pos x n_neg AUC form; prints training examples/s.

    python -m bench.bench_step                 # CPU here
    python -m bench.bench_step --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from detector_core.method.losses import cvar, detector_loss, pairwise_auc_loss
from detector_core.method.model import DetectorMLP
from detector_core.method.training import OptimConfig, build_optimizer, training_step


def reference_style_loss(logits, labels, alpha=0.8, gamma=0.5, eta=0.6, p=2):
    """CVaR with lambda from a CPU scalar search (the reference's way) + dense AUC."""
    per = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    host = per.detach().cpu().numpy().astype(np.float64)  # host sync
    res = minimize_scalar(lambda lam: lam + np.maximum(host - lam, 0).mean() / alpha, bounds=(host.min(), host.max()), method="bounded")
    lam = torch.tensor(res.x, dtype=per.dtype, device=per.device)
    risk = lam + torch.clamp(per - lam, min=0).mean() / alpha
    y = labels.float()
    diff = eta - (logits[:, None] - logits[None, :])
    mask = y[:, None] * (1 - y)[None, :]
    auc = (diff.clamp_min(0) ** p * mask).sum() / mask.sum()
    return gamma * risk + (1 - gamma) * auc


def timeit(fn, device, repeats):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--batch", type=int, default=2048, help="batch size (paper: 2048)")
    ap.add_argument("--width", type=int, default=1536, help="feature width (ViT-L/14 image+text: 1536)")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.width, device=device)
    y = (torch.rand(args.batch, device=device) < 0.8).long()  # D3's 1:4 real:generated
    model = DetectorMLP(args.width).to(device)
    cfg = OptimConfig()
    opt = build_optimizer(model, cfg)

    step = timeit(lambda: training_step(model, opt, x, y, cfg), device, args.repeats)
    logits = model(x).detach().requires_grad_(True)

    def exact():
        detector_loss(logits, y, "cvar_auc").backward()

    def reference():
        reference_style_loss(logits, y).backward()

    def dense_auc():
        pairwise_auc_loss(logits, y, p=2.5).backward()  # p outside {1,2}: the dense path

    t_exact = timeit(exact, device, args.repeats)
    t_ref = timeit(reference, device, args.repeats)
    t_dense = timeit(dense_auc, device, args.repeats)
    t_cvar = timeit(lambda: cvar(F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none"), 0.8).backward(), device, args.repeats)
    print(f"device={device} batch={args.batch} width={args.width} (median of {args.repeats})")
    print(f"  SAM step (2 fwd/bwd + AdamW)          {step * 1e3:9.2f} ms   {args.batch / step:10.0f} examples/s")
    print(f"  loss fwd+bwd, exact on-device          {t_exact * 1e3:9.3f} ms   ({100 * 2 * t_exact / step:.2f} % of the step, 2 per step)")
    print(f"    of which CVaR (top-k)                {t_cvar * 1e3:9.3f} ms")
    print(f"  loss fwd+bwd, reference CPU search     {t_ref * 1e3:9.3f} ms   ({100 * 2 * t_ref / step:.2f} % of the step)")
    print(f"  AUC term, dense n_pos x n_neg form     {t_dense * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
