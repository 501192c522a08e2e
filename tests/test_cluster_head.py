"""`ray job submit` against a real head started with ``ray start --head`` (marker ``cluster``, run by ``make test``).

The head has token auth on and its dashboard on loopback. The submission test uploads a labelled
image set to the S3 server in tests, and with the ``ray job submit`` CLI trains a detector to
s3://, scans an s3:// prefix with it and reads the tables back from the bucket; jobs that must
fail end non-zero with one ``ERROR:`` line at the end of their logs. Wrong credentials, dead
addresses, secrets in logs and the nightly submitter are tried against the same head. The head
is stopped at the end, whatever happened. (``tests/test_cluster.py``: the cluster/ configs.)
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.common.ray_setup import LOCAL_RAY_ENV, LOCAL_RAY_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A Ray head from `ray start --head --block` with token auth on; stopped (process tree killed) at the end.

    It keeps idle workers and lists Parquet with one footer reader, as a private Ray does
    (``LOCAL_RAY_SYSTEM_CONFIG``, ``LOCAL_RAY_ENV``): on 2 cores each job's stages would otherwise
    re-import torch and pyarrow in fresh workers.
    """
    import psutil

    token = uuid.uuid4().hex
    dash, gcs = _free_port(), _free_port()
    temp = Path(f"/tmp/rh-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
    env = {**LOCAL_RAY_ENV, **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "wb")
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", "--num-cpus=4", f"--temp-dir={temp}",
         # Every fixed default port elsewhere too: the session's local Ray already holds them.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
         "--include-dashboard=true", "--disable-usage-stats", f"--system-config={json.dumps(LOCAL_RAY_SYSTEM_CONFIG)}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not come up; see {log.name}")
            time.sleep(2)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "token": token}
    finally:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=8)
        for p in alive:
            p.kill()
        log.close()
        subprocess.run(["rm", "-rf", str(temp)])


def _submit(head, runtime_env: Path, *cmd: str, wait: bool = True, sid: str | None = None) -> subprocess.CompletedProcess | str:
    sid = sid or f"t-{uuid.uuid4().hex[:8]}"
    args = [str(VENV_BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", sid,
            "--runtime-env", str(runtime_env), *([] if wait else ["--no-wait"]), "--", *cmd]
    deadline = time.time() + 120
    while True:
        res = subprocess.run(args, env=head["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        # The job API answers before the head's job agent is up; Ray says to try again.
        if "No available agent to submit job" not in res.stdout + res.stderr or time.time() > deadline:
            break
        time.sleep(2)
    if not wait:
        assert res.returncode == 0, res.stdout + res.stderr
        return sid
    return res


def _wait(head, sid: str, timeout: float = 300) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(sid))) not in ("JobStatus.SUCCEEDED", "JobStatus.FAILED", "JobStatus.STOPPED", "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {sid} still {status}"
        time.sleep(1)
    return status.rsplit(".", 1)[-1], client.get_job_logs(sid)


def _last_line(logs: str) -> str:
    return [ln for ln in logs.splitlines() if ln.strip()][-1]


def _runtime_env(tmp_path: Path, endpoint: str, **extra_env) -> Path:
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["env_vars"] = {**env.get("env_vars", {}), "AWS_ENDPOINT_URL": endpoint, **extra_env}
    path = tmp_path / f"runtime_env_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


@pytest.mark.cluster
def test_job_api_refuses_requests_without_the_token(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    res = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head["address"]], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    assert subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_head["address"]], env=wrong, capture_output=True).returncode != 0


