"""The output lease (detector_core.tables.lease) and the Iceberg commit protocol (detector_core.tables.catalog), without Ray.

The lease is checked on a local disk (O_EXCL) and on the S3 server in tests (If-None-Match):
one holder at a time, even among racing threads; the holder is named to the loser; a dead
holder's lease expires; renewal keeps a live one; a lost lease is noticed before a commit.
The commit protocol is checked by cutting a unit's commit short by hand and recovering it:
each table gets the unit exactly once, however often recovery runs.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detector_core.storage import open_fs
from detector_core.tables import definitions as T
from detector_core.tables.catalog import CatalogError, ScanOutput, data_file_path, read_table
from detector_core.tables.lease import Lease, LeaseHeldError, LeaseLostError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_one_holder_named_to_the_others_and_released(root):
    fs, path = open_fs(root)
    a = Lease(fs, path, "scan-a", ttl_s=30)
    a.acquire()
    with pytest.raises(LeaseHeldError, match="scan-a"):
        Lease(fs, path, "scan-b", ttl_s=30).acquire()
    a.release()
    b = Lease(fs, path, "scan-b", ttl_s=30)
    b.acquire()
    assert b.current()[1]["scan_id"] == "scan-b"
    b.release()


def test_racing_acquirers_exactly_one_wins(root):
    fs, path = open_fs(root)
    leases = [Lease(fs, path, f"scan-{i}", ttl_s=30) for i in range(6)]
    won, lost = [], []
    barrier = threading.Barrier(len(leases))

    def go(lease):
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease.scan_id)
        except LeaseHeldError:
            lost.append(lease.scan_id)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5
    assert leases[0].current()[1]["scan_id"] == won[0]


def test_a_dead_holders_lease_expires_and_a_live_one_is_renewed(tmp_path):
    fs, path = open_fs(str(tmp_path / "out"))
    dead = Lease(fs, path, "scan-dead", ttl_s=1.0)
    dead.acquire()  # never renewed: its process "died"
    waiter = Lease(fs, path, "scan-next", ttl_s=1.0)
    started = time.time()
    waiter.acquire(wait=True, poll_s=0.2, timeout_s=10)
    assert 0.5 < time.time() - started < 5
    with pytest.raises(LeaseLostError):
        dead.check()  # the old holder notices before its next commit

    waiter.start_renewing(every_s=0.2)
    time.sleep(2.0)  # twice the ttl: renewal keeps it
    with pytest.raises(LeaseHeldError):
        Lease(fs, path, "scan-third", ttl_s=1.0).acquire()
    waiter.check()
    waiter.release()
    assert not Lease.is_live(waiter.current()[1])


def _intent(out: ScanOutput, scan_id: str, unit: int, rows: int) -> dict:
    day = dt.date(2026, 11, 23)
    now = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.timezone.utc)
    files = {}
    for name in T.TABLES:
        schema = T.TABLE_SCHEMAS[name]
        cols = {f.name: pa.nulls(rows, f.type) for f in schema}
        cols.update({"uri": pa.array([f"/x/{name}-{unit}-{i}.png" for i in range(rows)]), "scan_id": pa.array([scan_id] * rows),
                     "scan_date": pa.array([day] * rows, pa.date32()), "bucket": pa.array(["local"] * rows),
                     "scanned_at": pa.array([now] * rows, schema.field("scanned_at").type)})
        path = data_file_path(out.uri, name, day.isoformat(), "local", scan_id)
        fs_path = open_fs(path)[1]
        out.fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), fs_path)
        files[name] = [path]
    run = {"scan_id": scan_id, "unit": unit, "status": "unit", "scan_date": day.isoformat(), "detector_id": "d",
           "scored": rows, "flagged": rows, "errors": rows, "started_at": now.isoformat(), "committed_at": now.isoformat()}
    return {"scan_id": scan_id, "unit": unit, "files": files, "runs": [run]}


# Where the driver dies -> rows per table (scores, flagged, errors) just after: the commit order is
# intent, errors, scores, flagged, runs, then the intent is removed.
CUT = {"intent": [3, 3, 3], "errors": [3, 3, 3], "scores": [3, 3, 5], "flagged": [5, 3, 5], "runs": [5, 5, 5], "done": [5, 5, 5]}


@pytest.mark.parametrize("step", list(CUT))
def test_a_unit_cut_short_is_finished_once_by_recovery(tmp_path, step):
    out = ScanOutput.open(str(tmp_path / "out"))
    out.commit_unit(_intent(out, "scan-1", 0, 3))

    def die(at):
        if at == step:
            raise KeyboardInterrupt  # stands in for the driver's death at that point

    with pytest.raises(KeyboardInterrupt):
        out.commit_unit(_intent(out, "scan-1", 1, 2), before_each=die)
    assert [read_table(out.uri, n).num_rows for n in T.TABLES] == CUT[step]
    recovered = out.recover()
    assert len(recovered) == (0 if step == "intent" else 1) and out.recover() == []  # finished once, then nothing left
    want = 3 if step == "intent" else 5  # before its intent the unit's files are orphans: the next scan redoes them
    assert [read_table(out.uri, n).num_rows for n in T.TABLES] == [want] * 3
    runs = read_table(out.uri, "runs")
    assert sorted(runs["unit"].to_pylist()) == ([0] if step == "intent" else [0, 1])
    # Each runs row pins the three tables at snapshots that hold exactly its units.
    for r in runs.to_pylist():
        n = 3 if r["unit"] == 0 else 5
        assert [out.read(t, snapshot_id=r[f"{t}_snapshot_id"]).num_rows for t in T.TABLES] == [n, n, n]


def test_catalog_settings_refused_with_the_reason(tmp_path, s3_bucket):
    with pytest.raises(CatalogError, match="--catalog"):
        ScanOutput.open(f"{s3_bucket}/scans")
    with pytest.raises(CatalogError, match="password"):
        ScanOutput.open(str(tmp_path / "o"), catalog="postgresql://user:hunter2@db/iceberg")
    shared = f"sqlite:///{tmp_path}/shared.db"
    ScanOutput.open(str(tmp_path / "a"), catalog=shared)
    with pytest.raises(CatalogError, match="namespace"):
        ScanOutput.open(str(tmp_path / "b"), catalog=shared)  # same namespace, other output
    ScanOutput.open(str(tmp_path / "b"), catalog=shared, namespace="other")
    pointer = json.loads((tmp_path / "b" / "_catalog.json").read_text())
    assert {k: pointer[k] for k in ("catalog", "namespace")} == {"catalog": shared, "namespace": "other"}
    assert set(pointer["tables"]) >= {"scores", "flagged", "errors", "runs", "state"}  # each table's lineage


def test_scans_opening_a_fresh_output_at_once_all_get_the_same_tables(tmp_path):
    """Before any of them holds the lease, racing openers create the namespace and tables once."""
    errors, opened = [], []
    barrier = threading.Barrier(4)

    def go():
        barrier.wait()
        try:
            opened.append(ScanOutput.open(str(tmp_path / "fresh")).table("scores").metadata_location)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(opened)) == 1
