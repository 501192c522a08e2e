"""The review page from a real scan: contents checked in the HTML and in a real headless Chromium.

The browser test drives Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
through Playwright: the page loads with no console errors, shows the expected number of
thumbnails, runs no script from an object's name, and a screenshot is written; verdicts
clicked on the page survive a reload, export as CSV and JSON, and import into the verdicts
table exactly once. Without a Chromium these skip and say why.
"""

from __future__ import annotations

import html.parser
import os
import shutil

import numpy as np
import pytest
import torch

from detector_core.bundle import DetectorBundle, save_bundle
from detector_core.catalog import read_table
from detector_core.demo import encode, make_image
from detector_core.extractors import FeatureSpec
from detector_core.features import ClipEncoder
from detector_core.images import decode_image
from detector_core.model import DetectorMLP
from jobs import report, scan

NAUGHTY = 'odd <script>alert(1) & "quote" <img src=x onerror=alert(2)>.png'  # no "/": it is one file name
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
        self.imgs, self.scripts, self.text, self._in_script = [], 0, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and "thumb" in (a.get("class") or ""):
            self.imgs.append(a)
        if tag == "script":
            self.scripts += 1
            self._in_script = True

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)


def test_page_contents_caps_and_escaping(scanned, tmp_path):
    n_flagged = scanned["flagged"].num_rows
    assert 3 < n_flagged < 16
    counts = report.main(["--scan", str(scanned["out"]), "--out", str(tmp_path / "r.html"), "--max-thumbnails", "3",
                          "--band", "1.0", "--max-band", "4"])
    page = (tmp_path / "r.html").read_text()
    p = _Collect()
    p.feed(page)
    assert counts["flagged"] == n_flagged and counts["flagged_shown"] == 3 and counts["band_shown"] == 4
    assert len(p.imgs) == 3 + 4 and all(i["src"].startswith("data:image/jpeg;base64,") for i in p.imgs)
    text = "".join(p.text)
    assert f"{n_flagged - 3} more flagged images not shown" in text
    assert p.scripts == 1  # only the page's own filter script; the object name is text
    assert NAUGHTY in text and "<script>alert(1)" not in page and "<img src=x" not in page
    assert "http://" not in page and "https://" not in page  # self-contained
    # cards sorted by score, highest first, and the highest is the top flagged row
    flagged_part = page.split('id="flagged"')[1].split('id="band-heading"')[0]
    scores = [float(s.split('"')[0]) for s in flagged_part.split('data-score="')[1:]]
    want = sorted(scanned["flagged"]["score"].to_pylist(), reverse=True)[:3]
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert "not_an_image" in text and counts["errors"] == 2


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium; .ci/run does it)")
def test_page_in_headless_chromium(scanned, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report.html"
    counts = report.main(["--scan", str(scanned["out"]), "--out", str(out), "--band", "0.02"])
    n_flagged = scanned["flagged"].num_rows
    problems, dialogs = [], []
    shot = tmp_path / "report.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            assert page.locator("#flagged img.thumb").count() == n_flagged == counts["flagged_shown"]
            # every thumbnail really decoded in the browser
            assert page.evaluate("Array.from(document.querySelectorAll('#flagged img.thumb')).every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".uri", has_text="<script>alert(1)").count() >= 1
            page.fill("#filter", "alert(1)")
            assert page.locator("#flagged .card:visible").count() == 1
            page.fill("#filter", "")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == [] and dialogs == []
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("REPORT_SCREENSHOT_DIR")
    if keep:  # CI or a person can keep the picture
        shutil.copy(shot, os.path.join(keep, "report.png"))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium; .ci/run does it)")
def test_verdicts_clicked_on_the_page_persist_export_and_import_once(scanned, tmp_path):
    """Click verdicts in Chromium, reload (they persist), export CSV and JSON, import: the table holds exactly those rows."""
    from playwright.sync_api import expect, sync_playwright

    from jobs import audit

    out = tmp_path / "report.html"
    report.main(["--scan", str(scanned["out"]), "--out", str(out), "--band", "0.0"])
    flagged = scanned["flagged"].sort_by([("score", "descending"), ("uri", "ascending")]).to_pylist()
    chosen = {flagged[0]["uri"]: ("generated", ""), flagged[1]["uri"]: ("real", 'a "known" camera, not AI'),
              flagged[2]["uri"]: ("unsure", "")}
    files = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            ctx = browser.new_context(accept_downloads=True)
            page = ctx.new_page()
            page.goto(out.as_uri())
            page.fill("#reviewer", "rita")
            page.press("#reviewer", "Tab")  # change event: the name is kept
            cards = page.locator("#flagged .card")
            for i in range(3):
                verdict, note = chosen[flagged[i]["uri"]]
                if note:
                    cards.nth(i).locator(".vnote").fill(note)
                button = cards.nth(i).locator(f"button[data-verdict={verdict}]")
                button.click()
                expect(button).to_have_attribute("aria-pressed", "true")  # the page took it before the next click
            expect(page.locator("#vcount")).to_have_text("3 verdicts in this browser")  # and kept all three
            # localStorage reaches the browser's own store asynchronously: a reload right after the
            # last click could load the page before it got there (twice in ~6 two-worker runs the
            # reloaded page had lost the first card's verdict, pressed before). A second tab of the
            # file sees them once they are stored, as a reviewer's next visit would; then reload.
            other = ctx.new_page()
            other.goto(out.as_uri())
            other.wait_for_function("() => Object.keys(JSON.parse(localStorage.getItem("
                                    "'detector-review:' + document.body.dataset.scan) || '{}')).length === 3")
            other.close()
            page.reload()
            page.wait_for_load_state("load")
            cards = page.locator("#flagged .card")
            for i in range(cards.count()):
                pressed = [b.get_attribute("data-verdict") for b in cards.nth(i).locator("button[aria-pressed=true]").all()]
                want = chosen.get(cards.nth(i).get_attribute("data-uri"))
                assert pressed == ([want[0]] if want else []), (i, pressed)
            assert cards.nth(1).locator(".vnote").input_value() == chosen[flagged[1]["uri"]][1]
            assert page.locator("#reviewer").input_value() == "rita" and page.locator("#vcount").text_content() == "3 verdicts in this browser"
            for kind in ("csv", "json"):
                with page.expect_download() as d:
                    page.click(f"#export-{kind}")
                files[kind] = tmp_path / d.value.suggested_filename
                d.value.save_as(files[kind])
        finally:
            browser.close()
    assert files["csv"].name.startswith("verdicts-") and files["csv"].suffix == ".csv"
    first = audit.main(["verdicts", "import", str(files["csv"]), "--scan", str(scanned["out"])])
    assert (first["added"], first["refused_unknown"]) == (3, 0)
    table = read_table(str(scanned["out"]), "verdicts").to_pylist()
    assert {r["uri"]: (r["verdict"], r["note"] or "") for r in table} == chosen
    assert {(r["reviewer"], r["detector_id"], r["scan_id"]) for r in table} == {("rita", flagged[0]["detector_id"], scanned["summary"]["scan_id"])}
    for again in (files["json"], files["csv"]):  # the same verdicts in the other format, and the same file: nothing added
        assert audit.main(["verdicts", "import", str(again), "--scan", str(scanned["out"])])["added"] == 0
    assert read_table(str(scanned["out"]), "verdicts").num_rows == 3
    counts = report.main(["--scan", str(scanned["out"]), "--out", str(tmp_path / "next.html"), "--band", "0.0"])
    page = (tmp_path / "next.html").read_text()
    assert counts["reviewed_shown"] == 3 and page.count('class="reviewed"') == 3 and counts["precision_nights"] == 1
    assert 'class="prec"' in page
