"""The output tables and their lifecycle: what a scan writes, how it commits, how people read it, and how it lasts a year.

``definitions`` (each table's columns, partitions, docs and schema version), ``catalog``
(``ScanOutput``: an output opened once), ``units`` (commit units, intents and recovery),
``evolution`` (table properties, schema evolution), ``iceberg`` (opening the catalog that
``--catalog`` names), ``state``/``state_table`` (what each detector has settled: the plan's
anti-join), ``lease`` (one writer at a time), ``views``/``questions`` (DuckDB over the tables,
the audit's questions), ``verdicts``/``sampling``/``csv_cells`` (reviewers' verdicts, the
precision sample, safe CSV), ``maintenance`` (expiry, compaction, orphans, check, repair).

May import: the root leaves, ``detector_core.sources`` and ``detector_core.method`` (the
intervals of ``method.metrics``). This is the top wing. A new table goes here: its columns in
``definitions`` (and ``schema``), created by ``catalog.ScanOutput.ensure_tables``, kept by
``maintenance``.
"""
