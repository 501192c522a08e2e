"""Damage to a scan output, found and named in one line and mended: lost catalogs, missing data files, unreadable intents,
folders that are no output, a full disk under a writer, copies of an output, and SQL that would write.

``jobs.maintain check`` finds it, ``repair`` mends it, and every other job refuses a damaged output naming the file and the
mending command (``tests/test_maintain.py``: expiry, compaction and orphans on whole outputs).
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from test_maintain import _answers, _unit, _uris

from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables import maintenance as M
from detector_core.tables.catalog import LostCatalogError, ScanOutput
from jobs.common.errors import JobError


def _fresh(tmp_path, units: int = 3) -> ScanOutput:
    out = ScanOutput.open(str(tmp_path / "out"))
    for u in range(units):
        out.commit_unit(_unit(out, "scan-1", u))
    return out


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_lost_catalog_is_refused_in_one_line_and_repair_registers_the_tables(tmp_path, damage):
    from jobs.audit import main as audit
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path)
    before = _answers(out.uri)
    db = tmp_path / "out" / "catalog.db"
    if damage == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    with pytest.raises(LostCatalogError, match="jobs.maintain repair"):
        ScanOutput.open(out.uri)  # a scan: no new tables beside the old metadata
    with pytest.raises(JobError, match="jobs.maintain repair") as err:
        audit(["query", "per-day", "--scan", out.uri])
    assert "\n" not in str(err.value) and err.value.code == 2
    assert db.exists() == (damage == "emptied") and (not db.exists() or db.stat().st_size == 0)  # nothing created
    result = maintain(["repair", "--output", out.uri])
    assert set(result["registered"]) >= set(T.ALL_TABLES)
    assert _answers(out.uri) == before


def test_a_missing_data_file_is_found_and_repaired_and_its_objects_are_no_longer_settled(tmp_path, monkeypatch):
    from detector_core.tables.state_table import history_files_since
    from jobs.audit import main as audit
    from jobs.maintain import main as maintain

    out = _fresh(tmp_path)
    lost = sorted(t.file.file_path for t in out.table("scores").scan().plan_files())[1]
    lost_uris = set(pq.read_table(lost, columns=[S.URI])[S.URI].to_pylist())
    os.remove(lost)
    with pytest.raises(JobError) as err:
        maintain(["check", "--output", out.uri])
    assert err.value.code == 1 and "scores" in str(err.value)
    with pytest.raises(JobError, match="jobs.maintain check"):
        audit(["query", "per-day", "--scan", out.uri])

    def killed(*a, **kw):
        raise KeyboardInterrupt  # the repair's process dies after removing the file, before mending flagged

    monkeypatch.setattr(M.damage, "_rebuild_flagged", killed)
    with pytest.raises(KeyboardInterrupt):
        maintain(["repair", "--output", out.uri])
    monkeypatch.undo()
    with pytest.raises(JobError) as err:  # the missing file is out of the tables now, but the repair is not done
        maintain(["check", "--output", out.uri])
    assert "a repair was cut short" in str(err.value)
    done = maintain(["repair", "--output", out.uri])  # finishes it
    assert done["removed"] == {"scores": [lost]} and done["state_reset"]
    assert M.check(out) == {}
    scores, flagged = _uris(out, "scores"), _uris(out, "flagged")
    assert scores == {f"s3://b/scan-1/u{u}-{i}.png" for u in range(3) for i in range(4)} - lost_uris
    assert flagged <= scores and len(flagged) == 4  # the lost unit's flagged rows went with its scores rows
    # The state is rebuilt from history without the lost file: the next scan scores those objects again.
    files, _ = history_files_since(out, "scores", 0)
    assert lost not in files and len(files) == 2
    assert out.table("state").current_snapshot() is None
    per_day = audit(["query", "per-day", "--scan", out.uri]).to_pylist()
    assert per_day[0]["scored"] == 8


def test_an_unreadable_intent_is_set_aside_naming_it_and_intents_are_written_whole(tmp_path, capsys):
    out = _fresh(tmp_path, units=1)
    folder = tmp_path / "out" / "_intents"
    folder.mkdir(exist_ok=True)
    (folder / "scan-9-000001.json").write_bytes(b"")
    (folder / "scan-9-000002.json").write_text('{"scan_id": "scan-9", "unit": 2, "fi')
    assert out.recover() == []
    said = capsys.readouterr().out
    assert "scan-9-000001.json" in said and "scan-9-000002.json" in said
    assert sorted(p.name for p in (folder / "set-aside").iterdir()) == ["scan-9-000001.json", "scan-9-000002.json"]
    assert not [p for p in folder.iterdir() if p.is_file()]
    out.commit_unit(_unit(out, "scan-1", 1))  # the next unit commits as usual
    assert len(_uris(out, "scores")) == 8 and not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("job", ["audit", "report", "verdicts", "maintain"])
def test_a_folder_that_is_no_scan_output_is_refused_in_one_line_and_left_untouched(tmp_path, job):
    from jobs.audit import main as audit
    from jobs.maintain import main as maintain
    from jobs.report import main as report

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    verdicts = tmp_path / "v.csv"
    verdicts.write_text("uri,detector_id,scan_id,verdict,reviewed_at\ns3://b/a.png,d,s,generated,2026-11-23T02:00:00Z\n")
    call = {"audit": lambda: audit(["query", "per-day", "--scan", str(folder)]),
            "report": lambda: report(["--scan", str(folder), "--out", str(tmp_path / "r.html")]),
            "verdicts": lambda: audit(["verdicts", "import", str(verdicts), "--scan", str(folder), "--reviewer", "a"]),
            "maintain": lambda: maintain(["--output", str(folder)])}[job]
    with pytest.raises(JobError, match="not a scan output") as err:
        call()
    assert "\n" not in str(err.value) and err.value.code == 2
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]


def test_a_failed_writer_releases_its_lease_even_on_a_full_disk(tmp_path, monkeypatch):
    import errno

    import detector_core.tables.lease as lease_module
    from detector_core.storage import open_fs
    from detector_core.tables.lease import Lease

    fs, root = open_fs(str(tmp_path / "out"))
    lease = Lease(fs, root, "scan-1", ttl_s=300)
    lease.acquire()
    real_open = open

    def full_disk(path, *a, **kw):
        if str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(lease_module, "open", full_disk, raising=False)
    lease.release()
    monkeypatch.undo()
    assert not list((tmp_path / "out" / "_lease").glob("*.tmp"))
    other = Lease(fs, root, "scan-2", ttl_s=300)
    other.acquire()  # at once, not after the 300 s ttl
    other.release()


# -- read-only SQL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sql", ["COPY (SELECT 'x') TO '{tmp}/f.csv'", "COPY (SELECT 'x') TO '{out}/catalog.db'",
                                 "ATTACH '{tmp}/other.db' AS o", "SELECT * FROM read_text('/etc/hostname')",
                                 "SELECT * FROM read_csv('{tmp}/outside.csv')", "INSTALL httpfs", "LOAD httpfs",
                                 "SET enable_external_access = true", "SELECT 1; COPY scores TO '{tmp}/g.parquet'"])
def test_query_sql_only_reads_the_output(tmp_path, sql):
    from jobs.audit import main as audit

    out = _fresh(tmp_path, units=1)
    (tmp_path / "outside.csv").write_text("a\n1\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(JobError) as err:
        audit(["query", "sql", "--scan", out.uri, "--sql", sql.format(tmp=tmp_path, out=out.uri)])
    assert "\n" not in str(err.value) and err.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(_uris(out, "scores")) == 4  # the catalog is whole


# -- AWS: a Glue catalog (moto) over S3 --------------------------------------------------------------
def test_repair_refuses_an_output_copied_elsewhere_in_one_line(tmp_path):
    import shutil

    from jobs.maintain import main as maintain

    out = _fresh(tmp_path, units=1)
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    (tmp_path / "copy" / "catalog.db").unlink()
    with pytest.raises(JobError, match="copied or moved") as err:
        maintain(["repair", "--output", str(tmp_path / "copy")])
    assert "\n" not in str(err.value) and err.value.code == 2
    assert len(_uris(out, "scores")) == 4  # the original is untouched
