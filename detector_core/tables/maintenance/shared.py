"""What the maintenance steps share: optimistic commits tried again, times in ms, which unit a snapshot
committed, and the files a table's live snapshots reference.
"""

from __future__ import annotations

import datetime as dt
import time

from detector_core.tables import definitions as T
from detector_core.tables.catalog import ScanOutput
from detector_core.tables.paths import fs_path
from detector_core.tables.units import PROP_SCAN, PROP_UNIT

SNAPSHOT_COLUMNS = tuple(f"{t}_snapshot_id" for t in T.TABLES)
EPOCH = dt.date(1970, 1, 1)


def epoch_ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def epoch_ms_now(now: dt.datetime | None) -> int:
    return epoch_ms(now) if now is not None else int(time.time() * 1000)


def retry_commit(fn, what: str, attempts: int = 6):
    """``fn()`` again after a short sleep whenever another writer's commit won the race (Iceberg's optimistic commits;
    pyiceberg's own retry of a rewrite refuses when files were added meanwhile, a ``ValidationException``)."""
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    for attempt in range(attempts):
        try:
            return fn()
        except (CommitFailedException, ValidationException):
            if attempt == attempts - 1:
                raise RuntimeError(f"{what}: other writers kept committing first ({attempts} tries)") from None
            time.sleep(0.2 * 2**attempt)


def unit_of(snapshot) -> tuple[str | None, str | None]:
    props = snapshot.summary.additional_properties if snapshot.summary else {}
    return props.get(PROP_SCAN), props.get(PROP_UNIT)


def referenced(table) -> dict[str, set[str]]:
    """Every file that the table's live snapshots need: ``data``, ``manifests`` (+ lists) and ``metadata``."""
    io, meta = table.io, table.metadata
    data, manifests = set(), set()
    for snap in meta.snapshots:
        manifests.add(fs_path(snap.manifest_list))
        for m in snap.manifests(io):
            path = fs_path(m.manifest_path)
            if path in manifests:
                continue
            manifests.add(path)
            for entry in m.fetch_manifest_entry(io, discard_deleted=True):
                data.add(fs_path(entry.data_file.file_path))
    metadata = {fs_path(table.metadata_location)} | {fs_path(e.metadata_file) for e in meta.metadata_log}
    metadata |= {fs_path(s.statistics_path) for s in meta.statistics}
    return {"data": data, "manifests": manifests, "metadata": metadata}


def pending_path(out: ScanOutput) -> str:
    return f"{out.root}/_maintenance/repair-pending.json"


def partition_key(name: str, data_file) -> tuple:
    values = tuple(data_file.partition[i] for i in range(len(T.PARTITIONED.get(name, ()))))
    return values


def night_of(name: str, key: tuple) -> dt.date | None:
    """The date a partition belongs to (scan_date, or review_date for verdicts), None for unpartitioned tables."""
    if not key:
        return None
    day = key[0]
    return EPOCH + dt.timedelta(days=day) if isinstance(day, int) else day


def listing(out: ScanOutput, folder: str) -> dict[str, dict]:
    out.fs.invalidate_cache(folder)  # s3fs caches listings: this must be what the store holds now
    try:
        return out.fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
