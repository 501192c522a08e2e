"""The code before the streaming scan, extracted from git, to measure and migrate against.

``LEGACY_REF`` is the last commit whose ``jobs.scan`` drove one Ray Data execution per
chunk, collected result rows in the driver and wrote hive-partitioned Parquet (schema 2).
``legacy_tree()`` extracts that commit's ``detector_core`` and ``jobs`` once into a cache
folder; ``legacy_scan(args)`` runs its ``python -m jobs.scan`` in a subprocess with its
own local Ray, or as a job of a running one (``ray_address``: Ray puts the job's working
folder, the old tree, on its workers' path), so that its workers import the old modules,
not these; it returns the run summary and the process's peak RSS. ``bench_scan`` and
``bench_plan`` put the old and the new scan side by side on one machine in one run;
``tests/test_audit.py`` migrates what the old code wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEGACY_REF = "81494c6"


def legacy_tree(ref: str = LEGACY_REF) -> Path:
    """``detector_core`` + ``jobs`` of ``ref`` in a cache folder (raises RuntimeError without git history)."""
    dest = Path(tempfile.gettempdir()) / f"detector-legacy-{ref}"
    if (dest / "jobs" / "scan.py").exists():
        return dest
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "detector_core", "jobs"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot extract commit {ref} (needs git and the repository's history): {exc}") from exc
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def legacy_scan(args: list[str], timeout: float = 1800, ray_address: str | None = None) -> dict:
    """Run the old ``jobs.scan`` with ``args``; returns its run summary plus ``driver_peak_rss_mb``."""
    return scan_process(args, legacy_tree(), timeout, ray_address)


def scan_process(args: list[str], tree: Path | None = None, timeout: float = 1800, ray_address: str | None = None) -> dict:
    """``jobs.scan`` of ``tree`` (default: this checkout) in a fresh process with its own local Ray, or on ``ray_address``.

    Returns the run summary plus ``driver_peak_rss_mb``, the driver process's peak RSS. The local
    Ray is started before the job runs, so the job's ``seconds`` (listing to commit) exclude it.
    The benchmarks measure with a Ray of the job's own; the tests join their session Ray, which
    spares a Ray start and its processes on 2 cores.
    """
    tree = tree or ROOT
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    # Ray is started before the job's clock starts (as on a cluster, where it is already up);
    # both codes' init_ray() then find it running.
    code = ("import json, resource, sys\nfrom jobs import scan\n"
            "try:\n    from jobs.common.ray_setup import init_ray\n"
            "except ImportError:  # a tree from before jobs.common was a package\n    from jobs.common import init_ray\n"
            "init_ray(); s = scan.main(sys.argv[1:]); "
            "s['driver_peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            "print('LEGACY-SUMMARY ' + json.dumps(s, default=str))")
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    for line in res.stdout.splitlines():
        if line.startswith("LEGACY-SUMMARY "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"legacy scan failed ({res.returncode}): {res.stdout[-2000:]}{res.stderr[-2000:]}")
