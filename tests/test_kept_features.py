"""The features table a scan keeps: each scored object's head input, float16, committed with its scores.

Re-scoring the stored vectors with the scan's own detector reproduces every stored score within the float16 tolerance
docs/method.md records; the vectors equal the features computed afresh from the images (``Embedder``, another path);
``--no-keep-features`` keeps none; kills are covered by ``test_scan._exactly_once``, which every scan test calls.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit
from test_scan import _exactly_once, _images

from detector_core import schema as S
from detector_core.method.bundle import load_bundle
from detector_core.method.training import predict_logits
from detector_core.tables.catalog import ScanOutput, read_table
from detector_core.tables.features import decode
from jobs import scan

SCORE_TOLERANCE = 2e-3  # float16 vectors against float32 ones: the largest score difference allowed (docs/method.md)


def test_a_scan_keeps_each_objects_vector_and_rescoring_it_reproduces_the_scores(ray_local, bundle_dir, tmp_path):
    from jobs.scanning.decoding import load_images
    from jobs.scanning.pipeline import Embedder, feature_specs

    bucket, out = tmp_path / "bucket", tmp_path / "out"
    uris = _images(bucket, 10, 7)
    scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "4"])
    t = _exactly_once(out, uris)
    features = read_table(str(out), "features").sort_by(S.URI)
    scores = t["scores"].sort_by(S.URI)
    assert features[S.URI].to_pylist() == scores[S.URI].to_pylist()
    assert features[S.FEATURE_ID].to_pylist() == scores[S.FEATURE_ID].to_pylist()
    matrix = decode(features[S.VECTOR])
    bundle = load_bundle(str(bundle_dir), device=torch.device("cpu"))
    assert matrix.shape[0] == 10 and len(features[S.VECTOR][0].as_py()) == 2 * matrix.shape[1]
    logits = predict_logits(bundle.model, torch.from_numpy(matrix)).double().numpy()
    assert np.abs(expit(logits) - np.asarray(scores[S.SCORE])).max() < SCORE_TOLERANCE
    # The vectors are the features of the images, computed again here on another path (the embedding actor).
    spec = feature_specs([bundle])[0]
    batch = load_images({S.URI: np.asarray(scores[S.URI].to_pylist(), dtype=object)}, specs=[spec])
    fresh, ok = Embedder(spec, device=torch.device("cpu")).extract(batch)
    assert ok.all()
    np.testing.assert_allclose(matrix, fresh.numpy().astype("<f2").astype(np.float32), rtol=0, atol=0)


def test_no_keep_features_keeps_none(ray_local, bundle_dir, tmp_path):
    bucket, out = tmp_path / "bucket", tmp_path / "out"
    _images(bucket, 3, 8)
    scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--no-keep-features"])
    assert read_table(str(out), "features").num_rows == 0


def test_the_readmes_features_snippet_runs_as_written(ray_local, bundle_dir, tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "features import decode" in b)
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "bucket", 4, 9)
    scan.main(["--detector", str(bundle_dir), "--input", "bucket", "--output", "scans", "--scan-date", "2026-11-23"])
    capsys.readouterr()
    exec(compile(block, "README.md (features)", "exec"), {})
    rows, shape = capsys.readouterr().out.split(" ", 1)
    assert rows == "4" and shape.startswith("(4, ")
    # A relative --output: the workers (another working directory) wrote under this one, where the driver meant.
    written = [t.file.file_path for name in ("features", "scores") for t in ScanOutput.open("scans").table(name).scan().plan_files()]
    assert written and all(p.startswith(str(tmp_path / "scans") + "/") for p in written), written
