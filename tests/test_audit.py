"""Audit tables from real scans: DuckDB and pyiceberg read them, locally and from s3://; `jobs.audit` answers check out.

Three real scans (two detectors, two scan dates) write the Iceberg tables; every answer
of ``jobs.audit`` is compared with the same question answered independently from the
rows read with pyiceberg (and pandas); partition pruning is shown by corrupting the files
of the partitions a query must not open; a data file no commit references is invisible to
every reader; ``jobs.audit migrate`` moves what the previous code wrote into the tables.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from bench.legacy import legacy_tree, scan_process
from detector_core.demo import encode, make_image
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.features import ClipEncoder
from detector_core.method.model import DetectorMLP
from detector_core.sources.images import decode_image
from detector_core.tables import definitions as T
from detector_core.tables.catalog import ScanOutput, read_table
from detector_core.tables.definitions import current_names
from detector_core.tables.views import duckdb_connection
from jobs import audit, scan
from jobs.common.errors import JobError

DAY1, DAY2 = "2026-11-20", "2026-11-21"
SCHEMA_3_REF = "45e2a4a"  # the last commit whose tables said clip_id (schema version 3)


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
    # Glob characters in the output path are the path's own: every audit below reads "out[1]",
    # never the decoy "out1" that a glob would match.
    bucket, out = root / "bucket", root / "out[1]"
    (root / "out1").mkdir()
    for name, data in {**first, "broken.jpg": b"<html>no</html>"}.items():
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_bytes(data)
    common = ["--input", str(bucket), "--output", str(out)]
    # The first night by the code of schema version 3 (Iceberg tables whose feature column was
    # still clip_id), in its own process; the nights after by this code, which renames the column
    # in place: every audit below reads an output that both versions wrote.
    try:
        old_code = legacy_tree(SCHEMA_3_REF)
    except RuntimeError:  # no git history here: this code writes every night
        old_code = None
    if old_code is not None:
        # As a job of the session Ray: its workers import the old tree, their job's folder.
        scan_process(["--detector", str(root / "old"), *common, "--scan-date", DAY1], old_code, ray_address=ray_local)
    else:
        scan.main(["--detector", str(root / "old"), *common, "--scan-date", DAY1])
    for name, data in later.items():
        (bucket / name).write_bytes(data)
    second = scan.main(["--detector", str(root / "old"), *common, "--scan-date", DAY2])
    third = scan.main(["--detector", str(root / "new"), *common, "--scan-date", DAY2])
    assert second["scored"] == 2 and third["scored"] == 12
    return {"out": out, "old": ids[0], "new": ids[1], "root": root, "schema_3": old_code is not None}


def _rows(out, name):
    df = read_table(str(out), name).to_pandas()
    df["scan_date"] = df["scan_date"].astype(str)
    return df


def test_a_schema_3_output_is_renamed_in_place_and_read_whole(scans):
    """clip_id -> feature_id by Iceberg schema evolution: same field id, old files read by the name mapping."""
    if not scans["schema_3"]:
        pytest.skip("no git history to run the schema-3 code from")
    out = ScanOutput.open(str(scans["out"]), create=False)
    want = FeatureSpec(clip_model="test-tiny", feature_mode="image").id
    for name in ("scores", "flagged"):
        table = out.table(name)
        assert "feature_id" in table.schema().column_names and "clip_id" not in table.schema().column_names
        assert table.properties["detector.schema-version"] == T.SCHEMA_VERSION
        assert set(T.ADDED_COLUMNS) <= set(table.schema().column_names)  # schema 5's evidence columns, added in place
        rows = out.read(name)
        assert set(rows["feature_id"].to_pylist()) == {want}, name  # no nulls: the night-1 files too
        first = min(table.metadata.snapshots, key=lambda s: s.sequence_number)
        assert set(out.read(name, snapshot_id=first.snapshot_id)["feature_id"].to_pylist()) == {want}  # a snapshot of the old schema
        assert rows.filter(pc.equal(rows["scan_date"], dt.date.fromisoformat(DAY1)))["c2pa_state"].null_count == 10 or name == "flagged"
    day1 = _rows(scans["out"], "scores").query(f"scan_date == '{DAY1}'")
    assert len(day1) == 10 and set(day1["feature_id"]) == {want}
    got = _ask("detectors", "--scan", str(scans["out"]))  # DuckDB's iceberg_scan over both kinds of files
    assert set(got["feature_id"]) == {want} and got["scored"].sum() == 10 + 2 + 12


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
    deep = _ask("per-prefix", "--scan", out, "--detector-id", scans["new"], "--depth", "99")
    by_dir = {p.rsplit("/", 1)[-1]: (r.scored, r.flagged) for p, r in zip(deep.prefix, deep.itertuples())}
    assert by_dir == {"x": (want.loc["a", "size"], want.loc["a", "sum"]), "b": (want.loc["b", "size"], want.loc["b", "sum"])}

    errs = _ask("errors", "--scan", out)
    assert errs["objects"].sum() == 2 and set(errs["error_type"]) == {"not_an_image"}


def test_diff_between_detector_versions(scans):
    out = str(scans["out"])
    got = _ask("diff", "--scan", out, "--detector-id", scans["old"], "--against-id", scans["new"], "--limit", "0")
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
    got = _ask("recut", "--scan", out, "--detector-id", scans["new"], "--threshold", repr(t))
    logit = math.log(t / (1 - t))
    assert got.scored.tolist() == [12]
    assert got.flagged_at_threshold.tolist() == [int((s.logit >= logit).sum())]
    assert got.newly_flagged.tolist() == [int(((s.logit >= logit) & ~s.flagged).sum())]
    rows = _ask("recut", "--scan", out, "--detector-id", scans["new"], "--threshold", repr(t), "--rows", "--limit", "0")
    assert sorted(rows.uri) == sorted(s[s.logit >= logit].uri)
    # at the bundle's own threshold nothing changes
    same = _ask("recut", "--scan", out, "--detector-id", scans["new"], "--threshold", repr(float(s.threshold.iloc[0])))
    assert same.newly_flagged.tolist() == [0] and same.no_longer_flagged.tolist() == [0]


def _files_of_day(out, day):
    o = ScanOutput.open(str(out), create=False)
    return [t.file.file_path for name in ("scores", "flagged", "errors")
            for t in o.table(name).scan(row_filter=f"scan_date = '{day}'").plan_files()]


def test_date_and_bucket_filters_open_only_their_partitions(scans):
    out = scans["out"]
    files = _files_of_day(out, DAY1)
    assert files and all(f"/scan_date={DAY1}/" in p for p in files)  # pyiceberg plans only that partition
    saved = {p: open(p, "rb").read() for p in files}
    try:
        for p in files:  # the first night's files are now unreadable
            open(p, "wb").write(b"not parquet")
        assert _ask("per-day", "--scan", str(out), "--date", DAY2)["scored"].sum() == 2 + 12
        assert _ask("per-day", "--scan", str(out), "--since", DAY2, "--bucket", "local")["scored"].sum() == 2 + 12
        with pytest.raises(JobError):
            _ask("per-day", "--scan", str(out))  # all days: the corrupt files are read and the query fails cleanly
        # DuckDB's iceberg_scan as an auditor types it prunes on the partition columns too.
        con = duckdb_connection(ScanOutput.open(str(out), create=False))
        loc = ScanOutput.open(str(out), create=False).table("flagged").metadata_location
        n = con.sql(f"SELECT count(*) FROM iceberg_scan('{loc}') WHERE scan_date = DATE '{DAY2}' AND bucket = 'local'").fetchone()[0]
        assert n == int(_rows_cached["flagged"].query("scan_date == @DAY2").shape[0])
    finally:
        for p, data in saved.items():
            open(p, "wb").write(data)


_rows_cached: dict = {}


@pytest.fixture(autouse=True)
def _cache_rows(scans):
    if not _rows_cached:
        _rows_cached.update({n: _rows(scans["out"], n) for n in ("scores", "flagged", "errors")})


def test_a_data_file_no_commit_references_is_invisible(scans):
    out = scans["out"]
    part = _files_of_day(out, DAY2)[0]
    orphan = Path(part).with_name("scan-killed-before-its-commit.parquet")
    t = pq.read_table(part)
    pq.write_table(t.set_column(t.schema.get_field_index("scan_id"), "scan_id", [["scan-killed"] * t.num_rows]), orphan)
    try:
        got = _ask("sql", "--scan", str(out), "--sql", "SELECT count(*) AS n FROM scores")
        assert got.n.tolist() == [len(_rows_cached["scores"])]
        assert "scan-killed" not in set(read_table(str(out), "scores")["scan_id"].to_pylist())
    finally:
        orphan.unlink()


def test_tables_from_s3_with_duckdb_pyiceberg_and_the_audit_job(ray_local, scans, s3_bucket, s3_server, tmp_path):
    import s3fs

    rng = np.random.default_rng(5)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for i in range(5):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
    remote = f"{s3_bucket}/scans"
    summary = scan.main(["--detector", str(scans["root"] / "old"), "--input", f"{s3_bucket}/in", "--output", remote,
                         "--catalog", f"sqlite:///{tmp_path}/catalog.db", "--scan-date", DAY1])
    rows = read_table(remote, "scores").to_pandas()
    assert len(rows) == 5 and set(rows.bucket) == {s3_bucket[5:]}
    got = _ask("per-day", "--scan", remote)
    assert got.scored.tolist() == [5] and got.flagged.tolist() == [int(rows.flagged.sum())]
    o = ScanOutput.open(remote, create=False)
    assert o.table("scores").metadata_location.startswith(remote + "/scores/metadata/")
    con = duckdb_connection(o)  # DuckDB's iceberg_scan over s3:// through the fsspec filesystem
    n = con.sql(f"SELECT count(*) FROM iceberg_scan('{o.table('flagged').metadata_location}') WHERE scan_date = DATE '{DAY1}'").fetchone()[0]
    assert n == summary["flagged"] == int(rows.flagged.sum())


def test_migrate_what_the_previous_code_wrote(ray_local, scans, tmp_path):
    from bench.legacy import legacy_scan

    try:
        legacy = legacy_scan(["--detector", str(scans["root"] / "old"), "--ensemble", str(scans["root"] / "new"),
                              "--input", str(scans["root"] / "bucket"), "--output", str(tmp_path / "old"), "--scan-date", DAY1],
                             ray_address=ray_local)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    old = tmp_path / "old"
    # Make one table's first file schema 1 (before detector_kind), as the oldest outputs are.
    v1 = next((old / "errors").rglob("*.parquet"))
    t = pq.read_table(v1)
    pq.write_table(t.drop_columns(["detector_kind"]).replace_schema_metadata({b"diffusion_detector.schema_version": b"1"}), v1)
    def legacy_rows(name):
        files = sorted(str(p) for p in (old / name).glob("scan_date=*/bucket=*/*.parquet"))  # the old layout only
        parts = [pq.read_table(f) for f in files]
        parts = [t.drop_columns([c for c in ("detector_kind",) if c in t.column_names]).replace_schema_metadata(None) for t in parts]
        rows = pa.concat_tables(parts, promote_options="default").sort_by([("uri", "ascending"), ("detector_id", "ascending")])
        assert "clip_id" in rows.column_names or name == "errors"  # what the old code called it
        return current_names(rows)  # migrated rows carry it as feature_id

    first = audit.main(["migrate", "--output", str(old)])
    n_images = sum(1 for p in (scans["root"] / "bucket").rglob("*.png"))
    assert first["scans_migrated"] == 1 and first["scores_rows"] == legacy["scored"] == 2 * n_images
    again = audit.main(["migrate", "--output", str(old)])  # twice is once
    assert again["scans_migrated"] == 0 and again["scans_already_there"] == 1
    for name in ("scores", "flagged", "errors"):
        got = read_table(str(old), name).sort_by([("uri", "ascending"), ("detector_id", "ascending")])
        want = legacy_rows(name)
        assert got.num_rows == want.num_rows
        for col in want.column_names:  # same rows, scan ids and timestamps (partition columns: from the paths)
            if col not in ("scan_date", "bucket"):
                assert got[col].to_pylist() == want[col].to_pylist(), (name, col)
        assert {d.isoformat() for d in got["scan_date"].to_pylist()} == {DAY1}
    assert read_table(str(old), "errors")["detector_kind"].null_count == t.num_rows  # the schema-1 file's rows
    runs = _ask("sql", "--scan", str(old), "--sql", "SELECT scan_id, scored FROM runs ORDER BY detector_id")
    assert set(runs.scan_id) == {legacy["scan_id"]} and runs.scored.sum() == legacy["scored"]


def test_bad_questions_fail_with_one_line(scans, capsys):
    with pytest.raises(JobError, match="needs --detector-id OLD_ID --against-id NEW_ID"):
        audit.main(["query", "diff", "--scan", str(scans["out"])])
    with pytest.raises(JobError, match="is not a date"):
        audit.main(["query", "per-day", "--scan", str(scans["out"]), "--since", "yesterday"])
    with pytest.raises(JobError, match="query failed"):
        audit.main(["query", "sql", "--scan", str(scans["out"]), "--sql", "SELECT nope FROM scores"])


def test_readme_documents_every_column():
    from pathlib import Path

    from detector_core.schema import COLUMN_DOCS
    from detector_core.tables.definitions import TABLE_SCHEMAS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, doc in COLUMN_DOCS.items():
        assert f"| `{name}` | {doc} |" in readme, name
    for name in ("scores", "flagged", "errors"):
        assert set(TABLE_SCHEMAS[name].names) <= set(COLUMN_DOCS)
