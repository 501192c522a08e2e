"""Planning a scan on the cluster: fan-out listing, S3 Inventory input, the state table, and manifest hygiene."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scan import _exactly_once, _images, _tables, _write

from detector_core import schema as S
from detector_core.demo import encode, make_image
from detector_core.sources.listing import flat_listing, list_unit, split_prefix
from detector_core.tables import state as ST
from jobs import scan
from jobs.common.errors import JobError


@pytest.fixture(params=["driver", "cluster"])
def where(request):
    """Where the plan and the state's refresh run: every end-to-end test here runs on both paths (same rows either way)."""
    return request.param


def _scan(where: str, args: list[str]) -> dict:
    summary = scan.main([*args, "--plan", where])
    assert summary["plan"]["planned_in"] == where
    return summary


# -- the library, without Ray ----------------------------------------------------------------
def test_uri_bucket_is_icebergs_bucket_transform():
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import StringType

    uris = ["s3://b/a.png", "/local/é 空.png", "gs://x/y/z", "", "s3://b/" + "k" * 500]
    for n in (1, 7, 256):
        want = [BucketTransform(n).transform(StringType())(u) for u in uris]
        assert ST.uri_bucket_column(pa.array(uris), n).to_pylist() == want


def _reference_plan(listed, state, detectors):
    """What the plan must be, computed row by row from the definition (latest state row per detector and uri)."""
    latest = {}
    for r in sorted(state, key=lambda r: r["scanned_at"]):
        latest[(r["detector_id"], r["uri"])] = r
    seen, rows = set(), []
    for r in listed:
        if r["uri"] in seen:
            continue
        seen.add(r["uri"])
        todo = []
        for d in detectors:
            s = latest.get((d, r["uri"]))
            ok = s is not None and (r["etag"] is None or r["etag"] == s["etag"]) and (r["size"] is None or r["size"] == s["size"])
            todo.append(not ok)
        rows.append((r["uri"], tuple(todo)))
    return {u: t for u, t in rows if any(t)}


def test_anti_join_matches_a_row_by_row_reference():
    import datetime as dt

    rng = np.random.default_rng(0)
    detectors = ["d0", "d1"]
    listed = [{"uri": f"u{int(i)}", "etag": rng.choice(["a", "b", None]), "size": int(rng.choice([1, 2])) if rng.random() < .8 else None,
               "error_type": None, "error_message": None} for i in rng.integers(0, 300, 400)]
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    state = [{"detector_id": str(rng.choice(detectors)), "uri": f"u{int(rng.integers(0, 300))}", "etag": str(rng.choice(["a", "b"])),
              "size": int(rng.choice([1, 2])), "outcome": "scored", "scan_id": "s", "scanned_at": t0 + dt.timedelta(seconds=i),
              "uri_bucket": 0} for i in range(500)]
    work, counts = ST.anti_join(pa.Table.from_pylist(listed, schema=S.LIST_SCHEMA), pa.Table.from_pylist(state, schema=ST.STATE_SCHEMA),
                                detectors)
    want = _reference_plan(listed, state, detectors)
    got = {u: (a, b) for u, a, b in zip(work["uri"].to_pylist(), work[ST.todo_column(0)].to_pylist(), work[ST.todo_column(1)].to_pylist())}
    assert got == want
    assert counts["listed"] == len({r["uri"] for r in listed}) and counts["duplicates"] == len(listed) - counts["listed"]
    assert counts["skipped"] == {d: counts["listed"] - sum(t[i] for t in want.values()) for i, d in enumerate(detectors)}


def _tree(root, n_dirs=12, per_dir=40):
    files = {"top.png": b"x", "a/b/c/deep.png": b"y"}
    for d in range(n_dirs):
        for f in range(per_dir):
            files[f"d{d:02d}/{'s' + str(f % 3) + '/' if f % 2 else ''}f{f:03d}.jpg"] = b"z" * (f + 1)
    _write(root, files) if not str(root).startswith("s3://") else None
    return files


@pytest.mark.parametrize("target", [1, 5, 64])
def test_fan_out_listing_equals_flat_listing_local(tmp_path, target):
    _tree(tmp_path / "t", n_dirs=25, per_dir=100)  # 2,502 files
    units = split_prefix(str(tmp_path / "t"), target=target)
    fanned = pa.concat_tables([t for u in units for t in list_unit(u, rows=97)])
    flat = flat_listing(str(tmp_path / "t"))
    assert sorted(zip(fanned["uri"].to_pylist(), fanned["size"].to_pylist())) == sorted(zip(flat["uri"].to_pylist(), flat["size"].to_pylist()))
    assert fanned.num_rows == len(set(fanned["uri"].to_pylist())) == 2502
    if target > 1:
        assert len(units) > 1


