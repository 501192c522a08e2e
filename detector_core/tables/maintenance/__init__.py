"""Keeping a scan output's tables fast and whole for a year of nights: expiry, compaction, orphans, check and repair.

Every commit unit adds a snapshot to each table. Left alone, each commit rewrites an ever
larger ``metadata.json`` and every query opens one manifest per commit (docs/scaling.md:
the tables over a year). The table properties (``evolution.TABLE_PROPERTIES``) merge
manifests and bound the metadata log on every commit; this module does the rest, on
pyiceberg's public APIs, each step safe beside a scan that is committing (every change is
an optimistic Iceberg commit, tried again when a scan's commit wins the race):

- ``expire``: drops snapshots nobody needs (pyiceberg's ``expire_snapshots``): a finished
  scan's final snapshot (pinned by its ``completed`` runs row) stays for ``keep_days``;
  a unit's intermediate snapshot for ``unit_hours``; the newest runs row's snapshots, the
  current ones and the history the state has not folded yet always stay. Metadata only.
- ``compact``: rewrites each finished night's small data files into few large ones (one
  ``replace`` snapshot per table, marked ``detector.compaction`` so the state never counts
  its rows twice); ``runs`` and ``verdicts`` too.
- ``remove_orphans``: deletes files in the tables' ``data/`` and ``metadata/`` folders that no
  live snapshot references and that are older than a safety age (the caller holds the lease): killed units' files, compaction leftovers, replaced state files, old
  metadata, stale lease temporaries. Files named by a pending intent are kept (recovery
  commits them).
- ``check`` / ``repair``: referenced files that are missing, tables a lost catalog no longer
  knows or holds stale (not the lineage ``_catalog.json`` records), pending intents that
  cannot be finished, and ``flagged`` partitions that are not ``scores``' flagged rows.
  ``repair`` registers each lost table from the newest metadata of its own lineage, sets
  unfinishable intents aside and rolls their units forward, removes missing files from the
  tables (flagged rebuilt from scores where either lost rows), drops the state (rebuilt
  from history, so the lost objects are scored again) and commits a ``runs`` row of status
  ``repair`` that pins the repaired snapshots and names the nights it changed.

One module a step (``expiry``, ``compaction``, ``orphans``, ``damage``: check and repair; ``shared`` is what they share);
this package exports each step's functions. Nothing here imports Ray; ``jobs.maintain`` is the command.
"""

from detector_core.tables.maintenance.compaction import COMPACT_TARGET_ROWS, compact
from detector_core.tables.maintenance.damage import check, register_lost, repair
from detector_core.tables.maintenance.expiry import expire, pinned
from detector_core.tables.maintenance.orphans import remove_orphans
from detector_core.tables.maintenance.shared import fs_path, referenced

__all__ = ["COMPACT_TARGET_ROWS", "check", "compact", "expire", "fs_path", "pinned", "referenced", "register_lost", "remove_orphans", "repair"]
