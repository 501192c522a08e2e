"""A scan under faults: killed drivers (kill -9 at random moments and between table commits), dying actors, two scans at once.

Whatever is killed, a re-run scores every object exactly once, another scan's output is never
captured, and readers never see part of a commit unit (``tests/test_scan.py``: scans that go well).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_scan import _exactly_once, _images, _tables

from detector_core.demo import encode, make_image
from jobs import scan
from jobs.common.errors import JobError

ROOT = Path(__file__).resolve().parents[1]


def _start_driver(address: str, args: list[str]) -> subprocess.Popen:
    """``python -m jobs.scan ARGS`` started as its own driver process on the Ray at ``address`` (output in ``stdout``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "jobs.scan", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _driver(address: str, args: list[str], kill_after: float | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``_start_driver``, waited for; ``kill_after``: SIGKILL it then."""
    proc = _start_driver(address, args)
    try:
        out, _ = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: no cleanup of any kind in the driver
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_an_actor_that_dies_is_replaced_and_its_batch_retried(ray_local, bundle_dir, tmp_path):
    bucket = tmp_path / "bucket"
    uris = _images(bucket, 10, 3)
    marker = tmp_path / "crashed"
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(tmp_path / "out"),
                         "--batch-size", "4", "--crash-actor-once", str(marker)])
    assert marker.exists()  # the actor really died once
    assert summary["scored"] == 10 and summary["model_loads"] == 2  # the replacement built its models again
    _exactly_once(tmp_path / "out", uris)


def test_bug1_bug2_a_killed_scan_never_captures_another_input(ray_local, bundle_dir, tmp_path):
    a, b = _images(tmp_path / "a", 16, 6), _images(tmp_path / "b", 6, 7, prefix="b")
    out = tmp_path / "out"
    common = ["--detector", str(bundle_dir), "--output", str(out), "--chunk-size", "4", "--lease-ttl", "3", "--wait"]
    # Bug 2: a scan that dies at the same point on every attempt (each commits a unit, then dies in the next) ...
    for _ in range(2):
        died = _driver(ray_local, [*common, "--input", str(tmp_path / "a"), "--kill-at", "scores:1"])
        assert died.returncode == -9, died.stdout[-2000:]
    # ... does not block the output, and (bug 1) a scan of another input does only its own work.
    other = scan.main([*common, "--input", str(tmp_path / "b"), "--scan-date", "2026-11-20"])
    t = _tables(out)
    mine = [u for u, s in zip(t["scores"]["uri"].to_pylist(), t["scores"]["scan_id"].to_pylist()) if s == other["scan_id"]]
    assert sorted(mine) == b and other["scored"] == 6 and other["input"] == str(tmp_path / "b")
    assert other["recovered_units"] == 1  # it finished the killed scan's half-committed unit (its rows are a's)
    # The first input's remainder is done by the next scan of that input, each object once.
    scan.main([*common, "--input", str(tmp_path / "a")])
    _exactly_once(out, a + b)


def test_kill_9_at_random_moments_then_rerun_is_exactly_once(ray_local, bundle_dir, tmp_path):
    uris = _images(tmp_path / "bucket", 30, 8)
    out = tmp_path / "out"
    args = ["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(out), "--chunk-size", "3",
            "--batch-size", "3", "--lease-ttl", "2", "--wait"]
    rng = np.random.default_rng(11)
    for delay in rng.uniform(8, 16, size=1):
        _driver(ray_local, args, kill_after=float(delay))
    scan.main(args)
    _exactly_once(out, uris)


def test_bug3_kill_9_between_table_commits_on_s3(ray_local, bundle_dir, s3_bucket, tmp_path):
    """A real kill -9 after errors and scores committed a unit and before flagged did; every step: test_lease.py, test_maintain.py."""
    import s3fs

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(12)
    uris = []
    for i in range(8):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
        uris.append(f"{s3_bucket}/in/img_{i}.png")
    fs.pipe(f"{s3_bucket[5:]}/in/broken.jpg", b"not an image")
    uris.append(f"{s3_bucket}/in/broken.jpg")
    out = f"{s3_bucket}/scans"
    args = ["--detector", str(bundle_dir), "--input", f"{s3_bucket}/in", "--output", out, "--chunk-size", "3",
            "--catalog", f"sqlite:///{tmp_path}/catalog.db", "--lease-ttl", "2", "--wait"]
    died = _driver(ray_local, [*args, "--kill-at", "flagged:1"])
    assert died.returncode == -9, died.stdout[-2000:]
    assert fs.ls(f"{s3_bucket[5:]}/scans/_intents")  # the half-committed unit's intent is there
    scan.main(args)
    _exactly_once(out, uris)


def test_bug4_two_scans_at_once_one_refuses_naming_the_holder(ray_local, bundle_dir, tmp_path, capsys):
    from detector_core.storage import open_fs
    from detector_core.tables.lease import Lease

    uris = _images(tmp_path / "bucket", 6, 13)
    out = tmp_path / "out"
    args = ["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(out)]
    fs, root = open_fs(str(out))
    holder = Lease(fs, root, "scan-held-by-someone", ttl_s=3)
    holder.acquire()
    with pytest.raises(JobError, match="scan-held-by-someone"):
        scan.main([*args, "--full"])
    # --wait: the holder died without releasing; its lease expires and the waiting scan goes ahead.
    waited = scan.main([*args, "--full", "--wait"])
    assert waited["scored"] == 6

    # Two real drivers started together on a fresh output: one scans, the other refuses (or, had it
    # started later, would find nothing left): every object once.
    out2 = tmp_path / "out2"
    procs = [_start_driver(ray_local, [*args[:-1], str(out2)]) for _ in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0, logs
    if codes[1] != 0:
        assert any("is being written by scan" in log for log in logs), logs
    _exactly_once(out2, uris)


def test_readers_never_see_part_of_a_commit_unit(ray_local, bundle_dir, tmp_path):
    import threading

    from detector_core.tables.catalog import ScanOutput

    uris = _images(tmp_path / "bucket", 24, 14)
    out = tmp_path / "out"
    seen, stop = [], threading.Event()

    def poll():
        from detector_core.tables.views import duckdb_connection

        while not stop.is_set():
            try:
                o = ScanOutput.open(str(out), create=False)
                t = o.table("scores")
                seen.append(("pyiceberg", t.scan().to_arrow().num_rows))
                con = duckdb_connection(o)
                seen.append(("duckdb", con.sql(f"SELECT count(*) FROM iceberg_scan('{t.metadata_location}')").fetchone()[0]))
            except Exception:  # noqa: BLE001 - tables not created yet
                pass
            time.sleep(0.3)  # leave the 2 cores to the scan

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(out),
                         "--chunk-size", "4", "--batch-size", "4"])
    stop.set()
    th.join(timeout=30)
    units = sorted((r["unit"], r["scored"]) for r in _tables(out)["runs"].to_pylist() if r["status"] == "unit")
    boundaries = set(np.cumsum([0] + [n for _, n in units]).tolist())
    assert summary["commit_units"] >= 4 and len({n for _, n in seen}) >= 3, seen  # the readers saw the table grow
    assert all(n in boundaries for _, n in seen), (seen, boundaries)
    _exactly_once(out, uris)
