"""The scan job on a real local Ray: every object accounted for, incremental, resumable, exact, on S3."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from detector_core.bundle import DetectorBundle, load_bundle, save_bundle
from detector_core.demo import encode, make_image
from detector_core.extractors import FeatureSpec
from detector_core.features import ClipEncoder
from detector_core.images import decode_image
from detector_core.model import DetectorMLP
from jobs import scan


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = DetectorMLP(64).eval()
    path = tmp_path_factory.mktemp("bundle") / "detector"
    save_bundle(DetectorBundle(model=model, features=FeatureSpec(clip_model="test-tiny", feature_mode="image"), threshold_logit=0.0), str(path))
    return path


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


def _tables(out, so=None):
    from detector_core.tables import open_table

    res = {}
    for name in ("scores", "flagged", "errors"):
        ds = open_table(str(out), name, so)
        res[name] = None if ds is None else ds.to_table()
    return res


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
    assert not (out / "_staging").exists() or not list((out / "_staging").iterdir())
    assert set(scores["scan_date"].to_pylist()) == {summary["scan_date"]} and set(scores["bucket"].to_pylist()) == {"local"}

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


def test_incremental_rerun_and_resume_after_a_crash(ray_local, bundle_dir, tmp_path):
    rng = np.random.default_rng(1)
    bucket = tmp_path / "bucket"
    _write(bucket, {f"img_{i:02d}.png": encode(make_image(rng)) for i in range(12)})
    out = tmp_path / "out"
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "4"]
    with pytest.raises(SystemExit):
        scan.main([*args, "--fail-after-chunks", "1"])
    assert _tables(out)["scores"] is None  # nothing visible from the unfinished scan
    resumed = scan.main(args)
    assert resumed["scored"] == 12
    uris = _tables(out)["scores"]["uri"].to_pylist()
    assert sorted(uris) == sorted(set(uris)) and len(uris) == 12

    again = scan.main(args)
    assert again["skipped"] == 12 and again["scored"] == 0
    assert _tables(out)["scores"].num_rows == 12  # no duplicate rows

    _write(bucket, {f"new_{i}.png": encode(make_image(rng)) for i in range(3)})
    (bucket / "img_00.png").write_bytes(encode(make_image(rng, size=(90, 91))))  # changed object
    third = scan.main(args)
    assert third["scored"] == 4 and third["skipped"] == 11
    assert _tables(out)["scores"].num_rows == 16


def test_scan_on_s3(ray_local, bundle_dir, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(2)
    for i in range(5):
        fs.pipe(f"{s3_bucket[5:]}/in/img_{i}.png", encode(make_image(rng)))
    fs.pipe(f"{s3_bucket[5:]}/in/broken.jpg", b"not an image")
    fs.put(str(bundle_dir), f"{s3_bucket[5:]}/models/detector", recursive=True)
    summary = scan.main(["--detector", f"{s3_bucket}/models/detector", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/scans"])
    t = _tables(f"{s3_bucket}/scans")
    assert summary["scored"] == 5 and summary["errors"] == 1
    assert t["scores"].num_rows == 5 and t["errors"]["uri"].to_pylist() == [f"{s3_bucket}/in/broken.jpg"]
    assert all(e for e in t["scores"]["etag"].to_pylist())
    assert set(t["scores"]["bucket"].to_pylist()) == {s3_bucket[5:]}
    assert fs.ls(f"{s3_bucket[5:]}/scans/scores/scan_date={summary['scan_date']}") == [
        f"{s3_bucket[5:]}/scans/scores/scan_date={summary['scan_date']}/bucket={s3_bucket[5:]}"]
    assert fs.exists(f"{s3_bucket[5:]}/scans/runs/{summary['scan_id']}.json")


def test_image_text_detector_refuses_to_scan_without_captions(bundle_dir, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "it"
    save_bundle(DetectorBundle(model=DetectorMLP(128), features=FeatureSpec(clip_model="test-tiny", feature_mode="image+text")), str(path))
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit):
        scan.main(["--detector", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])


def test_an_actor_that_dies_is_replaced_and_its_batch_retried(ray_local, bundle_dir, tmp_path):
    rng = np.random.default_rng(3)
    bucket = tmp_path / "bucket"
    _write(bucket, {f"img_{i:02d}.png": encode(make_image(rng)) for i in range(10)})
    marker = tmp_path / "crashed"
    summary = scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(tmp_path / "out"),
                         "--batch-size", "4", "--crash-actor-once", str(marker)])
    assert marker.exists()  # the actor really died once
    uris = _tables(tmp_path / "out")["scores"]["uri"].to_pylist()
    assert summary["scored"] == 10 and len(uris) == 10 == len(set(uris))


def test_manifest_without_etag_or_size_is_incremental_too(ray_local, bundle_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    bucket = tmp_path / "bucket"
    _write(bucket, {f"img_{i}.png": encode(make_image(rng)) for i in range(4)})
    pq.write_table(pa.table({"uri": [str(p) for p in sorted(bucket.iterdir())]}), tmp_path / "inventory.parquet")
    args = ["--detector", str(bundle_dir), "--input", str(tmp_path / "inventory.parquet"), "--output", str(tmp_path / "out")]
    assert scan.main(args)["scored"] == 4
    again = scan.main(args)  # the manifest gives only uris: already-scored uris are settled
    assert again["skipped"] == 4 and again["scored"] == 0
    assert _tables(tmp_path / "out")["scores"].num_rows == 4
