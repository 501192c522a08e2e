"""The review page: one self-contained HTML file of a night's scan for people to look at.

    python -m jobs.report --scan s3://audit/scans --date 2026-11-23 --out report.html
    python -m jobs.report --scan demo_out/scans --out demo_out/report.html        # the newest scan date
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.report --scan s3://audit/scans --out s3://audit/reports/2026-11-23.html

The page holds the run summaries of the date, a histogram of scores per detector with the
threshold and the near-threshold band marked, a grid of flagged images as small embedded
thumbnails (made from the objects themselves) sorted by score with uri, score and detector,
the near-threshold band worth a human look, and the error counts by stage and type. Each card
has generated / real / unsure buttons and a note; the page keeps the choices in the browser
(localStorage) and exports them as one CSV or JSON file for ``jobs.audit verdicts import``
(no server); cards of images already reviewed say so, and a plot shows the precision per
night that the imported verdicts give (``query precision``). It
reads that date's partitions of the Iceberg tables as of the newest committed unit (``detector_core.views.connect``); the grid
and the band are capped (``--max-thumbnails``, ``--max-band``) and the page says how many
rows were left out and the command that lists them all. The page is rendered from the Jinja2
template ``jobs/templates/review.html.j2`` with autoescape on, so every text from the data
(URIs, messages, ids) is HTML-escaped; it loads nothing from outside itself.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from detector_core import schema as S
from detector_core.images import ImageDecodeError, decode_image
from detector_core.questions import question_sql
from detector_core.storage import open_fs, s3_storage_options
from detector_core.verdicts import FILE_COLUMNS
from detector_core.views import connect, read_runs, sql_quote
from jobs.common import JobError, config_dict, open_output, parse_date, run_main
from jobs.flags import CatalogOptions, StorageOptions, opt, parse_config

HIST_BINS = 50


@dataclass
class ReportConfig(CatalogOptions, StorageOptions):
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("last", "scan date to report, YYYY-MM-DD, or 'last' for the newest committed one")
    out: str = opt("report.html", "where to write the page (local or s3://)")
    detector_id: str = opt("", "only this detector id (default: every detector that scanned that date)")
    max_thumbnails: int = opt(500, "flagged images shown as thumbnails, highest scores first; the page counts the rest", within="[0, inf)")
    band: float = opt(0.05, "near-threshold band: scores within this distance of the threshold (score scale)", within="[0, 1]")
    max_band: int = opt(100, "rows of the near-threshold band shown as thumbnails", within="[0, inf)")
    thumb_size: int = opt(160, "thumbnail edge in pixels", within="[1, inf)")
    max_pixels: int = opt(64_000_000, "objects with more pixels than this get no thumbnail (decompression bombs)", within="[1, inf)")
    threads: int = opt(16, "concurrent object reads for the thumbnails", within="[1, inf)")


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


def histogram(scores: np.ndarray, threshold: float, band: float, width: int = 640, height: int = 180) -> dict:
    """The geometry of the inline SVG histogram of scores in [0, 1] (threshold line, band shaded) the template draws."""
    counts, edges = np.histogram(scores, bins=HIST_BINS, range=(0.0, 1.0))
    top = max(1, int(counts.max()))
    pad_l, pad_b = 40, 22
    w, h = width - pad_l - 8, height - pad_b - 8
    bw = w / HIST_BINS

    def x(v):
        return pad_l + v * w

    lo, hi = max(0.0, threshold - band), min(1.0, threshold + band)
    bars = [{"x": pad_l + i * bw, "y": 8 + h - h * c / top, "w": max(bw - 1, 1), "h": h * c / top, "over": bool(edges[i] >= threshold),
             "lo": edges[i], "hi": edges[i + 1], "count": int(c)} for i, c in enumerate(counts)]
    left = threshold >= 0.8
    return {"width": width, "height": height, "pad_l": pad_l, "plot_h": h, "top": top, "threshold": threshold,
            "band_x": x(lo), "band_w": x(hi) - x(lo), "bars": bars, "thr_x": x(threshold),
            "label_x": x(threshold) - 3 if left else x(threshold) + 3, "label_left": left,
            "ticks": [{"x": x(v), "label": f"{v:g}"} for v in (0.0, 0.25, 0.5, 0.75, 1.0)]}


def precision_plot(rows: list[dict], nights: int = 28, width: int = 640, height: int = 180) -> dict:
    """The geometry of the inline SVG of precision per night (Wilson interval bars) over the last ``nights`` nights with verdicts."""
    rows = [r for r in rows if r["reviewed"]]
    dates = sorted({r["scan_date"] for r in rows})[-nights:]
    rows = [r for r in rows if r["scan_date"] in dates]
    pad_l, pad_b = 40, 22
    w, h = width - pad_l - 40, height - pad_b - 8  # room right of the last night for its date label
    step = w / max(1, len(dates) - 1) if len(dates) > 1 else 0
    x_of = {d: pad_l + 8 + i * step for i, d in enumerate(dates)}

    def y(v):
        return 8 + h - h * v

    points = [{"x": x_of[r["scan_date"]], "y": y(r["precision"]), "y_low": y(r["precision_low"]), "y_high": y(r["precision_high"]),
               "scan_date": r["scan_date"], "detector_id": r["detector_id"], "confirmed": r["confirmed_generated"],
               "reviewed": r["reviewed"], "low": r["precision_low"], "high": r["precision_high"]} for r in rows]
    every = max(1, len(dates) // 6)
    return {"width": width, "height": height, "pad_l": pad_l, "nights": len(dates), "points": points,
            "yticks": [{"y": y(v), "label": f"{v:g}"} for v in (0.0, 0.5, 1.0)],
            "xticks": [{"x": x_of[d], "label": str(d)[5:]} for d in dates[::every]]}


def _reviewed(con, uris: list[str]) -> dict[str, dict]:
    """The latest imported verdict on each of ``uris``."""
    if not uris:
        return {}
    con.register("_shown", pa.table({"uri": uris}))
    rows = con.sql("SELECT uri, verdict, reviewer, reviewed_at::DATE::VARCHAR AS reviewed_at "
                   "FROM latest_verdicts JOIN _shown USING (uri)").to_arrow_table()
    return {r["uri"]: r for r in rows.to_pylist()}


def _cards(rows: list[dict], thumbs: dict, threshold_of: dict, reviewed: dict) -> list[dict]:
    out = []
    for r in rows:
        t = thumbs.get(r["uri"])
        out.append({**r, "thumb": t, "thumb_error": getattr(t, "message", None) or t, "reviewed": reviewed.get(r["uri"]),
                    "threshold": threshold_of.get(r["detector_id"], r.get("threshold"))})
    return out


def _table(table: pa.Table) -> dict:
    return {"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()]}


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs", "templates"), autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("review.html.j2")


def build_report(cfg: ReportConfig) -> tuple[str, dict]:
    """(the page, counts of what it shows) for ``cfg``."""
    so = s3_storage_options(cfg.s3_endpoint or None)
    out = open_output(cfg.scan, cfg.catalog, cfg.namespace, so)
    runs = read_runs(out)
    if runs.num_rows == 0:
        raise JobError(f"no finished scans in {cfg.scan}: nothing to report")
    date = max(runs["scan_date"].to_pylist()) if cfg.date in ("", "last") else parse_date(cfg.date, "--date")
    where = f"detector_id = {sql_quote(cfg.detector_id)}" if cfg.detector_id else ""
    con = connect(out, where, date, date, runs=runs)
    run_rows = [r for r in runs.to_pylist() if r["scan_date"] == date and (not cfg.detector_id or r["detector_id"] == cfg.detector_id)]
    if not run_rows:
        raise JobError(f"no committed scan on {date} under {cfg.scan} (dates: {', '.join(sorted(set(runs['scan_date'].to_pylist())))})")

    per_det = con.sql("SELECT detector_id, any_value(threshold) AS threshold, count(*) AS scored, "
                      "count(*) FILTER (WHERE flagged) AS flagged FROM scores GROUP BY ALL ORDER BY detector_id").to_arrow_table().to_pylist()
    threshold_of = {d["detector_id"]: d["threshold"] for d in per_det}
    hists = []
    for d in per_det:
        s = con.sql("SELECT score FROM scores WHERE detector_id = ?", params=[d["detector_id"]]).to_arrow_table()["score"].to_numpy()
        hists.append({**histogram(s, d["threshold"], cfg.band), **d})
    n_flagged = sum(d["flagged"] for d in per_det)
    flagged = con.sql("SELECT uri, score, threshold, detector_id, scan_id FROM flagged ORDER BY score DESC, uri LIMIT ?",
                      params=[max(0, cfg.max_thumbnails)]).to_arrow_table().to_pylist()
    n_band = con.execute("SELECT count(*) FROM scores WHERE abs(score - threshold) <= ?", [cfg.band]).fetchall()[0][0]
    band = con.sql("SELECT uri, score, threshold, detector_id, scan_id FROM scores WHERE abs(score - threshold) <= ? "
                   "ORDER BY abs(score - threshold), uri LIMIT ?", params=[cfg.band, max(0, cfg.max_band)]).to_arrow_table().to_pylist()
    errors = con.sql("SELECT error_stage, error_type, count(*) AS objects, any_value(uri) AS example_uri, "
                     "any_value(error_message) AS example_message FROM errors GROUP BY ALL ORDER BY objects DESC, error_stage, error_type"
                     ).to_arrow_table()
    shown = sorted({r["uri"] for r in flagged + band})
    thumbs = _thumbnails(shown, cfg, so)
    reviewed = _reviewed(con, shown)
    every_night = connect(out, where, runs=runs)  # precision over the nights before this one too
    precision = every_night.sql(question_sql(SimpleNamespace(question="precision"))).to_arrow_table().to_pylist()

    summary_cols = ["scan_id", "detector_id", "detector_kind", "input", "listed", "skipped", "scored", "flagged", "errors", "seconds", "finished_at"]
    summary = pa.Table.from_pylist([{k: r[k] for k in summary_cols} for r in run_rows])
    page = _template().render(
        title=f"Scan review {date}", scan=cfg.scan, date=date, band=f"{cfg.band:g}",
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        summary=_table(summary), histograms=hists, n_flagged=n_flagged, flagged=_cards(flagged, thumbs, threshold_of, reviewed),
        n_band=n_band, near=_cards(band, thumbs, threshold_of, reviewed), errors=_table(errors),
        n_errors=int(sum(errors["objects"].to_pylist())), precision=precision_plot(precision),
        file_columns=list(FILE_COLUMNS), verdict_choices=S.VERDICTS,
    )
    counts = {"date": date, "flagged": n_flagged, "flagged_shown": len(flagged), "band": n_band, "band_shown": len(band),
              "errors": int(sum(errors["objects"].to_pylist())),
              "thumbnail_failures": sum(1 for v in thumbs.values() if not isinstance(v, str)), "reviewed_shown": len(reviewed),
              "precision_nights": len({r["scan_date"] for r in precision if r["reviewed"]})}
    return page, counts


def run_report(cfg: ReportConfig) -> dict:
    """Write the review page for ``cfg``; returns what it shows (counts and the config)."""
    if not math.isfinite(cfg.band) or cfg.band < 0:
        raise JobError("--band must be a score distance >= 0")
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


def main(argv=None) -> dict:
    return run_report(parse_config(ReportConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
