"""The commit unit: a scan's files committed to four tables as whole snapshots, through an intent that survives a kill.

Iceberg commits one table at a time. Before the first of a unit's commits the driver writes
the unit's file list as an intent (``OUT/_intents/<scan>-<unit>.json``, written whole or not
at all); ``recover`` finishes every intent a killed driver left, skipping the tables whose
snapshot for that unit already exists (``find_commit``: the snapshot properties
``detector.scan-id``/``detector.unit``). ``UnitCommits`` is that half of ``catalog.ScanOutput``,
kept apart because it is the part a reader of the recovery rules needs, and nothing else.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from detector_core.storage import write_atomic
from detector_core.tables import definitions as T

PROP_SCAN = "detector.scan-id"
PROP_UNIT = "detector.unit"
COMMIT_ORDER = ("errors", "scores", "flagged")  # flagged after scores: an unpinned reader never sees flagged without scores
# Clock skew allowed between the driver that wrote an intent and the one that recovers it.
INTENT_SKEW_MS = 15 * 60 * 1000


class UnitCommits:
    """Unit commits, intents and recovery of a scan output (mixed into ``catalog.ScanOutput``: ``fs``, ``root``, ``table``, ``identifier``)."""

    @staticmethod
    def find_commit(table, scan_id: str, unit: int, since_ms: int | None = None) -> int | None:
        """The snapshot id that committed (scan_id, unit) to ``table``, if any.

        Walks the snapshots newest first and stops at the first older than ``since_ms`` (the
        unit's intent was written after it, so no older snapshot can be the unit's): a commit
        looks at the few snapshots since its intent, not at every snapshot of the table.
        """
        for snap in reversed(table.metadata.snapshots):
            if since_ms is not None and snap.timestamp_ms < since_ms:
                return None
            props = snap.summary.additional_properties if snap.summary else {}
            if props.get(PROP_SCAN) == scan_id and props.get(PROP_UNIT) == str(unit):
                return snap.snapshot_id
        return None

    def _commit(self, name: str, scan_id: str, unit: int, paths: list[str] | None = None, rows: pa.Table | None = None,
                check_first: bool = False, retries: int = 5, since_ms: int | None = None) -> int | None:
        """Commit one table's share of a unit (files or rows) as one snapshot; idempotent when ``check_first``."""
        from pyiceberg.exceptions import CommitFailedException

        props = {PROP_SCAN: scan_id, PROP_UNIT: str(unit)}
        for attempt in range(retries):
            table = self.table(name)
            if check_first or attempt:
                done = self.find_commit(table, scan_id, unit, since_ms)
                if done is not None:
                    return done
            if not paths and rows is None:
                return table.current_snapshot().snapshot_id if table.current_snapshot() else None
            try:
                if rows is not None:
                    table.append(rows, snapshot_properties=props)
                else:
                    table.add_files(paths, snapshot_properties=props, check_duplicate_files=False)
            except CommitFailedException:
                time.sleep(0.2 * 2**attempt)  # another commit won the race: reload and try again
                continue
            return self.find_commit(self.table(name), scan_id, unit, since_ms)
        raise RuntimeError(f"could not commit unit {unit} of scan {scan_id} to {self.identifier(name)} after {retries} tries")

    def intent_path(self, scan_id: str, unit: int) -> str:
        return f"{self.root}/_intents/{scan_id}-{unit:06d}.json"

    def commit_unit(self, intent: dict, check_first: bool = False, before_each=None) -> dict:
        """Commit a unit: intent first, then errors, scores, flagged (``COMMIT_ORDER``), then its ``runs`` rows; returns snapshot ids.

        ``intent``: ``scan_id``, ``unit``, ``files`` ({table: [paths]}) and ``runs`` (rows, as
        dicts without the snapshot ids). ``before_each(step)`` runs before every commit (the
        lease check, and the tests' kill points).
        """
        scan_id, unit = intent["scan_id"], int(intent["unit"])
        path = self.intent_path(scan_id, unit)
        before_each = before_each or (lambda step: None)
        if not check_first:
            before_each("intent")
            intent = {**intent, "written_ms": int(time.time() * 1000)}
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            write_atomic(self.fs, path, json.dumps(intent).encode())
        since = intent["written_ms"] - INTENT_SKEW_MS if intent.get("written_ms") else None
        snapshots = {}
        for name in COMMIT_ORDER:
            before_each(name)
            snapshots[name] = self._commit(name, scan_id, unit, paths=intent["files"].get(name, []), check_first=check_first,
                                           since_ms=since)
        before_each("runs")
        rows = [{**r, **{f"{n}_snapshot_id": snapshots[n] for n in T.TABLES}} for r in intent["runs"]]
        self._commit("runs", scan_id, unit, rows=T.runs_table(rows), check_first=check_first, since_ms=since)
        before_each("done")
        self.fs.rm_file(path)
        return snapshots

    def pending_intents(self) -> list[tuple[str, dict | None]]:
        """The intents a killed driver left: (path, the intent, or None where it cannot be read)."""
        root = f"{self.root}/_intents"
        try:
            paths = sorted(p for p in self.fs.ls(root, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        found = []
        for p in paths:
            try:
                intent = json.loads(self.fs.cat_file(p))
                if not (isinstance(intent, dict) and {"scan_id", "unit", "files", "runs"} <= intent.keys()):
                    raise ValueError("not an intent")
            except FileNotFoundError:
                continue  # finished by another process meanwhile
            except (ValueError, UnicodeDecodeError):
                intent = None
            found.append((p, intent))
        return found

    def recover(self, before_each=None) -> list[str]:
        """Finish the commits a killed driver left half done; returns the intents completed.

        An intent that cannot be read was cut short while it was written (a full disk; a
        store that is not atomic), so no commit of its unit had started: it is set aside in
        ``_intents/unreadable/`` with a message naming it, and the unit's objects are scored
        again by the next scan. It never blocks the scans after it.
        """
        done = []
        for p, intent in self.pending_intents():
            if intent is None:
                aside = f"{self.root}/_intents/unreadable/{p.rsplit('/', 1)[-1]}"
                self.fs.makedirs(aside.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(p, aside)
                print(f"warning: commit intent {p} is unreadable (cut short while it was written, before any commit of its "
                      f"unit): set aside as {aside}; its objects are scored again", flush=True)
                continue
            self.commit_unit(intent, check_first=True, before_each=before_each)
            done.append(p)
        return done
