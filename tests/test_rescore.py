"""``jobs.rescore``: the history re-scored from the stored features, without reading an image.

The scan's own detector reproduces every stored score within the float16 tolerance; another head gives exactly that
head on features computed afresh from the images (another path); refusals in one line (DNF, another extractor, no
stored features); a kill -9 mid-run leaves the challenger table as it was, and a second run replaces, never doubles.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.special import expit
from test_kept_features import SCORE_TOLERANCE
from test_scan import _images

from detector_core import schema as S
from detector_core.method.bundle import load_bundle, save_bundle
from detector_core.method.training import predict_logits
from detector_core.tables import definitions as T
from detector_core.tables.catalog import read_table
from jobs import rescore, scan
from jobs.common.errors import JobError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scanned(ray_local, bundle_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    uris = _images(root / "bucket", 12, 11)
    out = root / "out"
    scan.main(["--detector", str(bundle_dir), "--input", str(root / "bucket"), "--output", str(out), "--chunk-size", "5",
               "--scan-date", "2026-11-23"])
    return {"out": str(out), "uris": uris, "root": root}


def _challenger(out: str, detector_id: str):
    rows = read_table(out, T.CHALLENGER)
    return rows.filter(pa.array([d == detector_id for d in rows[S.DETECTOR_ID].to_pylist()], pa.bool_()))


def _other_head(bundle_dir, target) -> str:
    """The same detector with its head's last layer moved: another challenger on the same features."""
    bundle = load_bundle(str(bundle_dir), device=torch.device("cpu"))
    with torch.no_grad():
        last = [p for p in bundle.model.parameters()][-2]
        last.add_(torch.from_numpy(np.random.default_rng(0).normal(0, 0.5, tuple(last.shape)).astype(np.float32)))
    save_bundle(bundle, str(target))
    return str(target)


def test_the_scans_own_detector_reproduces_every_stored_score(scanned, bundle_dir):
    result = rescore.main(["--detector", str(bundle_dir), "--output", scanned["out"], "--all"])
    scores = read_table(scanned["out"], "scores").sort_by(S.URI)
    mine = _challenger(scanned["out"], result["detector_id"]).sort_by(S.URI)
    assert mine[S.URI].to_pylist() == scores[S.URI].to_pylist() and result["rows"] == 12
    assert np.abs(np.asarray(mine[S.SCORE]) - np.asarray(scores[S.SCORE])).max() < SCORE_TOLERANCE
    assert read_table(scanned["out"], "scores").num_rows == 12  # production untouched


def test_another_head_equals_that_head_on_features_computed_afresh(scanned, bundle_dir, tmp_path):
    from jobs.scanning.decoding import load_images
    from jobs.scanning.pipeline import Embedder, feature_specs

    other = _other_head(bundle_dir, tmp_path / "other")
    result = rescore.main(["--detector", other, "--output", scanned["out"], "--since", "2026-11-01"])
    mine = _challenger(scanned["out"], result["detector_id"]).sort_by(S.URI)
    bundle = load_bundle(other, device=torch.device("cpu"))
    spec = feature_specs([bundle])[0]
    batch = load_images({S.URI: np.asarray(mine[S.URI].to_pylist(), dtype=object)}, specs=[spec])
    fresh, ok = Embedder(spec, device=torch.device("cpu")).extract(batch)
    expected = expit(predict_logits(bundle.model, fresh).double().numpy())
    assert ok.all() and np.abs(np.asarray(mine[S.SCORE]) - expected).max() < SCORE_TOLERANCE
    again = rescore.main(["--detector", other, "--output", scanned["out"], "--all"])  # replaces, never doubles
    assert again["rows"] == 12 and _challenger(scanned["out"], result["detector_id"]).num_rows == 12


def test_refusals_in_one_line(scanned, bundle_dir, tmp_path, ray_local):
    bundle = load_bundle(str(bundle_dir), device=torch.device("cpu"))
    moved = dataclasses.replace(bundle, features=dataclasses.replace(bundle.features, pretrained="laion2b"))
    save_bundle(moved, str(tmp_path / "other-weights"))
    with pytest.raises(JobError, match="pretrained 'none' \\(stored\\) vs 'laion2b' \\(detector\\)") as err:
        rescore.main(["--detector", str(tmp_path / "other-weights"), "--output", scanned["out"], "--all"])
    assert "\n" not in str(err.value) and "--full" in str(err.value)
    bare = tmp_path / "bare"
    _images(tmp_path / "b2", 2, 12)
    scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "b2"), "--output", str(bare), "--no-keep-features"])
    with pytest.raises(JobError, match="holds no stored features") as err:
        rescore.main(["--detector", str(bundle_dir), "--output", str(bare), "--all"])
    assert "\n" not in str(err.value)
    with pytest.raises(JobError, match="which nights"):
        rescore.main(["--detector", str(bundle_dir), "--output", scanned["out"]])


def test_kill_9_mid_run_leaves_the_table_as_it_was_and_a_rerun_counts_once(scanned, bundle_dir, tmp_path, ray_local):
    other = _other_head(bundle_dir, tmp_path / "killed")
    detector_id = load_bundle(other, device=torch.device("cpu")).detector_id
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_local}
    proc_started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.rescore", "--detector", other, "--output", scanned["out"], "--all",
                             "--lease-ttl", "3"],  # a dead run's lease expires soon
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    data = Path(scanned["out"]) / T.CHALLENGER / "data"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not any(p.name.startswith("rescore-") for p in data.rglob("*.parquet")
                                                                      if p.stat().st_mtime > proc_started):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # its files written, the commit most likely not yet made
    proc.wait()
    assert _challenger(scanned["out"], detector_id).num_rows in (0, 12)  # the transaction or nothing
    rescore.main(["--detector", other, "--output", scanned["out"], "--all", "--wait"])
    rows = _challenger(scanned["out"], detector_id)
    assert sorted(rows[S.URI].to_pylist()) == sorted(scanned["uris"])  # each object once


def test_compare_on_production_traffic_matches_an_independent_count(scanned, bundle_dir, tmp_path):
    from sklearn.metrics import cohen_kappa_score

    from jobs.audit import main as audit

    other = _other_head(bundle_dir, tmp_path / "compared")
    detector_id = rescore.main(["--detector", other, "--output", scanned["out"], "--all"])["detector_id"]
    answer = audit(["query", "compare", "--scan", scanned["out"], "--challenger", detector_id]).to_pylist()
    prod = {r["uri"]: r["flagged"] for r in read_table(scanned["out"], "scores").to_pylist()}
    chal = {r["uri"]: r["flagged"] for r in _challenger(scanned["out"], detector_id).to_pylist()}
    p, c = [prod[u] for u in sorted(prod)], [chal[u] for u in sorted(prod)]
    [row] = answer
    assert (row["objects"], row["flagged_production"], row["flagged_challenger"]) == (12, sum(p), sum(c))
    assert row["flagged_both"] == sum(a and b for a, b in zip(p, c)) and row["flagged_either_only"] == sum(a != b for a, b in zip(p, c))
    if len(set(p)) > 1 or len(set(c)) > 1:
        assert row["cohens_kappa"] == pytest.approx(cohen_kappa_score(p, c))
    rows = audit(["query", "compare", "--scan", scanned["out"], "--challenger", detector_id, "--rows", "--limit", "0"]).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(u for u in prod if prod[u] != chal[u])
