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
sample* (``detector_core.tables.sampling``: a seeded random sample of the night's flagged rows,
stratified by score band, in a fixed order, drawn once per night and detector and kept in
the ``precision_sample`` table, so ``query precision`` estimates from it without the
reviewers' bias toward the top of the queue) and the near-threshold band. The queue is
paged; it sorts by score, bucket or time and filters by bucket, prefix, score band and
reviewed or not; images that carry an imported verdict are hidden by default. Keyboard:
j/k (or the arrows) next and previous, 1/2/3 (or g/r/u) generated / real / unsure, z undo,
v or Enter a larger view, n the note, [ and ] the pages. The reviewer's name is asked once,
before the first verdict. ``--reviewers N`` (or a link ending in ``#shard=k/N``) gives
reviewer k a deterministic share (by a hash of the uri). Verdicts stay in the browser
(localStorage) and export as CSV (formula-like cells neutralised, ``detector_core.tables.csv_cells``)
or JSON for ``jobs.audit verdicts import``. The tables are read as of the newest committed
unit (``detector_core.tables.views.connect``). Thumbnails already in the folder (a re-run after an
import) are not made again. The page is rendered from ``jobs/templates/review.html.j2``
with autoescape on; the queue's data is one JSON block that the page's script shows with
``textContent`` only, so no text from the data is ever parsed as HTML.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
from types import SimpleNamespace

import pyarrow as pa

from detector_core import schema as S
from detector_core.storage import open_fs, s3_storage_options, write_atomic
from detector_core.tables import definitions as T
from detector_core.tables.questions import finish, question_sql
from detector_core.tables.sampling import draw_sample, night_seed
from detector_core.tables.verdicts import FILE_COLUMNS
from detector_core.tables.views import connect, read_runs, sql_quote
from jobs.common.errors import JobError, parse_date, query_failed, run_main
from jobs.common.flags import parse_config
from jobs.common.outputs import config_dict, open_output
from jobs.reporting.config import ReportConfig
from jobs.reporting.page import (
    QUEUE_BAND,
    QUEUE_FLAGGED,
    QUEUE_SAMPLE,
    card_data,
    histogram,
    precision_plot,
    render_page,
    table_data,
)
from jobs.reporting.thumbnails import assets_folder, write_thumbnails

CARD_COLUMNS = ("uri, score, threshold, detector_id, scan_id, bucket, epoch(scanned_at) AS scanned_at, declared, evidence_source, "
                "declared_generator, c2pa_state, flag_reason")


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
    from detector_core.tables.lease import Lease

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


def build_report(cfg: ReportConfig) -> tuple[str, dict]:
    """(the page, counts of what it shows) for ``cfg``; draws the night's precision sample and writes the thumbnails."""
    so = s3_storage_options(cfg.s3_endpoint or None)
    out = open_output(cfg.scan, cfg.catalog, cfg.namespace, so)
    runs = read_runs(out)
    if runs.num_rows == 0:
        raise JobError(f"no finished scans in {cfg.scan}: nothing to report")
    date = max(runs["scan_date"].to_pylist()) if cfg.date in ("", "last") else parse_date(cfg.date, "--date")
    where = f"detector_id = {sql_quote(cfg.detector_id)}" if cfg.detector_id else ""
    con = connect(out, where, date, date)
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
    every_night = connect(out, where)  # precision over the nights before this one too
    ask = SimpleNamespace(question="precision")
    precision = finish(ask, every_night.sql(question_sql(ask)).to_arrow_table()).to_pylist()
    tonight = [r for r in precision if str(r["scan_date"]) == date]

    summary_cols = ["scan_id", "detector_id", "detector_kind", "input", "listed", "skipped", "scored", "flagged", "errors", "seconds", "finished_at"]
    summary = pa.Table.from_pylist([{k: r[k] for k in summary_cols} for r in run_rows])
    _, rel = assets_folder(cfg.out)
    data = {"scan": cfg.scan, "date": date, "files": rel, "preview": bool(cfg.preview_size), "page_size": cfg.page_size,
            "reviewers": cfg.reviewers, "file_columns": list(FILE_COLUMNS),
            **card_data(cards, per_det, failures, reviewed)}
    n_shown = sum(1 for c in cards if c["q"] & QUEUE_FLAGGED)
    page = render_page(
        title=f"Scan review {date}", scan=cfg.scan, date=date, band=f"{cfg.band:g}",
        generated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        summary=table_data(summary), histograms=hists, n_flagged=n_flagged, n_flagged_shown=n_shown, n_band=n_band,
        errors=table_data(errors), n_errors=int(sum(errors["objects"].to_pylist())), precision=precision_plot(precision),
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
          f"({counts['page_bytes'] / 1e6:.2f} MB, thumbnails in {assets_folder(cfg.out)[0]})")
    return counts


def main(argv=None) -> dict:
    import duckdb

    cfg = parse_config(ReportConfig, argv, __doc__)
    try:
        return run_report(cfg)
    except duckdb.Error as exc:  # a damaged output: named in one line, with the commands that mend it
        raise query_failed(exc, cfg.scan) from None


if __name__ == "__main__":
    run_main(main)
