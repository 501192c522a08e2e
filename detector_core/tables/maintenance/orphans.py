"""Orphan removal: files under an output that no live snapshot references, older than a safety age."""

from __future__ import annotations

import datetime as dt
import time

from detector_core.tables.catalog import OUTPUT_TABLES, ScanOutput
from detector_core.tables.maintenance.shared import (
    fs_path,
    listing,
    referenced,
)


def _mtime(info: dict) -> float:
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return float(value)
    return time.time()  # unknown age: treated as new, never removed


def remove_orphans(out: ScanOutput, older_than_s: float, dry_run: bool = False, now: float | None = None) -> dict[str, list[str]]:
    """Delete the files in the tables' ``data/`` and ``metadata/`` folders (and lease/intent temporaries) that no live
    snapshot references and that are older than ``older_than_s``; returns them per table. Nothing else under the
    output is ever removed.

    The age is the guard against a commit in flight: a scan's workers write data files before
    the driver commits them, and a commit writes its manifests and metadata before the
    catalog points at them. Keep it well above a commit unit's duration (default 3 days); the caller holds the
    output's lease (``jobs.maintain`` does), so that no scan writes meanwhile.
    """
    now = time.time() if now is None else now
    removed: dict[str, list[str]] = {}
    for name in OUTPUT_TABLES:
        # In this order: the files, then the pending intents, then the table's metadata. A file
        # listed here is either named by an intent still pending when read, or committed
        # before its intent went, so in the metadata loaded after (or young: see the age).
        # Only the table's own data and metadata folders: anything else under OUT/<table>/ is not ours to judge.
        base = fs_path(out.location(name)).rstrip("/")
        listed = {**listing(out, f"{base}/data"), **listing(out, f"{base}/metadata")}
        keep = {fs_path(p) for _, intent in out.pending_intents() if intent for paths in intent["files"].values() for p in paths}
        table = out.find_table(name)
        if table is None:
            continue
        refs = referenced(table)
        live = refs["data"] | refs["manifests"] | refs["metadata"] | keep
        removed[name] = sorted(p for p, info in listed.items()
                               if info.get("type") != "directory" and p not in live and now - _mtime(info) > older_than_s)
    temporaries = {**listing(out, f"{out.root}/_lease"), **listing(out, f"{out.root}/_intents")}
    removed["_temporary"] = sorted(p for p, info in temporaries.items()
                                   if p.endswith(".tmp") and now - _mtime(info) > older_than_s)
    if not dry_run:
        for paths in removed.values():
            for p in paths:
                try:
                    out.fs.rm_file(p)
                except FileNotFoundError:
                    pass
    return removed
