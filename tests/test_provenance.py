"""Provenance evidence read from real files: C2PA signed here with c2pa-python and a test CA, XMP, PNG chunks, EXIF.

Nothing is hand-faked: the C2PA manifests are signed by ``c2pa.Builder`` with a
certificate chain that ``cryptography`` makes here (an ECDSA root and signer:
``bench.bench_provenance.make_test_ca``, which the cost bench signs with too); the
XMP packets, PNG text chunks and EXIF tags are written by Pillow as the tools write them.
Hostile files (a 50 MB XMP packet, malformed JUMBF, a 10⁶-character text chunk, a
compressed chunk that inflates to 200 MB, a manifest pointing at a remote URL) are each
read within bounds, recorded, never raised, and the image still decodes (the compressed
chunk bomb is refused by Pillow's own decoder too: an errors row, as for any corrupt file).
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from bench.bench_provenance import IPTC, make_test_ca, sign
from detector_core.sources.images import decode_image
from detector_core.sources.provenance import MAX_TEXT_BYTES, Evidence, read_evidence


@pytest.fixture(scope="module")
def ca():
    """A test root CA and a C2PA signer certificate under it: (root PEM, signer chain PEM, signer key PEM)."""
    return make_test_ca()


def _image(fmt: str, seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_c2pa_generated_trusted_untrusted_tampered_and_stripped(ca, fmt, mime):
    root = ca[0]
    signed = sign(ca, _image(fmt), mime, "trainedAlgorithmicMedia")
    assert read_evidence(signed, trust_pem=root) == Evidence("declared_generated", "c2pa", "DiffuGen 2", "trusted")
    assert read_evidence(signed) == Evidence("declared_generated", "c2pa", "DiffuGen 2", "untrusted")  # valid, no anchor given
    # pixels changed after signing: the hash fails
    tampered = bytearray(signed)
    at = len(tampered) - 64 if fmt == "JPEG" else signed.index(b"IDAT") + 40
    tampered[at] ^= 0xFF
    got = read_evidence(bytes(tampered), trust_pem=root)
    assert got.c2pa_state == "invalid" and got.source == "c2pa" and "mismatch" in (got.error or "")
    # re-encoded without the manifest: nothing declared
    stripped = io.BytesIO()
    Image.open(io.BytesIO(signed)).save(stripped, fmt)
    assert read_evidence(stripped.getvalue()) == Evidence()
    captured = sign(ca, _image(fmt, 1), mime, "digitalCapture", agent="Camera App")
    assert read_evidence(captured, trust_pem=root).declared == "declared_captured"


def _xmp(source_type: str, tool: str = "") -> bytes:
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
            'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
            f'Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"' + (f' xmp:CreatorTool="{tool}"' if tool else "")
            + '/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def test_xmp_digital_source_type_in_jpeg_and_png():
    jpeg = _image("JPEG", xmp=_xmp("trainedAlgorithmicMedia", "Image Creator 3"))
    assert read_evidence(jpeg) == Evidence("declared_generated", "xmp", "Image Creator 3")
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp("compositeWithTrainedAlgorithmicMedia").decode(), zip=True)
    assert read_evidence(_image("PNG", pnginfo=info)) == Evidence("declared_edited", "xmp")
    assert read_evidence(_image("JPEG", xmp=_xmp("digitalCapture"))).declared == "declared_captured"
    assert read_evidence(_image("JPEG", xmp=_xmp("somethingElse"))) == Evidence()


def test_generator_chunks_and_exif_software():
    a1111 = PngImagePlugin.PngInfo()
    a1111.add_text("parameters", "a cat in a hat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                                 "Seed: 1, Size: 512x512, Model: sd_xl_base_1.0, Version: v1.6.0")
    assert read_evidence(_image("PNG", pnginfo=a1111)) == Evidence("declared_generated", "png_text", "AUTOMATIC1111 (sd_xl_base_1.0)")
    comfy = PngImagePlugin.PngInfo()
    comfy.add_text("prompt", json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}))
    comfy.add_text("workflow", json.dumps({"nodes": []}), zip=True)
    assert read_evidence(_image("PNG", pnginfo=comfy)) == Evidence("declared_generated", "png_text", "ComfyUI")
    nai = PngImagePlugin.PngInfo()
    nai.add_text("Software", "NovelAI")
    nai.add_text("Comment", json.dumps({"steps": 28, "sampler": "k_euler"}))
    assert read_evidence(_image("PNG", pnginfo=nai)) == Evidence("declared_generated", "png_text", "NovelAI")
    plain = PngImagePlugin.PngInfo()
    plain.add_text("Title", "holiday")
    assert read_evidence(_image("PNG", pnginfo=plain)) == Evidence()
    exif = Image.Exif()
    exif[0x0131] = "Adobe Firefly Image 3"
    assert read_evidence(_image("JPEG", exif=exif)) == Evidence("declared_generated", "exif", "Adobe Firefly Image 3")
    exif[0x0131] = "Apple iOS 17.1"
    assert read_evidence(_image("JPEG", exif=exif)) == Evidence()  # a camera's software declares nothing


class _Counter(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hostile_evidence_is_bounded_recorded_and_the_image_still_decodes(ca):
    # a 50 MB XMP packet (a PNG iTXt chunk): read up to the bound, its end never looked for past it
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/">' + " " * (50 << 20) + "</x:xmpmeta>")
    huge = _image("PNG", pnginfo=info)
    got = read_evidence(huge)
    assert got.declared is None and "no packet end" in got.error and "over 1 MB" in got.error
    # malformed JUMBF: a signed file whose manifest store bytes are scrambled
    signed = sign(ca, _image("JPEG"), "image/jpeg", "trainedAlgorithmicMedia")
    at = signed.index(b"jumb")
    broken = signed[:at + 40] + bytes(b ^ 0x5A for b in signed[at + 40:at + 400]) + signed[at + 400:]
    got = read_evidence(broken)
    assert got.source == "c2pa" and got.c2pa_state in ("invalid", "unreadable") and got.error
    # a 10⁶-character text chunk, and a compressed one that inflates to 200 MB: read up to the bound
    long = PngImagePlugin.PngInfo()
    long.add_text("Comment", "x" * 1_000_000)
    assert read_evidence(_image("PNG", pnginfo=long)) == Evidence()
    png = _image("PNG")
    bomb = zlib.compress(b"\x00" * (200 << 20), 9)
    chunk = b"Comment\x00\x00" + bomb
    crc = zlib.crc32(b"zTXt" + chunk).to_bytes(4, "big")
    bombed = png[:33] + len(chunk).to_bytes(4, "big") + b"zTXt" + chunk + crc + png[33:]
    got = read_evidence(bombed)
    assert f"over {MAX_TEXT_BYTES >> 20} MB" in got.error and got.declared is None
    # a manifest that lives at a remote URL: never fetched
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.c2pa"
        remote = _image("JPEG", xmp=(f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                                     f'<rdf:Description xmlns:dcterms="http://purl.org/dc/terms/" dcterms:provenance="{url}"/>'
                                     f'</rdf:RDF></x:xmpmeta>').encode())
        got = read_evidence(remote)
    finally:
        server.shutdown()
        server.server_close()
    assert _Counter.hits == 0 and got.declared is None
    # The object is still an image to score; the bomb too: Pillow refuses its text (MAX_TEXT_CHUNK), so its pixels
    # are decoded without the text chunks, which the evidence reader has already read within its bounds.
    for data in (huge, broken, remote, bombed):
        assert decode_image(data).image.size == (128, 96)


def test_a_scan_records_evidence_flags_declared_and_answers_agreement(ray_local, bundle_dir, ca, tmp_path):
    """A folder of known files scanned with --c2pa-trust and --flag-declared: every row's evidence, flag_reason and the recall per generator."""
    from detector_core.tables.catalog import read_table
    from jobs import audit, scan

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    files, want = {}, {}
    for i in range(4):  # C2PA-signed generated images from one tool, trusted through the CA passed
        files[f"c2pa_{i}.jpg"] = sign(ca, _image("JPEG", 10 + i), "image/jpeg", "trainedAlgorithmicMedia", agent="DiffuGen 2")
        want[f"c2pa_{i}.jpg"] = ("declared_generated", "c2pa", "DiffuGen 2", "trusted")
    for i in range(3):  # A1111 PNGs
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"prompt {i}\nSteps: 20, Sampler: Euler a, Model: dreamy_v{i % 2}")
        files[f"a1111_{i}.png"] = _image("PNG", 20 + i, pnginfo=info)
        want[f"a1111_{i}.png"] = ("declared_generated", "png_text", f"AUTOMATIC1111 (dreamy_v{i % 2})", None)
    tampered = bytearray(sign(ca, _image("JPEG", 30), "image/jpeg", "trainedAlgorithmicMedia"))
    tampered[-64] ^= 0xFF
    files["tampered.jpg"] = bytes(tampered)
    want["tampered.jpg"] = ("declared_generated", "c2pa", "DiffuGen 2", "invalid")
    files["camera.jpg"] = _image("JPEG", 31, xmp=_xmp("digitalCapture", "Camera App"))
    want["camera.jpg"] = ("declared_captured", "xmp", "Camera App", None)
    for i in range(3):
        files[f"plain_{i}.jpg"] = _image("JPEG", 40 + i)
        want[f"plain_{i}.jpg"] = (None, None, None, None)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cut-off file\nSteps: 20, Model: dreamy_v0")
    files["cut.png"] = _image("PNG", 50, pnginfo=info)[:-300]  # declared, but its pixels are cut short: an errors row
    from imwatermark import WatermarkEncoder

    from detector_core.sources.watermark import WATERMARKS, with_watermark

    enc = WatermarkEncoder()
    enc.set_watermark("bits", WATERMARKS["sdxl"][0])
    png = io.BytesIO()
    Image.fromarray(enc.encode(_photo(np.random.default_rng(0), 384, 512), "dwtDct")).save(png, "PNG")  # as the SDXL pipeline marks
    files["sdxl.png"] = png.getvalue()
    marked = with_watermark(read_evidence(files["sdxl.png"]), np.asarray(decode_image(files["sdxl.png"]).image))
    assert marked.source == "watermark"  # this photo keeps its mark (seeded)
    want["sdxl.png"] = (marked.declared, marked.source, marked.generator, None)
    for name, data in files.items():
        (bucket / name).write_bytes(data)
    (tmp_path / "ca.pem").write_text(ca[0])
    out = str(tmp_path / "out")
    scan.main(["--detector", str(bundle_dir), "--input", str(bucket), "--output", out, "--c2pa-trust", str(tmp_path / "ca.pem"),
               "--flag-declared", "--watermarks"])
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_table(out, "scores").to_pylist()}
    assert set(rows) == set(want)
    for name, (declared, source, generator, state) in want.items():
        r = rows[name]
        assert (r["declared"], r["evidence_source"], r["declared_generator"], r["c2pa_state"]) == (declared, source, generator, state), name
        # --watermarks: an image of 256 px a side or more gets its best match, declared or not; smaller ones are not read
        assert (r["watermark"] is not None) == (name == "sdxl.png"), name
        assert (r["evidence_error"] is not None) == (name == "tampered.jpg"), name  # "c2pa: assertion.dataHash.mismatch"
        by_score, by_declared = r["logit"] >= 0.0, declared == "declared_generated" and state != "invalid"
        assert r["flagged"] == (by_score or by_declared), name
        assert r["flag_reason"] == ("both" if by_score and by_declared else "score" if by_score else "declared" if by_declared else None)
    err = read_table(out, "errors").to_pylist()
    assert [(e["uri"].rsplit("/", 1)[-1], e["error_stage"], e["declared"], e["evidence_source"]) for e in err] == [
        ("cut.png", "decode", "declared_generated", "png_text")]

    got = audit.main(["query", "agreement", "--scan", out, "--format", "csv", "--out", str(tmp_path / "a.csv")]).to_pylist()
    counted: dict[str, list[int]] = {}
    for name, (declared, _, generator, state) in want.items():
        if declared == "declared_generated" and state != "invalid":
            counted.setdefault(generator, [0, 0])
            counted[generator][0] += 1
            counted[generator][1] += rows[name]["logit"] >= 0.0
    assert {g["generator"]: [g["declared_generated"], g["flagged_by_score"]] for g in got} == counted
    for g in got:
        assert g["recall"] == pytest.approx(g["flagged_by_score"] / g["declared_generated"])
    prov = audit.main(["query", "provenance", "--scan", out, "--format", "csv", "--out", str(tmp_path / "p.csv")]).to_pylist()
    by = {(p["evidence_source"], p["declared"], p["c2pa_state"]): p["objects"] for p in prov}
    assert by == {("c2pa", "declared_generated", "trusted"): 4, ("png_text", "declared_generated", ""): 3 + 1,
                  ("watermark", "declared_generated", ""): 1,
                  ("c2pa", "declared_generated", "invalid"): 1, ("xmp", "declared_captured", ""): 1, ("none", "none", ""): 3}
    # The review page marks each card with its evidence (and why a declared file is flagged).
    from jobs import report

    report.main(["--scan", out, "--out", str(tmp_path / "review.html"), "--preview-size", "0", "--precision-sample", "0"])
    page = (tmp_path / "review.html").read_text()
    data = json.loads(page.split('id="review-data">', 1)[1].split("</script>", 1)[0])
    cards = data["cards"]
    ev = {u.rsplit("/", 1)[-1]: e for u, e in zip(cards["uri"], cards["ev"])}
    for name in ("c2pa_0.jpg", "a1111_0.png", "tampered.jpg", "camera.jpg"):
        if name in ev:  # the queue holds flagged rows and the band
            assert ev[name][:4] == list(want[name]) and ev[name][4] == rows[name]["flag_reason"], name
    assert ev["c2pa_0.jpg"] is not None and all(ev.get(f"plain_{i}.jpg") is None for i in range(3))

    # The declared images become labelled training rows (generated 1, captured 0; the tampered file left out).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import train
    from jobs.training.config import TrainConfig

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(bucket / "plain_0.jpg"), str(bucket / "camera.jpg")], "label": [0, 1]}), manifest)
    path, counts = train._with_declared(TrainConfig(manifest=str(manifest), output=str(tmp_path / "run"), declared_labels=out), None)
    got = {r["uri"].rsplit("/", 1)[-1]: (r["label"], r["split"]) for r in pq.read_table(path).to_pylist()}
    assert got == {"plain_0.jpg": (0, None), "camera.jpg": (0, "train"),  # the manifest said generated; the file says captured
                   **{f"c2pa_{i}.jpg": (1, "train") for i in range(4)}, **{f"a1111_{i}.png": (1, "train") for i in range(3)},
                   "sdxl.png": (1, "train")}
    assert (counts["generated"], counts["real"], counts["relabelled"]) == (8, 1, 1)


