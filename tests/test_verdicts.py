"""Reviewers' verdicts: import into the verdicts table, precision, drift, the threshold for N flags a night.

The scan outputs here are committed directly (``ScanOutput.commit_unit`` of hand-made
Parquet files, as a scan's driver commits them), so 40 nights cost no Ray. Expected values
are counted by hand from the fixture or computed independently (``scipy.stats`` for the
Wilson interval).
"""

from __future__ import annotations

import csv
import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from scipy.special import logit
from scipy.stats import binomtest

from detector_core import schema as S
from detector_core.storage import open_fs
from detector_core.tables import definitions as T
from detector_core.tables.catalog import ScanOutput, data_file_path, read_table
from detector_core.tables.verdicts import VerdictError, parse_verdicts, with_verdicts
from jobs import audit
from jobs.common.errors import JobError

DET = "clip-mlp-0123456789ab"
THR = 0.5


def commit_night(out: ScanOutput, day: dt.date, scores: dict[str, float], detector: str = DET, hour: int = 2) -> str:
    """One finished scan of ``scores`` (uri -> score) on ``day``, committed at ``hour`` UTC; returns its scan id."""
    scan_id = f"scan-{day.isoformat()}-{detector[-4:]}"
    at = dt.datetime.combine(day, dt.time(hour), dt.timezone.utc)
    rows = [{S.URI: u, S.ETAG: "e", S.SIZE: 10, S.WIDTH: 8, S.HEIGHT: 8, S.FORMAT: "PNG", S.SCORE: s, S.LOGIT: float(logit(s)),
             S.THRESHOLD: THR, S.FLAGGED: s >= THR, S.DETECTOR_ID: detector, S.DETECTOR_KIND: "clip-mlp", S.FEATURE_ID: "f",
             S.SCAN_ID: scan_id, S.SCANNED_AT: at, S.SCAN_DATE: day, S.BUCKET: T.bucket_of(u)} for u, s in scores.items()]
    table = pa.Table.from_pylist(rows, schema=T.SCORES_SCHEMA)
    files = {"errors": []}
    for name, part in (("scores", table), ("flagged", table.filter(table[S.FLAGGED]))):
        files[name] = []
        for bucket in sorted(set(part[S.BUCKET].to_pylist())):
            path = data_file_path(out.uri, name, day.isoformat(), bucket, scan_id)
            local = open_fs(path)[1]
            out.fs.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
            pq.write_table(part.filter(pc.equal(part[S.BUCKET], bucket)), local)
            files[name].append(path)
    run = {"scan_id": scan_id, "unit": 0, "status": "completed", "scan_date": day.isoformat(), "detector_id": detector,
           "detector_kind": "clip-mlp", "feature_id": "f", "input": "fixture", "listed": len(rows), "skipped": 0, "scored": len(rows),
           "flagged": sum(r[S.FLAGGED] for r in rows), "errors": 0, "started_at": at.isoformat(), "committed_at": at.isoformat(),
           "config": "{}", "schema_version": T.SCHEMA_VERSION}
    out.commit_unit({"scan_id": scan_id, "unit": 0, "files": files, "runs": [run]})
    return scan_id


def verdict(uri: str, scan_id: str, v: str, at: str, reviewer: str = "ana", note: str = "") -> dict:
    return {"uri": uri, "detector_id": DET, "scan_id": scan_id, "verdict": v, "note": note, "reviewer": reviewer, "reviewed_at": at}


@pytest.fixture
def two_nights(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    d1, d2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)
    s1 = commit_night(out, d1, {f"s3://up/a/{i}.jpg": 0.9 if i < 6 else 0.2 for i in range(10)})
    s2 = commit_night(out, d2, {f"s3://up/b/{i}.jpg": 0.8 if i < 4 else 0.1 for i in range(10)})
    return {"out": out, "dir": tmp_path / "out", "scans": (s1, s2), "days": (d1, d2)}


