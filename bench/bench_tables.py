"""A year of nights on the scan tables: commit cost, metadata size, manifests, files and a DuckDB query, with and without maintenance.

    python -m bench.bench_tables --nights 365 --units 200 --every 30 --maintain --out bench/results/bench_tables-maintained.json
    python -m bench.bench_tables --nights 365 --units 200 --every 30 --as-before --out bench/results/bench_tables-plain.json

Every night commits ``--units`` commit units through the real commit path
(``ScanOutput.commit_unit``: intent, errors, scores, flagged, runs), each of one small
data file per table, then a ``completed`` runs row and the state's mark (as the scan's
state refresh moves it). With ``--maintain`` each night starts and ends as a scan does
(``expire``) and every ``--maintain-every`` nights ``jobs.maintain`` runs (expire, compact, orphans).
Every ``--every`` nights it records: seconds per unit commit (that night's mean), the
``scores`` table's ``metadata.json`` size, manifests and data files per table (current
snapshot), snapshots per table, and DuckDB's time for "flagged last night"
(``iceberg_scan`` of the current metadata, filtered on ``scan_date``; the median of five).

Nights are simulated: the wall clock (``time.time``, which pyiceberg stamps snapshots
with) is moved forward a day per night, so expiry sees a year pass in minutes. Orphan
removal runs with age 0, which is safe here only because nothing commits beside it.
``--budget-s`` stops a run that grows too slow and records how far it got.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

_REAL_TIME = time.time


class SimClock:
    """``time.time`` moved forward by whole days on demand (snapshot timestamps, intent times)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return _REAL_TIME() + self.offset


