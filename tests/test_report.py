"""The review page from a real scan: contents checked in the HTML and the table, and in a real headless Chromium.

The browser tests drive Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
through Playwright, with the page served over HTTP from its folder as a bucket's static
hosting would: the page loads with no console errors, its thumbnail files decode, no
script runs from an object's name; verdicts given with the keyboard (the reviewer's name
asked once, first) survive a reload, export as CSV (a formula-like note neutralised) and
JSON, import into the verdicts table exactly once, and the next page hides them. Without a
Chromium these skip and say why. The 10,000-card queue is ``tests/test_review_queue.py``.
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import needs_chromium, serve

from detector_core.demo import encode, make_image
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.extractors import FeatureSpec
from detector_core.method.features import ClipEncoder
from detector_core.method.model import DetectorMLP
from detector_core.sources.images import decode_image
from detector_core.tables.catalog import read_table
from jobs import report, scan
from jobs.reporting.page import QUEUE_FLAGGED, QUEUE_SAMPLE
from jobs.reporting.thumbnails import asset_name

NAUGHTY = 'odd <script>alert(1) & "quote" <img src=x onerror=alert(2)>.png'  # no "/": it is one file name


@pytest.fixture(scope="module")
def scanned(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(21)
    files = {f"img_{i:02d}.png": encode(make_image(rng)) for i in range(15)}
    files[NAUGHTY] = encode(make_image(rng))
    enc = ClipEncoder("test-tiny", "none")
    torch.manual_seed(3)
    model = DetectorMLP(64).eval()
    pixels = torch.stack([enc.preprocess(decode_image(b).image) for b in files.values()])
    with torch.no_grad():
        logits = model(enc.encode(pixels, None, "image")).double().numpy()
    # The naughty name sorts first among the flagged: threshold below its logit.
    thr = float(min(np.median(logits), logits[-1] - 1e-6))
    save_bundle(DetectorBundle(model=model, features=FeatureSpec(clip_model="test-tiny", feature_mode="image"), threshold_logit=thr),
                str(root / "detector"))
    bucket = root / "bucket"
    bucket.mkdir()
    for name, data in {**files, "broken.jpg": b"\xff\xd8 not really", "page.jpg": b"<html></html>"}.items():
        (bucket / name).write_bytes(data)
    summary = scan.main(["--detector", str(root / "detector"), "--input", str(bucket), "--output", str(root / "out")])
    return {"out": root / "out", "summary": summary, "flagged": read_table(str(root / "out"), "flagged")}


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts, self.text, self.data, self._in = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in = dict(attrs).get("id") or "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in == "review-data":
            self.data = json.loads(data)
        elif self._in is None:
            self.text.append(data)


def _page(path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text())
    return p


def test_page_queue_sample_thumbnail_files_and_escaping(scanned, tmp_path):
    from detector_core.storage import open_fs
    from detector_core.tables.lease import Lease

    n_flagged = scanned["flagged"].num_rows
    assert 3 < n_flagged < 16
    args = ["--scan", str(scanned["out"]), "--out", str(tmp_path / "r.html"), "--max-cards", "3", "--band", "1.0", "--max-band", "4"]
    # While a scan still writes the output, the night's flags are not all in: no sample is drawn yet.
    lease = Lease(*open_fs(str(scanned["out"])), "scan-still-running")
    lease.acquire()
    with lease:
        early = report.main(args)
    assert (early["sample"], early["sample_drawn_now"]) == (0, 0) and early["flagged_shown"] == 3
    counts = report.main(args)
    p = _page(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    cards = p.data["cards"]
    queue = [i for i, q in enumerate(cards["q"]) if q & QUEUE_FLAGGED]
    assert counts["flagged"] == n_flagged and counts["flagged_shown"] == 3 == len(queue) and counts["band_shown"] == 4
    # the queue holds the 3 highest scores; the sample holds every flagged row (fewer than 385)
    want = sorted(scanned["flagged"]["score"].to_pylist(), reverse=True)[:3]
    np.testing.assert_allclose(sorted((cards["score"][i] for i in queue), reverse=True), want, rtol=1e-5)
    sample = read_table(str(scanned["out"]), "precision_sample")
    assert sample.num_rows == n_flagged == counts["sample"] == counts["sample_drawn_now"]
    assert sorted(sample["uri"].to_pylist()) == sorted(scanned["flagged"]["uri"].to_pylist())
    assert sorted(sample["sample_order"].to_pylist()) == list(range(1, n_flagged + 1))
    assert sorted(o for o, q in zip(cards["order"], cards["q"]) if q & QUEUE_SAMPLE) == list(range(1, n_flagged + 1))
    # thumbnails are files beside the page (one per image, named by a hash of its uri), not in it
    files = tmp_path / "r_files"
    for i, name in enumerate(cards["thumb"]):
        assert name == asset_name(cards["uri"][i]) and (files / "t" / name).stat().st_size > 300
        assert (files / "p" / name).exists()
    assert "data:image" not in page and counts["page_bytes"] == len(page.encode())
    text = "".join(p.text)
    assert f"{n_flagged - 3} more flagged images are not in the queue" in text
    assert [s.get("type") for s in p.scripts] == ["application/json", None]  # the data block and the page's own script
    assert any(u.endswith(NAUGHTY) for u in cards["uri"]) and "<script>alert(1)" not in page and "<img src=x" not in page
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    assert "not_an_image" in text and counts["errors"] == 2
    # A second report of the night keeps the sample (drawn once) and makes no thumbnail again.
    mtimes = {n.name: n.stat().st_mtime_ns for n in (files / "t").iterdir()}
    again = report.main(["--scan", str(scanned["out"]), "--out", str(tmp_path / "r.html"), "--max-cards", "3", "--sample-seed", "9"])
    assert again["sample_drawn_now"] == 0 and read_table(str(scanned["out"]), "precision_sample").num_rows == n_flagged
    assert {n.name: n.stat().st_mtime_ns for n in (files / "t").iterdir()} == mtimes


def test_out_must_name_the_page(scanned, tmp_path):
    from jobs.common.errors import JobError

    with pytest.raises(JobError, match="name the page itself"):
        report.main(["--scan", str(scanned["out"]), "--out", str(tmp_path / "reports/")])


@needs_chromium
def test_page_in_headless_chromium(scanned, tmp_path, chromium):
    out = tmp_path / "report.html"
    counts = report.main(["--scan", str(scanned["out"]), "--out", str(out), "--band", "0.02"])
    n_flagged = scanned["flagged"].num_rows
    problems, dialogs = [], []
    shot = tmp_path / "report.png"
    with serve(tmp_path) as url:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{url}/report.html")
        page.wait_for_load_state("networkidle")
        assert page.locator("#cards .card").count() == n_flagged == counts["flagged_shown"]
        # every thumbnail really decoded in the browser, from its file
        assert page.evaluate("Array.from(document.querySelectorAll('#cards img.thumb')).every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator(".uri", has_text="<script>alert(1)").count() >= 1
        page.fill("#prefix", str(scanned["out"].parent / "bucket" / "odd <script>"))  # a local path's prefix is the path
        assert page.locator("#cards .card").count() == 1
        page.fill("#prefix", "")
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    assert problems == [] and dialogs == []
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("REPORT_SCREENSHOT_DIR")
    if keep:  # CI or a person can keep the picture
        shutil.copy(shot, os.path.join(keep, "report.png"))


@needs_chromium
def test_keyboard_verdicts_persist_export_import_once_and_hide(scanned, tmp_path, chromium):
    """Keys give verdicts (name asked first), a reload keeps them, CSV/JSON import once, and the next page hides them."""
    from playwright.sync_api import expect

    from jobs import audit

    out = tmp_path / "report.html"
    report.main(["--scan", str(scanned["out"]), "--out", str(out), "--band", "0.0"])
    flagged = scanned["flagged"].sort_by([("score", "descending"), ("uri", "ascending")]).to_pylist()
    note = '=HYPERLINK("http://evil.example/x", "a \'known\' camera")'
    chosen = {flagged[0]["uri"]: ("generated", ""), flagged[1]["uri"]: ("real", note), flagged[2]["uri"]: ("unsure", "")}
    files = {}
    with serve(tmp_path) as url:
        ctx = chromium.new_context(accept_downloads=True)
        page = ctx.new_page()
        page.goto(f"{url}/report.html")
        expect(page.locator("#cards .card.current")).to_have_attribute("data-uri", flagged[0]["uri"])
        page.keyboard.press("g")  # no name yet: the page asks before it records anything
        expect(page.locator("#name-dialog")).to_be_visible()
        assert page.evaluate("Object.keys(JSON.parse(localStorage.getItem('detector-review:' + document.body.dataset.scan) || '{}')).length") == 0
        page.fill("#reviewer-name", "rita")
        page.press("#reviewer-name", "Enter")
        expect(page.locator("#vcount")).to_have_text("1 verdict in this browser")
        expect(page.locator("#cards .card.current")).to_have_attribute("data-uri", flagged[1]["uri"])  # moved on
        page.keyboard.press("n")  # the note of the current card
        page.keyboard.type(note)
        page.keyboard.press("Enter")
        page.keyboard.press("2")
        page.keyboard.press("u")
        expect(page.locator("#vcount")).to_have_text("3 verdicts in this browser")
        page.wait_for_function("() => Object.keys(JSON.parse(localStorage.getItem('detector-review:' + document.body.dataset.scan) || '{}')).length === 3")
        page.reload()
        cards = page.locator("#cards .card")
        expect(page.locator("#vcount")).to_have_text("3 verdicts in this browser")
        for i in range(cards.count()):
            pressed = [b.get_attribute("data-verdict") for b in cards.nth(i).locator("button[aria-pressed=true]").all()]
            want = chosen.get(cards.nth(i).get_attribute("data-uri"))
            assert pressed == ([want[0]] if want else []), (i, pressed)
        assert cards.nth(1).locator(".vnote").input_value() == note
        assert page.locator("#who").text_content() == "rita"
        for kind in ("csv", "json"):
            with page.expect_download() as d:
                page.click(f"#export-{kind}")
            files[kind] = tmp_path / d.value.suggested_filename
            d.value.save_as(files[kind])
        ctx.close()
    assert files["csv"].name.startswith("verdicts-") and files["csv"].name.endswith("-rita.csv")
    assert "'=HYPERLINK" in files["csv"].read_text() and '"=HYPERLINK' not in files["csv"].read_text()  # neutralised in the CSV
    first = audit.main(["verdicts", "import", str(files["csv"]), "--scan", str(scanned["out"])])
    assert (first["added"], first["refused_unknown"]) == (3, 0)
    table = read_table(str(scanned["out"]), "verdicts").to_pylist()
    assert {r["uri"]: (r["verdict"], r["note"] or "") for r in table} == chosen  # the note restored exactly
    assert {(r["reviewer"], r["detector_id"], r["scan_id"]) for r in table} == {("rita", flagged[0]["detector_id"], scanned["summary"]["scan_id"])}
    for again in (files["json"], files["csv"]):  # the same verdicts in the other format, and the same file: nothing added
        assert audit.main(["verdicts", "import", str(again), "--scan", str(scanned["out"])])["added"] == 0
    assert read_table(str(scanned["out"]), "verdicts").num_rows == 3

    counts = report.main(["--scan", str(scanned["out"]), "--out", str(tmp_path / "next.html"), "--band", "0.0"])
    assert counts["reviewed_shown"] == 3 and counts["precision_nights"] == 1
    with serve(tmp_path) as url:
        page = chromium.new_page()
        page.goto(f"{url}/next.html")
        shown = page.evaluate("window.reviewQueue.keys()")
        assert len(shown) == len(flagged) - 3 and not {k.split("\t")[0] for k in shown} & set(chosen)  # imported: hidden
        page.select_option("#show", "imported")
        assert page.locator("#cards .card").count() == 3 and page.locator("#cards .reviewed").count() == 3
        page.close()
