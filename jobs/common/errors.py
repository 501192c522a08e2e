"""How a job fails: ``JobError`` (a reason its user can act on) and ``run_main`` (every failure ends in one ``ERROR:`` line).

Also the checks that turn bad input into a ``JobError`` before any work: ``require_weights``
(absent weights refused with what to pass) and ``parse_date``.
"""

from __future__ import annotations

import datetime as dt
import re
import sys


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
    from detector_core.method.dnf import UnetNotFoundError
    from detector_core.method.extractors import check_available
    from detector_core.method.features import WeightsNotFoundError

    try:
        check_available(spec, storage_options)
    except (WeightsNotFoundError, UnetNotFoundError, ValueError) as exc:
        raise JobError(str(exc)) from exc


def query_failed(exc: Exception, scan: str) -> JobError:
    """A DuckDB error over a scan output's tables as one line; a missing or unreadable file names check and repair."""
    import duckdb

    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, duckdb.IOException):
        return JobError(f"query failed: {first}; if a file the tables reference is gone, "
                        f"'python -m jobs.maintain check --output {scan}' lists them and 'repair' removes them")
    return JobError(f"query failed: {first}")


def parse_date(value: str, flag: str) -> str:
    """``YYYY-MM-DD`` as given to ``flag``, or the job ends with the one line that says so."""
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise JobError(f"{flag} {value!r} is not a date (YYYY-MM-DD)") from None


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
