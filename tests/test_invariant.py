"""Nothing lost, nothing counted twice: every listed object once in ``scores`` ∪ ``errors`` for its night and detector,
flagged ⊆ scores, and the (uri, score) checksum unchanged, through damage chains, unfinishable intents, orphans beside a
scan, re-scans of a night, and the user's own files. No Ray: units go through the real commit path (``test_maintain._unit``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_maintain import DAY, _unit

from detector_core import schema as S
from detector_core.tables import maintenance as M
from detector_core.tables.catalog import PROP_MARK, CatalogError, NotAScanOutputError, ScanOutput
from detector_core.tables.views import connect
from jobs.common.errors import JobError


def _invariant(out: ScanOutput, listed: set[str]) -> str:
    """Assert the invariant over the current rows (as every audit answer reads them); returns the (uri, score) checksum."""
    con = connect(out)
    counts = con.sql("""SELECT uri, scan_date, detector_id, count(*) AS n FROM (
                            SELECT uri, scan_date, detector_id FROM scores UNION ALL SELECT uri, scan_date, detector_id FROM errors)
                        GROUP BY ALL""").fetchall()
    assert {r[0] for r in counts} == listed, sorted({r[0] for r in counts} ^ listed)[:5]
    assert all(r[3] == 1 for r in counts), [r for r in counts if r[3] != 1][:5]
    flagged = {r[0] for r in con.sql("SELECT uri FROM flagged").fetchall()}
    assert flagged == {r[0] for r in con.sql("SELECT uri FROM scores WHERE flagged").fetchall()}
    rows = sorted(con.sql("SELECT uri, round(score, 6) FROM scores").fetchall())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _listed(scan_id: str, units: int) -> set[str]:
    return {f"s3://b/{scan_id}/u{u}-{i}.png" for u in range(units) for i in range(4)} | {f"s3://b/{scan_id}/bad{u}.png" for u in range(units)}


def _fresh(tmp_path, units: int = 3) -> ScanOutput:
    out = ScanOutput.open(str(tmp_path / "out"))
    for u in range(units):
        out.commit_unit(_unit(out, "scan-1", u))
    return out


class Killed(BaseException):
    pass


def _killed_at(step: str):
    def before_each(at):
        if at == step:
            raise Killed(at)
    return before_each


# -- a repair, then a lost catalog, then a repair and a scan -----------------------------------------
def test_chain_repair_then_lost_catalog_registers_the_new_state_not_the_dropped_one(tmp_path):
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path)
    old_state = out.table("state")
    for i in range(4):  # the old state folded every unit (its mark) and went through versions: higher numbers than a new one
        with old_state.transaction() as tx:
            tx.set_properties({PROP_MARK: json.dumps({"scores": 99 + i, "errors": 99 + i})})
        old_state = out.table("state")
    old_uuid = str(old_state.metadata.table_uuid)
    lost = sorted(t.file.file_path for t in out.table("scores").scan().plan_files())[0]
    os.remove(lost)
    assert maintain(["repair", "--output", out.uri])["state_reset"]
    new_uuid = str(out.table("state").metadata.table_uuid)
    assert new_uuid != old_uuid and json.loads((tmp_path / "out" / "_catalog.json").read_text())["tables"]["state"] == new_uuid
    (tmp_path / "out" / "catalog.db").unlink()  # then the catalog is lost
    maintain(["repair", "--output", out.uri])
    again = ScanOutput.open(out.uri)  # the next scan opens it
    assert str(again.table("state").metadata.table_uuid) == new_uuid
    assert again.table("state").properties.get(PROP_MARK) is None  # the next refresh folds all history: lost objects scored again
    assert M.check(again) == {}


def test_a_stale_state_brought_back_into_the_catalog_is_found_and_dropped(tmp_path, capsys):
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path, units=1)
    old_meta = out.table("state").metadata_location
    out.reset_state(reason="is dropped for this test")
    out.catalog.drop_table(out.identifier("state"))
    out.catalog.register_table(out.identifier("state"), old_meta)  # an old tool's repair registered the dropped one
    with pytest.raises(JobError, match="lineage|uuid") as err:
        maintain(["check", "--output", out.uri])
    assert err.value.code == 1
    ScanOutput.open(out.uri)  # a scan drops it by itself (the state is rebuilt from history)
    assert "dropped one" in capsys.readouterr().out
    assert M.check(ScanOutput.open(out.uri, create=False)) == {}


# -- intents that cannot be finished ------------------------------------------------------------------
def test_an_unreadable_intent_after_scores_committed_gets_its_flagged_rows(tmp_path):
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path, units=1)
    with pytest.raises(Killed):
        out.commit_unit(_unit(out, "scan-1", 1), before_each=_killed_at("flagged"))
    intent = tmp_path / "out" / "_intents" / "scan-1-000001.json"
    intent.write_text("{garbage")
    with pytest.raises(JobError) as err:  # check finds both: the intent, and scores rows flagged without flagged rows
        maintain(["check", "--output", out.uri])
    assert "scan-1-000001.json" in str(err.value) and "flagged" in str(err.value) and "\n" not in str(err.value)
    assert out.recover() == []  # what the next scan does first
    assert not intent.exists() and (tmp_path / "out" / "_intents" / "set-aside" / "scan-1-000001.json").exists()
    _invariant(out, _listed("scan-1", 2))
    assert M.check(out) == {}


def test_an_intent_cut_before_scores_leaves_those_objects_to_be_scored_again(tmp_path):
    out = _fresh(tmp_path, units=1)
    with pytest.raises(Killed):
        out.commit_unit(_unit(out, "scan-1", 1), before_each=_killed_at("scores"))
    (tmp_path / "out" / "_intents" / "scan-1-000001.json").write_bytes(b"\x00" * 10)
    out.recover()
    # Unit 1's error row committed; its scored objects are in no table, so the state (history only) does not hold them.
    _invariant(out, _listed("scan-1", 1) | {"s3://b/scan-1/bad1.png"})
    assert M.check(out) == {}


@pytest.mark.parametrize("bad", ["wrong-fields", "missing-file", "a-folder", "another-output", "restored-from-backup"])
def test_an_unfinishable_intent_is_named_by_check_mended_by_repair_and_never_blocks_a_scan(tmp_path, bad):
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path, units=2)
    before = _invariant(out, _listed("scan-1", 2))
    folder = tmp_path / "out" / "_intents"
    folder.mkdir(exist_ok=True)
    name = "scan-9-000003.json"
    if bad == "wrong-fields":
        (folder / name).write_text(json.dumps({"scan_id": "scan-9", "unit": "three", "files": {"scores": 1}, "runs": {}}))
    elif bad == "missing-file":
        intent = _unit(out, "scan-9", 3)
        os.remove(intent["files"]["scores"][0])
        (folder / name).write_text(json.dumps(intent))
    elif bad == "a-folder":
        (folder / name).mkdir()
    elif bad == "another-output":
        (folder / name).write_text(json.dumps({**_unit(out, "scan-9", 3), "files": {"scores": [str(tmp_path / "elsewhere.parquet")]}}))
    else:  # unit 2 committed whole, its snapshots expired since, and its intent restored from a backup
        import datetime as dt

        intent = _unit(out, "scan-1", 2)
        out.commit_unit(intent)
        out.commit_unit(_unit(out, "scan-1", 3))  # unit 2's snapshots are neither current nor pinned by the newest runs row
        with out.table("state").transaction() as tx:  # the state folded all history: expiry may drop the units' snapshots
            tx.set_properties({PROP_MARK: json.dumps({"scores": 10**6, "errors": 10**6})})
        M.expire(out, keep_days=0, unit_hours=0, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
        assert out.find_commit(out.table("scores"), "scan-1", 2) is None
        name = "scan-1-000002.json"
        (folder / name).write_text(json.dumps(intent))
        before = _invariant(out, _listed("scan-1", 4))
    with pytest.raises(JobError) as err:
        maintain(["check", "--output", out.uri])
    assert name in str(err.value) and "repair" in str(err.value) and "\n" not in str(err.value)
    maintain(["--output", out.uri, "--steps", "expire"])  # maintenance does not fail on it (and sets it aside: it holds the lease)
    out.recover()  # nor does a scan
    assert maintain(["repair", "--output", out.uri]) is not None
    assert M.check(out) == {} and not (folder / name).exists()
    assert _invariant(out, _listed("scan-1", 4 if bad == "restored-from-backup" else 2)) == before


def test_recovery_commits_only_files_no_snapshot_holds(tmp_path):
    out = _fresh(tmp_path, units=1)
    held = sorted(t.file.file_path for t in out.table("scores").scan().plan_files())[0]
    intent = _unit(out, "scan-1", 1)
    intent["files"]["scores"].append(held)  # a unit's intent that also names a file unit 0 committed
    with pytest.raises(Killed):
        out.commit_unit(intent, before_each=_killed_at("errors"))
    out.recover()
    _invariant(out, _listed("scan-1", 2))


# -- orphans beside a running scan ---------------------------------------------------------------------
def test_orphan_removal_has_a_floor_and_never_runs_under_a_scans_lease(tmp_path):
    from detector_core.tables.lease import Lease
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path, units=1)
    with pytest.raises(JobError) as err:
        maintain(["--output", out.uri, "--orphan-age-hours", "0.0001"])
    assert "orphan-age-hours" in str(err.value) and "\n" not in str(err.value)
    # A running scan's worker wrote this file; no intent names it yet. Old enough for the floor.
    written = _unit(out, "scan-2", 0)["files"]["scores"][0]
    two_days = time.time() - 2 * 86_400
    os.utime(written, (two_days, two_days))
    scan = Lease(out.fs, out.root, "scan-2", ttl_s=300)
    scan.acquire()
    result = maintain(["--output", out.uri, "--steps", "orphans"])
    assert result["orphan_files"] is None and os.path.exists(written)
    scan.release()
    assert written in maintain(["--output", out.uri, "--steps", "orphans", "--orphan-age-hours", "24"])["orphan_files"]["scores"]


# -- the user's own files ------------------------------------------------------------------------------
def test_a_folder_of_someone_elses_files_is_no_output_and_maintenance_touches_only_table_folders(tmp_path):
    from jobs.maintain import main as maintain

    theirs = tmp_path / "theirs"
    for sub in ("scores", "state"):
        (theirs / sub).mkdir(parents=True)
        (theirs / sub / "notes.txt").write_text("mine")
    with pytest.raises(NotAScanOutputError, match="not a scan output") as err:
        ScanOutput.open(str(theirs))
    assert "\n" not in str(err.value) and sorted(p.name for p in theirs.iterdir()) == ["scores", "state"]
    out = _fresh(tmp_path, units=1)
    mine = tmp_path / "out" / "scores" / "README.txt"  # a file beside the table's folders
    mine.write_text("notes")
    two_days = time.time() - 2 * 86_400
    os.utime(mine, (two_days, two_days))
    assert maintain(["--output", out.uri, "--steps", "orphans", "--orphan-age-hours", "24"])["orphan_files"] is not None
    assert mine.exists()


def test_an_output_that_is_a_file_or_read_only_is_refused_in_one_line(tmp_path):
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    with pytest.raises(CatalogError, match="is a file") as err:
        ScanOutput.open(str(afile))
    assert "\n" not in str(err.value)
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CatalogError, match="cannot be written") as err:
            ScanOutput.open(str(ro / "out"))
        assert "\n" not in str(err.value)
    finally:
        ro.chmod(0o755)


# -- a night scanned again -------------------------------------------------------------------------------
def _rescan(out: ScanOutput, scan_id: str, units: int, score: float) -> None:
    """A ``--full`` scan of the same night: the same objects again, each with another score (and flag)."""
    import datetime as dt

    for u in range(units):
        intent = _unit(out, scan_id, u, committed_at=dt.datetime.combine(DAY, dt.time(5), dt.timezone.utc))
        for name in ("scores", "flagged"):
            path = intent["files"][name][0]
            rows = pq.read_table(path)
            uris = [x.replace(f"/{scan_id}/", "/scan-1/") for x in rows[S.URI].to_pylist()]
            rows = rows.set_column(rows.schema.get_field_index(S.URI), S.URI, pa.array(uris))
            rows = rows.set_column(rows.schema.get_field_index(S.SCORE), S.SCORE, pa.array([score] * rows.num_rows))
            pq.write_table(rows, path)
        errors = pq.read_table(intent["files"]["errors"][0])
        errors = errors.set_column(errors.schema.get_field_index(S.URI), S.URI, pa.array([f"s3://b/scan-1/bad{u}.png"]))
        pq.write_table(errors, intent["files"]["errors"][0])
        out.commit_unit(intent)


def test_a_night_scanned_again_counts_each_object_once_in_every_answer(tmp_path):
    from jobs.audit import main as audit

    out = _fresh(tmp_path, units=2)
    _rescan(out, "scan-2", 2, 0.77)
    _invariant(out, _listed("scan-1", 2))
    per_day = audit(["query", "per-day", "--scan", out.uri]).to_pylist()
    assert [(r["scored"], r["flagged"], r["errors"]) for r in per_day] == [(8, 4, 2)]
    top = audit(["query", "top", "--scan", out.uri, "--limit", "0"]).to_pylist()
    assert len(top) == 4 and {r["scan_id"] for r in top} == {"scan-2"} and {round(r["score"], 2) for r in top} == {0.77}
    history = audit(["query", "sql", "--scan", out.uri, "--sql", "SELECT count(*) AS n FROM scores_history"]).to_pylist()
    assert history == [{"n": 16}]  # the raw history stays what it is


def test_per_day_names_the_repair_that_changed_a_night_and_runs_shows_its_status(tmp_path, capsys):
    from jobs.audit import main as audit
    from jobs.maintain import main as maintain
    from jobs.report import main as report

    out = _fresh(tmp_path, units=2)
    out.commit_unit(_unit(out, "scan-1", 2, status="completed"))
    os.remove(sorted(t.file.file_path for t in out.table("scores").scan().plan_files())[0])
    with pytest.raises(JobError, match="jobs.maintain check") as err:  # the review page names the mend, as the audit CLI does
        report(["--scan", out.uri, "--out", str(tmp_path / "r.html")])
    assert "\n" not in str(err.value)
    capsys.readouterr()
    maintain(["repair", "--output", out.uri])
    assert capsys.readouterr().out.startswith("state table detector.state is dropped, because files it was derived from")
    per_day = audit(["query", "per-day", "--scan", out.uri]).to_pylist()
    assert per_day[0]["repaired_by"].startswith("repair-")
    runs = audit(["query", "sql", "--scan", out.uri, "--sql", "SELECT status, committed_at, nights FROM runs WHERE status = 'repair'"])
    assert runs.num_rows == 1 and runs.to_pylist()[0]["nights"] == [DAY]


# -- the query sandbox ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sql", [
    "EXPLAIN ANALYZE COPY (SELECT * REPLACE (0.0 AS score) FROM scores) TO '{data}'",
    "EXPLAIN (FORMAT JSON) COPY (SELECT 1) TO '{out}/x.csv'",
    "SELECT * FROM read_text('.tmp/x')",
    "SELECT * FROM read_blob('{out}/catalog.db')",
    "SELECT * FROM read_text('{out}/_catalog.json')",
])
def test_the_sandbox_cannot_write_or_read_beyond_the_tables(tmp_path, sql, monkeypatch):
    from jobs.audit import main as audit

    out = _fresh(tmp_path, units=1)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "x").write_text("secret")
    monkeypatch.chdir(tmp_path)
    before = _invariant(out, _listed("scan-1", 1))
    data = sorted(t.file.file_path for t in out.table("scores").scan().plan_files())[0]
    with pytest.raises(JobError) as err:
        audit(["query", "sql", "--scan", out.uri, "--sql", sql.format(data=data, out=out.uri)])
    assert "\n" not in str(err.value) and err.value.code == 2
    assert _invariant(out, _listed("scan-1", 1)) == before and not (tmp_path / "out" / "x.csv").exists()


def test_a_query_stops_at_its_time_and_memory_limits_in_one_line(tmp_path):
    from jobs.audit import main as audit

    out = _fresh(tmp_path, units=1)
    endless = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    t0 = time.time()
    with pytest.raises(JobError, match="time limit") as err:
        audit(["query", "sql", "--scan", out.uri, "--sql", endless, "--timeout", "1"])
    assert time.time() - t0 < 30 and "\n" not in str(err.value)
    big = "SELECT list(i) FROM range(30000000) t(i)"  # one list value: nothing to spill
    with pytest.raises(JobError, match="memory") as err:
        audit(["query", "sql", "--scan", out.uri, "--sql", big, "--memory-limit", "64MB"])
    assert "\n" not in str(err.value)
