"""The tables over many nights: commit order, maintenance (detector_core.tables.maintenance, jobs.maintain), table docs,
the README's reader snippets, and AWS Glue (moto). No Ray. (``tests/test_damage.py``: damage found and repaired.)

Units are committed through the real commit path (``ScanOutput.commit_unit``) from small
hand-made data files in which ``flagged`` is a true subset of ``scores`` (same uris), so
"no flagged row without its scores row" is a property the tables can break. Readers are
DuckDB's ``iceberg_scan`` and pyiceberg, as audit teams' engines read the tables.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables import maintenance as M
from detector_core.tables.catalog import ScanOutput, data_file_path, read_table
from detector_core.tables.views import duckdb_connection, pinned_snapshots, sql_quote

ROOT = Path(__file__).resolve().parents[1]
DAY = dt.date(2026, 11, 23)


def _unit(out: ScanOutput, scan_id: str, unit: int, n: int = 4, day: dt.date = DAY, committed_at: dt.datetime | None = None,
          status: str = "unit") -> dict:
    """The intent of one unit: ``n`` scores rows (every other one flagged: the flagged rows are those same objects) and one error."""
    when = committed_at or dt.datetime.combine(day, dt.time(2), dt.timezone.utc)
    uris = [f"s3://b/{scan_id}/u{unit}-{i}.png" for i in range(n)]
    scores = {f.name: pa.nulls(n, f.type) for f in T.SCORES_SCHEMA}
    scores.update({S.URI: pa.array(uris), S.SCAN_ID: pa.array([scan_id] * n), S.DETECTOR_ID: pa.array(["d"] * n),
                   S.SCORE: pa.array([0.9 if i % 2 == 0 else 0.1 for i in range(n)]),
                   S.FLAGGED: pa.array([i % 2 == 0 for i in range(n)]), S.SCAN_DATE: pa.array([day] * n, pa.date32()),
                   S.BUCKET: pa.array(["b"] * n), S.SCANNED_AT: pa.array([when] * n, T.SCORES_SCHEMA.field(S.SCANNED_AT).type)})
    scores = pa.table(scores, schema=T.SCORES_SCHEMA)
    errors = {f.name: pa.nulls(1, f.type) for f in T.ERRORS_SCHEMA}
    errors.update({S.URI: pa.array([f"s3://b/{scan_id}/bad{unit}.png"]), S.SCAN_ID: pa.array([scan_id]), S.DETECTOR_ID: pa.array(["d"]),
                   S.ERROR_STAGE: pa.array(["decode"]), S.SCAN_DATE: pa.array([day], pa.date32()), S.BUCKET: pa.array(["b"]),
                   S.SCANNED_AT: pa.array([when], T.ERRORS_SCHEMA.field(S.SCANNED_AT).type)})
    parts = {"scores": scores, "flagged": scores.filter(scores[S.FLAGGED]), "errors": pa.table(errors, schema=T.ERRORS_SCHEMA)}
    files = {}
    for name, rows in parts.items():
        path = data_file_path(out.uri, name, day.isoformat(), "b", scan_id)
        fs_path = M.fs_path(path)
        out.fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
        with out.fs.open(fs_path, "wb") as f:
            pq.write_table(rows, f)
        files[name] = [path]
    run = {"scan_id": scan_id, "unit": unit, "status": status, "scan_date": day.isoformat(), "detector_id": "d",
           "scored": n, "flagged": parts["flagged"].num_rows, "errors": 1, "started_at": when.isoformat(), "committed_at": when.isoformat()}
    return {"scan_id": scan_id, "unit": unit, "files": files, "runs": [run]}


def _uris_duckdb(out: ScanOutput, name: str) -> set[str]:
    """The table's rows as DuckDB sees its *current* snapshot (unpinned), through the catalog's metadata location."""
    con = duckdb_connection(out)
    table = out.table(name)
    if table.current_snapshot() is None:
        return set()
    return {r[0] for r in con.execute(f"SELECT uri FROM iceberg_scan({sql_quote(table.metadata_location)})").fetchall()}


def _uris(out: ScanOutput, name: str, snapshot_id: int | None = None) -> set[str]:
    table = out.table(name)
    if table.current_snapshot() is None:
        return set()
    return set(out.read(name, selected_fields=(S.URI,), snapshot_id=snapshot_id)[S.URI].to_pylist())


# -- whole units for readers that do not pin --------------------------------------------------------
KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from detector_core.tables.catalog import ScanOutput
from test_maintain import _unit
out = ScanOutput.open({out!r})
step = {step!r}
def die(at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
out.commit_unit(_unit(out, "scan-1", 1), before_each=die)
"""


