"""The review page at the size of a real night: its size on disk, first paint, and paging and scrolling in headless Chromium.

    python -m bench.bench_review --cards 10000 --out bench/results/bench_review-10k.json
    python -m bench.bench_review --cards 20000 --page-size 200 --out bench/results/bench_review-20k-p200.json

``make_page`` writes a synthetic night (``--cards`` flagged rows over four buckets, 10 %
of them with an imported verdict, a precision sample of 385 drawn by
``detector_core.tables.sampling``, thumbnails made from ``detector_core.demo`` images at the
report's 160 px and 80 % JPEG quality) with the report's own renderer
(``jobs.reporting.page.render_page``); ``tests/test_review_queue.py`` uses the same builder for its
10,000-card page. The bench serves the folder over HTTP on loopback and measures in
Debian's Chromium (Playwright): first contentful paint (``performance`` paint entries, the
median of ``--loads`` fresh loads), the time to the first page of cards with their
thumbnails decoded, the time a key takes to flip to the next page (all pages; measured in the page from the key
event to the second animation frame after it, so the new cards are laid out and painted), the time a
verdict key takes (30 of them), the frames while scrolling a page of cards (requestAnimationFrame
intervals: the median, the 95th percentile and frames over 50 ms), and the JS heap.
Targets: first paint under 2 s, scrolling at display rate (p95 frame under ~33 ms).
``--thumbnail-photos N`` also times what the report itself spends per image: the thumbnail
and the larger view of N local JPEG photos (``--photo-edge`` px, noisy enough to have a
photo's size), and a re-run that finds them all there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa

from jobs.common.outputs import write_json

BUCKETS = ("uploads", "avatars", "listings", "archive")


def _jpegs(n: int, size: int, seed: int) -> list[bytes]:
    from detector_core.demo import make_image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = make_image(rng, size=(int(rng.integers(size // 2, size)), size))
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def make_page(folder: str, cards: int = 10_000, seed: int = 0, imported: float = 0.1, page_size: int = 60, reviewers: int = 1,
              thumb_size: int = 160, distinct_thumbs: int = 64, sample: int = 385) -> dict:
    """A review page of ``cards`` synthetic flagged rows in ``folder`` (``report.html`` + ``report_files/``); returns what it holds."""
    from detector_core import schema as S
    from detector_core.tables.sampling import draw_sample, night_seed
    from detector_core.tables.verdicts import FILE_COLUMNS
    from jobs.reporting import page

    rng = np.random.default_rng(seed)
    det = {"detector_id": "clip-mlp-bench00000000", "threshold": 0.6}
    day = dt.datetime(2026, 11, 23, 1, tzinfo=dt.timezone.utc).timestamp()
    rows = [{"uri": f"s3://{BUCKETS[i % len(BUCKETS)]}/u/{(i * 7919) % 97:02d}/{i:06d}.jpg", "score": float(s),
             "detector_id": det["detector_id"], "scan_id": "scan-bench", "bucket": BUCKETS[i % len(BUCKETS)],
             "scanned_at": day + float(t), "q": page.QUEUE_FLAGGED, "order": 0, "stratum": -1}
            for i, (s, t) in enumerate(zip(rng.uniform(0.6, 1.0, cards), rng.uniform(0, 5 * 3600, cards)))]
    drawn = draw_sample(pa.table({S.URI: [r["uri"] for r in rows], S.SCAN_ID: [r["scan_id"] for r in rows],
                                  S.SCORE: [r["score"] for r in rows]}), sample, 4, night_seed("2026-11-23", det["detector_id"]))
    at = {u: i for i, u in enumerate(r["uri"] for r in rows)}
    for r in drawn.to_pylist():
        c = rows[at[r[S.URI]]]
        c.update(q=c["q"] | page.QUEUE_SAMPLE, order=r[S.SAMPLE_ORDER], stratum=r[S.STRATUM])
    done = rng.random(cards) < imported
    reviewed = {r["uri"]: {"verdict": "generated" if rng.random() < 0.8 else "real", "reviewer": "ana", "reviewed_at": "2026-11-23"}
                for r, d in zip(rows, done) if d}
    data = {"scan": "s3://audit/scans", "date": "2026-11-23", "files": "report_files", "preview": False, "page_size": page_size,
            "reviewers": reviewers, "file_columns": list(FILE_COLUMNS), **page.card_data(rows, [det], {}, reviewed)}
    page = page.render_page(
        title="Scan review 2026-11-23 (synthetic)", scan="s3://audit/scans", date="2026-11-23", band="0.05",
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), summary={"columns": [], "rows": []},
        histograms=[], n_flagged=cards, n_flagged_shown=cards, n_band=0, errors={"columns": [], "rows": []}, n_errors=0,
        precision=page.precision_plot([]), tonight=[], data=data, reviewers=reviewers)
    os.makedirs(os.path.join(folder, "report_files", "t"), exist_ok=True)
    with open(os.path.join(folder, "report.html"), "w") as f:
        f.write(page)
    pool = _jpegs(distinct_thumbs, thumb_size, seed)
    thumb_bytes = 0
    for i, name in enumerate(data["cards"]["thumb"]):
        blob = pool[i % len(pool)]
        with open(os.path.join(folder, "report_files", "t", name), "wb") as f:
            f.write(blob)
        thumb_bytes += len(blob)
    return {"cards": cards, "imported": len(reviewed), "sample": drawn.num_rows, "page_bytes": len(page.encode()),
            "thumb_files": cards, "thumb_bytes": thumb_bytes, "rows": rows, "data": data}


_FRAMES_JS = """async (ms) => {
  const t = []; const start = performance.now(); let last = start;
  const el = document.scrollingElement; const top = document.getElementById('cards').offsetTop;
  const height = document.getElementById('cards').offsetHeight;
  await new Promise(done => { function step(now) { t.push(now - last); last = now;
      const f = (now - start) / ms; el.scrollTop = top + (height - innerHeight) * (f < 0.5 ? 2 * f : 2 - 2 * f);
      if (now - start < ms) requestAnimationFrame(step); else done(); } requestAnimationFrame(step); });
  return t.slice(1);
}"""


def _measure(folder: str, loads: int, chromium: str) -> dict:
    import contextlib
    import functools
    import http.server
    import threading

    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    @contextlib.contextmanager
    def serve():
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/report.html"
        finally:
            server.shutdown()
            server.server_close()

    res: dict = {}
    with serve() as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            fcp, ready = [], []
            for _ in range(loads):
                ctx = browser.new_context(viewport={"width": 1440, "height": 900})
                page = ctx.new_page()
                t0 = time.perf_counter()
                page.goto(url, wait_until="commit")
                page.wait_for_function("() => document.querySelectorAll('#cards img.thumb').length > 0 && "
                                       "Array.from(document.querySelectorAll('#cards img.thumb')).slice(0, 12).every(i => i.complete && i.naturalWidth > 0)")
                ready.append((time.perf_counter() - t0) * 1000)
                fcp.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime"))
                ctx.close()
            res["first_contentful_paint_ms"] = round(statistics.median(fcp), 1)
            res["first_contentful_paint_ms_all"] = [round(v, 1) for v in fcp]
            res["first_cards_with_thumbnails_ms"] = round(statistics.median(ready), 1)
            ctx = browser.new_context(viewport={"width": 1440, "height": 900})
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_load_state("networkidle")
            page.evaluate("localStorage.setItem('detector-review:reviewer', 'bench')")
            pages = page.evaluate("Math.ceil(window.reviewQueue.size() / %d)" % page.evaluate("JSON.parse(document.getElementById('review-data').textContent).page_size"))
            flips = []
            for _ in range(pages - 1):  # in the page: the key's handler, then two frames (style, layout, paint of the new cards)
                flips.append(page.evaluate("""() => new Promise(done => { const t = performance.now();
                    document.dispatchEvent(new KeyboardEvent('keydown', {key: ']', bubbles: true}));
                    requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t))); })"""))
            res["page_flip_ms"] = {"pages": pages, "median": round(statistics.median(flips), 1) if flips else None,
                                   "p95": round(float(np.percentile(flips, 95)), 1) if flips else None,
                                   "max": round(max(flips), 1) if flips else None}
            page.keyboard.press("Home")
            page.reload()
            page.wait_for_load_state("networkidle")
            verdict_ms = []
            for i in range(30):
                t0 = time.perf_counter()
                page.keyboard.press("123"[i % 3])
                page.wait_for_function("(n) => Object.keys(JSON.parse(localStorage.getItem('detector-review:' + document.body.dataset.scan) || '{}')).length === n", arg=i + 1)
                verdict_ms.append((time.perf_counter() - t0) * 1000)
            res["verdict_key_ms"] = {"median": round(statistics.median(verdict_ms), 1), "max": round(max(verdict_ms), 1)}
            page.wait_for_load_state("networkidle")
            frames = page.evaluate(_FRAMES_JS, 3000)
            res["scroll_frames"] = {"frames": len(frames), "median_ms": round(statistics.median(frames), 1),
                                    "p95_ms": round(float(np.percentile(frames, 95)), 1),
                                    "over_50ms": int(sum(1 for f in frames if f > 50))}
            res["js_heap_mb"] = round(page.evaluate("performance.memory ? performance.memory.usedJSHeapSize / 1e6 : -1"), 1)
            res["dom_cards"] = page.evaluate("document.querySelectorAll('#cards .card').length")
            ctx.close()
        finally:
            browser.close()
    return res


def thumbnail_cost(n: int, edge: int, threads: int) -> dict:
    """Seconds ``jobs.reporting.thumbnails.write_thumbnails`` takes for ``n`` local JPEG photos of ``edge`` px (thumbnail + larger view each)."""
    from detector_core.demo import make_image
    from jobs.reporting import thumbnails
    from jobs.reporting.config import ReportConfig

    folder = tempfile.mkdtemp(prefix="bench_review-photos-")
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(16):  # noisy photo-like content, so the JPEGs have a photo's size
        im = make_image(rng, size=(edge * 3 // 4, edge))
        noise = rng.normal(0, 18, (edge * 3 // 4, edge, 3))
        arr = np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    uris = []
    for i in range(n):
        path = os.path.join(folder, f"photo_{i:05d}.jpg")
        with open(path, "wb") as f:
            f.write(pool[i % len(pool)])
        uris.append(path)
    cfg = ReportConfig(out=os.path.join(folder, "out", "report.html"), threads=threads)
    t0 = time.perf_counter()
    failures = thumbnails.write_thumbnails(uris, cfg, None)
    seconds = time.perf_counter() - t0
    t_dir, p_dir = os.path.join(folder, "out", "report_files", "t"), os.path.join(folder, "out", "report_files", "p")
    thumbs = [os.path.getsize(os.path.join(t_dir, f)) for f in os.listdir(t_dir)]
    previews = [os.path.getsize(os.path.join(p_dir, f)) for f in os.listdir(p_dir)]
    t0 = time.perf_counter()
    thumbnails.write_thumbnails(uris, cfg, None)  # a re-run: everything is there already
    rerun = time.perf_counter() - t0
    return {"photos": n, "photo_px": f"{edge}x{edge * 3 // 4}", "photo_kb": round(statistics.mean(len(p) for p in pool) / 1e3, 1),
            "threads": threads, "seconds": round(seconds, 2), "per_second": round(n / seconds, 1), "failures": len(failures),
            "thumb_kb_mean": round(statistics.mean(thumbs) / 1e3, 2), "preview_kb_mean": round(statistics.mean(previews) / 1e3, 2),
            "rerun_seconds": round(rerun, 3)}


def main(argv=None) -> dict:
    import shutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=10_000, help="flagged rows on the page")
    ap.add_argument("--page-size", type=int, default=60, help="cards per page (jobs.report --page-size)")
    ap.add_argument("--loads", type=int, default=5, help="fresh page loads for the first-paint median")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "", help="Chromium binary")
    ap.add_argument("--keep", default="", help="write the page here and keep it (default: a temporary folder)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--thumbnail-photos", type=int, default=0, help="also time the report's thumbnails of this many local JPEG photos")
    ap.add_argument("--photo-edge", type=int, default=2048, help="long edge of those photos in pixels")
    ap.add_argument("--threads", type=int, default=16, help="jobs.report --threads for those thumbnails")
    args = ap.parse_args(argv)
    if not args.chromium:
        raise SystemExit("no Chromium: apt-get install chromium (or pass --chromium PATH)")
    folder = args.keep or tempfile.mkdtemp(prefix="bench_review-")
    t0 = time.perf_counter()
    built = make_page(folder, args.cards, page_size=args.page_size)
    build_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    result = {"bench": "bench_review", "date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
              "cards": args.cards, "page_size": args.page_size, "imported": built["imported"], "sample": built["sample"],
              "page_mb": round(built["page_bytes"] / 1e6, 2), "thumb_files": built["thumb_files"],
              "thumbs_mb": round(built["thumb_bytes"] / 1e6, 2), "mean_thumb_kb": round(built["thumb_bytes"] / built["thumb_files"] / 1e3, 2),
              "folder_mb_on_disk": round(disk / 1e6, 2), "build_s": round(build_s, 2),
              **_measure(folder, args.loads, args.chromium)}
    if args.thumbnail_photos:
        result["thumbnails"] = thumbnail_cost(args.thumbnail_photos, args.photo_edge, args.threads)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
