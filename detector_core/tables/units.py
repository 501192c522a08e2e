"""The commit unit: a scan's files committed to four tables as whole snapshots, through an intent that survives a kill.

Iceberg commits one table at a time. Before the first of a unit's commits the driver writes
the unit's file list as an intent (``OUT/_intents/<scan>-<unit>.json``, written whole or not
at all); ``recover`` finishes every intent a killed driver left, skipping the tables whose
snapshot for that unit already exists (``find_commit``: the snapshot properties
``detector.scan-id``/``detector.unit``) and the files a live snapshot already holds. An
intent that cannot be finished is set aside, named, and its unit rolled forward from the
snapshots it did commit (``roll_forward``), so no object is hidden or counted twice. ``UnitCommits`` is that half of ``catalog.ScanOutput``,
kept apart because it is the part a reader of the recovery rules needs, and nothing else.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time

import pyarrow as pa

from detector_core.storage import write_atomic
from detector_core.tables import definitions as T
from detector_core.tables.paths import fs_path

PROP_SCAN = "detector.scan-id"
PROP_UNIT = "detector.unit"
# features first (a scores row's vector is committed whenever it is), flagged after scores (an unpinned reader never
# sees a flagged row without its scores row).
COMMIT_ORDER = (T.FEATURES, "errors", "scores", "flagged")
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
                check_first: bool = False, retries: int = 5, since_ms: int | None = None, only_new: bool = False) -> int | None:
        """Commit one table's share of a unit (files or rows) as one snapshot; idempotent when ``check_first``."""
        from pyiceberg.exceptions import CommitFailedException

        props = {PROP_SCAN: scan_id, PROP_UNIT: str(unit)}
        for attempt in range(retries):
            if not paths and rows is None:  # nothing of this table in the unit (an output older than the table may lack it)
                found = self.find_table(name)
                return found.current_snapshot().snapshot_id if found is not None and found.current_snapshot() else None
            table = self.table(name)
            if check_first or attempt:
                done = self.find_commit(table, scan_id, unit, since_ms)
                if done is not None:
                    return done
            if paths and only_new and table.current_snapshot() is not None:
                # Recovery commits only what no live snapshot holds yet: a file restored from a backup,
                # or named twice, would otherwise count its rows twice.
                held = {fs_path(t.file.file_path) for t in table.scan().plan_files()}
                paths = [p for p in paths if fs_path(p) not in held]
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

    def commit_unit(self, intent: dict, check_first: bool = False, before_each=None, only_new: bool = False) -> dict:
        """Commit a unit: intent first, then features, errors, scores, flagged (``COMMIT_ORDER``), then its ``runs`` rows; returns
        snapshot ids.

        ``intent``: ``scan_id``, ``unit``, ``files`` ({table: [paths]}) and ``runs`` (rows, as
        dicts without the snapshot ids). ``before_each(step)`` runs before every commit (the
        lease check, and the tests' kill points). ``only_new``: commit only the files no live
        snapshot holds already (recovery).
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
                                           since_ms=since, only_new=only_new)
        before_each("runs")
        rows = [{**r, **{f"{n}_snapshot_id": snapshots[n] for n in T.TABLES}} for r in intent["runs"]]
        self._commit("runs", scan_id, unit, rows=T.runs_table(rows), check_first=check_first, since_ms=since)
        before_each("done")
        self.fs.rm_file(path)
        return snapshots

    def pending_intents(self) -> list[tuple[str, dict | None]]:
        """The intents a killed driver left: (path, the intent, or None where it cannot be used as one).

        An intent is usable when it is a file of JSON with this product's fields and types, and
        every file it names is a data file of that table of this output, named for its scan
        (``data_file_path``): anything else (garbage, wrong fields, a folder, another
        output's files) is None here, and ``recover`` sets it aside.
        """
        root = f"{self.root}/_intents"
        try:
            entries = sorted((e["name"], e.get("type")) for e in self.fs.ls(root, detail=True) if e["name"].endswith(".json"))
        except FileNotFoundError:
            return []
        found = []
        for p, kind in entries:
            intent = None
            if kind != "directory":
                try:
                    intent = self._usable(json.loads(self.fs.cat_file(p)))
                except FileNotFoundError:
                    continue  # finished by another process meanwhile
                except (ValueError, UnicodeDecodeError, IsADirectoryError):
                    intent = None
            found.append((p, intent))
        return found

    def _usable(self, intent) -> dict | None:
        """``intent`` when its fields have the types ``commit_unit`` writes and its files are its own scan's data files."""
        if not (isinstance(intent, dict) and {"scan_id", "unit", "files", "runs"} <= intent.keys()):
            return None
        scan_id, unit, files, runs = intent["scan_id"], intent["unit"], intent["files"], intent["runs"]
        if not (isinstance(scan_id, str) and scan_id and "/" not in scan_id and isinstance(unit, int) and not isinstance(unit, bool)
                and isinstance(files, dict) and isinstance(runs, list) and all(isinstance(r, dict) for r in runs)
                and isinstance(intent.get("written_ms", 0), int)):
            return None
        for name, paths in files.items():
            if name not in COMMIT_ORDER or not isinstance(paths, list):
                return None
            folder = fs_path(f"{self.location(name).rstrip('/')}/data/")
            for path in paths:
                if not (isinstance(path, str) and fs_path(path).startswith(folder) and ".." not in path.split("/")
                        and scan_id in path.rsplit("/", 1)[-1]):
                    return None
        return intent

    def set_aside(self, path: str, why: str) -> str:
        """Move an intent that cannot be finished to ``_intents/set-aside/`` and say so; returns where it went."""
        aside = f"{self.root}/_intents/set-aside/{path.rsplit('/', 1)[-1]}"
        self.fs.makedirs(aside.rsplit("/", 1)[0], exist_ok=True)
        if self.fs.exists(aside):
            aside = f"{aside}.{int(time.time() * 1000)}"
        self.fs.mv(path, aside, recursive=True)
        print(f"warning: commit intent {path} {why}: set aside as {aside}", flush=True)
        return aside

    def _unfinishable(self, intent: dict) -> str:
        """Why ``intent`` (usable) cannot be committed as it stands, or '' when it can.

        Its unit already has a ``runs`` row (committed whole: a stale or restored intent), or a
        file it names for a table its unit has not reached is gone.
        """
        from pyiceberg.expressions import And, EqualTo

        scan_id, unit = intent["scan_id"], int(intent["unit"])
        missing = [n for n in COMMIT_ORDER if intent["files"].get(n) and self.find_commit(self.table(n), scan_id, unit) is None]
        runs = self.table("runs")
        if missing and runs.current_snapshot() is not None and runs.scan(
                row_filter=And(EqualTo("scan_id", scan_id), EqualTo("unit", unit)), selected_fields=("scan_id",)).to_arrow().num_rows:
            # Its runs row exists, so the unit committed whole, yet these tables show no commit of it: the intent is
            # older than the snapshots left (restored from a backup). (A driver killed after its runs row, before
            # deleting the intent, finds every commit: nothing to do, not stale.)
            return f"is for unit {unit} of scan {scan_id}, which is committed whole already (a stale or restored intent)"
        for name in missing:
            gone = [p for p in intent["files"][name] if not self.fs.exists(fs_path(p))]
            if gone:
                return f"names {len(gone)} {name} data file(s) that are gone (e.g. {gone[0]})"
        return ""

    def recover(self, before_each=None) -> list[str]:
        """Finish the commits a killed driver left half done; returns the intents completed.

        An intent that cannot be finished (unreadable, wrong fields, a folder, files of another
        scan or output, files gone, or a unit committed whole already) is set aside in
        ``_intents/set-aside/`` with a line naming it, and never blocks the scans after it.
        Its unit is then rolled forward from what it did commit (``roll_forward``): a
        ``scores`` commit gets its ``flagged`` rows, and the objects of the tables it never
        reached are in no table, so the next scan scores them again.
        """
        done = []
        for p, intent in self.pending_intents():
            why = "is not a usable intent (unreadable, wrong fields, or files that are not its scan's)" if intent is None \
                else self._unfinishable(intent)
            if why:
                self.set_aside(p, why)
                unit = _unit_from_name(p) if intent is None else (intent["scan_id"], int(intent["unit"]))
                if unit is not None:
                    self.roll_forward(*unit)
                continue
            self.commit_unit(intent, check_first=True, before_each=before_each, only_new=True)
            done.append(p)
        return done

    def roll_forward(self, scan_id: str, unit: int) -> int:
        """A unit whose intent was set aside: give the ``scores`` it committed their ``flagged`` rows; returns the rows added.

        Objects whose ``errors``/``scores`` share never committed are in no table, and the state
        is derived from those tables only, so they are scored again; those that did commit stay
        (never scored twice). A ``runs`` row of status ``recovered`` pins the result for pinned readers.
        """
        committed = {n: self.find_commit(t, scan_id, unit) if (t := self.find_table(n)) is not None else None for n in COMMIT_ORDER}
        if all(v is None for v in committed.values()):
            return 0  # nothing of the unit is in any table: its objects are simply scored again
        rows = self._flagged_from_scores(scan_id, unit, committed["scores"]) if committed["flagged"] is None else 0
        if self.find_commit(self.table("runs"), scan_id, unit) is None:
            # Pinned readers (views.pinned_snapshots) see what the newest runs row pins: this row shows what the unit committed.
            snapshots = {n: (self.table(n).current_snapshot().snapshot_id if self.table(n).current_snapshot() else None)
                         for n in T.TABLES}
            when = dt.datetime.now(dt.timezone.utc)
            row = {"scan_id": scan_id, "unit": unit, "status": "recovered", "scan_date": when.date(), "started_at": when,
                   "committed_at": when, "flagged": rows, "schema_version": T.SCHEMA_VERSION,
                   "config": json.dumps({"recovered": "intent set aside", "committed": sorted(n for n, v in committed.items() if v)}),
                   **{f"{n}_snapshot_id": s for n, s in snapshots.items()}}
            self._commit("runs", scan_id, unit, rows=T.runs_table([row]))
        return rows

    def _flagged_from_scores(self, scan_id: str, unit: int, scores_snap: int | None) -> int:
        """Commit, as the unit's flagged share, the flagged rows of the scores files its snapshot added; returns the rows."""
        import pyarrow.parquet as pq
        from pyiceberg.manifest import ManifestEntryStatus

        from detector_core import schema as S
        from detector_core.tables.paths import data_file_path

        if scores_snap is None:
            return 0
        table = self.table("scores")
        snap = table.snapshot_by_id(scores_snap)
        added = [e.data_file.file_path for m in snap.manifests(table.io)
                 for e in m.fetch_manifest_entry(table.io, discard_deleted=True)
                 if e.snapshot_id == scores_snap and e.status == ManifestEntryStatus.ADDED]
        paths, rows = [], 0
        for path in added:
            with self.fs.open(fs_path(path), "rb") as f:
                part = pq.read_table(f)
            part = T.conform(part.filter(part[S.FLAGGED]), "flagged")
            for key in part.group_by([S.SCAN_DATE, S.BUCKET]).aggregate([]).to_pylist():
                rows_k = part.filter(_eq(part, key))
                new = data_file_path(self.uri, "flagged", key[S.SCAN_DATE].isoformat(), key[S.BUCKET], scan_id)
                self.fs.makedirs(fs_path(new).rsplit("/", 1)[0], exist_ok=True)
                with self.fs.open(fs_path(new), "wb") as f:
                    pq.write_table(rows_k, f)
                paths.append(new)
                rows += rows_k.num_rows
        self._commit("flagged", scan_id, unit, paths=paths)
        return rows


def _unit_from_name(path: str) -> tuple[str, int] | None:
    """(scan id, unit) from an intent's file name ``<scan>-<unit:06d>.json``, the one thing an unreadable intent still says."""
    m = re.match(r"^(.+)-(\d{6,})\.json$", path.rsplit("/", 1)[-1])
    return (m.group(1), int(m.group(2))) if m else None


def _eq(table: pa.Table, key: dict):
    import pyarrow.compute as pc

    mask = None
    for col, value in key.items():
        m = pc.equal(table[col], pa.scalar(value, table.schema.field(col).type))
        mask = m if mask is None else pc.and_(mask, m)
    return mask
