"""The review page: a static review queue of a night's scan, with its thumbnails as files beside it.

    python -m jobs.report --scan s3://audit/scans --date 2026-11-23 --out s3://audit/reports/2026-11-23/report.html
    python -m jobs.report --scan demo_out/scans --out demo_out/report.html        # the newest scan date
    python -m jobs.report --scan s3://audit/scans --out report.html --reviewers 4  # links for four reviewers' shares
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.report --scan s3://audit/scans --out s3://audit/reports/2026-11-23/report.html

The page (``--out``) and the folder ``<name>_files/`` beside it (thumbnails ``t/``, larger
views ``p/``) are a static artifact: host them anywhere next to the tables (a bucket with
static hosting, a file share); there is no server. The page holds the run summaries of the
date, a histogram of scores per detector with the threshold and the near-threshold band,
the precision per night with its interval, the error counts, and the review queue: every
flagged image of the night (up to ``--max-cards``, highest scores first), the *precision
sample* (``detector_core.sampling``: a seeded random sample of the night's flagged rows,
stratified by score band, in a fixed order, drawn once per night and detector and kept in
the ``precision_sample`` table, so ``query precision`` estimates from it without the
reviewers' bias toward the top of the queue) and the near-threshold band. The queue is
paged; it sorts by score, bucket or time and filters by bucket, prefix, score band and
reviewed or not; images that carry an imported verdict are hidden by default. Keyboard:
j/k (or the arrows) next and previous, 1/2/3 (or g/r/u) generated / real / unsure, z undo,
v or Enter a larger view, n the note, [ and ] the pages. The reviewer's name is asked once,
before the first verdict. ``--reviewers N`` (or a link ending in ``#shard=k/N``) gives
reviewer k a deterministic share (by a hash of the uri). Verdicts stay in the browser
(localStorage) and export as CSV (formula-like cells neutralised, ``detector_core.csv_cells``)
or JSON for ``jobs.audit verdicts import``. The tables are read as of the newest committed
unit (``detector_core.views.connect``). Thumbnails already in the folder (a re-run after an
import) are not made again. The page is rendered from ``jobs/templates/review.html.j2``
with autoescape on; the queue's data is one JSON block that the page's script shows with
``textContent`` only, so no text from the data is ever parsed as HTML.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import math
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from detector_core import schema as S
from detector_core import tables as T
from detector_core.catalog import write_atomic
from detector_core.images import decode_image
from detector_core.questions import question_sql
from detector_core.sampling import DEFAULT_STRATA, draw_sample, night_seed, sample_size
from detector_core.storage import open_fs, s3_storage_options
from detector_core.verdicts import FILE_COLUMNS
from detector_core.views import connect, read_runs, sql_quote
from jobs.common import JobError, config_dict, open_output, parse_date, run_main
from jobs.flags import CatalogOptions, StorageOptions, opt, parse_config

HIST_BINS = 50
QUEUE_FLAGGED, QUEUE_SAMPLE, QUEUE_BAND = 1, 2, 4  # a card's queues, as bits (the page's filters test them)
CARD_COLUMNS = ("uri, score, threshold, detector_id, scan_id, bucket, epoch(scanned_at) AS scanned_at, declared, evidence_source, "
                "declared_generator, c2pa_state, flag_reason")


@dataclass
class ReportConfig(CatalogOptions, StorageOptions):
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("last", "scan date to report, YYYY-MM-DD, or 'last' for the newest committed one")
    out: str = opt("report.html", "the page to write (local or s3://); its thumbnails go to <name>_files/ beside it")
    detector_id: str = opt("", "only this detector id (default: every detector that scanned that date)")
    max_cards: int = opt(20_000, "flagged images in the queue, highest scores first; the page counts the rest", within="[0, inf)")
    band: float = opt(0.05, "near-threshold band: scores within this distance of the threshold (score scale)", within="[0, 1]")
    max_band: int = opt(200, "rows of the near-threshold band in the queue (closest first)", within="[0, inf)")
    precision_sample: int = opt(sample_size(), "rows of each night's flagged images (per detector) in the precision sample, drawn once "
                                "and kept in the precision_sample table; the default gives a 95 % interval of about ±5 points; "
                                "0 = draw none", within="[0, inf)")
    sample_strata: int = opt(DEFAULT_STRATA, "score bands the precision sample is stratified by (equal counts of flagged rows)", within="[1, 100]")
    sample_seed: int = opt(0, "seed of the precision sample, with the date and detector (change it only to draw a new sample)", within="[0, inf)")
    reviewers: int = opt(1, "reviewers who split the queue: the page links each one's deterministic share (#shard=k/N)", within="[1, 1000]")
    page_size: int = opt(60, "cards per page of the queue", within="[1, 1000]")
    thumb_size: int = opt(160, "thumbnail edge in pixels", within="[1, inf)")
    preview_size: int = opt(640, "edge of the larger view (v / Enter) in pixels; 0 = the thumbnail only", within="[0, inf)")
    max_pixels: int = opt(64_000_000, "objects with more pixels than this get no thumbnail (decompression bombs)", within="[1, inf)")
    threads: int = opt(16, "concurrent object reads and writes for the thumbnails", within="[1, inf)")


def asset_name(uri: str) -> str:
    """The file name of an object's thumbnail and larger view (a hash of the uri: any uri, one safe name)."""
    return hashlib.sha1(uri.encode()).hexdigest()[:24] + ".jpg"


