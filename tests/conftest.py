"""Shared test fixtures: a real S3 API on loopback, the tiny CLIP and a detector bundle on it, the demo set, one local Ray.

The S3 server is moto's standalone server in its own process on 127.0.0.1 (a free
port), reached through s3fs exactly as production reaches AWS; the AWS variables
point every client (and every Ray worker started later) at it. Ray, for the few tests
that need it, is one session-scoped local instance (one per pytest-xdist worker under
``make test``). The review page's tests get a headless Chromium (``chromium``, one per
module; skipped where Debian's Chromium is missing) and ``serve``, a static HTTP server of
a folder on loopback, as a bucket's static hosting serves the page.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's; .ci/run installs it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium; .ci/run does it)")

# libgomp's threads busy-wait after every parallel region unless told otherwise. On 2 cores the
# pytest process, its xdist sibling and Ray's workers all run torch, and the spinning threads
# hold the cores that the others need: two ResNet-18 training loops side by side took 32 s each,
# 8.5 s each with PASSIVE (alone: 4.8 s, 6.4 s with PASSIVE). Read when torch loads, so set here,
# before any test module imports it; Ray's workers and the jobs' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Files by how long they run, longest first (2 cores, `make test`): pytest-xdist's workers take
# whole files in collection order, so the long ones start at once and short files fill the end.
LONGEST_FIRST = ("test_dnf.py", "test_cluster_head.py", "test_plan.py", "test_train.py", "test_scan_faults.py", "test_scan.py", "test_audit.py",
                 "test_evaluate.py", "test_rescore.py", "test_rescan.py", "test_invariant.py", "test_kept_features.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL of a moto S3 server on loopback, with AWS env vars pointing at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start; see {log.name}")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the test S3 server; yields ``s3://name``."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    fs.invalidate_cache()
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def tiny_encoder():
    """The shipped random ``test-tiny`` CLIP on CPU."""
    from detector_core.method.features import ClipEncoder

    return ClipEncoder("test-tiny", "none", device="cpu")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    """A detector bundle of a random MLP (seed 0) on the tiny CLIP's image features, threshold logit 0: what scans need."""
    import torch

    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec
    from detector_core.method.model import DetectorMLP

    torch.manual_seed(0)
    model = DetectorMLP(64).eval()
    path = tmp_path_factory.mktemp("bundle") / "detector"
    save_bundle(DetectorBundle(model=model, features=FeatureSpec(clip_model="test-tiny", feature_mode="image"), threshold_logit=0.0), str(path))
    return path


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session, yielding its address (for the tests' own driver processes); workers inherit the S3 test-server variables."""
    import ray

    from jobs.common.ray_setup import LOCAL_RAY_SYSTEM_CONFIG, use_local_ray_env

    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    use_local_ray_env()  # as a job's private Ray is started (jobs.common.ray_setup.init_ray)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory):
    """300 real + 300 generated demo PNGs and a Parquet manifest of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from detector_core.demo import write_dataset

    root = tmp_path_factory.mktemp("demo")
    rows = write_dataset(root / "images", 300, 300, seed=0)
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root / "manifest.parquet"


@pytest.fixture(scope="session")
def demo_features(ray_local, demo_manifest, tmp_path_factory):
    """The demo manifest embedded once with the tiny CLIP (a jobs.embed feature cache)."""
    from jobs.embed import main as embed_main

    cache = tmp_path_factory.mktemp("features") / "cache"
    embed_main(["--manifest", str(demo_manifest), "--output", str(cache), "--batch-size", "128", "--clip-model", "test-tiny", "--pretrained", "none"])
    return cache


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test output stays readable
        pass


@contextlib.contextmanager
def serve(folder):
    """A static HTTP server of ``folder`` on loopback (as a bucket's static hosting serves the review page); yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium through Playwright, one per test module."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
