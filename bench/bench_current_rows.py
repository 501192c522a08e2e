"""What "one row per object, night and detector" and the deeper ``check`` cost: audit answers and check at a night's size.

    python -m bench.bench_current_rows --nights 4 --rows 1000000 --out bench/results/bench_current_rows-cpu2-2026-12-07.json

Builds an output of ``--nights`` nights of ``--rows`` scores rows each (10 % flagged, one
data file per 250,000 rows, committed through the real unit path), then times, as the audit
CLI answers them: ``query per-day`` and ``query top`` over every night, with no night scanned
twice (the current-row rule costs nothing: the views are the tables) and again after one
night is scanned a second time in full (that night's rows go through the rule: a hash
aggregate over its keys); and ``maintenance.check`` (file listing, lineage, intents, and the
flagged ⊆ scores count per partition, which reads ``scores``' ``flagged`` column).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables import maintenance as M
from detector_core.tables.catalog import ScanOutput, data_file_path
from jobs.common.outputs import write_json

FILE_ROWS = 250_000


def _night(out: ScanOutput, scan_id: str, day: dt.date, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    when = dt.datetime.combine(day, dt.time(2 + seed % 20), dt.timezone.utc)
    for unit, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        score = rng.random(n)
        cols = {f.name: pa.nulls(n, f.type) for f in T.SCORES_SCHEMA}
        cols.update({S.URI: pa.array([f"s3://b/{day}/{i}.jpg" for i in range(start, start + n)]), S.SCAN_ID: pa.array([scan_id] * n),
                     S.DETECTOR_ID: pa.array(["d"] * n), S.SCORE: pa.array(score), S.THRESHOLD: pa.array(np.full(n, 0.9)),
                     S.FLAGGED: pa.array(score >= 0.9), S.SCAN_DATE: pa.array([day] * n, pa.date32()), S.BUCKET: pa.array(["b"] * n),
                     S.SCANNED_AT: pa.array([when] * n, T.SCORES_SCHEMA.field(S.SCANNED_AT).type)})
        scores = pa.table(cols, schema=T.SCORES_SCHEMA)
        files = {}
        for name, part in (("scores", scores), ("flagged", scores.filter(scores[S.FLAGGED]))):
            path = data_file_path(out.uri, name, day.isoformat(), "b", scan_id)
            out.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            pq.write_table(part, path)
            files[name] = [path]
        run = {"scan_id": scan_id, "unit": unit, "status": "unit", "scan_date": day.isoformat(), "detector_id": "d",
               "started_at": when.isoformat(), "committed_at": when.isoformat()}
        out.commit_unit({"scan_id": scan_id, "unit": unit, "files": files, "runs": [run]})


def _time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)), 3)


def main(argv=None) -> dict:
    from jobs.audit import AuditConfig, answer
    from jobs.common.flags import parse_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=4, help="nights of scores")
    ap.add_argument("--rows", type=int, default=1_000_000, help="scores rows a night")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-current-")
    out = ScanOutput.open(f"{folder}/out")
    days = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(args.nights)]
    t0 = time.perf_counter()
    for i, day in enumerate(days):
        _night(out, f"scan-{i}", day, args.rows, i)
    built = round(time.perf_counter() - t0, 1)

    def ask(q: str, *extra: str):
        return lambda: answer(parse_config(AuditConfig, ["--question", q, "--scan", out.uri, *extra]))

    result = {"machine": platform.processor() or platform.machine(), "python": sys.version.split()[0], "nights": args.nights,
              "rows_a_night": args.rows, "build_s": built}
    result["scanned_once"] = {"per_day_s": _time(ask("per-day")), "top_s": _time(ask("top", "--limit", "100")),
                              "check_s": _time(lambda: M.check(out), 1)}
    _night(out, "scan-again", days[-1], args.rows, 99)  # the last night scanned again in full
    per_day = ask("per-day")()
    assert per_day.to_pylist()[-1]["scored"] == args.rows, per_day  # each object once
    result["one_night_twice"] = {"per_day_s": _time(ask("per-day")), "top_s": _time(ask("top", "--limit", "100")),
                                 "check_s": _time(lambda: M.check(out), 1)}
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
