"""Benchmark: what one small training fit costs on a private local Ray besides its epochs.

Starts a local Ray as ``jobs.common.ray_setup.init_ray`` does (its system config and environment, with
``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` set by ``--footer-actors``, Ray's own default 32, and
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` by ``--train-poll-s``, Ray's own default 2), embeds the
demo set with the tiny CLIP, then runs ``--fits`` fits of ``jobs.train --features`` (2
workers, ``--epochs`` epochs) and reports for each: wall seconds, CPU seconds of the whole machine
(``/proc/stat``, Linux; run it on an otherwise idle machine) and the Ray worker processes it
started (worker log files in the session folder). On 2 cores most of a small fit is process
start-up: Ray Train's controller and helper actors, its workers, Ray Data's readers; with
many epochs, Ray Train's wait for the controller's next poll of the workers' reports.

    python -m bench.bench_fit_overhead [--footer-actors 1] [--train-poll-s 2] [--epochs 12] [--fits 2] [--out bench/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        p = [int(x) for x in f.readline().split()[1:]]
    return (p[0] + p[1] + p[2] + p[5] + p[6] + p[7]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--footer-actors", type=int, default=None,
                    help="RAY_DATA_PARQUET_FOOTER_NUM_ACTORS for the local Ray (default: what jobs.common.ray_setup.LOCAL_RAY_ENV sets)")
    ap.add_argument("--train-poll-s", type=float, default=None,
                    help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the local Ray (default: what jobs.common.ray_setup.LOCAL_RAY_ENV sets)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fit")
    ap.add_argument("--fits", type=int, default=2, help="training fits to run on the same cache")
    ap.add_argument("--out", default="", help="write the results here as JSON")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from detector_core.demo import write_dataset
    from jobs import embed, train
    from jobs.common.outputs import write_json
    from jobs.common.ray_setup import LOCAL_RAY_ENV, LOCAL_RAY_SYSTEM_CONFIG

    env = dict(LOCAL_RAY_ENV)
    if args.footer_actors is not None:
        env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(args.footer_actors)
    if args.train_poll_s is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.train_poll_s)
    os.environ.update(env)  # before Ray starts: its workers inherit it
    root = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    pq.write_table(pa.Table.from_pylist(write_dataset(root / "images", 300, 300, seed=0)), root / "manifest.parquet")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def workers() -> int:
        return len(list(logs.glob("worker-*.out"))) + len(list(logs.glob("old/worker-*.out")))

    def measured(fn) -> dict:
        w0, c0, t0 = workers(), _busy_cpu_s(), time.time()
        fn()
        return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(_busy_cpu_s() - c0, 1), "new_workers": workers() - w0}

    cache = str(root / "features")
    result = {"footer_actors": env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"], "train_poll_s": env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
              "epochs": args.epochs, "ray_env": env, "cores": os.cpu_count(),
              "embed": measured(lambda: embed.main(["--manifest", str(root / "manifest.parquet"), "--output", cache, "--batch-size", "128",
                                                     "--clip-model", "test-tiny", "--pretrained", "none"]))}
    result["fits"] = [measured(lambda i=i: train.main(["--features", cache, "--output", str(root / f"fit{i}"), "--workers", "2",
                                                      "--epochs", str(args.epochs), "--batch-size", "64"]))
                      for i in range(args.fits)]
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
