"""Detector bundles round-trip through a local folder and the S3 server, and refuse misfits."""

from __future__ import annotations

import json

import pytest
import torch

from detector_core.method.bundle import BundleError, DetectorBundle, load_bundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.model import DetectorMLP


def _bundle(seed=0, mode="image") -> DetectorBundle:
    torch.manual_seed(seed)
    width = 64 if mode == "image" else 128
    model = DetectorMLP(width).eval()
    # Give BatchNorm non-default statistics so that they are seen to travel.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return DetectorBundle(
        model=model,
        features=FeatureSpec(clip_model="test-tiny", feature_mode=mode),
        threshold_logit=1.25,
        calibration={"method": "target_fpr", "target_fpr": 0.01, "n_real": 500, "achieved_fpr": 0.008},
        training_config={"epochs": 3, "loss": "cvar_auc"},
        metrics={"val_auc": 0.97},
    )


def _check_same(a: DetectorBundle, b: DetectorBundle):
    x = torch.randn(7, a.in_dim)
    torch.testing.assert_close(a.model.eval()(x), b.model(x), rtol=0, atol=0)
    assert b.clip_model == a.clip_model and b.pretrained == a.pretrained and b.feature_mode == a.feature_mode
    assert b.threshold_logit == a.threshold_logit and b.calibration == a.calibration
    assert b.training_config == a.training_config and b.content_hash == a.content_hash
    assert b.detector_id.startswith("clip-mlp-") and len(b.content_hash) == 64


def test_local_round_trip(tmp_path):
    b = _bundle()
    h = save_bundle(b, str(tmp_path / "detector"))
    loaded = load_bundle(str(tmp_path / "detector"))
    assert h == loaded.content_hash
    _check_same(b, loaded)
    assert loaded.threshold == pytest.approx(1 / (1 + torch.exp(torch.tensor(-1.25)).item()))
    meta = json.loads((tmp_path / "detector" / "detector.json").read_text())
    assert meta["in_dim"] == 64 and meta["format_version"] == 1


def test_s3_round_trip(s3_bucket):
    b = _bundle(1, mode="image+text")
    save_bundle(b, f"{s3_bucket}/runs/r1/detector")
    _check_same(b, load_bundle(f"{s3_bucket}/runs/r1/detector"))


def test_hash_changes_with_threshold_and_weights(tmp_path):
    a, b = _bundle(), _bundle()
    b.threshold_logit = 2.0
    assert save_bundle(a, str(tmp_path / "a")) != save_bundle(b, str(tmp_path / "b"))


def test_refuses_missing_newer_and_mismatched(tmp_path):
    with pytest.raises(BundleError, match="no detector bundle"):
        load_bundle(str(tmp_path / "nothing"))
    root = tmp_path / "d"
    save_bundle(_bundle(), str(root))
    meta_path = root / "detector.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(str(root))

    # Claims image+text (128-d) for 64-d weights.
    meta_path.write_text(json.dumps({**meta, "feature_mode": "image+text"}))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(str(root))

    # Shapes that contradict the weights file.
    meta_path.write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "hidden_dim": 32}}))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(str(root))

    # Weights swapped under an unchanged detector.json.
    meta_path.write_text(json.dumps(meta))
    save_bundle(_bundle(seed=5), str(tmp_path / "other"))
    (root / "weights.safetensors").write_bytes((tmp_path / "other" / "weights.safetensors").read_bytes())
    with pytest.raises(BundleError, match="content hash"):
        load_bundle(str(root))