def test_fan_out_listing_equals_flat_listing_on_s3_through_ray(ray_local, s3_bucket):
    import s3fs

    from jobs.scanning.planning import listing

    fs = s3fs.S3FileSystem()
    files = _tree("s3://", n_dirs=10, per_dir=120)  # 1,202 keys
    for name, data in files.items():
        fs.pipe(f"{s3_bucket[5:]}/p/{name}", data)
    fs.pipe(f"{s3_bucket[5:]}/p/d00/", b"")  # a folder marker is no object
    ds, info = listing(f"{s3_bucket}/p", None, fan_out=8)
    got = ds.to_arrow_refs()
    import ray

    fanned = pa.concat_tables(ray.get(got))
    flat = flat_listing(f"{s3_bucket}/p")
    assert info["listing_units"] > 1
    assert sorted(fanned["uri"].to_pylist()) == sorted(u for u in flat["uri"].to_pylist() if not u.endswith("/")) \
        and fanned.num_rows == len(files)
    assert all(fanned["etag"].to_pylist())


# -- end to end ------------------------------------------------------------------------------
def _inventory(fs, bucket, keys_csv, keys_parquet):
    """An S3 Inventory report as S3 writes it: manifest.json + a CSV.gz and a Parquet data file, in a destination bucket."""
    base = f"{bucket}/inv/{bucket}/daily"
    buf = io.StringIO()
    for k in keys_csv:
        buf.write(f'"{bucket}","{urllib.parse.quote_plus(k)}","{len(k)}","2026-11-26T00:00:00.000Z","etag-{len(k)}"\n')
    fs.pipe(f"{base}/data/part-1.csv.gz", gzip.compress(buf.getvalue().encode()))
    table = pa.table({"bucket": [bucket] * len(keys_parquet), "key": keys_parquet, "size": pa.array([1] * len(keys_parquet), pa.int64()),
                      "last_modified_date": pa.array([0] * len(keys_parquet), pa.timestamp("ms")),
                      "e_tag": [f"p-{i}" for i in range(len(keys_parquet))]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.pipe(f"{base}/data/part-2.parquet", sink.getvalue())
    for fmt, name, schema in (("CSV", "csv", "Bucket, Key, Size, LastModifiedDate, ETag"),
                              ("Parquet", "parquet", "message s3.inventory { required binary bucket; required binary key; }")):
        manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "version": "2016-11-30",
                    "fileFormat": fmt, "fileSchema": schema,
                    "files": [{"key": f"inv/{bucket}/daily/data/part-{1 if name == 'csv' else 2}.{'csv.gz' if name == 'csv' else 'parquet'}",
                               "size": 1, "MD5checksum": "x"}]}
        fs.pipe(f"{base}/2026-11-2{6 if name == 'csv' else 5}T01-00Z/manifest.json", json.dumps(manifest).encode())
    return f"s3://{base}"


def test_s3_inventory_input_every_object_exactly_once(ray_local, bundle_dir, s3_bucket, tmp_path, where):
    import s3fs

    fs = s3fs.S3FileSystem()
    b = s3_bucket[5:]
    rng = np.random.default_rng(3)
    csv_keys = ["img/with space.png", "img/ünïcødé 空.png", "img/plus+sign.png", "img/a%25b.png"]
    pq_keys = ["img/p1.png", "img/p 2 é.png"]
    for k in csv_keys + pq_keys:
        fs.pipe(f"{b}/{k}", encode(make_image(rng)))
    base = _inventory(fs, b, csv_keys, pq_keys)
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    common = ["--detector", str(bundle_dir), "--output", f"{s3_bucket}/scans", "--catalog", catalog]
    # The glob of the configuration's dated reports: the newest report only (the CSV one).
    first = _scan(where, [*common, "--input", f"{base}/*/manifest.json"])
    assert first["plan"]["input_kind"] == "inventory" and first["plan"]["inventory_manifests"] == [f"{base}/2026-11-26T01-00Z/manifest.json"]
    assert first["scored"] == 4 and first["errors"] == 0
    # Both reports, named one by one as a folder and a file: every object once, the CSV's already settled.
    second = _scan(where, [*common, "--input", f"{base}/2026-11-25T01-00Z/"])
    assert second["scored"] == 2 and second["listed"] == 2
    _exactly_once(f"{s3_bucket}/scans", [f"s3://{b}/{k}" for k in csv_keys + pq_keys], catalog)


def test_state_deleted_is_rebuilt_from_history_and_compacts(ray_local, bundle_dir, tmp_path, where):
    from detector_core.tables.catalog import STATE, ScanOutput
    from detector_core.tables.state_table import open_state
    from jobs.scanning.refresh import refresh_state

    bucket = tmp_path / "bucket"
    uris = _images(bucket, 10, 1)
    out = tmp_path / "out"
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "3"]
    assert _scan(where, args)["scored"] == 10
    o = ScanOutput.open(str(out))
    before = sorted(o.read(STATE).select(["uri", "etag", "size", "outcome"]).to_pylist(), key=lambda r: r["uri"])
    assert [r["uri"] for r in before] == uris and {r["outcome"] for r in before} == {"scored"}
    # Deleted (dropped from the catalog and its files removed): rebuilt from scores/errors, same rows, same plan.
    o.catalog.drop_table(o.identifier(STATE))
    shutil.rmtree(out / STATE)
    again = _scan(where, args)
    assert again["scored"] == 0 and again["skipped"] == 10 and again["state_refresh"]["before"]["history_files"] > 0
    o = ScanOutput.open(str(out))
    assert sorted(o.read(STATE).select(["uri", "etag", "size", "outcome"]).to_pylist(), key=lambda r: r["uri"]) == before
    # Files deleted under a catalog entry: the state is unreadable, recreated, and rebuilt by the refresh.
    shutil.rmtree(out / STATE)
    o = ScanOutput.open(str(out))
    assert refresh_state(o)["history_files"] > 0
    assert sorted(o.read(STATE).select(["uri", "etag", "size", "outcome"]).to_pylist(), key=lambda r: r["uri"]) == before
    # Refreshes stay bounded: a partition with compact_at files is merged into one (latest row per object).
    rng = np.random.default_rng(5)
    replaced = 0
    for i in range(2):
        (bucket / "img_00.png").write_bytes(encode(make_image(rng, size=(60 + i, 60))))
        s = _scan(where, [*args, "--state-compact-at", "2"])
        assert s["scored"] == 1
        replaced += s["state_refresh"]["after"]["state_files_replaced"]
    _, files = open_state(o)
    assert replaced >= 2 and max(len(v) for v in files.values()) == 1
    state = o.read(STATE)
    rows = [r for r in state.to_pylist() if r["uri"] == uris[0]]
    latest = max(rows, key=lambda r: r["scanned_at"])
    assert latest["size"] == (bucket / "img_00.png").stat().st_size
    assert refresh_state(o)["history_files"] == 0  # caught up


