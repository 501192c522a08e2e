"""The product end to end on an embedded default: demo data, a detector, its bundle.

``python -m jobs.demo`` (the README's first command) writes a synthetic set of "real"
and "generated" images, embeds them with the shipped ``test-tiny`` CLIP (random
weights: it shows the pipeline, not detection quality), trains the paper's MLP with
CVaR + AUC loss and SAM, calibrates the threshold to a 1 % false-positive rate on
held-out real images, and writes the detector bundle and metrics under ``--output``.
With real weights: ``--clip-model ViT-L-14 --pretrained /path/to/open_clip_weights.bin``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from detector_core.bundle import DetectorBundle, save_bundle
from detector_core.demo import write_dataset
from detector_core.features import ClipEncoder
from detector_core.images import decode_image
from detector_core.metrics import calibrate_threshold, summarize
from detector_core.model import DetectorMLP
from detector_core.training import OptimConfig, fit, predict_logits


@dataclass
class DemoConfig:
    output: str = "demo_out"
    n_real: int = 400
    n_generated: int = 400
    clip_model: str = "test-tiny"
    pretrained: str = "none"
    epochs: int = 40
    batch_size: int = 128
    target_fpr: float = 0.01
    seed: int = 0


def parse_args(argv=None) -> DemoConfig:
    d = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=d.output, help="folder for the demo images, bundle and metrics")
    ap.add_argument("--n-real", type=int, default=d.n_real, help="number of real demo images")
    ap.add_argument("--n-generated", type=int, default=d.n_generated, help="number of generated demo images")
    ap.add_argument("--clip-model", default=d.clip_model, help="open_clip model name (paper: ViT-L-14)")
    ap.add_argument("--pretrained", default=d.pretrained, help="open_clip tag, weights path or s3:// URI; 'none' = random")
    ap.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    ap.add_argument("--target-fpr", type=float, default=d.target_fpr, help="false-positive rate the threshold is calibrated to")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed for data and training")
    return DemoConfig(**{k.replace("-", "_"): v for k, v in vars(ap.parse_args(argv)).items()})


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    start = time.time()
    out = Path(cfg.output)
    rows = write_dataset(out / "images", cfg.n_real, cfg.n_generated, seed=cfg.seed)
    if cfg.pretrained == "none":
        print(f"NOTE: {cfg.clip_model} with random weights shows the pipeline, not detection quality. "
              "For real detection pass --clip-model ViT-L-14 --pretrained openai (cached) or a weights path.")
    encoder = ClipEncoder(cfg.clip_model, cfg.pretrained, device="cpu")
    pixels = torch.stack([encoder.preprocess(decode_image(Path(r["uri"]).read_bytes()).image) for r in rows])
    feats = torch.cat([encoder.encode(pixels[i : i + 256], None, "image") for i in range(0, len(rows), 256)])
    labels = torch.tensor([r["label"] for r in rows])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = len(rows) // 4
    val, train = order[:n_val], order[n_val:]
    optim = OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size)
    model = fit(DetectorMLP(feats.shape[1]), feats[train], labels[train], optim, seed=cfg.seed)
    val_logits = predict_logits(model, feats[val]).numpy()
    val_labels = labels[val].numpy()
    threshold = calibrate_threshold(val_logits[val_labels == 0], cfg.target_fpr)
    metrics = summarize(val_labels, val_logits, threshold)
    bundle = DetectorBundle(
        model=model.eval(), clip_model=cfg.clip_model, pretrained=cfg.pretrained, feature_mode="image",
        threshold_logit=threshold,
        calibration={"method": "target_fpr", "target_fpr": cfg.target_fpr, "n_real": int((val_labels == 0).sum())},
        training_config={"demo": asdict(cfg), "optim": optim.to_dict()}, metrics=metrics,
    )
    save_bundle(bundle, str(out / "detector"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"detector {bundle.detector_id} -> {out / 'detector'}  ({time.time() - start:.1f} s)")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
