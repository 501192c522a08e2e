"""What every job shares besides its flags (``jobs.flags``): Ray start-up, output files, errors.

``init_ray``/``check_connection`` (a cluster that answers, or one line saying what to set),
``write_json``/``write_parquet`` (whole files, never half), ``config_dict`` (the resolved
config saved beside every artifact), ``JobError`` and ``run_main`` (every failure ends with
one ``ERROR:`` line), ``require_weights`` (absent weights refused before any work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time
import uuid

from detector_core.storage import join, open_fs

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


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def write_json(uri: str, payload: dict, storage_options: dict | None = None) -> None:
    """Write JSON to a local path or URI (whole-object put; local via temp + rename)."""
    fs, path = open_fs(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_parquet(table, uri: str, storage_options: dict | None = None) -> None:
    """Write one Parquet file to a local path or URI, making its folder."""
    import pyarrow.parquet as pq

    fs, path = open_fs(uri, storage_options)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class JobError(Exception):
    """A job cannot go on, for a reason its user can act on: the message is the one line they read.

    Raised anywhere in a job (and by functions that other jobs reuse); printed only by
    ``run_main``, as the log's last line ``ERROR: <message>``, with exit status ``code`` (2 for
    bad input or settings, 1 for a run that failed). ``--debug`` adds the traceback, with the
    library error it was raised from.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def require_weights(spec, storage_options: dict | None = None) -> None:
    """End the job now, with what to pass, when a feature spec's weights are not here (not later in every actor)."""
    from detector_core.dnf import UnetNotFoundError
    from detector_core.extractors import check_available
    from detector_core.features import WeightsNotFoundError

    try:
        check_available(spec, storage_options)
    except (WeightsNotFoundError, UnetNotFoundError, ValueError) as exc:
        raise JobError(str(exc)) from exc


def parse_date(value: str, flag: str) -> str:
    """``YYYY-MM-DD`` as given to ``flag``, or the job ends with the one line that says so."""
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise JobError(f"{flag} {value!r} is not a date (YYYY-MM-DD)") from None


@contextlib.contextmanager
def output_lease(out, run_id: str, ttl_s: float, wait: bool):
    """The write lease of scan output ``out`` for a job's whole run, renewed in the background; the job
    ends naming the holder when another writer has it (unless ``wait``). Released at the end whatever
    happened; a release that fails only warns, since the job's own error is what its user must read."""
    from detector_core.lease import Lease, LeaseHeldError

    lease = Lease(out.fs, out.root, run_id, ttl_s)
    try:
        lease.acquire(wait=wait)
    except LeaseHeldError as exc:
        raise JobError(str(exc))
    lease.start_renewing()
    try:
        yield lease
    finally:
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            print(f"warning: the lease of {out.uri} could not be released ({type(exc).__name__}: {exc}); it expires after "
                  f"{ttl_s:g} s", file=sys.stderr, flush=True)


def open_output(scan: str, catalog: str, namespace: str, storage_options: dict | None):
    """A scan output's tables (``detector_core.views.open_scan_output``), or the job ends with the reason."""
    from detector_core.catalog import CatalogError
    from detector_core.views import open_scan_output

    try:
        return open_scan_output(scan, catalog, namespace, storage_options)
    except CatalogError as exc:
        raise JobError(str(exc))


_RAY_WRAPPERS = ("ActorDiedError", "RayActorError", "RayTaskError", "ActorUnavailableError")
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.M)  # "WeightsNotFoundError: ..." lines of a remote traceback


def _cause(exc: BaseException) -> str:
    """One line that says what went wrong, from the exception chain's most telling link."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain or len(chain) > 10:
            break
        chain.append(nxt)
    for e in chain:
        if type(e).__name__ in _RAY_WRAPPERS:  # a task or actor died: say what killed it, not that it died
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException) and cause is not e:
                return _cause(cause)
            found = [m for m in _RAISED.findall(str(e)) if m[0] not in _RAY_WRAPPERS]
            if found:
                return f"{found[-1][0]}: {found[-1][1].strip()[:400]}"
        if isinstance(e, (PermissionError,)) or type(e).__name__ in ("NoCredentialsError", "ClientError"):
            text = " ".join(str(e).split())
            return f"object store refused the request ({type(e).__name__}: {text}); check the credentials (AWS_* variables, instance role) and --s3-endpoint"
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text[:400]}"


def run_main(main) -> None:
    """Run a job's ``main`` as a program; every way it ends badly ends with one ``ERROR:`` line.

    A ``JobError`` prints its message (and, with ``--debug``, its traceback first) and exits
    with its code; any other exception is a crash: its traceback stays in the log, then the
    one line says the cause, exit 1. Under ``ray job submit`` the log tail is what people read
    first; the last line says the cause instead of leaving them to dig it out of a traceback.
    """
    import traceback

    try:
        main()
    except JobError as exc:
        if "--debug" in sys.argv[1:]:
            traceback.print_exc()
            sys.stdout.flush()
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.code) from None
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of the log must say why
        traceback.print_exc()
        sys.stdout.flush()
        print(f"ERROR: {_cause(exc)}", file=sys.stderr, flush=True)
        raise SystemExit(1)


__all__ = ["init_ray", "check_connection", "check_ray_address", "new_run_id", "write_json", "write_parquet", "config_dict", "JobError", "run_main", "join", "parse_date", "open_output", "output_lease", "require_weights"]