# -- manifest hygiene ------------------------------------------------------------------------
def test_manifest_hygiene_duplicates_null_uris_file_uris_mixed_schemes_and_bad_sizes(ray_local, bundle_dir, s3_bucket, tmp_path, where):
    import s3fs

    fs = s3fs.S3FileSystem()
    local = _images(tmp_path / "bucket", 3, 11)
    rng = np.random.default_rng(12)
    fs.pipe(f"{s3_bucket[5:]}/r/remote.png", encode(make_image(rng)))
    remote = f"{s3_bucket}/r/remote.png"
    real_size = os.path.getsize(local[2])
    rows = [
        {"uri": local[0], "size": None}, {"uri": local[0], "size": None},  # a duplicate: scored once
        {"uri": "file://" + local[1], "size": None},  # file:// is a local path, not one under the manifest's folder
        {"uri": local[2], "size": str(real_size + 5)},  # a wrong size: recorded, and settled all the same
        {"uri": remote, "size": None},  # another scheme in the same manifest: read through its own filesystem
        {"uri": None, "size": None}, {"uri": "  ", "size": None},  # no uri: an error row each, stage list
        {"uri": str(tmp_path / "bucket" / "x.png"), "size": "abc"},  # a size that is no number: an error row naming it
    ]
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    pa.csv.write_csv(pa.Table.from_pylist(rows, schema=pa.schema([("uri", pa.string()), ("size", pa.string())])), manifest)
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    args = ["--detector", str(bundle_dir), "--input", str(manifest), "--output", str(tmp_path / "out"), "--catalog", catalog]
    first = _scan(where, args)
    t = _tables(tmp_path / "out")
    scored = sorted(t["scores"]["uri"].to_pylist())
    assert scored == sorted([local[0], local[1], local[2], remote])  # each once, the remote one read from S3
    assert first["plan"]["duplicates"] == 1
    errs = t["errors"].to_pylist()
    assert sorted((e["error_stage"], e["error_type"]) for e in errs) == [("list", "bad_size"), ("list", "missing_uri"), ("list", "missing_uri")]
    bad = next(e for e in errs if e["error_type"] == "bad_size")
    assert "'abc'" in bad["error_message"] and "'size'" in bad["error_message"] and str(manifest) in bad["error_message"]
    assert next(r for r in t["scores"].to_pylist() if r["uri"] == local[2])["size"] == real_size + 5  # the manifest's value
    again = _scan(where, args)
    assert again["scored"] == 0 and again["skipped"] == 4  # all four settled; the three unusable rows are errors again
    assert again["errors"] == 3


