"""The ``state`` table of a scan output: opened (rebuilt when lost), its files by partition,
the history it covers, and the one commit that moves it forward.

``detector_core.tables.state`` says what a state row is and how the plan anti-joins against it;
``jobs.scanning.planning.refresh_state`` folds newly committed ``scores``/``errors`` files into it in
Ray tasks. These are the catalog operations around that, on a ``ScanOutput``: O(files) and
O(snapshots) work on the driver, never rows.
"""

from __future__ import annotations

import json

from detector_core.tables.catalog import HISTORY, PROP_COMPACTION, PROP_MARK, STATE, ScanOutput

__all__ = ["commit_state", "history_files_since", "open_state", "state_files", "state_mark"]


def open_state(out: ScanOutput) -> tuple[object, dict[int, list]]:
    """The ``state`` table and its files by partition (``state_files``), read once.

    Recreated empty (to be rebuilt from history) when it was dropped or its files deleted.
    """
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = out.table(STATE)
        return table, state_files(table)  # its metadata and manifests are readable
    except NoSuchTableError:
        out.create(STATE)
    except OSError as exc:
        out.reset_state(exc)
    return out.table(STATE), {}

def state_mark(table) -> dict[str, int]:
    """The history the state covers: the last sequence number of ``scores`` and ``errors`` folded into it."""
    return json.loads(table.properties.get(PROP_MARK, "{}")) or {name: 0 for name in HISTORY}

def history_files_since(out: ScanOutput, name: str, sequence_number: int, rows: list | None = None) -> tuple[list[str], int]:
    """Data files committed to ``name`` after ``sequence_number`` (walking only the newer snapshots), and the newest number.

    ``rows``: a list that gets each file's record count, in order (the catalog's, no file read).

    From 0 (a state being rebuilt) it is every data file of the current snapshot: older
    snapshots may have been expired (``detector_core.tables.maintenance``), their rows live on in the
    current files. Compaction snapshots add no history (their rows are already counted) and
    are skipped.
    """
    from pyiceberg.manifest import ManifestEntryStatus

    table = out.table(name)
    current = table.current_snapshot()
    if sequence_number == 0:
        if current is None:
            return [], 0
        tasks = list(table.scan().plan_files())
        if rows is not None:
            rows.extend(int(t.file.record_count) for t in tasks)
        return [t.file.file_path for t in tasks], current.sequence_number or 0
    paths, top = [], sequence_number
    for snap in table.metadata.snapshots:
        if (snap.sequence_number or 0) <= sequence_number:
            continue
        top = max(top, snap.sequence_number)
        if snap.summary is not None and snap.summary.additional_properties.get(PROP_COMPACTION):
            continue
        for manifest in snap.manifests(table.io):
            if manifest.added_snapshot_id != snap.snapshot_id:
                continue
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snap.snapshot_id:
                    paths.append(entry.data_file.file_path)
                    if rows is not None:
                        rows.append(int(entry.data_file.record_count))
    return paths, top

def state_files(table) -> dict[int, list]:
    """uri_bucket -> the state's data files (pyiceberg ``DataFile``) in that partition: O(files), never rows."""
    out: dict[int, list] = {}
    if table.current_snapshot() is None:
        return out
    for task in table.scan().plan_files():
        out.setdefault(int(task.file.partition[0]), []).append(task.file)
    return out

def commit_state(out: ScanOutput, added: list[str], removed: list, mark: dict[str, int]) -> None:
    """One commit: the new state files, the files they replace (compaction), and the history mark they reach."""
    from pyiceberg.io.pyarrow import parquet_file_to_data_file

    table = out.table(STATE)
    with table.transaction() as tx:
        if removed:
            with tx.update_snapshot().overwrite() as ow:
                for df in removed:
                    ow.delete_data_file(df)
                for p in added:
                    ow.append_data_file(parquet_file_to_data_file(table.io, table.metadata, p))
        elif added:
            tx.add_files(added, check_duplicate_files=False)
        tx.set_properties({PROP_MARK: json.dumps(mark, sort_keys=True)})