def _photo(rng, h=768, w=1024) -> np.ndarray:
    from detector_core.demo import make_image

    im = np.asarray(make_image(rng, size=(h, w)), dtype=np.float64)
    return np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)  # a photo's noise, not a flat synthetic


def test_invisible_watermarks_are_counted_in_bits_with_a_computed_false_positive_bound():
    """SD and SDXL marks embedded by invisible-watermark's encoder as the reference code does; read back as agreeing bits.

    The DWT-DCT mark is fragile even through a lossless PNG: on four seeded photos per pattern
    it comes back with 27-48 of SDXL's 48 bits (the issue saw 29, 32, 43 and 48 on real photos),
    so the count is the result, and it declares only at the threshold whose chance on an
    unmarked image is at most 10⁻⁶.
    """
    from imwatermark import WatermarkDecoder, WatermarkEncoder
    from scipy.stats import binom

    from detector_core.sources.watermark import WATERMARKS, watermark_agreement, watermark_threshold, with_watermark

    for name, (bits, _) in WATERMARKS.items():  # the bound: an unmarked image's bits as fair coins, three patterns read
        t = watermark_threshold(len(bits))
        assert binom.sf(t - 1, len(bits), 0.5) <= 1e-6 / 3 < binom.sf(t - 2, len(bits), 0.5)
    rng = np.random.default_rng(5)
    after_jpeg, declared = {}, {}
    for name, (bits, bgr) in WATERMARKS.items():
        declared[name] = 0
        for _ in range(4):
            photo = _photo(rng)
            enc = WatermarkEncoder()
            enc.set_watermark("bits", bits)
            marked = enc.encode(np.ascontiguousarray(photo[:, :, ::-1]) if bgr else photo.copy(), "dwtDct")
            marked = np.ascontiguousarray(marked[:, :, ::-1]) if bgr else marked  # back to RGB, as the scripts save it
            png = io.BytesIO()
            Image.fromarray(marked).save(png, "PNG")
            data = png.getvalue()
            pixels = np.asarray(decode_image(data).image)
            raw = WatermarkDecoder("bits", len(bits)).decode(np.ascontiguousarray(pixels[:, :, ::-1] if bgr else pixels), "dwtDct")
            agree = sum(int(g) == b for g, b in zip(raw, bits))
            assert watermark_agreement(pixels)[name] == (agree, len(bits))
            got = with_watermark(read_evidence(data), pixels)
            if agree >= watermark_threshold(len(bits)):
                declared[name] += 1
                assert (got.declared, got.source, got.watermark) == ("declared_generated", "watermark", f"{name} {agree}/{len(bits)}")
                assert f"{agree}/{len(bits)} bits" in got.generator
            else:
                assert got.declared is None and got.watermark is not None  # a count below the threshold: recorded, no claim
        jpeg = io.BytesIO()
        Image.fromarray(marked).save(jpeg, "JPEG", quality=90)
        after_jpeg[name] = watermark_agreement(np.asarray(decode_image(jpeg.getvalue()).image))[name]
    assert all(n >= 2 for n in declared.values()), declared
    # What survives a JPEG q90 re-encode is reported (docs/scaling.md), not asserted away: here, nothing declares.
    print("agreeing bits after JPEG q90:", after_jpeg)
    assert all(a < watermark_threshold(n) for a, n in after_jpeg.values())
    for _ in range(4):  # unmarked photos: a count for each pattern, none at its threshold, nothing declared
        photo = _photo(rng)
        found = watermark_agreement(photo)
        assert all(a < watermark_threshold(n) for a, n in found.values()), found
        assert with_watermark(Evidence(), photo).declared is None


