"""The review page: one self-contained HTML file of a night's scan for people to look at.

    python -m jobs.report --scan s3://audit/scans --date 2026-11-23 --out report.html
    python -m jobs.report --scan demo_out/scans --out demo_out/report.html        # the newest scan date
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.report --scan s3://audit/scans --out s3://audit/reports/2026-11-23.html

The page holds the run summaries of the date, a histogram of scores per detector with the
threshold and the near-threshold band marked, a grid of flagged images as small embedded
thumbnails (made from the objects themselves) sorted by score with uri, score and detector,
the near-threshold band worth a human look, and the error counts by stage and type. It
reads that date's partitions of the Iceberg tables as of the newest committed unit (``detector_core.views.connect``); the grid
and the band are capped (``--max-thumbnails``, ``--max-band``) and the page says how many
rows were left out and the command that lists them all. Every text from the data (URIs,
messages, ids) is HTML-escaped; the page loads nothing from outside itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from detector_core.images import ImageDecodeError, decode_image
from detector_core.storage import open_fs, s3_storage_options
from detector_core.views import connect, read_runs, sql_quote
from jobs.common import config_dict, fail, open_output, opt, parse_config, parse_date, run_main

HIST_BINS = 50


@dataclass
class ReportConfig:
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("last", "scan date to report, YYYY-MM-DD, or 'last' for the newest committed one")
    out: str = opt("report.html", "where to write the page (local or s3://)")
    detector: str = opt("", "only this detector id (default: every detector that scanned that date)")
    max_thumbnails: int = opt(500, "flagged images shown as thumbnails, highest scores first; the page counts the rest", within="[0, inf)")
    band: float = opt(0.05, "near-threshold band: scores within this distance of the threshold (score scale)", within="[0, 1]")
    max_band: int = opt(100, "rows of the near-threshold band shown as thumbnails", within="[0, inf)")
    thumb_size: int = opt(160, "thumbnail edge in pixels", within="[1, inf)")
    max_pixels: int = opt(64_000_000, "objects with more pixels than this get no thumbnail (decompression bombs)", within="[1, inf)")
    threads: int = opt(16, "concurrent object reads for the thumbnails", within="[1, inf)")
    catalog: str = opt("", "Iceberg catalog of the tables (default: the one OUT/_catalog.json records; see jobs.scan --catalog)")
    namespace: str = opt("", "catalog namespace of the output's tables (default: as recorded)")
    s3_endpoint: str = opt("", "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def thumbnail(uri: str, size: int, storage_options: dict | None, max_pixels: int) -> str:
    """A data: URI of a small JPEG of the object, or raise with the reason."""
    fs, path = open_fs(uri, storage_options)
    decoded = decode_image(fs.cat_file(path), max_pixels=max_pixels, draft_size=2 * size)
    im = decoded.image
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbnails(uris: list[str], cfg: ReportConfig, so: dict | None) -> dict[str, str | Exception]:
    def one(u):
        try:
            return thumbnail(u, cfg.thumb_size, so, cfg.max_pixels)
        except ImageDecodeError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - shown on the card; the page still renders
            return exc

    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        return dict(zip(uris, pool.map(one, uris)))


def histogram_svg(scores: np.ndarray, threshold: float, band: float, width: int = 640, height: int = 180) -> str:
    """Inline SVG histogram of scores in [0, 1] with the threshold line and the band shaded."""
    counts, edges = np.histogram(scores, bins=HIST_BINS, range=(0.0, 1.0))
    top = max(1, int(counts.max()))
    pad_l, pad_b = 40, 22
    w, h = width - pad_l - 8, height - pad_b - 8
    bw = w / HIST_BINS

    def x(v):
        return pad_l + v * w

    parts = [f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="histogram of scores">']
    lo, hi = max(0.0, threshold - band), min(1.0, threshold + band)
    parts.append(f'<rect class="band" x="{x(lo):.1f}" y="8" width="{x(hi) - x(lo):.1f}" height="{h}"/>')
    for i, c in enumerate(counts):
        bh = h * c / top
        parts.append(f'<rect class="bar{" over" if edges[i] >= threshold else ""}" x="{pad_l + i * bw:.1f}" y="{8 + h - bh:.1f}" '
                     f'width="{max(bw - 1, 1):.1f}" height="{bh:.1f}"><title>{edges[i]:.2f}–{edges[i + 1]:.2f}: {c}</title></rect>')
    parts.append(f'<line class="thr" x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="4" y2="{8 + h}"/>')
    # Right of the line, or left of it when the threshold is near 1 and the label would be cut off.
    side = 'x="{:.1f}"'.format(x(threshold) + 3) if threshold < 0.8 else 'x="{:.1f}" text-anchor="end"'.format(x(threshold) - 3)
    parts.append(f'<text {side} y="14" class="lbl">threshold {threshold:.3f}</text>')
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(v):.1f}" y="{height - 6}" class="axis" text-anchor="middle">{v:g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="16" class="axis" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{8 + h}" class="axis" text-anchor="end">0</text></svg>')
    return "".join(parts)


def _cards(rows: list[dict], thumbs: dict, threshold_of: dict) -> str:
    out = []
    for r in rows:
        t = thumbs.get(r["uri"])
        if isinstance(t, str):
            img = f'<img class="thumb" src="{t}" alt="{_e(r["uri"])}" loading="lazy">'
        else:
            img = f'<div class="nothumb">no thumbnail: {_e(getattr(t, "message", None) or t)}</div>'
        thr = threshold_of.get(r["detector_id"], r.get("threshold"))
        out.append(
            f'<figure class="card" data-score="{r["score"]:.6f}">{img}<figcaption>'
            f'<div class="score">{r["score"]:.4f} <span class="muted">(threshold {thr:.3f})</span></div>'
            f'<div class="uri" title="{_e(r["uri"])}">{_e(r["uri"])}</div>'
            f'<div class="muted">{_e(r["detector_id"])}</div></figcaption></figure>')
    return "".join(out)


def _table(table: pa.Table) -> str:
    if table.num_rows == 0:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in table.column_names)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row.values()) + "</tr>" for row in table.to_pylist())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#777;font-size:12px} table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left} th{background:#f0f0f0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
.card img{display:block;max-width:100%;margin:0 auto 6px;image-rendering:auto}
.nothumb{height:120px;display:flex;align-items:center;justify-content:center;color:#a33;font-size:12px;text-align:center;background:#f4f4f4}
.uri{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all;white-space:pre-wrap}
.score{font-weight:600} .hist .bar{fill:#8aa4c8} .hist .bar.over{fill:#d0675f} .hist .band{fill:#f5e6a8}
.hist .thr{stroke:#b00;stroke-width:2} .hist .lbl{font-size:11px;fill:#b00} .hist .axis{font-size:10px;fill:#555}
.note{background:#fff7d6;border:1px solid #e8d78a;padding:6px 10px;border-radius:4px;margin:8px 0}
input[type=search]{padding:4px 8px;width:320px}
"""