@pytest.mark.cluster
def test_train_then_scan_through_ray_job_submit_on_s3(ray_head, s3_server, s3_bucket, tmp_path):
    import s3fs

    from detector_core.demo import encode, make_dataset, make_image

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    b = s3_bucket[5:]
    rows = []
    for d in make_dataset(40, 40, seed=4):
        key = f"{b}/data/{d.name}.png"
        fs.pipe(key, encode(d.image))
        rows.append({"uri": f"s3://{key}", "label": d.label, "generator": d.generator})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs.pipe(f"{b}/data/manifest.parquet", buf.getvalue())
    rng = np.random.default_rng(9)
    for i in range(8):
        fs.pipe(f"{b}/incoming/img_{i}.png", encode(make_image(rng)))
    fs.pipe(f"{b}/incoming/broken.jpg", b"<html>not an image</html>")
    renv = _runtime_env(tmp_path, s3_server)

    train = _submit(ray_head, renv, "python", "-m", "jobs.train", "--manifest", f"{s3_bucket}/data/manifest.parquet",
                    "--output", f"{s3_bucket}/train", "--epochs", "3", "--batch-size", "32", "--embed-batch-size", "64",
                    "--clip-model", "test-tiny", "--pretrained", "none")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{b}/train/detector/detector.json") and fs.exists(f"{b}/train/metrics.json")

    # Failures, submitted together while the scan runs: each ends FAILED with one ERROR: line last.
    # The head runs on this machine, so a SQLite catalog file here is one it can reach.
    catalog = ["--catalog", f"sqlite:///{tmp_path}/catalog.db"]
    bad_input = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/train/detector",
                        "--input", f"{s3_bucket}/no-such-prefix/", "--output", f"{s3_bucket}/scans-x", *catalog,
                        "--namespace", "x", wait=False)
    no_bundle = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/no-such-detector",
                        "--input", f"{s3_bucket}/incoming/", "--output", f"{s3_bucket}/scans-x", *catalog, wait=False)
    scan = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", f"{s3_bucket}/train/detector",
                   "--input", f"{s3_bucket}/incoming/", "--output", f"{s3_bucket}/scans", *catalog)
    assert scan.returncode == 0, scan.stdout[-3000:] + scan.stderr[-3000:]

    from detector_core.tables.catalog import read_table

    scores = read_table(f"{s3_bucket}/scans", "scores")
    errors = read_table(f"{s3_bucket}/scans", "errors")
    assert scores.num_rows == 8 and errors.num_rows == 1
    assert sorted(scores["uri"].to_pylist()) == sorted(f"{s3_bucket}/incoming/img_{i}.png" for i in range(8))
    assert fs.ls(f"{b}/scans/runs")

    status, logs = _wait(ray_head, bad_input)
    assert status == "FAILED" and _last_line(logs).startswith("ERROR:") and "no-such-prefix" in _last_line(logs)
    status, logs = _wait(ray_head, no_bundle)
    assert status == "FAILED" and _last_line(logs).startswith("ERROR:") and "no-such-detector" in _last_line(logs)