def _unit(out, scan_id: str, unit: int, day: dt.date, n: int = 8) -> dict:
    from detector_core import schema as S
    from detector_core.tables import definitions as T
    from detector_core.tables.catalog import data_file_path

    now = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc)
    cols = {f.name: pa.nulls(n, f.type) for f in T.SCORES_SCHEMA}
    cols.update({S.URI: pa.array([f"s3://b/{scan_id}/{unit}/{i}.jpg" for i in range(n)]), S.SCAN_ID: pa.array([scan_id] * n),
                 S.DETECTOR_ID: pa.array(["d"] * n), S.SCORE: pa.array([0.5] * n), S.FLAGGED: pa.array([i % 4 == 0 for i in range(n)]),
                 S.SCAN_DATE: pa.array([day] * n, pa.date32()), S.BUCKET: pa.array(["b"] * n),
                 S.SCANNED_AT: pa.array([now] * n, T.SCORES_SCHEMA.field(S.SCANNED_AT).type)})
    scores = pa.table(cols, schema=T.SCORES_SCHEMA)
    errors = T.ERRORS_SCHEMA.empty_table()
    err = {f.name: pa.nulls(1, f.type) for f in T.ERRORS_SCHEMA}
    err.update({S.URI: pa.array([f"s3://b/{scan_id}/{unit}/bad.jpg"]), S.SCAN_DATE: pa.array([day], pa.date32()),
                S.BUCKET: pa.array(["b"]), S.ERROR_STAGE: pa.array(["decode"])})
    errors = pa.table(err, schema=T.ERRORS_SCHEMA)
    files = {}
    for name, rows in (("scores", scores), ("flagged", scores.filter(scores[S.FLAGGED])), ("errors", errors)):
        path = data_file_path(out.uri, name, day.isoformat(), "b", scan_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(rows, path)
        files[name] = [path]
    run = {"scan_id": scan_id, "unit": unit, "status": "unit", "scan_date": day.isoformat(), "detector_id": "d", "scored": n,
           "flagged": n // 4, "errors": 1, "started_at": now.isoformat(), "committed_at": now.isoformat()}
    return {"scan_id": scan_id, "unit": unit, "files": files, "runs": [run]}


def _figures(out, night: int, day: dt.date, unit_seconds: list[float]) -> dict:
    from detector_core.tables import definitions as T
    from detector_core.tables.views import duckdb_connection, sql_quote

    row = {"night": night, "seconds_per_unit": round(statistics.mean(unit_seconds), 4)}
    for name in (*T.ALL_TABLES,):
        table = out.table(name)
        snap = table.current_snapshot()
        row[f"{name}_snapshots"] = len(table.metadata.snapshots)
        row[f"{name}_manifests"] = len(snap.manifests(table.io)) if snap else 0
        row[f"{name}_data_files"] = len(table.scan().plan_files()) if snap else 0
    scores = out.table("scores")
    row["scores_metadata_json_bytes"] = os.path.getsize(scores.metadata_location.removeprefix("file://"))
    con = duckdb_connection(out)
    times = []
    for _ in range(5):  # the median of five: one query is a few ms, and the machine is shared
        t0 = time.perf_counter()
        n = con.execute(f"SELECT count(*) FROM iceberg_scan({sql_quote(out.table('flagged').metadata_location)}) "
                        f"WHERE scan_date = DATE {sql_quote(day.isoformat())}").fetchone()[0]
        times.append(time.perf_counter() - t0)
    row["duckdb_flagged_last_night_s"] = round(statistics.median(times), 4)
    row["flagged_last_night_rows"] = n
    return row


def _as_before(out) -> None:
    """The tables as the version before jobs.maintain made them: pyiceberg's defaults (no manifest merge, 100 metadata versions kept)."""
    from detector_core.tables.catalog import OUTPUT_TABLES
    from detector_core.tables.evolution import TABLE_PROPERTIES

    for name in OUTPUT_TABLES:
        table = out.table(name)
        with table.transaction() as tx:
            tx.remove_properties(*TABLE_PROPERTIES)


def run(nights: int, units: int, every: int, maintain: bool, maintain_every: int, budget_s: float, root: str,
        as_before: bool = False) -> dict:
    clock = SimClock()
    time.time = clock  # pyiceberg stamps snapshots with time.time(); the intents and runs rows too
    from detector_core.tables import maintenance as M
    from detector_core.tables.catalog import ScanOutput
    from detector_core.tables.state_table import commit_state

    out = ScanOutput.open(os.path.join(root, "out"))
    if as_before:
        _as_before(out)
    first_day = dt.date(2026, 1, 1)
    rows, started = [], time.perf_counter()
    stopped = None
    for night in range(1, nights + 1):
        day = first_day + dt.timedelta(days=night - 1)
        clock.offset = (dt.datetime.combine(day, dt.time(2), dt.timezone.utc).timestamp() - _REAL_TIME())
        scan_id = f"scan-{day.isoformat()}"
        if maintain:
            M.expire(out, keep_days=7, unit_hours=12)  # what every scan does at its start
        unit_seconds = []
        for u in range(units):
            intent = _unit(out, scan_id, u, day)
            t0 = time.perf_counter()
            out.commit_unit(intent)
            unit_seconds.append(time.perf_counter() - t0)
        done = {**intent["runs"][0], "unit": -1, "status": "completed"}
        out.commit_unit({"scan_id": scan_id, "unit": -1, "files": {}, "runs": [done]})
        commit_state(out, [], [], {n: out.table(n).current_snapshot().sequence_number for n in ("scores", "errors")})
        if maintain:
            M.expire(out, keep_days=7, unit_hours=12)  # what every scan does at its end
            if night % maintain_every == 0:
                M.compact(out, before=day, min_files=4)
                M.expire(out, keep_days=7, unit_hours=12)
                M.remove_orphans(out, older_than_s=0)
        if night == 1 or night % every == 0 or night == nights:
            rows.append(_figures(out, night, day, unit_seconds))
            print(rows[-1], flush=True)
        if time.perf_counter() - started > budget_s:
            stopped = night
            if rows[-1]["night"] != night:
                rows.append(_figures(out, night, day, unit_seconds))
            break
    time.time = _REAL_TIME
    first, last = rows[0], rows[-1]
    ratios = {k: round(last[k] / first[k], 2) for k in first if k != "night" and isinstance(first[k], (int, float)) and first[k]}
    return {"nights": nights, "units_per_night": units, "maintain": maintain, "maintain_every": maintain_every, "as_before": as_before,
            "stopped_after_night": stopped, "seconds": round(time.perf_counter() - started, 1), "rows": rows,
            "last_over_first": ratios}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, default=365, help="nights to simulate")
    ap.add_argument("--units", type=int, default=200, help="commit units per night (a night of 10^7 objects at --chunk-size 50000)")
    ap.add_argument("--every", type=int, default=30, help="record the figures every this many nights (and the first and last)")
    ap.add_argument("--maintain", action="store_true", help="expire at each night's end and run jobs.maintain's steps")
    ap.add_argument("--maintain-every", type=int, default=1, help="nights between compaction + orphan removal runs")
    ap.add_argument("--as-before", action="store_true",
                    help="the tables without this version's properties (no manifest merge, pyiceberg's metadata log): the old behaviour")
    ap.add_argument("--budget-s", type=float, default=3600, help="stop after this many seconds and record how far it got")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        result = run(args.nights, args.units, args.every, args.maintain, args.maintain_every, args.budget_s, root, args.as_before)
    result["command"] = "python -m bench.bench_tables " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    if args.out:
        from jobs.common.outputs import write_json

        write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "rows"})
    return result


if __name__ == "__main__":
    main()
