"""Ray start-up for every job: a private local Ray, or a cluster checked before joining it.

``init_ray``/``check_connection`` (a cluster that answers, or one line saying what to set);
``LOCAL_RAY_SYSTEM_CONFIG``/``LOCAL_RAY_ENV``: the settings a private Ray on one machine gets.
"""

from __future__ import annotations

import os
import sys

from jobs.common.errors import JobError

# Ray kills an idle worker beyond one per CPU after 1 s. A job's stages (plan, stream, state
# refresh) each need workers with pyarrow, pyiceberg or torch imported, and on a small machine
# a fresh worker's imports cost 1-2 s of CPU: a 40-image scan on 2 cores spent ~2/3 of its
# 17-20 s re-importing in new workers. A private Ray lives as long as its job, so its idle
# workers are kept (6-7 s; docs/scaling.md). Clusters keep Ray's default.
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}
# Ray Data's Parquet reader lists a dataset's files by starting 32 ``FooterReader`` actors --
# 32 fresh processes -- for every read, and training reads its feature cache three times
# (train, validation, calibration). A cache has tens of files: on one machine one reader lists
# them all (a 2-worker, 2-epoch fit on 2 cores: 43-50 -> 30-35 CPU-s; docs/scaling.md). Workers
# inherit it from the process that starts Ray; a cluster sets it in its own environment.
# Ray Train's controller collects a worker's report every 2 s and a worker's next report waits
# for it (a queue of one): every epoch of a fit lasts at least 2 s. A private Ray runs small
# fits whose epochs take a fraction of that (12 epochs of the demo set: 48 -> 22-26 s); a poll
# every 0.25 s costs the controller a few remote calls a second. One machine is not preempted
# by a cloud provider: no PreemptionWatcher actor (one more fresh process per fit).
LOCAL_RAY_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def use_local_ray_env() -> None:
    """Put ``LOCAL_RAY_ENV`` into this process's environment (a user's own setting wins), for the local Ray started next."""
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster (under ``ray job submit``, ``RAY_ADDRESS`` or ``--ray-address``) or start a private local Ray.

    A cluster address is checked before ``ray.init``, which would otherwise wait minutes on a
    dead head (and ignore SIGTERM meanwhile) or print 20 s of ``InvalidAuthToken`` against a
    token cluster: no answer, or a refused token, ends the job with one line that says what
    to set. No environment variable is passed through a runtime env: Ray writes runtime envs in
    plain text into its session logs, so credentials would land on disk. A local Ray's workers
    inherit this process's environment; a cluster's workers use their own (instance profile,
    IRSA, the job's env from ``cluster/runtime_env.yaml``, which holds no secrets).
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:
        # A private local Ray, even when a `ray start` head runs on this machine (ray.init()
        # would join it and then refuse num_cpus). CPUs are scheduling tokens on a small
        # machine: Ray Train workers (1 CPU each) must leave some for the tasks that feed them.
        cpus = max(os.cpu_count() or 1, 4)
        print(f"starting a private local Ray ({cpus} CPUs); pass --ray-address auto (or set RAY_ADDRESS) to use a running cluster",
              file=sys.stderr, flush=True)
        use_local_ray_env()
        ray.init(address="local", num_cpus=cpus, log_to_driver=True, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
        return
    check_connection(address)
    ray.init(address=address, log_to_driver=True)


def check_connection(address: str | None) -> None:
    """Check the cluster a job will join (``--ray-address``, else ``RAY_ADDRESS``) before any work; nothing to check for a private Ray.

    Jobs that write before they start Ray (the scan takes its output's lease first) call this
    right after validating their flags, so a wrong address leaves nothing behind.
    """
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        check_ray_address(target)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when no Ray cluster answers at ``address`` or it refuses our token."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):
        return  # Ray Client: its own connection timeout applies
    if address.startswith(("http://", "https://")):
        raise JobError(f"{address} is a dashboard (job API) address: submit with `ray job submit --address {address} -- python -m jobs…`, "
                       "or pass the cluster's GCS address (host:6379) to --ray-address")
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:  # "auto" with nothing running here, or no host:port
        raise JobError(f"no Ray cluster at --ray-address {address}: {e}; start one (`ray start --head`) or leave out --ray-address "
                       "for a private local Ray")
    if resolved is None:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise JobError(f"no Ray cluster answers at {resolved} ({e.strerror or type(e).__name__}): the head is down, or its address file "
                       "is left from one that died; start it (`ray start --head`), fix --ray-address/RAY_ADDRESS, or leave both out "
                       "for a private local Ray")
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token auth: nothing more to check
        return
    try:
        GcsClient(address=resolved)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        raise JobError(f"the Ray cluster at {resolved} refused this job: it requires a token and "
                       + ("RAY_AUTH_MODE is not set; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)" if mode != "token"
                else "the one given (RAY_AUTH_TOKEN or ~/.ray/auth_token) is not its token"))
