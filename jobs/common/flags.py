"""The flag machinery every job's config goes through: ``opt`` fields, ``parse_config``, intervals.

A job's config is a dataclass whose fields are ``opt(default, help, within=...)``;
``parse_config`` turns argv into it (one ``--flag`` per field, ``--no-flag`` for booleans,
each shared piece -- ``StorageOptions``, ``CatalogOptions``, ``RayOptions`` here, ``jobs.common.options.ExtractorOptions``
-- as its own ``--help`` group after the job's own flags) and refuses a number outside its
field's interval with a ``JobError``. Light on purpose: importing it costs no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, TypeVar, get_type_hints

from jobs.common.errors import JobError

__all__ = ["CatalogOptions", "RayOptions", "RetentionOptions", "StorageOptions", "in_interval", "opt", "parse_config", "parse_interval"]

T = TypeVar("T")


def opt(default: Any, help: str, *, within: str | None = None, **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text (and optional argparse ``choices``).

    ``within`` is the interval a number must lie in, written as in mathematics:
    ``"[1, inf)"``, ``"(0, 1)"``, ``"[0, 1]"``. ``parse_config`` refuses a value outside it
    before the job does anything, and ``--help`` shows it. Every int and float flag has one
    (``tests/test_cli.py`` checks).
    """
    meta = {"help": help, **kw}
    if within is not None:
        parse_interval(within)  # a typo in an interval fails at import, not at a user's run
        meta["within"] = within
    return dataclasses.field(default=default, metadata=meta)


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """``"[0, 1)"`` -> (0.0, 1.0, True, False): low, high, and whether each end is included."""
    t = text.strip()
    if len(t) < 5 or t[0] not in "[(" or t[-1] not in "])" or "," not in t:
        raise ValueError(f"not an interval: {text!r} (write e.g. '[1, inf)' or '(0, 1]')")
    low, high = (float(x) for x in t[1:-1].split(","))
    return low, high, t[0] == "[", t[-1] == "]"


def in_interval(value: float, text: str) -> bool:
    low, high, low_in, high_in = parse_interval(text)
    if math.isnan(value):  # NaN lies in no interval
        return False
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def parse_config(cls: type[T], argv=None, description: str | None = None) -> T:
    """Parse ``argv`` into the job's config dataclass; a number outside its field's ``within`` ends the job with one line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(cls)
    # Flags declared by a shared piece (jobs.common.options) go in that piece's group, after the job's own.
    owner = {name: klass for klass in reversed(cls.__mro__) for name in vars(klass).get("__annotations__", {})}
    groups: dict[type, Any] = {}
    ordered = sorted(dataclasses.fields(cls), key=lambda f: owner.get(f.name, cls) is not cls)
    for f in ordered:
        klass = owner.get(f.name, cls)
        if klass is cls:
            target = parser
        elif klass not in groups:
            target = groups[klass] = parser.add_argument_group((klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip("."))
        else:
            target = groups[klass]
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        within = meta.pop("within", None)
        typ = hints[f.name]
        if typ is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        base = typ
        if getattr(typ, "__origin__", None) is not None or str(typ).startswith("typing.Optional") or " | " in str(typ):
            args = [a for a in getattr(typ, "__args__", ()) if a is not type(None)]
            base = args[0] if args else str
        shown = f"{help_text} (default: {f.default}" + (f"; in {within})" if within else ")")
        target.add_argument(flag, dest=f.name, type=base, default=f.default, help=shown, **meta)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback (and the error it came from) before the ERROR line")
    parsed = vars(parser.parse_args(argv))
    parsed.pop("debug")  # read by run_main from the command line, not a setting of the job
    cfg = cls(**parsed)
    for f in dataclasses.fields(cls):
        within = f.metadata.get("within")
        value = getattr(cfg, f.name)
        unset = isinstance(f.default, float) and math.isnan(f.default) and math.isnan(value)  # NaN default = "not given"
        if within and value is not None and not unset and not in_interval(value, within):
            raise JobError(f"--{f.name.replace('_', '-')} must be in {within}, got {value}")
    return cfg


@dataclasses.dataclass
class StorageOptions:
    """Object storage."""

    s3_endpoint: str = opt("", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


@dataclasses.dataclass
class CatalogOptions:
    """Where a scan output's tables are catalogued, for the jobs that read them (as the scan recorded)."""

    catalog: str = opt("", "Iceberg catalog of the tables (default: the one OUT/_catalog.json records; see jobs.scan --catalog)")
    namespace: str = opt("", "catalog namespace of the output's tables (default: as recorded)")


@dataclasses.dataclass
class RetentionOptions:
    """How long the tables' snapshots stay (each scan expires the rest at its end; jobs.maintain too)."""

    keep_days: float = opt(7.0, "days a finished scan's snapshots stay readable (time travel, the runs pins of completed scans)",
                           within="(0, inf)")
    keep_unit_hours: float = opt(12.0, "hours each commit unit's intermediate snapshots stay readable (pins of a running scan's units)",
                                 within="(0, inf)")


@dataclasses.dataclass
class RayOptions:
    """The Ray cluster."""

    ray_address: str = opt("", "Ray cluster address (default: the job's cluster, or a local Ray)")