def shard_hash(uri: str) -> int:
    """The 32-bit number the page divides reviewers' shares by (``hash % N``): one image, one reviewer."""
    return int(hashlib.sha1(uri.encode()).hexdigest()[24:32], 16)


def _jpeg(im, size: int) -> bytes:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnails(uri: str, sizes: tuple[int, ...], storage_options: dict | None, max_pixels: int) -> list[bytes]:
    """JPEGs of the object at each edge of ``sizes`` (one read, one decode), or raise with the reason."""
    fs, path = open_fs(uri, storage_options)
    decoded = decode_image(fs.cat_file(path), max_pixels=max_pixels, draft_size=2 * max(sizes))
    return [_jpeg(decoded.image, s) for s in sizes]


def _assets_folder(out: str) -> tuple[str, str]:
    """(the folder beside the page that holds its thumbnails, its name relative to the page)."""
    base, name = posixpath.split(out.rstrip("/"))
    stem = name.rsplit(".", 1)[0] if "." in name else name
    rel = f"{stem}_files"
    return (posixpath.join(base, rel) if base else rel), rel


def write_thumbnails(uris: list[str], cfg: ReportConfig, so: dict | None) -> dict[str, str]:
    """Thumbnails (and larger views) of ``uris`` in the page's folder; returns uri -> why it has none, for the failures.

    Files already there (a re-run of the same page) are kept, not made again.
    """
    folder, _ = _assets_folder(cfg.out)
    fs, root = open_fs(folder, so)
    kinds = [("t", cfg.thumb_size)] + ([("p", cfg.preview_size)] if cfg.preview_size else [])
    for k, _ in kinds:
        fs.makedirs(f"{root}/{k}", exist_ok=True)
    try:
        have = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/t", detail=False)}
    except FileNotFoundError:
        have = set()
    todo = [u for u in dict.fromkeys(uris) if asset_name(u) not in have]

    def one(u: str) -> str | None:
        try:
            images = thumbnails(u, tuple(s for _, s in kinds), so, cfg.max_pixels)
        except Exception as exc:  # noqa: BLE001 - shown on the card; the page still renders
            return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        # Each file whole or absent (a killed report leaves no half thumbnail that a re-run would keep),
        # the thumbnail last: its presence means "done".
        for (k, _), data in zip(reversed(kinds), reversed(images)):
            write_atomic(fs, f"{root}/{k}/{asset_name(u)}", data, sync=False)
        return None

    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        return {u: why for u, why in zip(todo, pool.map(one, todo)) if why}


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
    """The geometry of the inline SVG of precision per night over the last ``nights`` nights with verdicts.

    A night's point is the precision sample's estimate with its interval where the sample
    is reviewed in every score band, else the convenience figure (every verdict given),
    drawn hollow: reviewers' choice of images biases it.
    """
    shown = []
    for r in rows:
        if r["precision"] is not None:
            shown.append({**r, "kind": "sample", "p": r["precision"], "low": r["precision_low"], "high": r["precision_high"],
                          "n": r["sample_reviewed"], "k": r["sample_generated"]})
        elif r["reviewed"]:
            shown.append({**r, "kind": "convenience", "p": r["convenience_precision"], "low": r["convenience_low"],
                          "high": r["convenience_high"], "n": r["reviewed"], "k": r["confirmed_generated"]})
    dates = sorted({r["scan_date"] for r in shown})[-nights:]
    shown = [r for r in shown if r["scan_date"] in dates]
    pad_l, pad_b = 40, 22
    w, h = width - pad_l - 40, height - pad_b - 8  # room right of the last night for its date label
    step = w / max(1, len(dates) - 1) if len(dates) > 1 else 0
    x_of = {d: pad_l + 8 + i * step for i, d in enumerate(dates)}

    def y(v):
        return 8 + h - h * v

    points = [{"x": x_of[r["scan_date"]], "y": y(r["p"]), "y_low": y(r["low"]), "y_high": y(r["high"]), "kind": r["kind"],
               "scan_date": r["scan_date"], "detector_id": r["detector_id"], "confirmed": r["k"], "reviewed": r["n"],
               "low": r["low"], "high": r["high"]} for r in shown]
    every = max(1, len(dates) // 6)
    return {"width": width, "height": height, "pad_l": pad_l, "nights": len(dates), "points": points,
            "any_convenience": any(p["kind"] == "convenience" for p in points),
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


def draw_precision_sample(out, con, date: str, detectors: list[str], cfg: ReportConfig) -> tuple[pa.Table, int]:
    """The night's precision sample of ``detectors``: the one drawn before, else a new draw, kept in the table; (rows, rows drawn now).

    The sample of a night is drawn once (the first report after the scan) and reused by every
    later report, so reviewers never see it change under them; two reports at once draw the
    same rows (one seed) and the table keeps them once (``append_new``). While a scan holds
    the output's lease the caller passes no detector: the night's flags are not all in.
    """
    from pyiceberg.expressions import EqualTo

    table = out.find_table(T.SAMPLE)
    have = (out.read(T.SAMPLE, EqualTo(S.SCAN_DATE, date)) if table is not None and table.current_snapshot() is not None
            else T.SAMPLE_SCHEMA.empty_table())
    done = set(have[S.DETECTOR_ID].to_pylist())
    new = []
    drawn_at = dt.datetime.now(dt.timezone.utc)
    for d in detectors:
        if d in done or cfg.precision_sample <= 0:
            continue
        rows = con.sql("SELECT uri, scan_id, score, bucket FROM flagged WHERE detector_id = ?", params=[d]).to_arrow_table()
        if rows.num_rows == 0:
            continue
        seed = night_seed(date, d, cfg.sample_seed)
        drawn = draw_sample(rows, cfg.precision_sample, cfg.sample_strata, seed)
        n = drawn.num_rows
        drawn = (drawn.append_column(S.DETECTOR_ID, pa.array([d] * n)).append_column(S.SAMPLE_SEED, pa.array([seed] * n, pa.int64()))
                 .append_column(S.DRAWN_AT, pa.array([drawn_at] * n, S.TYPES[S.DRAWN_AT]))
                 .append_column(S.SCAN_DATE, pa.array([dt.date.fromisoformat(date)] * n, pa.date32())))
        new.append(T.conform(drawn, T.SAMPLE))
    added = 0
    if new:
        if table is None:
            out.create(T.SAMPLE)
        rows = pa.concat_tables(new)
        added = out.append_new(T.SAMPLE, rows, (S.SCAN_DATE, S.DETECTOR_ID, S.URI, S.SCAN_ID))
        have = pa.concat_tables([T.conform(have, T.SAMPLE), rows])  # what Iceberg gives back has its own int widths
    return have, added


def _writer(out) -> str:
    """Who holds the output's lease now (a scan still writing, a repair), or '' when nobody does."""
    from detector_core.lease import Lease

    _, record = Lease(out.fs, out.root, "report").current()
    return f"scan {record.get('scan_id')}" if Lease.is_live(record) else ""


def _queue(con, cfg: ReportConfig, sample: pa.Table) -> tuple[list[dict], int, int]:
    """The cards of the page (flagged top rows, the sample, the band), once each with their queues; (cards, flagged, band)."""
    cards: dict[tuple, dict] = {}

    def add(rows: list[dict], bit: int, extra=None):
        for r in rows:
            c = cards.setdefault((r["uri"], r["detector_id"], r["scan_id"]), {**r, "q": 0, "order": 0, "stratum": -1})
            c["q"] |= bit
            if extra:
                c.update(extra(r))

    n_flagged = con.execute("SELECT count(*) FROM flagged").fetchall()[0][0]
    add(con.sql(f"SELECT {CARD_COLUMNS} FROM flagged ORDER BY score DESC, uri LIMIT ?",
                params=[max(0, cfg.max_cards)]).to_arrow_table().to_pylist(), QUEUE_FLAGGED)
    if sample.num_rows:
        con.register("_sample", sample.select([S.URI, S.DETECTOR_ID, S.SCAN_ID, S.SAMPLE_ORDER, S.STRATUM]))
        add(con.sql(f"SELECT {CARD_COLUMNS}, sample_order, stratum FROM flagged JOIN _sample USING (uri, detector_id, scan_id)"
                    ).to_arrow_table().to_pylist(),
            QUEUE_SAMPLE, lambda r: {"order": r[S.SAMPLE_ORDER], "stratum": r[S.STRATUM]})
    n_band = con.execute("SELECT count(*) FROM scores WHERE abs(score - threshold) <= ?", [cfg.band]).fetchall()[0][0]
    add(con.sql(f"SELECT {CARD_COLUMNS} FROM scores WHERE abs(score - threshold) <= ? ORDER BY abs(score - threshold), uri LIMIT ?",
                params=[cfg.band, max(0, cfg.max_band)]).to_arrow_table().to_pylist(), QUEUE_BAND)
    return list(cards.values()), n_flagged, n_band


def card_data(cards: list[dict], detectors: list[dict], failures: dict[str, str], reviewed: dict[str, dict]) -> dict:
    """The queue as the page's script reads it: one list per field (ids and buckets as indexes into their lists)."""
    det_ix = {d["detector_id"]: i for i, d in enumerate(detectors)}
    scans = sorted({c["scan_id"] for c in cards})
    buckets = sorted({c["bucket"] for c in cards})
    scan_ix, bucket_ix = {s: i for i, s in enumerate(scans)}, {b: i for i, b in enumerate(buckets)}
    cols: dict[str, list] = {k: [] for k in ("uri", "score", "det", "scan", "bucket", "time", "thumb", "err", "h", "q", "order",
                                             "stratum", "rv", "ev")}
    for c in cards:
        u = c["uri"]
        rv = reviewed.get(u)
        cols["uri"].append(u)
        cols["score"].append(round(float(c["score"]), 6))
        cols["det"].append(det_ix[c["detector_id"]])
        cols["scan"].append(scan_ix[c["scan_id"]])
        cols["bucket"].append(bucket_ix[c["bucket"]])
        cols["time"].append(int(c["scanned_at"] or 0))
        cols["thumb"].append("" if u in failures else asset_name(u))
        cols["err"].append(failures.get(u, ""))
        cols["h"].append(shard_hash(u))
        cols["q"].append(c["q"])
        cols["order"].append(int(c["order"] or 0))
        cols["stratum"].append(int(c["stratum"]))
        cols["rv"].append([rv["verdict"], rv["reviewer"], rv["reviewed_at"]] if rv else None)
        declared = c.get("declared")  # the evidence the file carries, and why the row is flagged
        cols["ev"].append([declared, c.get("evidence_source"), c.get("declared_generator"), c.get("c2pa_state"), c.get("flag_reason")]
                          if declared or c.get("c2pa_state") or c.get("flag_reason") == "declared" else None)
    return {"detectors": [{"id": d["detector_id"], "threshold": d["threshold"]} for d in detectors], "scans": scans,
            "buckets": buckets, "cards": cols}


def _table(table: pa.Table) -> dict:
    return {"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()]}


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs", "templates"), autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("review.html.j2")


def render_page(**context) -> str:
    """The page from its parts (``build_report`` gathers them; ``bench/bench_review.py`` makes them up)."""
    return _template().render(file_columns=list(FILE_COLUMNS), verdict_choices=S.VERDICTS, **context)


def build_report(cfg: ReportConfig) -> tuple[str, dict]:
    """(the page, counts of what it shows) for ``cfg``; draws the night's precision sample and writes the thumbnails."""
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
    hists = []
    for d in per_det:
        s = con.sql("SELECT score FROM scores WHERE detector_id = ?", params=[d["detector_id"]]).to_arrow_table()["score"].to_numpy()
        hists.append({**histogram(s, d["threshold"], cfg.band), **d})
    writer = _writer(out)
    if writer:  # its flags are not all in yet: a sample drawn now would leave the rest out for good
        print(f"WARNING: {writer} holds {cfg.scan}: no precision sample drawn now; the next report after it finishes draws it",
              file=sys.stderr, flush=True)
    sample, sample_added = draw_precision_sample(out, con, date, [d["detector_id"] for d in per_det if d["flagged"] and not writer], cfg)
    cards, n_flagged, n_band = _queue(con, cfg, sample)
    errors = con.sql("SELECT error_stage, error_type, count(*) AS objects, any_value(uri) AS example_uri, "
                     "any_value(error_message) AS example_message FROM errors GROUP BY ALL ORDER BY objects DESC, error_stage, error_type"
                     ).to_arrow_table()
    uris = sorted({c["uri"] for c in cards})
    failures = write_thumbnails(uris, cfg, so)
    reviewed = _reviewed(con, uris)
    every_night = connect(out, where, runs=runs)  # precision over the nights before this one too
    precision = every_night.sql(question_sql(SimpleNamespace(question="precision"))).to_arrow_table().to_pylist()
    tonight = [r for r in precision if str(r["scan_date"]) == date]

    summary_cols = ["scan_id", "detector_id", "detector_kind", "input", "listed", "skipped", "scored", "flagged", "errors", "seconds", "finished_at"]
    summary = pa.Table.from_pylist([{k: r[k] for k in summary_cols} for r in run_rows])
    _, rel = _assets_folder(cfg.out)
    data = {"scan": cfg.scan, "date": date, "files": rel, "preview": bool(cfg.preview_size), "page_size": cfg.page_size,
            "reviewers": cfg.reviewers, "file_columns": list(FILE_COLUMNS),
            **card_data(cards, per_det, failures, reviewed)}
    n_shown = sum(1 for c in cards if c["q"] & QUEUE_FLAGGED)
    page = render_page(
        title=f"Scan review {date}", scan=cfg.scan, date=date, band=f"{cfg.band:g}",
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        summary=_table(summary), histograms=hists, n_flagged=n_flagged, n_flagged_shown=n_shown, n_band=n_band,
        errors=_table(errors), n_errors=int(sum(errors["objects"].to_pylist())), precision=precision_plot(precision),
        tonight=tonight, data=data, reviewers=cfg.reviewers,
    )
    counts = {"date": date, "flagged": n_flagged, "flagged_shown": n_shown, "band": n_band,
              "band_shown": sum(1 for c in cards if c["q"] & QUEUE_BAND), "sample": sum(1 for c in cards if c["q"] & QUEUE_SAMPLE),
              "sample_drawn_now": sample_added, "cards": len(cards),
              "errors": int(sum(errors["objects"].to_pylist())), "thumbnail_failures": len(failures), "reviewed_shown": len(reviewed),
              "precision_nights": len({r["scan_date"] for r in precision if r["reviewed"]})}
    return page, counts


def run_report(cfg: ReportConfig) -> dict:
    """Write the review page (and its thumbnails) for ``cfg``; returns what it shows (counts and the config)."""
    if not math.isfinite(cfg.band) or cfg.band < 0:
        raise JobError("--band must be a score distance >= 0")
    if not cfg.out.lower().endswith((".html", ".htm")):
        raise JobError(f"--out {cfg.out!r}: name the page itself, e.g. {cfg.out.rstrip('/') or 'reports'}/report.html "
                       "(its thumbnails go to report_files/ beside it)")
    page, counts = build_report(cfg)
    fs, path = open_fs(cfg.out, s3_storage_options(cfg.s3_endpoint or None))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    write_atomic(fs, path, page.encode())  # the page last, whole: its thumbnails are there when it appears
    counts["page_bytes"] = len(page.encode())
    counts["config"] = config_dict(cfg)
    print(f"report for {counts['date']}: {counts['flagged_shown']}/{counts['flagged']} flagged in the queue, "
          f"{counts['sample']} in the precision sample ({counts['sample_drawn_now']} drawn now), "
          f"{counts['band_shown']}/{counts['band']} near the threshold, {counts['errors']} errors -> {cfg.out} "
          f"({counts['page_bytes'] / 1e6:.2f} MB, thumbnails in {_assets_folder(cfg.out)[0]})")
    return counts


def main(argv=None) -> dict:
    return run_report(parse_config(ReportConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