# Filters the cards by a substring of their uri; textContent comparisons only, no innerHTML.
JS = """
document.addEventListener('DOMContentLoaded', function () {
  var box = document.getElementById('filter');
  if (!box) return;
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    document.querySelectorAll('.card').forEach(function (c) {
      var u = c.querySelector('.uri');
      c.style.display = (!q || (u && u.textContent.toLowerCase().indexOf(q) >= 0)) ? '' : 'none';
    });
  });
});
"""


def build_report(cfg: ReportConfig) -> tuple[str, dict]:
    """(the page, counts of what it shows) for ``cfg``."""
    so = s3_storage_options(cfg.s3_endpoint or None)
    out = open_output(cfg.scan, cfg.catalog, cfg.namespace, so)
    runs = read_runs(out)
    if runs.num_rows == 0:
        fail(f"no finished scans in {cfg.scan}: nothing to report")
    date = max(runs["scan_date"].to_pylist()) if cfg.date in ("", "last") else parse_date(cfg.date, "--date")
    where = f"detector_id = {sql_quote(cfg.detector)}" if cfg.detector else ""
    con = connect(out, where, date, date, runs=runs)
    run_rows = [r for r in runs.to_pylist() if r["scan_date"] == date and (not cfg.detector or r["detector_id"] == cfg.detector)]
    if not run_rows:
        fail(f"no committed scan on {date} under {cfg.scan} (dates: {', '.join(sorted(set(runs['scan_date'].to_pylist())))})")

    per_det = con.sql("SELECT detector_id, any_value(threshold) AS threshold, count(*) AS scored, "
                      "count(*) FILTER (WHERE flagged) AS flagged FROM scores GROUP BY ALL ORDER BY detector_id").to_arrow_table().to_pylist()
    threshold_of = {d["detector_id"]: d["threshold"] for d in per_det}
    hists = []
    for d in per_det:
        s = con.sql("SELECT score FROM scores WHERE detector_id = ?", params=[d["detector_id"]]).to_arrow_table()["score"].to_numpy()
        hists.append(f'<h3 class="muted">{_e(d["detector_id"])}: {d["scored"]} scored, {d["flagged"]} flagged</h3>'
                     + histogram_svg(s, d["threshold"], cfg.band))
    n_flagged = sum(d["flagged"] for d in per_det)
    flagged = con.sql("SELECT uri, score, threshold, detector_id FROM flagged ORDER BY score DESC, uri LIMIT ?",
                      params=[max(0, cfg.max_thumbnails)]).to_arrow_table().to_pylist()
    n_band = con.execute("SELECT count(*) FROM scores WHERE abs(score - threshold) <= ?", [cfg.band]).fetchall()[0][0]
    band = con.sql("SELECT uri, score, threshold, detector_id FROM scores WHERE abs(score - threshold) <= ? "
                   "ORDER BY abs(score - threshold), uri LIMIT ?", params=[cfg.band, max(0, cfg.max_band)]).to_arrow_table().to_pylist()
    errors = con.sql("SELECT error_stage, error_type, count(*) AS objects, any_value(uri) AS example_uri, "
                     "any_value(error_message) AS example_message FROM errors GROUP BY ALL ORDER BY objects DESC, error_stage, error_type"
                     ).to_arrow_table()
    thumbs = _thumbnails(sorted({r["uri"] for r in flagged + band}), cfg, so)

    summary_cols = ["scan_id", "detector_id", "detector_kind", "input", "listed", "skipped", "scored", "flagged", "errors", "seconds", "finished_at"]
    summary = pa.Table.from_pylist([{k: r[k] for k in summary_cols} for r in run_rows])
    left_out = n_flagged - len(flagged)
    more = (f'<p class="note">{left_out} more flagged images not shown (the page shows the {len(flagged)} highest scores). '
            f'All of them: <code>python -m jobs.audit query top --scan {_e(cfg.scan)} --date {date} --limit 0 --format csv</code></p>'
            if left_out > 0 else "")
    band_more = (f'<p class="note">{n_band - len(band)} more rows in the band not shown (closest to the threshold first).</p>'
                 if n_band > len(band) else "")
    title = f"Scan review {date}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{CSS}</style><script>{JS}</script></head>
