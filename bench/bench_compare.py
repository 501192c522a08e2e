"""What ``query compare`` costs at a night's size: production's rows against a challenger's, 10⁶ of each.

    python -m bench.bench_compare --rows 1000000 --out bench/results/bench_compare-cpu2-2026-12-08.json

Builds an output with ``--rows`` production ``scores`` rows in one night (``bench_current_rows``'
builder: the real unit path) and the same objects in ``challenger_scores`` under another
detector id with other scores (as ``jobs.rescore`` leaves them), then times ``jobs.audit query
compare`` (per night and bucket) and ``--rows --limit 100`` (the disagreements), median of three.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.bench_current_rows import _night, _time
from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables.catalog import ScanOutput, data_file_path
from jobs.common.outputs import write_json


def main(argv=None) -> dict:
    from jobs.audit import AuditConfig, answer
    from jobs.common.flags import parse_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of each detector")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    out = ScanOutput.open(f"{tempfile.mkdtemp(prefix='bench-compare-')}/out")
    day = dt.date(2026, 11, 23)
    _night(out, "scan-0", day, args.rows, 0)
    paths = []
    rng = np.random.default_rng(1)
    for task in out.table("scores").scan().plan_files():
        rows = pq.read_table(task.file.file_path)
        score = np.clip(np.asarray(rows[S.SCORE]) + rng.normal(0, 0.05, rows.num_rows), 0, 1)
        rows = rows.set_column(rows.schema.get_field_index(S.SCORE), S.SCORE, pa.array(score))
        rows = rows.set_column(rows.schema.get_field_index(S.FLAGGED), S.FLAGGED, pc.greater_equal(rows[S.SCORE], 0.9))
        rows = rows.set_column(rows.schema.get_field_index(S.DETECTOR_ID), S.DETECTOR_ID, pa.array(["challenger"] * rows.num_rows))
        path = data_file_path(out.uri, T.CHALLENGER, day.isoformat(), "b", "rescore-bench")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(rows.cast(T.SCORES_SCHEMA), path)
        paths.append(path)
    out.table(T.CHALLENGER).add_files(paths)

    def ask(*extra: str):
        return lambda: answer(parse_config(AuditConfig, ["--question", "compare", "--scan", out.uri, "--challenger", "challenger",
                                                         *extra]))

    summary = ask()().to_pylist()[0]
    result = {"rows_each": args.rows, "compare_s": _time(ask()), "disagreements_rows_s": _time(ask("--rows", "--limit", "100")),
              "objects": summary["objects"], "flagged_either_only": summary["flagged_either_only"],
              "cohens_kappa": summary["cohens_kappa"], "machine": platform.processor() or platform.machine(),
              "python": sys.version.split()[0]}
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
