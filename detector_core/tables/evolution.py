"""What every table of a scan output carries, and how a table written by an older version is brought up to date.

``TABLE_PROPERTIES`` (merged manifests, a bounded metadata log: a commit costs the same on the
365th night as on the first) and each table's comment; ``evolve_schema`` renames old columns and
adds the ones added since (Iceberg schema evolution, metadata only); ``upgrade`` sets today's
properties and column docs on an older table. ``catalog.ScanOutput`` calls both when it opens
an output.
"""

from __future__ import annotations

from detector_core import schema as S
from detector_core.tables import definitions as T

PROP_SCHEMA_VERSION = "detector.schema-version"  # detector_core.tables.definitions.SCHEMA_VERSION of the table's columns
NO_REBASE = {"commit.retry.num-retries": "0"}  # tables appended to only after a key comparison (append_new)
# Every table's properties (set at creation, and on older tables when a scan opens them):
# - manifests merged on append, so a query opens a bounded number of manifests, not one per commit;
# - the metadata log bounded, older metadata.json files deleted after each commit.
TABLE_PROPERTIES = {
    "commit.manifest-merge.enabled": "true",
    "commit.manifest.min-count-to-merge": "16",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
}


def table_properties(name: str) -> dict[str, str]:
    """The table properties of table ``name`` (``TABLE_PROPERTIES``, its comment, and verdicts' no-rebase)."""
    props = {**TABLE_PROPERTIES, "comment": T.TABLE_DOCS[name]}
    if name in T.REVIEW_TABLES:
        props.update(NO_REBASE)
    return props


def upgrade(table, name: str) -> None:
    """Give a table written by an older version today's properties and documentation (one metadata-only commit)."""
    props = table_properties(name)
    docs = T.column_docs(name)
    stale = {k: v for k, v in props.items() if table.properties.get(k) != v}
    undocumented = [f for f in table.schema().fields if docs.get(f.name) and f.doc != docs[f.name]]
    if not stale and not undocumented:
        return
    with table.transaction() as tx:
        if stale:
            tx.set_properties(stale)
        if undocumented:
            with tx.update_schema() as update:
                for f in undocumented:
                    update.update_column(f.name, doc=docs[f.name])

def evolve_schema(table, name: str = "") -> bool:
    """Schema evolution to this version: old names renamed (``S.RENAMED``: the field keeps its id, files
    written under the old name are read through the name mapping) and the columns added since
    (``T.ADDED_COLUMNS``, optional: old files read them as null); one metadata-only commit."""
    names = {f.name for f in table.schema().fields}
    todo = {old: new for old, new in S.RENAMED.items() if old in names and new not in names}
    want = T.TABLE_SCHEMAS.get(name)
    added = [c for c in T.ADDED_COLUMNS if want is not None and c in want.names and c not in names]
    if not todo and not added:
        return False
    from pyiceberg.types import StringType

    with table.transaction() as tx:
        with tx.update_schema() as update:
            for old, new in todo.items():
                update.rename_column(old, new)
            for col in added:
                update.add_column(col, StringType(), doc=S.COLUMN_DOCS[col])
        tx.set_properties({PROP_SCHEMA_VERSION: T.SCHEMA_VERSION})
    return True
