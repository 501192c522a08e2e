"""Expiry: the snapshots nobody needs any more are dropped (metadata only; ``orphans`` deletes their files later)."""

from __future__ import annotations

import datetime as dt
import json

from detector_core.tables import definitions as T
from detector_core.tables.catalog import HISTORY, OUTPUT_TABLES, PROP_MARK, STATE, ScanOutput
from detector_core.tables.maintenance.shared import (
    SNAPSHOT_COLUMNS,
    epoch_ms,
    epoch_ms_now,
    retry_commit,
    unit_of,
)


def pinned(out: ScanOutput, keep_days: float, unit_hours: float, now: dt.datetime | None = None) -> dict[str, set[int]]:
    """Per result table, the snapshot ids that ``runs`` rows still pin: the newest row's always, a finished
    (or repaired) scan's for ``keep_days``, a unit's for ``unit_hours``."""
    keep: dict[str, set[int]] = {t: set() for t in T.TABLES}
    runs = out.read("runs", selected_fields=("status", "committed_at", *SNAPSHOT_COLUMNS))
    if runs.num_rows == 0:
        return keep
    now_ms = epoch_ms_now(now)
    window, units = now_ms - keep_days * 86_400_000, now_ms - unit_hours * 3_600_000
    rows = runs.to_pylist()
    newest = max(rows, key=lambda r: r["committed_at"])
    for r in rows:
        ms = epoch_ms(r["committed_at"])
        if r is newest or ms >= units or (ms >= window and r["status"] != "unit"):
            for t in T.TABLES:
                if r[f"{t}_snapshot_id"] is not None:
                    keep[t].add(int(r[f"{t}_snapshot_id"]))
    return keep


def expire(out: ScanOutput, keep_days: float = 7.0, unit_hours: float = 12.0, now: dt.datetime | None = None) -> dict[str, int]:
    """Expire the snapshots of every table that nothing needs any more (see the module docstring); returns how many per table.

    Only metadata changes: the files stay until ``remove_orphans`` finds them unreferenced.
    """
    keep = pinned(out, keep_days, unit_hours, now)
    # A killed scan's half-committed unit: recovery finds which tables it reached by these
    # snapshots, so they stay until it has run (expired, the unit would be committed twice).
    pending = {(i["scan_id"], str(i["unit"])) for _, i in out.pending_intents() if i}
    now_ms = epoch_ms_now(now)
    state = out.find_table(STATE)
    mark = json.loads(state.properties.get(PROP_MARK, "{}")) if state is not None else {}
    expired = {}
    for name in OUTPUT_TABLES:
        age_ms = (keep_days * 86_400_000) if name in T.REVIEW_TABLES else (unit_hours * 3_600_000)

        def once(name=name, age_ms=age_ms) -> int:
            table = out.find_table(name)
            if table is None or table.current_snapshot() is None:
                return 0
            current = table.current_snapshot().snapshot_id
            folded = int(mark.get(name, 0)) if name in HISTORY else None
            ids = [s.snapshot_id for s in table.metadata.snapshots
                   if s.snapshot_id != current and s.timestamp_ms < now_ms - age_ms and s.snapshot_id not in keep.get(name, ())
                   and (folded is None or (s.sequence_number or 0) <= folded)  # the state's refresh still walks the others
                   and unit_of(s) not in pending]
            if ids:
                table.maintenance.expire_snapshots().by_ids(ids).commit()
            return len(ids)

        expired[name] = retry_commit(once, f"expiring snapshots of {out.identifier(name)}")
    return expired