def test_a_schema_4_output_gains_the_evidence_columns_in_place(tmp_path):
    """Tables without the evidence columns (schema 4) get them by Iceberg schema evolution: old rows read null, new rows whole."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from detector_core import schema as S
    from detector_core.tables import definitions as T
    from detector_core.tables.catalog import ScanOutput, data_file_path
    from jobs import audit

    root = str(tmp_path / "out")
    out = ScanOutput.open(root)
    for name in ("scores", "flagged", "errors"):  # what a version-4 output's tables looked like
        with out.table(name).transaction() as tx:
            with tx.update_schema() as update:
                for col in T.ADDED_COLUMNS:
                    if col in T.TABLE_SCHEMAS[name].names:
                        update.delete_column(col)
            tx.set_properties({"detector.schema-version": "4"})

    def night(day: dt.date, evidence: bool) -> None:
        scan_id = f"scan-{day}"
        rows = [{S.URI: f"s3://up/{day}/{i}.jpg", S.SCORE: 0.9, S.LOGIT: 2.2, S.THRESHOLD: 0.5, S.FLAGGED: True, S.DETECTOR_ID: "d",
                 S.SCAN_ID: scan_id, S.SCANNED_AT: dt.datetime.combine(day, dt.time(1), dt.timezone.utc), S.SCAN_DATE: day,
                 S.BUCKET: "up", **({S.DECLARED: "declared_generated", S.EVIDENCE_SOURCE: "c2pa", S.C2PA_STATE: "trusted",
                                     S.FLAG_REASON: "score"} if evidence and i < 2 else {})} for i in range(3)]
        table = pa.Table.from_pylist(rows, schema=T.SCORES_SCHEMA)
        if not evidence:  # the old code's files: no such columns at all
            table = table.drop_columns(list(T.ADDED_COLUMNS))
        files = {"errors": []}
        for name in ("scores", "flagged"):
            path = data_file_path(out.uri, name, day.isoformat(), "up", scan_id)
            out.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            pq.write_table(table, path)
            files[name] = [path]
        run = {"scan_id": scan_id, "unit": 0, "status": "completed", "scan_date": day.isoformat(), "detector_id": "d", "scored": 3,
               "flagged": 3, "errors": 0, "started_at": rows[0][S.SCANNED_AT].isoformat(), "committed_at": rows[0][S.SCANNED_AT].isoformat(),
               "config": "{}", "schema_version": "4" if not evidence else T.SCHEMA_VERSION}
        out.commit_unit({"scan_id": scan_id, "unit": 0, "files": files, "runs": [run]})

    d1, d2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)
    night(d1, evidence=False)
    out = ScanOutput.open(root)  # what the next scan does first
    for name in ("scores", "flagged", "errors"):
        table = out.table(name)
        assert set(T.ADDED_COLUMNS) & set(T.TABLE_SCHEMAS[name].names) <= set(table.schema().column_names), name
        assert table.properties["detector.schema-version"] == T.SCHEMA_VERSION
    night(d2, evidence=True)
    scores = out.read("scores")
    old = scores.filter(pc.equal(scores[S.SCAN_DATE], d1))
    new = scores.filter(pc.equal(scores[S.SCAN_DATE], d2))
    assert old[S.DECLARED].null_count == 3 and old[S.FLAG_REASON].null_count == 3
    assert new[S.DECLARED].to_pylist().count("declared_generated") == 2 and new[S.DECLARED].null_count == 1
    got = audit.main(["query", "provenance", "--scan", root, "--format", "csv", "--out", str(tmp_path / "p.csv")]).to_pylist()
    assert {(str(g["scan_date"]), g["evidence_source"], g["declared"], g["objects"]) for g in got} == {
        (str(d1), "none", "none", 3), (str(d2), "c2pa", "declared_generated", 2), (str(d2), "none", "none", 1)}
