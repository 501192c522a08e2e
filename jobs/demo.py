"""The product end to end on an embedded default: local Ray, local files, demo data.

``python -m jobs.demo`` (the README's ``make demo``) writes a synthetic labelled set of
"real" and "generated" images, trains a detector on it with ``jobs.train`` (Ray Data
embedding, Ray Train, CVaR + AUC loss with SAM, threshold calibrated to 1 % FPR), then
scans a separate folder of unlabelled demo images (with a few broken files among
them) with ``jobs.scan``, writes the review page (``jobs.report``), and prints where the
tables are and the run summary.

``--dnf`` also trains the second detector family (Diffusion Noise Feature of the shipped
random ``test-tiny`` UNet + ResNet-18) and scans with both detectors in one pass
(``--ensemble``): every object then has a row per detector.

It uses the shipped ``test-tiny`` CLIP: random weights, so the demo shows the pipeline
and its outputs, not real detection quality. For real detection train with
``--clip-model ViT-L-14 --pretrained openai`` (weights in the open_clip cache) or
``--pretrained /path/or/s3://uri/to/weights.bin``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector_core.demo import GENERATORS, encode, make_image, write_dataset
from jobs import report, scan, train
from jobs.common.errors import run_main
from jobs.common.flags import opt, parse_config


@dataclass
class DemoConfig:
    output: str = opt("demo_out", "folder for the demo images, the detector and the scan tables")
    n_train: int = opt(300, "labelled demo images per class for training", within="[1, inf)")
    n_scan: int = opt(60, "unlabelled demo images to scan", within="[1, inf)")
    clip_model: str = opt("test-tiny", "open_clip model name (paper: ViT-L-14)")
    pretrained: str = opt("none", "open_clip tag, weights path or s3:// URI; 'none' = random init")
    epochs: int = opt(12, "training epochs", within="[1, inf)")
    workers: int = opt(1, "Ray Train workers", within="[1, inf)")
    seed: int = opt(0, "seed for the demo data", within="[0, inf)")
    dnf: bool = opt(False, "also train a DNF detector (test-tiny UNet + ResNet-18) and scan with both detectors in one pass")


def main(argv=None) -> dict:
    cfg = parse_config(DemoConfig, argv, __doc__)
    out = Path(cfg.output).resolve()
    if cfg.pretrained == "none":
        print(f"NOTE: {cfg.clip_model} with random weights shows the pipeline, not detection quality. For real detection "
              "pass --clip-model ViT-L-14 --pretrained openai (cached) or --pretrained /path/to/weights.bin.")
    rows = write_dataset(out / "train_images", cfg.n_train, cfg.n_train, seed=cfg.seed)
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    metrics = train.run_training(train.TrainConfig(
        manifest=str(out / "manifest.parquet"), output=str(out / "training"), clip_model=cfg.clip_model, pretrained=cfg.pretrained,
        epochs=cfg.epochs, workers=cfg.workers, batch_size=64, lr=3e-3, embed_batch_size=128,
    ))
    ensemble = ""
    if cfg.dnf:
        dnf_metrics = train.run_training(train.TrainConfig(
            manifest=str(out / "manifest.parquet"), output=str(out / "training-dnf"), extractor="dnf", unet="test-tiny",
            resnet="resnet18", epochs=cfg.epochs, workers=cfg.workers, batch_size=32, lr=1e-3, embed_batch_size=128,
        ))
        ensemble = str(out / "training-dnf" / "detector")
    rng = np.random.default_rng(cfg.seed + 1)
    bucket = out / "bucket"
    bucket.mkdir(parents=True, exist_ok=True)
    kinds = ["real", *GENERATORS]
    for i in range(cfg.n_scan):
        (bucket / f"upload_{i:04d}.png").write_bytes(encode(make_image(rng, kinds[i % len(kinds)])))
    (bucket / "broken_upload.jpg").write_bytes(b"<html>this was never an image</html>")
    summary = scan.run_scan(scan.ScanConfig(detector=str(out / "training" / "detector"), ensemble=ensemble, input=str(bucket),
                                            output=str(out / "scans")))
    report.run_report(report.ReportConfig(scan=str(out / "scans"), out=str(out / "report.html")))
    print("\n=== demo finished ===")
    print(f"detector:  {out / 'training' / 'detector'}  (val AUC {metrics['val_auc']:.3f}, threshold {metrics['threshold']:.3f})")
    if cfg.dnf:
        print(f"DNF:       {out / 'training-dnf' / 'detector'}  (val AUC {dnf_metrics['val_auc']:.3f}, threshold {dnf_metrics['threshold']:.3f})")
    print(f"tables:    Iceberg tables detector.{{scores,flagged,errors,runs}} in {out / 'scans' / 'catalog.db'} (data under {out / 'scans'}/)")
    print(f"           python -c \"from detector_core.tables.catalog import read_table; print(read_table('{out / 'scans'}', 'flagged'))\"")
    print(f"summary:   {out / 'scans' / 'runs' / (summary['scan_id'] + '.json')}")
    print(f"review:    {out / 'report.html'}  (open in a browser)")
    print(f"questions: python -m jobs.audit query per-day --scan {out / 'scans'}")
    print(json.dumps({k: summary[k] for k in ("listed", "scored", "flagged", "errors", "seconds", "images_per_second",
                                                     "commit_units", "model_loads")}, indent=2))
    return summary


if __name__ == "__main__":
    run_main(main)
