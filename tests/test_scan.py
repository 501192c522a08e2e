"""The scan job on a real local Ray: every object accounted for, incremental, resumable, exact, on S3."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from detector_core.demo import encode, make_image
from detector_core.method.bundle import DetectorBundle, load_bundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.features import ClipEncoder
from detector_core.method.model import DetectorMLP
from detector_core.sources.images import decode_image
from jobs import scan
from jobs.common.errors import JobError


def _save(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb():
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 9)) + chunk(b"IEND", b"")


def hostile_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = {f"good_{i}.png": encode(make_image(rng)) for i in range(6)}
    jpeg = _save(make_image(rng), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 255, 0)]]
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    files = {
        **good,
        "photo.jpg": jpeg,
        "empty.jpg": b"",
        "random.jpg": rng.bytes(3000),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "page.jpg": b"<!DOCTYPE html><html><body>404</body></html>",
        "bomb.png": _bomb(),
        "cmyk.jpg": _save(Image.new("CMYK", (50, 40), (10, 200, 30, 0)), "JPEG"),
        "sixteen.png": _save(Image.fromarray((rng.random((40, 50)) * 65535).astype(np.uint16)), "PNG"),
        "palette.png": _save(pal, "PNG", transparency=0),
        "anim.gif": _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "pic.webp": _save(make_image(rng), "WEBP"),
        "rotated.jpg": _save(make_image(rng), "JPEG", exif=exif),
        "odd name <script>alert(1)</script> é 空.png": encode(make_image(rng)),
        "sub/dir/nested file.png": encode(make_image(rng)),
    }
    return files


BAD = {"empty.jpg": "empty", "random.jpg": "not_an_image", "page.jpg": "not_an_image", "bomb.png": "too_large"}


def _write(root, files):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _data_files(out, name, catalog=""):
    from detector_core.tables.catalog import ScanOutput

    table = ScanOutput.open(str(out), catalog, create=False).table(name)
    return [t.file.file_path for t in table.scan().plan_files()]


def _tables(out, catalog=""):
    from detector_core.tables.catalog import read_table

    return {name: read_table(str(out), name, catalog=catalog) for name in ("scores", "flagged", "errors", "runs")}


def test_hostile_mix_every_object_accounted_for_and_scores_exact(ray_local, bundle_dir, tmp_path):
    files = hostile_files()
    _write(tmp_path / "bucket", files)
    out = tmp_path / "out"
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(out), "--chunk-size", "8"])
    t = _tables(out)
    scores, errors = t["scores"], t["errors"]
    assert summary["listed"] == len(files) == scores.num_rows + errors.num_rows
    assert sorted(scores["uri"].to_pylist() + errors["uri"].to_pylist()) == sorted(str(tmp_path / "bucket" / n) for n in files)
    kinds = {u.rsplit("/", 1)[1]: k for u, k in zip(errors["uri"].to_pylist(), errors["error_type"].to_pylist())}
    assert {k: v for k, v in kinds.items() if k in BAD} == BAD
    assert kinds["truncated.jpg"] in ("truncated", "corrupt") and len(kinds) == 5
    flagged = t["flagged"]
    assert flagged.num_rows == summary["flagged"] == sum(scores["flagged"].to_pylist())
    assert json.loads((out / "runs" / f"{summary['scan_id']}.json").read_text())["scored"] == scores.num_rows
    assert not (out / "_intents").exists() or not list((out / "_intents").iterdir())
    assert {d.isoformat() for d in scores["scan_date"].to_pylist()} == {summary["scan_date"]}
    assert set(scores["bucket"].to_pylist()) == {"local"}
    # Every data file sits in its table's partition folder and is referenced by the table.
    for name in ("scores", "flagged", "errors"):
        assert all(f"/{name}/data/scan_date={summary['scan_date']}/bucket=local/" in p for p in _data_files(out, name))

    # Scores equal a direct detector_core computation on the same files (no JPEGs: no draft).
    bundle = load_bundle(str(bundle_dir))
    enc = ClipEncoder("test-tiny", "none")
    by_uri = dict(zip(scores["uri"].to_pylist(), scores["logit"].to_pylist()))
    names = [n for n in files if n.endswith(".png") and n not in BAD]
    pixels = torch.stack([enc.preprocess(decode_image(files[n]).image) for n in names])
    with torch.no_grad():
        direct = bundle.model(enc.encode(pixels, None, "image")).double().numpy()
    got = np.array([by_uri[str(tmp_path / "bucket" / n)] for n in names])
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)
    assert np.array_equal(scores["flagged"].to_numpy(zero_copy_only=False), scores["logit"].to_numpy() >= 0.0)


def _exactly_once(out, uris, catalog=""):
    from detector_core.tables.catalog import read_table

    t = _tables(out, catalog)
    got = t["scores"]["uri"].to_pylist() + t["errors"]["uri"].to_pylist()
    assert sorted(got) == sorted(uris), "every object exactly once in scores + errors"
    flagged = t["flagged"]["uri"].to_pylist()
    assert sorted(flagged) == sorted(u for u, f in zip(t["scores"]["uri"].to_pylist(), t["scores"]["flagged"].to_pylist()) if f)
    # Every scored object's vector (CLIP family), committed in the same units as its scores rows: once per scan that
    # embedded it (a repair's lost objects are embedded again by the next scan: a later version, not a double).
    features = read_table(str(out), "features", catalog=catalog)
    kept = list(zip(features["uri"].to_pylist(), features["feature_id"].to_pylist(), features["scan_id"].to_pylist()))
    assert len(kept) == len(set(kept)), "a vector committed twice by one scan"
    scored = {(u, f) for u, f in zip(t["scores"]["uri"].to_pylist(), t["scores"]["feature_id"].to_pylist()) if not f.startswith("dnf/")}
    assert {(u, f) for u, f, _ in kept} == scored
    return t


def _images(bucket, n, seed, prefix="img"):
    rng = np.random.default_rng(seed)
    files = {f"{prefix}_{i:02d}.png": encode(make_image(rng)) for i in range(n)}
    _write(bucket, files)
    return sorted(str(bucket / f) for f in files)


def test_incremental_rerun_and_changes(ray_local, bundle_dir, tmp_path):
    bucket = tmp_path / "bucket"
    uris = _images(bucket, 12, 1)
    out = tmp_path / "out"
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "4"]
    first = scan.main(args)
    assert first["scored"] == 12 and first["commit_units"] == 3
    _exactly_once(out, uris)
    again = scan.main(args)
    assert again["skipped"] == 12 and again["scored"] == 0 and again["model_loads"] == 0
    assert _tables(out)["scores"].num_rows == 12  # no duplicate rows

    rng = np.random.default_rng(9)
    _write(bucket, {f"new_{i}.png": encode(make_image(rng)) for i in range(3)})
    (bucket / "img_00.png").write_bytes(encode(make_image(rng, size=(90, 91))))  # changed object
    third = scan.main([*args, "--keep-unit-hours", "0.000001"])  # the scan's start and end expire every unit snapshot not pinned
    assert third["scored"] == 4 and third["skipped"] == 11
    assert _tables(out)["scores"].num_rows == 16
    # scores: the first scan's units 0 and 1 go; its unit 2 (its completed row's pin) and the third's unit (current) stay.
    expired = {t: third["expired_snapshots"]["start"][t] + third["expired_snapshots"]["end"][t] for t in ("scores", "runs")}
    assert expired == {"scores": 2, "runs": 6}
    runs = _tables(out)["runs"]
    done = [r for r in runs.to_pylist() if r["status"] == "completed"]
    assert [r["scored"] for r in sorted(done, key=lambda r: r["started_at"])] == [12, 0, 4]


def test_one_stream_models_built_once_per_actor_and_rows_never_reach_the_driver(ray_local, bundle_dir, tmp_path):
    bucket = tmp_path / "bucket"
    uris = _images(bucket, 24, 4)
    out = tmp_path / "out"
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "4",
                         "--batch-size", "4", "--actors", "2"])
    _exactly_once(out, uris)
    assert summary["model_loads"] == 2  # one pipeline: each of the 2 actors built its models once, for all units
    # What the driver received: exactly one record per data file the tables reference (counted
    # independently from the Iceberg metadata), not one per object.
    referenced = sum(len(_data_files(out, name)) for name in ("scores", "flagged", "errors", "features"))
    assert summary["driver_rows_received"] == summary["data_files"] == referenced
    units = sorted((r for r in _tables(out)["runs"].to_pylist() if r["status"] == "unit"), key=lambda r: r["unit"])
    sizes = [r["scored"] + r["errors"] for r in units]
    assert [r["unit"] for r in units] == list(range(summary["commit_units"])) and sum(sizes) == 24
    # Units are cut at the first writer-call boundary once 4 rows are pending, and a writer call holds
    # at most 4 rows (Ray Data may hand it fewer at a block's end, so the count of units is 4 to 6):
    # every unit but the last holds 4 to 7 rows.
    assert summary["commit_units"] >= 4 and all(4 <= n <= 7 for n in sizes[:-1]) and 1 <= sizes[-1] <= 7


def test_scan_on_s3(ray_local, bundle_dir, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(2)
    for i in range(5):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
    fs.pipe(f"{s3_bucket[5:]}/in/broken.jpg", b"not an image")
    fs.put(str(bundle_dir), f"{s3_bucket[5:]}/models/detector", recursive=True)
    out = f"{s3_bucket}/scans"
    args = ["--detector", f"{s3_bucket}/models/detector", "--input", f"{s3_bucket}/in", "--output", out]
    with pytest.raises(JobError, match="catalog"):  # an object-store output needs a catalog that every reader can reach
        scan.main(args)
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    summary = scan.main([*args, "--catalog", catalog])
    t = _tables(out)  # the catalog is recorded in OUT/_catalog.json
    assert summary["scored"] == 5 and summary["errors"] == 1
    assert t["scores"].num_rows == 5 and t["errors"]["uri"].to_pylist() == [f"{s3_bucket}/in/broken.jpg"]
    assert all(e for e in t["scores"]["etag"].to_pylist())
    assert set(t["scores"]["bucket"].to_pylist()) == {s3_bucket[5:]}
    files = _data_files(out, "scores")
    assert files and all(p.startswith(f"{out}/scores/data/scan_date={summary['scan_date']}/bucket={s3_bucket[5:]}/") for p in files)
    assert fs.exists(f"{s3_bucket[5:]}/scans/runs/{summary['scan_id']}.json")
    assert scan.main([*args, "--catalog", catalog])["scored"] == 0


def test_image_text_detector_refuses_to_scan_without_captions(bundle_dir, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "it"
    save_bundle(DetectorBundle(model=DetectorMLP(128), features=FeatureSpec(clip_model="test-tiny", feature_mode="image+text")), str(path))
    (tmp_path / "in").mkdir()
    with pytest.raises(JobError, match="needs captions"):
        scan.main(["--detector", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])


def test_manifest_without_etag_or_size_is_incremental_too(ray_local, bundle_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket = tmp_path / "bucket"
    _images(bucket, 4, 5)
    pq.write_table(pa.table({"uri": [str(p) for p in sorted(bucket.iterdir())]}), tmp_path / "inventory.parquet")
    args = ["--detector", str(bundle_dir), "--input", str(tmp_path / "inventory.parquet"), "--output", str(tmp_path / "out")]
    assert scan.main(args)["scored"] == 4
    again = scan.main(args)  # the manifest gives only uris: already-scored uris are settled
    assert again["skipped"] == 4 and again["scored"] == 0
    assert _tables(tmp_path / "out")["scores"].num_rows == 4


@pytest.mark.parametrize("bad", [["--chunk-size", "0"], ["--chunk-size", "-1"], ["--batch-size", "0"], ["--actors", "0"],
                                 ["--actors", "3-1"], ["--actors", "x"], ["--lease-ttl", "0"], ["--resource-timeout", "-5"]])
def test_bug5_bad_numbers_are_refused_before_anything_starts(bundle_dir, tmp_path, capsys, bad):
    (tmp_path / "in").mkdir()
    with pytest.raises(JobError) as e:
        scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *bad])
    assert bad[0] in str(e.value), e.value
    assert not (tmp_path / "out").exists()  # no catalog, no lease, no tables


def test_elastic_pool_and_a_missing_gpu_fails_fast_naming_it(ray_local, bundle_dir, tmp_path, capsys):
    uris = _images(tmp_path / "bucket", 8, 15)
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(tmp_path / "out"),
                         "--actors", "1-2", "--batch-size", "2"])
    assert summary["scored"] == 8 and 1 <= summary["model_loads"] <= 2
    _exactly_once(tmp_path / "out", uris)
    started = time.time()
    with pytest.raises(JobError) as e:
        scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "bucket"), "--output", str(tmp_path / "out-gpu"),
                   "--gpu", "--resource-timeout", "5"])
    err = str(e.value)
    assert "no Scorer actor could be placed" in err and "GPU" in err, err
    assert time.time() - started < 120


def _big_jpeg(seed: int = 5) -> bytes:
    rng = np.random.default_rng(seed)
    small = make_image(rng, "real", size=(96, 128))
    arr = np.asarray(small.resize((1024, 768), Image.BICUBIC)).astype(np.int16) + rng.integers(-8, 9, size=(768, 1024, 3))
    return _save(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=90)


def test_an_ensemble_decodes_each_detectors_images_as_its_training_did(tmp_path):
    """CLIP allows JPEG draft decoding, DNF does not: in one pass each gets its own decode (before, the
    ensemble turned draft off for both, so the CLIP detector saw other pixels than in training)."""
    from detector_core.method.extractors import draft_size_for, preprocess_for
    from jobs.scanning.decoding import load_images, pixel_column

    data = _big_jpeg()
    (tmp_path / "big.jpg").write_bytes(data)
    clip, dnf = FeatureSpec(clip_model="test-tiny"), FeatureSpec(extractor="dnf", unet="test-tiny").resolved()
    out = load_images({"uri": np.array([str(tmp_path / "big.jpg")], dtype=object)}, specs=[clip, dnf])
    p_clip, p_dnf = preprocess_for(clip), preprocess_for(dnf)
    assert draft_size_for(p_clip) == 2 * p_clip.size and draft_size_for(p_dnf) is None
    want_clip = p_clip.to_input(decode_image(data, draft_size=2 * p_clip.size).image)
    want_dnf = p_dnf.to_input(decode_image(data).image)
    assert np.array_equal(out[pixel_column(0)][0], want_clip) and np.array_equal(out[pixel_column(1)][0], want_dnf)
    assert not np.array_equal(want_clip, p_clip.to_input(decode_image(data).image))  # the decode paths really differ here
    alone = load_images({"uri": np.array([str(tmp_path / "big.jpg")], dtype=object)}, specs=[clip])
    assert np.array_equal(alone[pixel_column(0)][0], want_clip)  # as when the CLIP detector was trained (embedded alone)


def test_a_detector_trained_with_another_decode_is_refused_and_another_precision_warned(ray_local, tmp_path, capsys):
    from detector_core.method.extractors import feature_compute

    spec = FeatureSpec(clip_model="test-tiny", feature_mode="image")
    here = feature_compute(spec, gpu=False)
    assert here == {"precision": "fp32", "jpeg_draft_size": 128, "resize": "bicubic"}
    torch.manual_seed(0)
    for name, recorded in (("draft", {**here, "jpeg_draft_size": 448}), ("resize", {**here, "resize": "bilinear"}),
                           ("bf16", {**here, "precision": "bf16"})):
        save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=spec, feature_compute=recorded), str(tmp_path / name))
    assert load_bundle(str(tmp_path / "bf16")).feature_compute["precision"] == "bf16"  # recorded, and kept by the content hash
    bucket = tmp_path / "bucket"
    _images(bucket, 2, 7)
    for name, key in (("draft", "jpeg_draft_size 448"), ("resize", "resize 'bilinear'")):
        with pytest.raises(JobError) as e:
            scan.main(["--detector", str(tmp_path / name), "--input", str(bucket), "--output", str(tmp_path / f"out-{name}")])
        assert str(e.value).startswith("detector") and key in str(e.value), e.value
        assert not (tmp_path / f"out-{name}").exists()  # refused before anything was written
    summary = scan.main(["--detector", str(tmp_path / "bf16"), "--input", str(bucket), "--output", str(tmp_path / "out")])
    assert "trained on bf16 features and this scan computes fp32" in capsys.readouterr().err
    (d,) = summary["detectors"]
    assert d["feature_compute"] == {"trained": {**here, "precision": "bf16"}, "scanned": here} and summary["scored"] == 2


def test_no_jpeg_draft_makes_png_and_jpeg_the_same_function_and_scans_follow_the_bundle(ray_local, tmp_path, capsys):
    """--no-jpeg-draft: a large picture as PNG and as JPEG q100 4:4:4 gives features no further apart than
    the JPEG's own full and draft decodes; a bundle trained so is scanned with full decodes, not refused."""
    from detector_core.method.extractors import feature_compute
    from jobs.scanning.decoding import load_images
    from jobs.scanning.pipeline import Embedder

    rng = np.random.default_rng(9)
    picture = Image.fromarray(np.clip(np.asarray(make_image(rng, "real", size=(96, 128)).resize((1024, 768), Image.BICUBIC)).astype(np.int16)
                                      + rng.integers(-8, 9, size=(768, 1024, 3)), 0, 255).astype(np.uint8))
    (tmp_path / "p.png").write_bytes(_save(picture, "PNG"))
    (tmp_path / "p.jpg").write_bytes(_save(picture, "JPEG", quality=100, subsampling=0))
    spec = FeatureSpec(clip_model="test-tiny")
    embed = Embedder(spec)

    def features(name: str, draft: bool) -> np.ndarray:
        batch = load_images({"uri": np.array([str(tmp_path / name)], dtype=object)}, specs=[spec], draft=draft)
        return embed.extract(batch)[0].numpy()[0]

    jpeg_full, jpeg_draft, png = features("p.jpg", False), features("p.jpg", True), features("p.png", False)
    assert np.abs(png - jpeg_full).max() <= np.abs(jpeg_full - jpeg_draft).max()
    assert np.abs(jpeg_full - jpeg_draft).max() > 0  # the draft path was really taken

    torch.manual_seed(0)
    full = {**feature_compute(spec, gpu=False, draft=False)}
    assert full["jpeg_draft_size"] == 0
    model = DetectorMLP(64).eval()
    save_bundle(DetectorBundle(model=model, features=spec, feature_compute=full), str(tmp_path / "full"))
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "p.jpg").write_bytes((tmp_path / "p.jpg").read_bytes())
    summary = scan.main(["--detector", str(tmp_path / "full"), "--input", str(bucket), "--output", str(tmp_path / "out")])
    (d,) = summary["detectors"]
    assert d["feature_compute"]["scanned"] == full and summary["scored"] == 1
    from detector_core.tables.catalog import read_table

    (logit,) = read_table(str(tmp_path / "out"), "scores")["logit"].to_pylist()
    with torch.no_grad():
        assert logit == pytest.approx(float(model(torch.from_numpy(jpeg_full)[None])), abs=1e-5)

    # Two detectors of one extractor trained with different decodes cannot share a pass.
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=spec, feature_compute=feature_compute(spec, gpu=False)), str(tmp_path / "draft"))
    with pytest.raises(JobError, match="decoded JPEGs differently"):
        scan.main(["--detector", str(tmp_path / "full"), "--ensemble", str(tmp_path / "draft"), "--input", str(bucket),
                   "--output", str(tmp_path / "out2")])
