"""Audit tables from real scans: DuckDB and pyarrow read them, locally and from s3://; `jobs.audit` answers check out.

Three real scans (two detectors, two scan dates) write the tables; every answer of
``jobs.audit`` is compared with the same question answered independently from the
rows read with pyarrow datasets (and pandas), and partition pruning is shown by
corrupting the files of the partitions a query must not open.
"""

from __future__ import annotations

import math
import shutil

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from detector_core.bundle import DetectorBundle, save_bundle
from detector_core.demo import encode, make_image
from detector_core.extractors import FeatureSpec
from detector_core.features import ClipEncoder
from detector_core.images import decode_image
from detector_core.model import DetectorMLP
from detector_core.tables import open_table
from jobs import audit, scan

DAY1, DAY2 = "2026-11-20", "2026-11-21"


def _median_threshold(model, files, enc):
    pixels = torch.stack([enc.preprocess(decode_image(b).image) for b in files.values()])
    with torch.no_grad():
        logits = model(enc.encode(pixels, None, "image")).double().numpy()
    return float(np.median(logits))


@pytest.fixture(scope="module")
def scans(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(11)
    first = {f"a/x/img_{i}.png": encode(make_image(rng)) for i in range(6)}
    first.update({f"b/img_{i}.png": encode(make_image(rng)) for i in range(4)})
    later = {f"b/new_{i}.png": encode(make_image(rng)) for i in range(2)}
    enc = ClipEncoder("test-tiny", "none")
    ids = []
    for seed, name in ((0, "old"), (1, "new")):
        torch.manual_seed(seed)
        model = DetectorMLP(64).eval()
        thr = _median_threshold(model, {**first, **later}, enc)
        b = DetectorBundle(model=model, features=FeatureSpec(clip_model="test-tiny", feature_mode="image"), threshold_logit=thr)
        save_bundle(b, str(root / name))
        ids.append(b.detector_id)
    bucket, out = root / "bucket", root / "out"
    for name, data in {**first, "broken.jpg": b"<html>no</html>"}.items():
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_bytes(data)
    common = ["--input", str(bucket), "--output", str(out)]
    scan.main(["--detector", str(root / "old"), *common, "--scan-date", DAY1])
    for name, data in later.items():
        (bucket / name).write_bytes(data)
    second = scan.main(["--detector", str(root / "old"), *common, "--scan-date", DAY2])
    third = scan.main(["--detector", str(root / "new"), *common, "--scan-date", DAY2])
    assert second["scored"] == 2 and third["scored"] == 12
    return {"out": out, "old": ids[0], "new": ids[1]}


def _rows(out, name):
    return open_table(str(out), name).to_table().to_pandas()


def _ask(*argv):
    return audit.main(["query", *argv, "--format", "csv", "--out", "/dev/null"]).to_pandas()


def test_per_day_matches_the_rows(scans):
    got = _ask("per-day", "--scan", str(scans["out"]))
    s, e = _rows(scans["out"], "scores"), _rows(scans["out"], "errors")
    assert len(s) == 6 + 4 + 2 + 12 and len(e) == 2  # the broken file: once per detector
    want = s.groupby(["scan_date", "detector_id"]).agg(scored=("uri", "size"), flagged=("flagged", "sum")).reset_index()
    errs = e.groupby(["scan_date", "detector_id"]).size().rename("errors").reset_index()
    want = want.merge(errs, how="outer", on=["scan_date", "detector_id"]).fillna(0)
    got["scan_date"] = got["scan_date"].astype(str)
    merged = got.merge(want, on=["scan_date", "detector_id"], suffixes=("", "_want"))
    assert len(merged) == len(want) == 3
    for c in ("scored", "flagged", "errors"):
        assert (merged[c] == merged[f"{c}_want"]).all(), c


def test_top_per_prefix_and_errors(scans):
    out = str(scans["out"])
    f = _rows(out, "flagged")
    top = _ask("top", "--scan", out, "--limit", "3")
    assert top["uri"].tolist() == f.sort_values(["score", "uri"], ascending=[False, True])["uri"].head(3).tolist()

    s = _rows(out, "scores")
    s = s[s.detector_id == scans["new"]]
    folder = s.uri.str.split("/bucket/").str[1].str.split("/").str[0]
    want = s.assign(folder=folder).groupby("folder").flagged.agg(["size", "sum"])
    # Local paths: the prefix is the path's folders (depth 99 = all of them), so the last
    # folder names the group.
    deep = _ask("per-prefix", "--scan", out, "--detector", scans["new"], "--depth", "99")
    by_dir = {p.rsplit("/", 1)[-1]: (r.scored, r.flagged) for p, r in zip(deep.prefix, deep.itertuples())}
    assert by_dir == {"x": (want.loc["a", "size"], want.loc["a", "sum"]), "b": (want.loc["b", "size"], want.loc["b", "sum"])}

    errs = _ask("errors", "--scan", out)
    assert errs["objects"].sum() == 2 and set(errs["error_type"]) == {"not_an_image"}


def test_diff_between_detector_versions(scans):
    out = str(scans["out"])
    got = _ask("diff", "--scan", out, "--detector", scans["old"], "--against", scans["new"], "--limit", "0")
    s = _rows(out, "scores")
    latest = s.sort_values("scanned_at").groupby(["detector_id", "uri"]).last().reset_index()
    a = latest[latest.detector_id == scans["old"]].set_index("uri").flagged
    b = latest[latest.detector_id == scans["new"]].set_index("uri").flagged
    both = a.index.intersection(b.index)
    newly = sorted(u for u in both if b[u] and not a[u])
    gone = sorted(u for u in both if a[u] and not b[u])
    assert newly or gone  # two different random detectors disagree somewhere
    assert sorted(got[got.change == "newly flagged"].uri) == newly
    assert sorted(got[got.change == "no longer flagged"].uri) == gone


def test_recut_at_another_threshold(scans):
    out = str(scans["out"])
    s = _rows(out, "scores")
    s = s[s.detector_id == scans["new"]]
    t = float(s.score.quantile(0.3))  # a threshold inside the spread of scores
    got = _ask("recut", "--scan", out, "--detector", scans["new"], "--threshold", repr(t))
    logit = math.log(t / (1 - t))
    assert got.scored.tolist() == [12]
    assert got.flagged_at_threshold.tolist() == [int((s.logit >= logit).sum())]
    assert got.newly_flagged.tolist() == [int(((s.logit >= logit) & ~s.flagged).sum())]
    rows = _ask("recut", "--scan", out, "--detector", scans["new"], "--threshold", repr(t), "--rows", "--limit", "0")
    assert sorted(rows.uri) == sorted(s[s.logit >= logit].uri)
    # at the bundle's own threshold nothing changes
    same = _ask("recut", "--scan", out, "--detector", scans["new"], "--threshold", repr(float(s.threshold.iloc[0])))
    assert same.newly_flagged.tolist() == [0] and same.no_longer_flagged.tolist() == [0]


def _copy_with_corrupt_day(src, dst, day):
    """A copy of the scan output whose files of ``day`` are not Parquet: opening one fails."""
    shutil.copytree(src, dst)
    for p in dst.glob(f"*/scan_date={day}/*/*.parquet"):
        p.write_bytes(b"not parquet")
    return dst


def test_date_and_bucket_filters_open_only_their_partitions(scans, tmp_path):
    copy = _copy_with_corrupt_day(scans["out"], tmp_path / "a", DAY1)
    assert _ask("per-day", "--scan", str(copy), "--date", DAY2)["scored"].sum() == 2 + 12
    assert _ask("per-day", "--scan", str(copy), "--since", DAY2, "--bucket", "local")["scored"].sum() == 2 + 12
    with pytest.raises(SystemExit):
        _ask("per-day", "--scan", str(copy))  # all days: the corrupt files are read and the query fails cleanly

    # DuckDB as an auditor types it, and pyarrow datasets, prune on the partition columns.
    # (DuckDB reads the first file's footer to bind the schema: the corrupt day is the later one.)
    copy = _copy_with_corrupt_day(scans["out"], tmp_path / "b", DAY2)
    want = int(_rows(scans["out"], "flagged").query("scan_date == @DAY1").shape[0])
    sql = f"""SELECT count(*) FROM read_parquet('{copy}/flagged/*/*/*.parquet', hive_partitioning = true)
              WHERE scan_date = DATE '{DAY1}' AND bucket = 'local'"""
    assert duckdb.sql(sql).fetchall()[0][0] == want
    ds = open_table(str(copy), "flagged")
    frags = list(ds.get_fragments(filter=pads.field("scan_date") == DAY1))
    assert frags and all(f"scan_date={DAY1}/bucket=local/" in f.path for f in frags)
    assert ds.to_table(filter=pads.field("scan_date") == DAY1).num_rows == want


def test_rows_of_a_scan_without_a_run_summary_are_not_shown(scans, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(scans["out"], copy)
    part = next(copy.glob(f"scores/scan_date={DAY2}/bucket=local/*.parquet"))
    t = pq.read_table(part)
    t = t.set_column(t.schema.get_field_index("scan_id"), "scan_id", [["scan-still-committing"] * t.num_rows])
    pq.write_table(t, part.with_name("part-scan-still-committing-00000.parquet"))
    got = _ask("sql", "--scan", str(copy), "--sql", "SELECT count(*) AS n FROM scores")
    assert got.n.tolist() == [len(_rows(scans["out"], "scores"))]


def test_schema_1_files_read_next_to_schema_2_files(scans, tmp_path):
    """Tables written before ``detector_kind`` existed stay readable, with the column null."""
    copy = tmp_path / "out"
    shutil.copytree(scans["out"], copy)
    old = list(copy.glob(f"*/scan_date={DAY1}/bucket=local/*.parquet"))
    assert old
    for part in old:  # rewrite the first night as schema version 1 wrote it
        t = pq.read_table(part)
        t = t.drop_columns(["detector_kind"]).replace_schema_metadata({b"diffusion_detector.schema_version": b"1"})
        pq.write_table(t, part)
    got = _ask("sql", "--scan", str(copy), "--sql",
               "SELECT scan_date::VARCHAR AS d, count(*) AS n, count(detector_kind) AS with_kind FROM scores GROUP BY ALL ORDER BY d")
    want = _rows(scans["out"], "scores").groupby("scan_date").size()
    assert got.n.tolist() == want.tolist()
    assert got.with_kind.tolist() == [0, want[DAY2]]
    rows = open_table(str(copy), "scores").to_table().to_pandas()
    assert rows.detector_kind.isna().sum() == want[DAY1] and set(rows.detector_kind.dropna()) == {"clip-mlp"}


def test_tables_from_s3_with_duckdb_pyarrow_and_the_audit_job(scans, s3_bucket, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.put(str(scans["out"]) + "/", f"{s3_bucket[5:]}/scans/", recursive=True)
    fs.invalidate_cache()
    remote = f"{s3_bucket}/scans"
    local = _ask("per-day", "--scan", str(scans["out"]))
    assert _ask("per-day", "--scan", remote).equals(local)
    # pyarrow datasets over s3://
    ds = open_table(remote, "scores")
    assert ds.count_rows(filter=pads.field("bucket") == "local") == len(_rows(scans["out"], "scores"))
    # DuckDB over s3:// through the fsspec filesystem (no extension download)
    con = duckdb.connect()
    con.register_filesystem(fs)
    n = con.sql(f"SELECT count(*) FROM read_parquet('{remote}/flagged/*/*/*.parquet', hive_partitioning = true) "
                f"WHERE scan_date = DATE '{DAY2}'").fetchall()[0][0]
    assert n == int(_rows(scans["out"], "flagged").query("scan_date == @DAY2").shape[0])


def test_bad_questions_fail_with_one_line(scans, capsys):
    with pytest.raises(SystemExit):
        audit.main(["query", "diff", "--scan", str(scans["out"])])
    assert "needs --detector OLD_ID --against NEW_ID" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        audit.main(["query", "per-day", "--scan", str(scans["out"]), "--since", "yesterday"])
    assert "is not a date" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        audit.main(["query", "sql", "--scan", str(scans["out"]), "--sql", "SELECT nope FROM scores"])
    assert "query failed" in capsys.readouterr().err


def test_readme_documents_every_column():
    from pathlib import Path

    from detector_core.schema import COLUMN_DOCS
    from detector_core.tables import TABLE_SCHEMAS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, doc in COLUMN_DOCS.items():
        assert f"| `{name}` | {doc} |" in readme, name
    for schema in TABLE_SCHEMAS.values():
        assert set(schema.names) <= set(COLUMN_DOCS)
