"""What every job shares: dataclass-driven command lines, Ray start-up, config files.

Each job declares one dataclass whose fields carry their help text
(``field(metadata={"help": ...})``); ``parse_config`` builds the argparse parser from
it (``--some-field``; booleans become ``--flag`` / ``--no-flag``), so a flag cannot
exist without help and the resolved config is always the dataclass that gets saved
next to the job's artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import uuid
from typing import Any, TypeVar, get_type_hints

from detector_core.storage import join, open_fs

T = TypeVar("T")


def opt(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text (and optional argparse ``choices``/``flag``)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def parse_config(cls: type[T], argv=None, description: str | None = None) -> T:
    """Parse ``argv`` into the job's config dataclass."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        typ = hints[f.name]
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        base = typ
        if getattr(typ, "__origin__", None) is not None or str(typ).startswith("typing.Optional") or " | " in str(typ):
            args = [a for a in getattr(typ, "__args__", ()) if a is not type(None)]
            base = args[0] if args else str
        parser.add_argument(flag, dest=f.name, type=base, default=f.default, help=f"{help_text} (default: {f.default})", **meta)
    ns = parser.parse_args(argv)
    return cls(**vars(ns))


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster (under ``ray job submit``, ``RAY_ADDRESS`` or ``--ray-address``) or start a private local Ray.

    No environment variable is passed through a runtime env: Ray writes runtime envs in plain
    text into its session logs, so credentials would land on disk. A local Ray's workers
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
        ray.init(address="local", num_cpus=cpus, log_to_driver=True)
        return
    ray.init(address=address, log_to_driver=True)


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


def read_json(uri: str, storage_options: dict | None = None) -> dict | None:
    fs, path = open_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def fail(message: str, code: int = 2) -> None:
    """End a job with a one-line cause on the last line of its log."""
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _cause(exc: BaseException) -> str:
    """One line that says what went wrong, from the exception chain's most telling link."""
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain or len(chain) > 10:
            break
        chain.append(nxt)
    for e in chain:
        if isinstance(e, (PermissionError,)) or type(e).__name__ in ("NoCredentialsError", "ClientError"):
            text = " ".join(str(e).split())
            return f"object store refused the request ({type(e).__name__}: {text}); check the credentials (AWS_* variables, instance role) and --s3-endpoint"
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text[:400]}"


def run_main(main) -> None:
    """Run a job's ``main`` as a program: a crash keeps its traceback, then ends with one ``ERROR:`` line and exit 1.

    Under ``ray job submit`` the log tail is what people read first; the last line says
    the cause instead of leaving them to dig it out of a long traceback.
    """
    import traceback

    try:
        main()
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


__all__ = ["opt", "parse_config", "init_ray", "new_run_id", "write_json", "write_parquet", "read_json", "config_dict", "fail", "run_main", "join"]