def _csv(path, rows: list[dict]) -> str:
    pacsv.write_csv(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_import_is_exact_idempotent_and_refuses_unknown_objects(two_nights, tmp_path):
    s1, s2 = two_nights["scans"]
    scan = str(two_nights["dir"])
    rows = [verdict("s3://up/a/0.jpg", s1, "generated", "2026-11-21T09:00:00.000Z", note='commas, "quotes"'),
            verdict("s3://up/a/1.jpg", s1, "real", "2026-11-21T09:01:00.000Z", reviewer=""),
            verdict("s3://up/b/7.jpg", s2, "unsure", "2026-11-22T10:00:00+01:00")]
    first = _csv(tmp_path / "v1.csv", rows)
    r = audit.main(["verdicts", "import", first, "--scan", scan, "--reviewer", "bo"])
    assert (r["added"], r["already_there"], r["refused_unknown"]) == (3, 0, 0)
    got = read_table(scan, "verdicts").sort_by("reviewed_at").to_pylist()
    assert [(g["uri"], g["verdict"], g["reviewer"], g["note"]) for g in got] == [
        ("s3://up/a/0.jpg", "generated", "ana", 'commas, "quotes"'), ("s3://up/a/1.jpg", "real", "bo", None),
        ("s3://up/b/7.jpg", "unsure", "ana", None)]
    assert got[2]["reviewed_at"] == dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.timezone.utc)  # +01:00 -> UTC
    assert [g["review_date"] for g in got] == [dt.date(2026, 11, 21)] * 2 + [dt.date(2026, 11, 22)]

    # The same file again, and the page's next export (old verdicts + new ones) as JSON: only new rows.
    again = audit.main(["verdicts", "import", first, "--scan", scan, "--reviewer", "bo"])
    assert (again["added"], again["already_there"]) == (0, 3)
    later = [{**rows[0], "reviewer": "ana"}, {**rows[1], "reviewer": "bo"}, rows[2],
             verdict("s3://up/a/0.jpg", s1, "real", "2026-11-23T08:00:00Z"),  # a changed mind: a later verdict
             verdict("s3://up/a/9.jpg", s2, "real", "2026-11-23T08:00:00Z"),  # right uri, wrong scan: never scored by s2
             verdict("s3://elsewhere/x.jpg", s1, "generated", "2026-11-23T08:00:00Z")]
    (tmp_path / "v2.json").write_text(json.dumps({"verdicts": later}))
    r2 = audit.main(["verdicts", "import", str(tmp_path / "v2.json"), "--scan", scan])
    assert (r2["added"], r2["already_there"], r2["refused_unknown"]) == (1, 3, 2)
    assert read_table(scan, "verdicts").num_rows == 4

    # Nothing known: refused whole, with the count; an unusable row: the file imports nothing.
    _csv(tmp_path / "v3.csv", [verdict("s3://elsewhere/y.jpg", s1, "real", "2026-11-23T08:00:00Z")])
    with pytest.raises(JobError, match="none of the 1 verdicts"):
        audit.main(["verdicts", "import", str(tmp_path / "v3.csv"), "--scan", scan])
    _csv(tmp_path / "v4.csv", [verdict("s3://up/a/2.jpg", s1, "fake", "2026-11-23T08:00:00Z"),
                               verdict("s3://up/a/3.jpg", s1, "real", "yesterday"),
                               verdict("s3://up/a/4.jpg", s1, "real", "2026-11-23T08:00:00Z", reviewer="")])
    with pytest.raises(JobError) as e:
        audit.main(["verdicts", "import", str(tmp_path / "v4.csv"), "--scan", scan])
    assert "nothing imported, 3 of 3" in str(e.value) and "'fake'" in str(e.value) and "'yesterday'" in str(e.value)
    assert "no reviewer" in str(e.value)
    assert read_table(scan, "verdicts").num_rows == 4


def test_parse_refuses_files_without_the_columns():
    with pytest.raises(VerdictError, match="no scan_id, reviewed_at column"):
        parse_verdicts(b"uri,detector_id,verdict\ns3://a/b.jpg,d,real\n", "x.csv")
    with pytest.raises(VerdictError, match="not valid JSON"):
        parse_verdicts(b"[{", "x.json")
    dup = json.dumps([verdict("s3://a/1.jpg", "s", "real", "2026-11-23T08:00:00Z")] * 2).encode()
    assert parse_verdicts(dup, "x.json").num_rows == 1  # a row repeated inside the file counts once


def test_a_verdict_from_the_future_is_refused_and_junk_is_called_junk():
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
    ahead = json.dumps([verdict("s3://a/1.jpg", "s", "real", "2026-12-07T12:09:00Z")]).encode()
    assert parse_verdicts(ahead, "x.json", imported_at=now).num_rows == 1  # a clock a few minutes ahead is fine
    future = json.dumps([verdict("s3://a/1.jpg", "s", "real", "9999-12-31T00:00:00Z")]).encode()
    with pytest.raises(VerdictError, match="reviewed_at in the future") as err:
        parse_verdicts(future, "x.json", imported_at=now)
    assert "\n" not in str(err.value) and "9999-12-31" in str(err.value)
    junk = np.random.default_rng(0).bytes(1 << 20)
    with pytest.raises(VerdictError, match="is not a verdicts file: binary data") as err:
        parse_verdicts(junk, "junk.csv")
    assert "UTF-16" not in str(err.value)


