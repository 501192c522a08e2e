"""Submit a job to a Ray cluster once under a fixed id, follow it to its end, and stop it at a deadline.

    python -m jobs.submit --submission-id "scan-$(date -u +%F)" --deadline 36000 \\
        --runtime-env cluster/runtime_env.yaml -- python -m jobs.scan --detector … --input … --output …

What the nightly CronJob runs instead of a bare ``ray job submit``, whose submitter pod is all
that Kubernetes' ``activeDeadlineSeconds`` kills (the Ray job runs on, and the next night's
starts beside it) and whose retry after a dropped log stream submits the scan a second time.
Here the submission id is the night's: a second submitter (a retried pod, a person running it
by hand) finds the job and follows it instead of starting another; a job that already ended
is reported, not rerun. The deadline counts from the job's own start, so a retried submitter
does not extend it; at the deadline, or on SIGTERM (the pod's own deadline), the Ray job is
stopped (``ray job stop``). The exit status is the job's: 0 when it succeeded, 1 otherwise,
with one ``ERROR:`` line last. The address is ``--address`` or ``RAY_ADDRESS`` (the
dashboard's http://…:8265); the token, where the cluster has one, comes from
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in the environment, never a flag.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import yaml

from jobs.common.errors import JobError, run_main
from jobs.common.flags import opt, parse_config

ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class SubmitConfig:
    submission_id: str = opt("", "the job's id, one per night (e.g. scan-2026-11-27): a job with this id is followed, never submitted twice")
    address: str = opt("", "the cluster's job API, http://HOST:8265 (default: RAY_ADDRESS)")
    runtime_env: str = opt("", "a runtime env YAML file (e.g. cluster/runtime_env.yaml); no secrets in it, Ray logs it")
    deadline: float = opt(36_000.0, "seconds from the job's start after which it is stopped", within="(0, inf)")
    poll: float = opt(5.0, "seconds between status checks when the log stream is not available", within="(0, 600]")


def _name(status) -> str:
    """``JobStatus.RUNNING`` (or ``RUNNING``) -> ``RUNNING``."""
    return str(status).rsplit(".", 1)[-1]


def _status(client, sid: str) -> str:
    return _name(client.get_job_info(sid).status)


def _find(client, sid: str):
    try:
        return client.get_job_info(sid)
    except RuntimeError as e:  # the SDK raises RuntimeError("... does not exist") for an unknown id
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise


def _submit_or_attach(client, cfg: SubmitConfig, entrypoint: list[str]) -> None:
    info = _find(client, cfg.submission_id)
    if info is not None:
        print(f"job {cfg.submission_id} exists ({_name(info.status)}): following it, not submitting again", flush=True)
        return
    runtime_env = None
    if cfg.runtime_env:
        with open(cfg.runtime_env) as f:
            runtime_env = yaml.safe_load(f) or {}
    try:
        client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=cfg.submission_id, runtime_env=runtime_env)
        print(f"submitted job {cfg.submission_id}: {shlex.join(entrypoint)}", flush=True)
    except RuntimeError as e:
        if _find(client, cfg.submission_id) is None:  # not a race with another submitter: a real refusal
            raise
        print(f"job {cfg.submission_id} was submitted by another submitter meanwhile: following it ({' '.join(str(e).split())[:200]})",
              flush=True)


async def _follow_logs(client, sid: str) -> None:
    async for lines in client.tail_job_logs(sid):
        print(lines, end="", flush=True)


def _follow(client, cfg: SubmitConfig) -> str:
    """Stream the job's log until it ends or its deadline passes; the final status ('DEADLINE' when stopped for it)."""
    sid = cfg.submission_id
    while True:
        info = client.get_job_info(sid)
        status = _name(info.status)
        if status in ENDED:
            return status
        started = (info.start_time or time.time() * 1000) / 1000
        left = started + cfg.deadline - time.time()
        if left <= 0:
            return "DEADLINE"
        try:
            asyncio.run(asyncio.wait_for(_follow_logs(client, sid), timeout=left))
        except (asyncio.TimeoutError, TimeoutError):
            return "DEADLINE"
        except JobError:  # SIGTERM's handler (run): the submitter is ending, not the log stream
            raise
        except Exception as e:  # noqa: BLE001 - a dropped log stream: poll the status instead
            print(f"log stream of {sid} dropped ({type(e).__name__}); checking its status every {cfg.poll:.0f} s", flush=True)
            time.sleep(min(cfg.poll, max(left, 0.1)))


def _stop(client, sid: str, why: str) -> None:
    print(f"stopping job {sid}: {why}", flush=True)
    client.stop_job(sid)
    deadline = time.time() + 60
    while _status(client, sid) not in ENDED and time.time() < deadline:
        time.sleep(1)


def run(cfg: SubmitConfig, entrypoint: list[str]) -> int:
    from ray.job_submission import JobSubmissionClient

    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if not cfg.submission_id:
        raise JobError("--submission-id is required (one per night, e.g. scan-$(date -u +%F))")
    if not entrypoint:
        raise JobError("no command after --: give the job's entrypoint, e.g. -- python -m jobs.scan …")
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address (or RAY_ADDRESS) must be the cluster's job API, http://HOST:8265; got {address!r}")
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection refused, token refused: one line saying which
        raise JobError(f"cannot reach the job API at {address}: {' '.join(str(e).split())[:300]}")
    sid = cfg.submission_id

    def on_term(signum, frame):  # the pod's deadline: the Ray job must not outlive its submitter
        _stop(client, sid, f"the submitter got signal {signal.Signals(signum).name}")
        raise JobError(f"job {sid} stopped: the submitter was terminated (signal {signal.Signals(signum).name})", code=1)

    signal.signal(signal.SIGTERM, on_term)
    _submit_or_attach(client, cfg, entrypoint)
    status = _follow(client, cfg)
    if status == "DEADLINE":
        _stop(client, sid, f"it ran past its deadline of {cfg.deadline:.0f} s")
        raise JobError(f"job {sid} ran past its deadline of {cfg.deadline:.0f} s and was stopped", code=1)
    if status != "SUCCEEDED":
        message = " ".join(str(client.get_job_info(sid).message or "").split())[:300]
        raise JobError(f"job {sid} ended {status}" + (f": {message}" if message else ""), code=1)
    print(f"job {sid} succeeded", flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    cfg = parse_config(SubmitConfig, argv[:cut], description=__doc__)
    return run(cfg, argv[cut + 1:])


if __name__ == "__main__":
    run_main(main)
