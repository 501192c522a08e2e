"""The review queue at the size of a real night: 10,000 flagged cards in headless Chromium.

The page is ``bench.bench_review.make_page``'s synthetic night (10,000 flagged rows over
four buckets, 10 % with an imported verdict, a 385-row precision sample, small thumbnail
files) rendered by the report's own template, served over HTTP from its folder. What a
reviewer does is checked against the data the page was made from: the first paint and the
first page of cards; 30 verdicts by keyboard and an undo; a reload that keeps them; images
with an imported verdict hidden by default; filters and sorts against a Python count;
reviewer shares that do not overlap and cover the queue, as ``shard_hash % N`` says; the
precision sample in its fixed order. Speed is the bench's business (``bench/bench_review.py``),
not these tests'.
"""

from __future__ import annotations

import csv
import io

import pytest
from conftest import serve

from bench.bench_review import make_page
from jobs.reporting.page import QUEUE_SAMPLE
from jobs.reporting.thumbnails import shard_hash

N = 10_000


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    folder = tmp_path_factory.mktemp("queue")
    built = make_page(str(folder), N, seed=3, thumb_size=48, distinct_thumbs=8)
    with serve(folder) as url:
        yield {**built, "url": f"{url}/report.html"}


def _key(r: dict) -> str:
    return "\t".join((r["uri"], r["detector_id"], r["scan_id"]))


def _fresh(chromium, night, fragment: str = ""):
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(night["url"] + fragment)
    page.wait_for_function("() => window.reviewQueue !== undefined")
    return ctx, page, errors


def test_first_paint_and_hidden_imports(chromium, night):
    ctx, page, errors = _fresh(chromium, night)
    page.wait_for_function("() => performance.getEntriesByName('first-contentful-paint').length === 1")
    rows = night["rows"]
    imported = {r["uri"] for r, rv in zip(rows, night["data"]["cards"]["rv"]) if rv}
    # hidden by default: the queue is the flagged rows without an imported verdict, highest score first
    want = [_key(r) for r in sorted((r for r in rows if r["uri"] not in imported), key=lambda r: (-round(r["score"], 6), r["uri"]))]
    assert len(imported) == night["imported"] > 500
    assert page.evaluate("window.reviewQueue.keys()") == want
    assert page.locator("#cards .card").count() == 60 and "of " + str(len(want)) in page.locator("#qinfo").text_content()
    page.wait_for_function("() => Array.from(document.querySelectorAll('#cards img.thumb')).slice(0, 6).every(i => i.complete && i.naturalWidth > 0)")
    page.select_option("#show", "imported")
    assert page.evaluate("window.reviewQueue.size()") == len(imported) and page.locator("#cards .reviewed").count() == 60
    page.select_option("#show", "all")
    assert page.evaluate("window.reviewQueue.size()") == N
    assert errors == []
    ctx.close()