def test_precision_per_night_equals_a_hand_count_with_wilson_intervals(two_nights, tmp_path):
    s1, s2 = two_nights["scans"]
    scan = str(two_nights["dir"])
    # Night 1 flags a/0..a/5: verdicts on a/0..a/4 (a/0 first real, then generated: the later counts),
    # a/5 unreviewed, a/9 (not flagged) reviewed too. Night 2 flags b/0..b/3: b/0 generated, b/1 unsure.
    rows = [verdict("s3://up/a/0.jpg", s1, "real", "2026-11-21T09:00:00Z"),
            verdict("s3://up/a/0.jpg", s1, "generated", "2026-11-21T10:00:00Z", reviewer="cy"),
            verdict("s3://up/a/1.jpg", s1, "generated", "2026-11-21T09:00:00Z"),
            verdict("s3://up/a/2.jpg", s1, "generated", "2026-11-21T09:00:00Z"),
            verdict("s3://up/a/3.jpg", s1, "real", "2026-11-21T09:00:00Z"),
            verdict("s3://up/a/4.jpg", s1, "unsure", "2026-11-21T09:00:00Z"),
            verdict("s3://up/a/9.jpg", s1, "real", "2026-11-21T09:00:00Z"),
            verdict("s3://up/b/0.jpg", s2, "generated", "2026-11-22T09:00:00Z"),
            verdict("s3://up/b/1.jpg", s2, "unsure", "2026-11-22T09:00:00Z")]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(rows))
    audit.main(["verdicts", "import", str(path), "--scan", scan])
    got = audit.main(["query", "precision", "--scan", scan, "--format", "csv"]).to_pylist()
    # hand count: night 1: flagged 6, reviewed (generated/real) 4 = a/0 (gen), a/1, a/2, a/3 (real); unsure a/4
    want = [(two_nights["days"][0], 6, 4, 3, 1, 1), (two_nights["days"][1], 4, 1, 1, 0, 1)]
    assert [(g["scan_date"], g["flagged"], g["reviewed"], g["confirmed_generated"], g["confirmed_real"], g["unsure"]) for g in got] == want
    for g in got:
        ci = binomtest(g["confirmed_generated"], g["reviewed"]).proportion_ci(confidence_level=0.95, method="wilson")
        assert g["convenience_precision"] == pytest.approx(g["confirmed_generated"] / g["reviewed"])
        assert (g["convenience_low"], g["convenience_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        # no precision sample was drawn (no report ran): no estimate, and the table says why
        assert (g["precision"], g["precision_low"], g["estimate"]) == (None, None, "no sample (jobs.report draws it)")


def test_drift_flags_a_night_with_five_times_the_usual_flagged_rate(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    start = dt.date(2026, 10, 1)
    for d in range(40):  # 7-9 of 200 flagged a night in bucket "up" (~4 %); night 35: 40 (5x); "other" stays at 8
        day = start + dt.timedelta(days=d)
        n_flag = 40 if d == 35 else 7 + d % 3
        scores = {f"s3://up/{d}/{i}.jpg": (0.9 if i < n_flag else 0.1) for i in range(200)}
        scores.update({f"s3://other/{d}/{i}.jpg": (0.9 if i < 8 else 0.1) for i in range(200)})
        commit_night(out, day, scores)
    got = audit.main(["query", "drift", "--scan", str(tmp_path / "out"), "--format", "csv"]).to_pylist()
    judged = {(g["scan_date"], g["bucket"]): g["drift"] for g in got}
    assert all(v == "no baseline" for (day, _), v in judged.items() if day < start + dt.timedelta(days=7))
    high = [k for k, v in judged.items() if v != "ok" and v != "no baseline"]
    assert high == [(start + dt.timedelta(days=35), "up")] and judged[high[0]] == "high"
    night = next(g for g in got if (g["scan_date"], g["bucket"]) == high[0])
    # the baseline is the 28 calendar days before, independently averaged
    rates = {(g["scan_date"], g["bucket"]): g["flagged_rate"] for g in got}
    base = [rates[(start + dt.timedelta(days=d), "up")] for d in range(35 - 28, 35)]
    assert night["baseline_nights"] == 28 and night["baseline_rate"] == pytest.approx(np.mean(base))


def test_threshold_for_about_n_flags_a_night(two_nights):
    scan = str(two_nights["dir"])
    got = audit.main(["query", "threshold", "--scan", scan, "--target-daily-flags", "3", "--format", "csv"]).to_pylist()
    # Two nights, 20 scores: 0.9 x6, 0.8 x4, 0.2 x4, 0.1 x6. Six flags in two nights: the 6th highest is 0.9.
    assert len(got) == 1 and got[0]["threshold"] == pytest.approx(0.9) and got[0]["flags_per_night"] == 3.0
    assert got[0]["bundle_threshold"] == THR and got[0]["flags_per_night_at_bundle"] == 5.0
    with pytest.raises(JobError, match="--target-daily-flags"):
        audit.main(["query", "threshold", "--scan", scan])


def test_reviewed_images_become_labelled_training_rows():
    manifest = pa.table({"uri": ["/d/r1.png", "/d/g1.png", "/d/fp.png"], "label": [0, 1, 1], "split": [None, None, "val"]})
    at = [f"2026-11-2{i}T08:00:00Z" for i in range(1, 6)]
    rows = [verdict("/d/fp.png", "s", "real", at[0]),             # the manifest said generated: a confirmed false positive
            verdict("/scan/new_gen.png", "s", "real", at[0]),     # first real ...
            verdict("/scan/new_gen.png", "s", "generated", at[1]),  # ... then generated: the later counts
            verdict("/scan/new_real.png", "s", "real", at[2]),
            verdict("/scan/unsure.png", "s", "unsure", at[3])]
    v = parse_verdicts(json.dumps(rows).encode(), "v.json")
    merged, counts = with_verdicts(manifest, v)
    got = {r["uri"]: (r["label"], r["split"]) for r in merged.to_pylist()}
    assert got == {"/d/r1.png": (0, None), "/d/g1.png": (1, None), "/d/fp.png": (0, "train"),
                   "/scan/new_gen.png": (1, "train"), "/scan/new_real.png": (0, "train")}
    assert counts == {"verdict_rows": 3, "generated": 1, "real": 2, "unsure_dropped": 1, "already_in_manifest": 1,
                      "relabelled": 1, "in_validation": False}
    merged, _ = with_verdicts(manifest, v, in_validation=True)
    assert {r["split"] for r in merged.to_pylist() if r["uri"].startswith("/scan/")} == {None}


def test_imports_at_once_add_each_verdict_once(two_nights, tmp_path):
    """Three `jobs.audit verdicts import` processes of overlapping files race on one table: every verdict lands once.

    (pyiceberg rebases a failed append by itself unless the table says not to: with its
    default this test saw the three shared verdicts twice.)
    """
    import subprocess
    import sys
    from pathlib import Path

    s1, s2 = two_nights["scans"]
    a = [verdict(f"s3://up/a/{i}.jpg", s1, "generated", f"2026-11-21T09:0{i}:00Z") for i in range(6)]
    b = a[3:] + [verdict(f"s3://up/b/{i}.jpg", s2, "real", f"2026-11-22T09:0{i}:00Z") for i in range(4)]
    paths = []
    for name, rows in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(rows))
        paths.append(str(tmp_path / name))
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.audit", "verdicts", "import", p, "--scan", str(two_nights["dir"])],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in [*paths, paths[0]]]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    table = read_table(str(two_nights["dir"]), "verdicts")
    assert table.num_rows == 10 and len(set(table["uri"].to_pylist())) == 10


def test_precision_from_the_stratified_sample_is_unbiased_where_convenience_is_not(tmp_path):
    """2,000 flagged rows whose true share of generated images falls with the score band (0.95 at the top, 0.2 at the bottom).

    Reviewers who take the queue from the top judge the easy flags: their figure is far above
    the truth. The report's precision sample, reviewed in full, gives an estimate whose 95 %
    interval holds the true precision; the estimate and interval equal an independent
    computation of the stratified estimator (weights N_h / N, Wilson at the effective size).
    """
    from detector_core.tables.views import connect
    from jobs import report

    rng = np.random.default_rng(7)
    out = ScanOutput.open(str(tmp_path / "out"))
    day = dt.date(2026, 11, 23)
    n = 2000
    scores = {f"s3://up/p/{i:04d}.jpg": float(s) for i, s in enumerate(rng.uniform(0.5, 1.0, n))}
    p_true = {u: 0.2 + 0.75 * (s - 0.5) / 0.5 for u, s in scores.items()}
    label = {u: bool(rng.random() < p) for u, p in p_true.items()}
    scan_id = commit_night(out, day, scores)
    true_precision = sum(label.values()) / n

    cfg = report.ReportConfig(scan=str(tmp_path / "out"))
    sample, added = report.draw_precision_sample(out, connect(out, "", day.isoformat(), day.isoformat()), day.isoformat(), [DET], cfg)
    assert added == sample.num_rows == 385 == cfg.precision_sample
    again, added = report.draw_precision_sample(out, connect(out, "", day.isoformat(), day.isoformat()), day.isoformat(), [DET], cfg)
    assert added == 0 and sorted(again["uri"].to_pylist()) == sorted(sample["uri"].to_pylist())  # drawn once

    def imported(rows, name):
        (tmp_path / name).write_text(json.dumps([verdict(u, scan_id, "generated" if label[u] else "real", "2026-11-24T09:00:00Z")
                                                 for u in rows]))
        audit.main(["verdicts", "import", str(tmp_path / name), "--scan", str(tmp_path / "out")])

    top = sorted(scores, key=lambda u: -scores[u])[:300]  # the convenience picks: the top of the page
    imported(top, "top.json")
    s = sample.to_pylist()
    imported([r["uri"] for r in s if r["stratum"] != 3], "sample-part.json")
    got = audit.main(["query", "precision", "--scan", str(tmp_path / "out"), "--format", "csv"]).to_pylist()[0]
    assert got["precision"] is None and got["estimate"] == "sample incomplete: 3 of 4 score bands reviewed"
    imported([r["uri"] for r in s if r["stratum"] == 3], "sample-rest.json")
    got = audit.main(["query", "precision", "--scan", str(tmp_path / "out"), "--format", "csv"]).to_pylist()[0]

    # independently: bands by rank of score (500 rows each), each band's confirmed share of its reviewed sample rows
    ranked = sorted(scores, key=lambda u: (-scores[u], u))
    band = {u: (i * 4) // n for i, u in enumerate(ranked)}
    est, var = 0.0, 0.0
    for h in range(4):
        drawn = [r["uri"] for r in s if band[r["uri"]] == h]
        p_h, w_h = np.mean([label[u] for u in drawn]), 500 / n
        est += w_h * p_h
        var += w_h * w_h * p_h * (1 - p_h) / len(drawn)
    m = est * (1 - est) / var
    z = 1.959963984540054
    centre, half = (est + z * z / (2 * m)) / (1 + z * z / m), z * np.sqrt(est * (1 - est) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    assert got["estimate"] == "stratified sample" and (got["sample_size"], got["sample_reviewed"]) == (385, 385)
    assert got["precision"] == pytest.approx(est, abs=1e-12)
    assert (got["precision_low"], got["precision_high"]) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert got["precision_low"] <= true_precision <= got["precision_high"]
    assert got["precision_high"] - got["precision_low"] <= 0.10  # about ±5 points at the default size
    # the convenience figure counts every verdict on the night's flags: the top 300 pull it far above the truth
    assert got["convenience_precision"] > got["precision_high"] + 0.05 and got["reviewed"] == len(set(top) | {r["uri"] for r in s})


def test_threshold_query_gives_each_flag_rate_an_exact_interval(two_nights):
    got = audit.main(["query", "threshold", "--scan", str(two_nights["dir"]), "--target-daily-flags", "3", "--format", "csv"]).to_pylist()[0]
    for k, rate in ((got["flagged_at_threshold"], "flag_rate"), (got["flagged_at_bundle"], "flag_rate_at_bundle")):
        ci = binomtest(k, got["scored"]).proportion_ci(confidence_level=0.95, method="exact")
        assert got[rate] == pytest.approx(k / got["scored"]) and (got[f"{rate}_low"], got[f"{rate}_high"]) == pytest.approx((ci.low, ci.high))
    assert (got["flagged_at_threshold"], got["flagged_at_bundle"], got["scored"]) == (6, 10, 20)


def test_csv_answers_neutralise_formulas_but_not_numbers(two_nights, tmp_path):
    s1, _ = two_nights["scans"]
    scan = str(two_nights["dir"])
    notes = ['=HYPERLINK("http://evil.example", "x")', "+cmd|' /C calc'!A0", "@SUM(1)", "-2+3", "'=already quoted", "fine"]
    rows = [verdict(f"s3://up/a/{i}.jpg", s1, "generated", f"2026-11-21T09:0{i}:00Z", note=n) for i, n in enumerate(notes)]
    (tmp_path / "v.json").write_text(json.dumps(rows))
    audit.main(["verdicts", "import", str(tmp_path / "v.json"), "--scan", scan])
    audit.main(["query", "sql", "--scan", scan, "--sql", "SELECT note, -2.5 AS logit FROM verdicts ORDER BY reviewed_at",
                "--format", "csv", "--out", str(tmp_path / "a.csv")])
    got = list(csv.DictReader(open(tmp_path / "a.csv", encoding="utf-8")))
    assert [g["note"] for g in got] == ["'" + n if n[0] in "=+-@" or n.startswith("'=") else n for n in notes]
    assert {g["logit"] for g in got} == {"-2.5"}  # a number stays a number
    # a spreadsheet round trip: the neutralised file imports back to the exact notes
    with open(tmp_path / "back.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "note": g["note"], "reviewed_at": "2026-11-22T09:00:00Z"} for r, g in zip(rows, got)])
    audit.main(["verdicts", "import", str(tmp_path / "back.csv"), "--scan", scan])
    back = read_table(scan, "verdicts").filter(pc.equal(read_table(scan, "verdicts")["review_date"], dt.date(2026, 11, 22)))
    assert sorted(back["note"].to_pylist()) == sorted(notes)


def test_imports_read_utf8_with_or_without_bom_and_utf16_and_refuse_latin1_in_one_line(two_nights, tmp_path):
    s1, _ = two_nights["scans"]
    scan = str(two_nights["dir"])
    header = "uri,detector_id,scan_id,verdict,note,reviewer,reviewed_at\n"
    line = "s3://up/a/{i}.jpg,%s,%s,real,café crème,zoë,2026-11-21T09:0{i}:00Z\n" % (DET, s1)
    cases = {"bom.csv": (header + line.format(i=1)).encode("utf-8-sig"), "utf16.csv": (header + line.format(i=2)).encode("utf-16"),
             "plain.csv": (header + line.format(i=3)).encode("utf-8")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert audit.main(["verdicts", "import", str(tmp_path / name), "--scan", scan])["added"] == 1, name
    table = read_table(scan, "verdicts")
    assert set(table["note"].to_pylist()) == {"café crème"} and set(table["reviewer"].to_pylist()) == {"zoë"}
    latin = (header + line.format(i=4)).encode("latin-1")
    (tmp_path / "latin.csv").write_bytes(latin)
    with pytest.raises(JobError) as e:
        audit.main(["verdicts", "import", str(tmp_path / "latin.csv"), "--scan", scan])
    msg = str(e.value)
    at = latin.index("é".encode("latin-1"))
    assert "\n" not in msg and f"byte position {at}" in msg and "(line 2)" in msg
    assert f"iconv -f latin1 -t utf-8 {tmp_path / 'latin.csv'}" in msg
    (tmp_path / "nobom.csv").write_bytes((header + line.format(i=5)).encode("utf-16-le"))
    with pytest.raises(JobError, match="UTF-16 without a byte-order mark"):
        audit.main(["verdicts", "import", str(tmp_path / "nobom.csv"), "--scan", scan])
    assert read_table(scan, "verdicts").num_rows == 3


def test_a_second_detector_gets_its_own_sample_beside_the_first(two_nights):
    """A night whose sample one detector already has: the next report draws the other's and returns both (one table)."""
    from detector_core.tables.views import connect
    from jobs import report

    out, night = two_nights["out"], dt.date(2026, 11, 22)
    day, other = night.isoformat(), "dnf-resnet-fedcba987654"
    commit_night(out, night, {f"s3://up/c/{i}.jpg": 0.9 for i in range(6)})
    commit_night(out, night, {f"s3://up/o/{i}.jpg": 0.9 for i in range(4)}, detector=other, hour=3)
    cfg = report.ReportConfig(scan=str(two_nights["dir"]))
    con = connect(out, "", day, day)
    first, added = report.draw_precision_sample(out, con, day, [DET], cfg)  # a report of one detector
    assert added == first.num_rows == 6  # every flagged row of a small night
    both, added = report.draw_precision_sample(out, con, day, [DET, other], cfg)  # then one of both
    assert added == 4 and sorted(both["detector_id"].to_pylist()) == [DET] * 6 + [other] * 4