def test_special_files_under_a_prefix_are_error_rows_never_reads(ray_local, bundle_dir, tmp_path, where):
    bucket = tmp_path / "bucket"
    uris = _images(bucket, 2, 13)
    os.mkfifo(bucket / "pipe.png")
    os.symlink("/dev/zero", bucket / "zero.png")
    limit = max(os.path.getsize(u) for u in uris) + 100
    (bucket / "big.png").write_bytes(b"\0" * (limit + 1))
    summary = _scan(where, ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(tmp_path / "out"), "--max-bytes", str(limit)])
    t = _exactly_once(tmp_path / "out", [*uris, str(bucket / "pipe.png"), str(bucket / "zero.png"), str(bucket / "big.png")])
    kinds = {e["uri"].rsplit("/", 1)[1]: (e["error_stage"], e["error_type"]) for e in t["errors"].to_pylist()}
    assert kinds == {"pipe.png": ("list", "not_regular_file"), "zero.png": ("list", "not_regular_file"), "big.png": ("read", "too_large")}
    assert summary["scored"] == 2


def test_a_manifest_naming_a_fifo_or_dev_zero_directly_is_refused_not_read(ray_local, bundle_dir, tmp_path, where):
    os.mkfifo(tmp_path / "pipe")
    uris = _images(tmp_path / "bucket", 1, 14)
    pq.write_table(pa.table({"uri": [str(tmp_path / "pipe"), "/dev/zero", uris[0]]}), tmp_path / "m.parquet")
    summary = _scan(where, ["--detector", str(bundle_dir), "--input", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out")])
    t = _tables(tmp_path / "out")
    assert summary["scored"] == 1
    assert sorted((e["uri"], e["error_type"]) for e in t["errors"].to_pylist()) == [("/dev/zero", "not_regular_file"),
                                                                                  (str(tmp_path / "pipe"), "not_regular_file")]


def test_plan_rows_never_reach_the_driver(ray_local, bundle_dir, tmp_path):
    """The plan's result in the driver is one row per partition with work (counts and a path), whatever the object count."""
    from detector_core.tables.catalog import ScanOutput
    from jobs.scanning.planning import plan

    bucket = tmp_path / "bucket"
    _write(bucket, {f"d{i % 7}/f{i:04d}.png": b"" for i in range(3000)})
    o = ScanOutput.open(str(tmp_path / "out"))
    paths, counts = plan(o, str(bucket), ["d"], "scan-x", where="cluster")
    assert counts["listed"] == counts["work"] == 3000 and counts["listing_units"] > 1
    assert len(paths) <= counts["state_partitions"]
    assert sum(pq.read_metadata(p).num_rows for p in paths) == 3000
    assert S.URI in pq.read_schema(paths[0]).names


def test_unusable_inputs_are_refused_naming_what_is_wrong(ray_local, bundle_dir, tmp_path, capsys, where):
    pq.write_table(pa.table({"path": ["/x.png"]}), tmp_path / "nouri.parquet")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    (tmp_path / "notes.txt").write_text("hello")
    for source, words in ((tmp_path / "nouri.parquet", "no 'uri' column"), (tmp_path / "m", "is not JSON"),
                          (tmp_path / "notes.txt", "not a manifest"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(JobError) as e:
            _scan(where, ["--detector", str(bundle_dir), "--input", str(source), "--output", str(tmp_path / "out")])
        assert words in str(e.value), e.value
    empty = tmp_path / "empty.csv"
    empty.write_text("uri,etag,size\n")
    assert _scan(where, ["--detector", str(bundle_dir), "--input", str(empty), "--output", str(tmp_path / "out")])["listed"] == 0


def test_an_output_inside_its_input_is_left_out_and_an_input_inside_the_output_refused(ray_local, bundle_dir, tmp_path, where):
    bucket = tmp_path / "bucket"
    uris = _images(bucket, 3, 21)
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(bucket / "scans")]
    assert _scan(where, args)["scored"] == 3
    again = _scan(where, args)  # the first scan's tables, catalog and summaries are under the input now
    assert again["listed"] == 3 and again["skipped"] == 3 and again["errors"] == 0
    _exactly_once(bucket / "scans", uris)
    for output in (bucket, tmp_path):
        with pytest.raises(JobError, match="is the output"):
            _scan(where, ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(output)])
    assert not (tmp_path / "catalog.db").exists() and not (bucket / "catalog.db").exists()


def test_driver_and_cluster_plans_give_the_same_rows(ray_local, bundle_dir, tmp_path):
    """Same input, same state: the same work rows (and counts) from the plan in the driver and the plan on the cluster;
    auto goes to the cluster when the listed rows plus the state rows they touch pass --driver-plan-max."""
    from detector_core.tables.catalog import ScanOutput
    from jobs.scanning.planning import plan

    bucket = tmp_path / "bucket"
    uris = _images(bucket, 12, 31)
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(tmp_path / "out")]
    assert scan.main(args)["scored"] == 12
    rng = np.random.default_rng(32)
    (bucket / "img_03.png").write_bytes(encode(make_image(rng, size=(70, 60))))  # changed: planned again
    (bucket / "new.png").write_bytes(encode(make_image(rng)))  # new
    (bucket / "empty.png").write_bytes(b"")  # a decode error to be
    manifest = tmp_path / "m.csv"
    rows = [{"uri": u, "size": None} for u in uris] + [{"uri": uris[0], "size": None}, {"uri": None, "size": None},
                                                        {"uri": str(bucket / "new.png"), "size": "12x"}]
    pa.csv.write_csv(pa.Table.from_pylist(rows, schema=pa.schema([("uri", pa.string()), ("size", pa.string())])), manifest)
    captions = tmp_path / "captions.csv"
    pa.csv.write_csv(pa.table({"uri": uris[:5], "caption": [f"c{i}" for i in range(5)]}), captions)
    o = ScanOutput.open(str(tmp_path / "out"))

    def rows_of(paths):
        t = pa.concat_tables([pq.read_table(p) for p in paths]) if paths else None
        return sorted(map(json.dumps, t.to_pylist())) if t is not None else []

    for source, caps, full in ((str(bucket), "", False), (str(manifest), str(captions), False), (str(bucket), "", True)):
        got = {where: plan(o, source, ["a", "clip-mlp-x"] if caps else [scan_id_of(o)], f"scan-{where}", full, caps, where=where)
               for where in ("driver", "cluster")}
        (pd_, cd), (pc_, cc) = got["driver"], got["cluster"]
        assert rows_of(pd_) == rows_of(pc_) and rows_of(pd_)
        assert {k: v for k, v in cd.items() if k not in ("planned_in", "plan_seconds")} == \
            {k: v for k, v in cc.items() if k not in ("planned_in", "plan_seconds")}
        assert (cd["planned_in"], cc["planned_in"]) == ("driver", "cluster")
    work = rows_of(plan(o, str(bucket), [scan_id_of(o)], "scan-w", where="driver")[0])
    assert sorted(json.loads(r)["uri"] for r in work) == sorted([str(bucket / "img_03.png"), str(bucket / "new.png"), str(bucket / "empty.png")])
    # auto: 14 listed + the 12 state rows of their partitions (the catalog's counts)
    assert plan(o, str(bucket), [scan_id_of(o)], "scan-a", driver_max=26)[1]["planned_in"] == "driver"
    assert plan(o, str(bucket), [scan_id_of(o)], "scan-b", driver_max=25)[1]["planned_in"] == "cluster"
    assert plan(o, str(bucket), [scan_id_of(o)], "scan-c", driver_max=13)[1]["planned_in"] == "cluster"  # the listing alone


def scan_id_of(o) -> str:
    """The detector id that the output's state holds."""
    from detector_core.tables.catalog import STATE

    return o.read(STATE)["detector_id"][0].as_py()