<body>
<h1>{_e(title)}</h1>
<p class="muted">scan output {_e(cfg.scan)} · generated {_e(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))}</p>
<h2>Run summary</h2>{_table(summary)}
<h2>Scores</h2><div id="histograms">{"".join(hists) or '<p class="muted">no scores</p>'}</div>
<p class="muted">red line: the detector's threshold; shaded: the near-threshold band (±{cfg.band:g}); red bars: flagged.</p>
<h2 id="flagged-heading">Flagged images ({n_flagged})</h2>
<p><input type="search" id="filter" placeholder="filter by uri"></p>{more}
<div class="grid" id="flagged">{_cards(flagged, thumbs, threshold_of)}</div>
<h2 id="band-heading">Near the threshold ({n_band}, |score − threshold| ≤ {cfg.band:g})</h2>{band_more}
<div class="grid" id="band">{_cards(band, thumbs, threshold_of)}</div>
<h2>Errors by type ({sum(errors["objects"].to_pylist())})</h2>{_table(errors)}
</body></html>
"""
    counts = {"date": date, "flagged": n_flagged, "flagged_shown": len(flagged), "band": n_band, "band_shown": len(band),
              "errors": int(sum(errors["objects"].to_pylist())),
              "thumbnail_failures": sum(1 for v in thumbs.values() if not isinstance(v, str))}
    return page, counts


def main(argv=None) -> dict:
    cfg = parse_config(ReportConfig, argv, __doc__)
    if not math.isfinite(cfg.band) or cfg.band < 0:
        fail("--band must be a score distance >= 0")
    page, counts = build_report(cfg)
    fs, path = open_fs(cfg.out, s3_storage_options(cfg.s3_endpoint or None))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(page.encode())
    counts["config"] = config_dict(cfg)
    print(f"report for {counts['date']}: {counts['flagged_shown']}/{counts['flagged']} flagged shown, "
          f"{counts['band_shown']}/{counts['band']} near the threshold, {counts['errors']} errors -> {cfg.out}")
    return counts


if __name__ == "__main__":
    run_main(main)