@pytest.mark.parametrize("step", ["intent", "errors", "scores", "flagged", "runs", "done"])
def test_kill_9_at_every_commit_point_unpinned_readers_see_no_flagged_row_without_scores(tmp_path, step):
    out = ScanOutput.open(str(tmp_path / "out"))
    out.commit_unit(_unit(out, "scan-1", 0))
    proc = subprocess.run([sys.executable, "-c", KILLER.format(tests=str(ROOT / "tests"), out=out.uri, step=step)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # The current snapshots, read as outside engines read them (flagged first, then scores: never older than flagged).
    for read in (_uris_duckdb, _uris):
        flagged, scores = read(out, "flagged"), read(out, "scores")
        assert flagged and flagged <= scores, (step, flagged - scores)
    # The documented whole-unit read (pin the newest runs row): exactly the units that have a runs row.
    pins = pinned_snapshots(out)
    units = set(read_table(out.uri, "runs")["unit"].to_pylist())
    want = {f"s3://b/scan-1/u{u}-{i}.png" for u in units for i in range(4)}
    assert _uris(out, "scores", pins["scores"]) == want
    assert _uris(out, "flagged", pins["flagged"]) == {u for u in want if int(u.rsplit("-", 1)[1][0]) % 2 == 0}
    # The next scan finishes the unit (or, killed before its intent, leaves it to be scored again).
    out.recover()
    assert _uris(out, "flagged") <= _uris(out, "scores")
    assert len(_uris(out, "scores")) == (4 if step == "intent" else 8)


# -- maintenance ----------------------------------------------------------------------------------
def test_maintenance_beside_a_committing_scan_loses_no_commit_and_no_live_file(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    # The units' data files are a day old and named by pending intents before maintenance
    # starts: old enough for orphan removal, and live all along (an intent, then a snapshot).
    # What the age guards (a commit's own manifests and metadata, written before the catalog
    # points at them; a real scan's files before their intent) is young here and left alone.
    intents = [_unit(out, "scan-1", u) for u in range(24)]
    day_ago = time.time() - 86_400
    for intent in intents:
        for paths in intent["files"].values():
            os.utime(paths[0], (day_ago, day_ago))
        out.fs.makedirs(out.intent_path("scan-1", intent["unit"]).rsplit("/", 1)[0], exist_ok=True)
        out.fs.pipe_file(out.intent_path("scan-1", intent["unit"]), json.dumps(intent).encode())
    errors, polls, done = [], [], threading.Event()

    def scan():
        try:
            for intent in intents:
                ScanOutput.open(out.uri).commit_unit(intent)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=scan)
    thread.start()
    rounds, removed = 0, 0
    while not done.is_set():
        mine = ScanOutput.open(out.uri)
        M.expire(mine, keep_days=7, unit_hours=0)
        M.compact(mine, before=dt.date(2100, 1, 1), min_files=2)  # tonight's partition too, under the scan
        M.remove_orphans(mine, older_than_s=60)
        flagged, scores = _uris(mine, "flagged"), _uris(mine, "scores")
        polls.append(flagged <= scores)
        rounds += 1
    thread.join()
    assert not errors, errors
    assert rounds >= 2 and all(polls)
    assert M.check(out) == {}
    assert len(_uris(out, "scores")) == 24 * 4 and len(_uris(out, "flagged")) == 24 * 2
    assert sorted(read_table(out.uri, "runs")["unit"].to_pylist()) == list(range(24))
    assert len(read_table(out.uri, "errors")) == 24
    # Once nothing commits: one more compaction and unit (so that the newest runs row pins the
    # compacted files), then the files compaction replaced go and what the tables reference stays.
    M.compact(out, before=dt.date(2100, 1, 1), min_files=2)
    out.commit_unit(_unit(out, "scan-1", 24))
    _fold_history(out)
    M.expire(out, keep_days=7, unit_hours=0)
    removed = M.remove_orphans(out, older_than_s=0)
    assert any(p.endswith(".parquet") and "/data/" in p for p in removed["scores"]) and M.check(out) == {}
    assert len(_uris(out, "scores")) == 25 * 4 and len(_uris(out, "flagged")) == 25 * 2


def _fold_history(out: ScanOutput) -> None:
    """Move the state's mark to the newest history, as a scan's state refresh does (the files themselves need Ray to fold)."""
    from detector_core.tables.state_table import commit_state

    commit_state(out, [], [], {n: out.table(n).current_snapshot().sequence_number for n in ("scores", "errors")})


def _answers(out_uri: str) -> dict:
    from jobs.audit import AuditConfig, answer
    from jobs.common.flags import parse_config

    def audit(argv):
        return answer(parse_config(AuditConfig, ["--question", argv[1], *argv[2:]]))

    asked = {}
    for q, extra in (("per-day", []), ("top", ["--limit", "0"]), ("errors", []), ("sql", ["--sql", "SELECT scan_date, count(*) AS n "
                                                                                        "FROM flagged GROUP BY ALL ORDER BY ALL"])):
        table = audit(["query", q, "--scan", out_uri, *extra])
        # example_uri is any one row of its group: which one depends on the files' order
        asked[q] = sorted(json.dumps({k: v for k, v in r.items() if k != "example_uri"}, sort_keys=True, default=str)
                          for r in table.to_pylist())
    return asked


def test_expiry_keeps_what_runs_pin_inside_the_window_and_the_audit_answers_as_before(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    now = dt.datetime.now(dt.timezone.utc)
    completed = {}
    for night, age_days in (("scan-a", 10), ("scan-b", 3), ("scan-c", 1)):
        when = now - dt.timedelta(days=age_days)
        for u in range(3):
            out.commit_unit(_unit(out, night, u, day=when.date(), committed_at=when))
        completed[night] = out.commit_unit({"scan_id": night, "unit": -1, "files": {},
                                            "runs": [{**_unit(out, night, -1, n=0, day=when.date(), committed_at=when)["runs"][0],
                                                      "status": "completed"}]})
    before = _answers(out.uri)
    _fold_history(out)
    later = now + dt.timedelta(hours=13)  # every snapshot is older than --keep-unit-hours 12 then
    expired = M.expire(out, keep_days=7, unit_hours=12, now=later)
    kept = {s.snapshot_id for s in out.table("scores").metadata.snapshots}
    # scan-a finished 10 days ago: gone; scan-b and scan-c: their completed pins stay; units of all: gone.
    assert kept == {completed["scan-b"]["scores"], completed["scan-c"]["scores"]}
    assert expired["scores"] == 9 - 2 and expired["runs"] == 12 - 1  # a completed row commits no scores snapshot of its own
    M.compact(out, before=dt.date(2100, 1, 1), min_files=2)
    M.expire(out, keep_days=7, unit_hours=12, now=later)
    M.remove_orphans(out, older_than_s=0)
    assert M.check(out) == {}
    assert _answers(out.uri) == before
    scores = out.table("scores")
    assert len(scores.scan().plan_files()) == 3  # one file per night's partition after compaction
    # Time travel to a kept pin still works; to an expired one it says so.
    assert len(_uris(out, "scores", completed["scan-b"]["scores"])) == 3 * 4 * 2
    with pytest.raises(ValueError):
        out.read("scores", snapshot_id=completed["scan-a"]["scores"])


def test_expiry_keeps_a_half_committed_units_snapshots_until_it_is_recovered(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    out.commit_unit(_unit(out, "scan-1", 0))

    def die(at):
        if at == "runs":
            raise KeyboardInterrupt  # killed after flagged, before runs

    with pytest.raises(KeyboardInterrupt):
        out.commit_unit(_unit(out, "scan-1", 1), before_each=die)
    out.commit_unit(_unit(out, "scan-2", 0))  # later commits: the half unit's snapshots are no longer current
    _fold_history(out)
    M.expire(out, keep_days=7, unit_hours=0, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    out.recover()
    flagged = out.read("flagged", selected_fields=(S.URI,))[S.URI].to_pylist()
    assert len(flagged) == len(set(flagged)) == 6  # each unit's flagged rows once, not the half unit's twice


def test_table_properties_bound_manifests_and_metadata_on_old_tables_too(tmp_path):
    out = ScanOutput.open(str(tmp_path / "out"))
    table = out.table("scores")
    with table.transaction() as tx:  # as an older version made it
        tx.remove_properties("commit.manifest-merge.enabled", "write.metadata.previous-versions-max")
        with tx.update_schema() as update:
            update.update_column(S.URI, doc="")
    out = ScanOutput.open(out.uri)  # a scan opening it upgrades it
    for u in range(40):
        out.commit_unit(_unit(out, "scan-1", u, n=2))
    scores = out.table("scores")
    assert scores.properties["commit.manifest-merge.enabled"] == "true"
    assert len(scores.current_snapshot().manifests(scores.io)) <= 17  # merged, not one per commit
    assert len(out.metadata_files("scores")) <= 21  # metadata.json of the last versions only
    assert scores.schema().find_field(S.URI).doc == S.COLUMN_DOCS[S.URI]
    assert scores.properties["comment"] == T.TABLE_DOCS["scores"]
    assert {f.name for f in scores.schema().fields if not f.doc} == set()


# -- damage ----------------------------------------------------------------------------------------
def test_glue_catalog_commits_reads_and_maintains_the_tables(s3_bucket, s3_server):
    import boto3

    out = ScanOutput.open(f"{s3_bucket}/scans", catalog="glue", namespace="detector_glue")
    for u in range(5):
        out.commit_unit(_unit(out, "scan-1", u))
    assert len(_uris(out, "scores")) == 20 and _uris_duckdb(out, "flagged") <= _uris_duckdb(out, "scores")
    glue = boto3.client("glue", endpoint_url=s3_server)
    described = glue.get_table(DatabaseName="detector_glue", Name="scores")["Table"]
    assert described["Parameters"]["table_type"].upper() == "ICEBERG"
    assert described["Parameters"]["metadata_location"] == out.table("scores").metadata_location
    comments = {c["Name"]: c.get("Comment") for c in described["StorageDescriptor"]["Columns"]}
    assert comments[S.SCORE] == S.COLUMN_DOCS[S.SCORE]  # what Athena's column list shows
    _fold_history(out)
    assert M.expire(out, keep_days=7, unit_hours=0)["flagged"] == 4
    assert M.compact(out, before=dt.date(2100, 1, 1), min_files=2)["scores"] == 5
    M.expire(out, keep_days=7, unit_hours=0)
    removed = M.remove_orphans(out, older_than_s=0)
    assert removed["scores"] and M.check(out) == {}
    reopened = ScanOutput.open(f"{s3_bucket}/scans")  # the catalog and namespace from _catalog.json
    assert len(_uris(reopened, "scores")) == 20 and len(_uris(reopened, "flagged")) == 10
    assert reopened.table("scores").schema().find_field(S.SCORE).doc == S.COLUMN_DOCS[S.SCORE]


# -- the README's snippets for outside readers -----------------------------------------------------
def test_the_readmes_outside_reader_snippets_run_as_written(tmp_path, monkeypatch, capsys):
    import re

    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "iceberg_scan" in b]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    out = ScanOutput.open("scans")  # as jobs.scan --output scans makes it
    for u in range(3):
        out.commit_unit(_unit(out, "scan-1", u))
    out.commit_unit({**_unit(out, "scan-1", 3), "runs": []})  # a unit a killed scan left without its runs row
    capsys.readouterr()
    exec(compile(blocks[0], "README.md (DuckDB)", "exec"), {})
    assert capsys.readouterr().out.strip() == f"[(datetime.date({DAY.year}, {DAY.month}, {DAY.day}), 8)]"
    exec(compile(blocks[1], "README.md (pinned)", "exec"), {})
    # Pinned to the newest runs row: the three whole units that have one, not the fourth.
    assert capsys.readouterr().out.split("\n")[:2] == ["12 scored, 6 flagged as of the last whole unit", "[(6,)]"]