@pytest.mark.cluster
def test_wrong_credentials_end_with_one_line(ray_head, tmp_path):
    """An S3 server that checks signatures (moto with auth on) refuses unknown keys."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        renv = _runtime_env(tmp_path, f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="AKIDWRONGWRONGWRONG0",
                            AWS_SECRET_ACCESS_KEY="wrong-secret")
        sid = f"t-{uuid.uuid4().hex[:8]}"
        res = _submit(ray_head, renv, "python", "-m", "jobs.scan", "--detector", "s3://models/detector",
                      "--input", "s3://uploads/", "--output", "s3://audit/scans", "--catalog", f"sqlite:///{tmp_path}/c.db", sid=sid)
        assert res.returncode != 0
        status, logs = _wait(ray_head, sid)
        last = _last_line(logs)
        assert status == "FAILED" and last.startswith("ERROR: object store refused the request"), logs[-2000:]
        assert "check the credentials" in last
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.cluster
def test_no_secret_reaches_any_file_a_local_run_leaves(ray_head, s3_server, s3_bucket, tmp_path):
    """A scan of s3:// with a marker secret, as its own driver with its own local Ray: no file it leaves holds the secret.

    Ray writes runtime envs in plain text into its session logs; credentials must reach the
    workers through their environment, never a runtime env. moto accepts any key pair, so the
    marker is the secret actually used for every S3 request. Without ``--ray-address`` the job
    starts a private local Ray and says so -- here beside a running `ray start --head` with
    token auth, whose token is in the environment: the job must not join that head (and fail
    on ``num_cpus``).
    """
    import shutil
    import tempfile

    import s3fs

    from detector_core.demo import encode, make_image

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(0)
    for i in range(3):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
    _tiny_bundle(tmp_path / "detector")
    marker = "MARKERSECRET" + uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=marker, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=ray_head["token"])
    try:
        res = subprocess.run([sys.executable, "-m", "jobs.scan", "--detector", str(tmp_path / "detector"), "--input", f"{s3_bucket}/in",
                              "--output", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "scored 3" in res.stdout and "starting a private local Ray" in res.stderr
        leaked = []
        for root in (Path(ray_tmp), tmp_path / "out"):
            for p in root.rglob("*"):
                if p.is_file() and not p.is_symlink() and marker.encode() in p.read_bytes():
                    leaked.append(str(p))
        files = sum(1 for _ in Path(ray_tmp).rglob("*"))
        assert files > 10 and not leaked, f"the secret is in {leaked}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _tiny_bundle(path: Path) -> Path:
    import torch

    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec
    from detector_core.method.model import DetectorMLP

    torch.manual_seed(0)
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny", feature_mode="image")), str(path))
    return path


@pytest.mark.cluster
def test_ray_connections_fail_fast_with_one_line(ray_head, tmp_path):
    """As a user on a workstation with a `ray start --head` (token auth on) running.

    A dead address, a token cluster without the token, a wrong token and the dashboard's
    address each end the job within the subprocess timeout (ray.init would wait minutes on a
    dead head) with one ``ERROR:`` line saying what to set. (No address at all: a private local
    Ray beside the head, in ``test_no_secret_reaches_any_file_a_local_run_leaves``.)
    """
    from detector_core.demo import encode, make_image

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"img_{i}.png").write_bytes(encode(make_image(rng)))
    args = [sys.executable, "-m", "jobs.scan", "--detector", str(_tiny_bundle(tmp_path / "detector")), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out")]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"]}
    cases = [
        (["--ray-address", f"127.0.0.1:{_free_port()}"], with_token, "no Ray cluster answers at"),
        (["--ray-address", ray_head["gcs"]], base, "requires a token and RAY_AUTH_MODE is not set; set RAY_AUTH_MODE=token"),
        (["--ray-address", ray_head["gcs"]], {**with_token, "RAY_AUTH_TOKEN": "not-the-token"}, "is not its token"),
        (["--ray-address", ray_head["address"]], with_token, "is a dashboard (job API) address"),
    ]
    for extra, env, says in cases:
        res = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        assert _last_line(res.stderr).startswith("ERROR: ") and says in _last_line(res.stderr), res.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing was written before the connection was checked


@pytest.mark.cluster
def test_nightly_submitter_submits_once_follows_and_stops_at_the_deadline(ray_head, tmp_path):
    """`python -m jobs.submit`, as the CronJob runs it, against the real head (token from the environment).

    Two submitters with the same id at once start one job and both follow it to its end; a
    job past its deadline is stopped (the Ray job, not only the submitter); SIGTERM to the
    submitter (Kubernetes' activeDeadlineSeconds) stops the Ray job too.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    env = {**{k: v for k, v in ray_head["env"].items() if k != "RAY_ADDRESS"}, "RAY_ADDRESS": ray_head["address"]}
    base = [sys.executable, "-m", "jobs.submit"]

    def start(sid: str, *cmd: str, deadline: float = 300) -> subprocess.Popen:
        return subprocess.Popen([*base, "--submission-id", sid, "--deadline", str(deadline), "--", *cmd], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    once = f"once-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "runs"
    cmd = ["python", "-c", f"import time; open({str(marker)!r}, 'a').write('ran\\n'); time.sleep(3); print('night done')"]
    a, b = start(once, *cmd), start(once, *cmd)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert marker.read_text() == "ran\n"  # the entrypoint ran once
    assert [j.submission_id for j in client.list_jobs()].count(once) == 1
    assert all("night done" in out for out, _ in outs)  # both followed the one job's log
    again = subprocess.run([*base, "--submission-id", once, "--", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "exists (SUCCEEDED)" in again.stdout and marker.read_text() == "ran\n"  # not rerun

    late = f"late-{uuid.uuid4().hex[:6]}"
    p = start(late, "python", "-c", "import time; time.sleep(600)", deadline=8)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 1 and _last_line(err) == f"ERROR: job {late} ran past its deadline of 8 s and was stopped"
    assert str(client.get_job_status(late)).endswith("STOPPED")

    term = f"term-{uuid.uuid4().hex[:6]}"
    p = start(term, "python", "-c", "import time; time.sleep(600)")
    deadline = time.time() + 120
    while not str(client.get_job_status(term) if term in [j.submission_id for j in client.list_jobs()] else "").endswith("RUNNING"):
        assert time.time() < deadline, "the job never started"
        time.sleep(1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "the submitter was terminated" in _last_line(err)
    assert str(client.get_job_status(term)).endswith("STOPPED")