def test_thirty_verdicts_by_keyboard_undo_reload_and_export(chromium, night):
    from playwright.sync_api import expect

    ctx, page, errors = _fresh(chromium, night)
    queue = page.evaluate("window.reviewQueue.keys()")
    page.keyboard.press("1")
    page.fill("#reviewer-name", "kai")
    page.press("#reviewer-name", "Enter")
    expect(page.locator("#vcount")).to_have_text("1 verdict in this browser")
    keys = ["1", "2", "3", "g", "r", "u"]
    for i in range(1, 30):
        page.keyboard.press(keys[i % 6])
    expect(page.locator("#vcount")).to_have_text("30 verdicts in this browser")
    assert page.evaluate("window.reviewQueue.cursor()") == queue[30]
    page.keyboard.press("z")  # undo the 30th: gone, and the cursor is back on it
    expect(page.locator("#vcount")).to_have_text("29 verdicts in this browser")
    assert page.evaluate("window.reviewQueue.cursor()") == queue[29]
    assert page.locator("#cards .card.current button[aria-pressed=true]").count() == 0
    page.keyboard.press("k")
    page.keyboard.press("3")  # a changed mind on the 29th: real -> unsure
    page.keyboard.press("]")  # next page
    assert page.evaluate("window.reviewQueue.cursor()") == queue[60] and "cards 61–120" in page.locator("#qinfo").text_content()
    page.keyboard.press("v")
    expect(page.locator("#viewer")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    names = {"1": "generated", "g": "generated", "2": "real", "r": "real", "3": "unsure", "u": "unsure"}
    want = {queue[i]: names[keys[i % 6]] for i in range(29)}
    want[queue[28]] = "unsure"
    page.reload()
    page.wait_for_function("() => window.reviewQueue !== undefined")
    expect(page.locator("#vcount")).to_have_text("29 verdicts in this browser")
    assert page.evaluate("window.reviewQueue.cursor()") == queue[60]  # the place in the queue survives too
    with page.expect_download() as d:
        page.click("#export-csv")
    got = list(csv.DictReader(io.StringIO(open(d.value.path(), encoding="utf-8").read())))
    assert {_key(r): r["verdict"] for r in got} == want and {r["reviewer"] for r in got} == {"kai"}
    assert errors == []
    ctx.close()


def test_filters_and_sorts_agree_with_the_data(chromium, night):
    ctx, page, errors = _fresh(chromium, night)
    page.select_option("#show", "all")
    rows = night["rows"]
    page.select_option("#bucket", "avatars")
    page.fill("#prefix", "u/0")
    page.fill("#smin", "0.7")
    page.fill("#smax", "0.8")
    want = [r for r in rows if r["bucket"] == "avatars" and r["uri"].split("/", 3)[3].startswith("u/0")
            and 0.7 <= round(r["score"], 6) <= 0.8]
    assert 0 < len(want) < 200 and page.evaluate("window.reviewQueue.size()") == len(want)
    page.select_option("#bucket", "")
    page.fill("#prefix", "")
    page.fill("#smin", "")
    page.fill("#smax", "")
    page.select_option("#sort", "time-asc")
    first = page.evaluate("window.reviewQueue.keys()[0]")
    assert first == _key(min(rows, key=lambda r: (int(r["scanned_at"]), -round(r["score"], 6))))
    page.select_option("#queue", "sample")  # the precision sample: its own fixed order, whatever the sort
    cards = night["data"]["cards"]
    order = sorted((o, i) for i, (o, q) in enumerate(zip(cards["order"], cards["q"])) if q & QUEUE_SAMPLE)
    assert page.evaluate("window.reviewQueue.keys()") == [_key(rows[i]) for _, i in order] and len(order) == night["sample"] == 385
    assert page.locator("#sort").is_disabled()
    assert errors == []
    ctx.close()


def test_reviewer_shares_do_not_overlap_and_cover_the_queue(chromium, night):
    seen = []
    for k in (1, 2, 3):
        ctx, page, errors = _fresh(chromium, night, f"#shard={k}/3")
        page.select_option("#show", "all")
        assert page.locator("#shard").text_content() == f"share {k} of 3" and errors == []
        seen.append(page.evaluate("window.reviewQueue.keys()"))
        ctx.close()
    rows = night["rows"]
    for k, keys in enumerate(seen, start=1):
        assert set(keys) == {_key(r) for r in rows if shard_hash(r["uri"]) % 3 + 1 == k}
    assert sum(len(s) for s in seen) == N and len(set().union(*map(set, seen))) == N


def test_two_tabs_keep_each_others_verdicts(chromium, night):
    """Two tabs of one page (a reviewer's second window): a verdict in each, neither lost, each tab shows the other's."""
    from playwright.sync_api import expect

    ctx = chromium.new_context()
    a, b = ctx.new_page(), ctx.new_page()
    for p in (a, b):
        p.goto(night["url"])
        p.wait_for_function("() => window.reviewQueue !== undefined")
    a.evaluate("localStorage.setItem('detector-review:reviewer', 'lee')")
    queue = a.evaluate("window.reviewQueue.keys()")
    a.keyboard.press("1")  # first card: generated, in tab a
    b.keyboard.press("j")
    b.keyboard.press("2")  # second card: real, in tab b, which loaded before tab a's verdict
    stored = a.evaluate("JSON.parse(localStorage.getItem('detector-review:' + document.body.dataset.scan))")
    assert {k: v["verdict"] for k, v in stored.items()} == {queue[0]: "generated", queue[1]: "real"}
    expect(a.locator("#vcount")).to_have_text("2 verdicts in this browser")
    expect(a.locator("#cards .card[data-i] >> nth=1").locator("button[aria-pressed=true]")).to_have_text("real")
    ctx.close()
