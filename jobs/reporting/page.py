"""The page itself: the histogram and precision plot geometry, the queue's columnar data, the template render.

Rendered from ``jobs/templates/review.html.j2`` with autoescape on; the queue's data is one JSON
block that the page's script shows with ``textContent`` only.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from detector_core import schema as S
from detector_core.tables.verdicts import FILE_COLUMNS
from jobs.reporting.thumbnails import asset_name, shard_hash

HIST_BINS = 50
QUEUE_FLAGGED, QUEUE_SAMPLE, QUEUE_BAND = 1, 2, 4  # a card's queues, as bits (the page's filters test them)


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


def table_data(table: pa.Table) -> dict:
    return {"columns": table.column_names, "rows": [list(r.values()) for r in table.to_pylist()]}


@functools.lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs", "templates"), autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("review.html.j2")


def render_page(**context) -> str:
    """The page from its parts (``build_report`` gathers them; ``bench/bench_review.py`` makes them up)."""
    return _template().render(file_columns=list(FILE_COLUMNS), verdict_choices=S.VERDICTS, **context)
