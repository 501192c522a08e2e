"""Reviewers' verdicts: the review page's export, checked, as rows of the ``verdicts`` table and as labels.

The review page (``jobs.report``) exports one CSV or JSON file with the columns
``uri, detector_id, scan_id, verdict, note, reviewer, reviewed_at`` (``verdict``: generated,
real or unsure; ``reviewed_at``: ISO 8601). ``parse_verdicts`` reads either format and
refuses a malformed file whole, saying which rows are wrong (a file that is not UTF-8, or
UTF-16/32 with a byte-order mark, is refused in one line with the byte position and the
``iconv`` command that converts it; the CSV export's neutralised cells are restored); ``known`` says which verdicts
are about an object the scan output scored; ``ScanOutput.append_new(T.VERDICTS, rows, KEY)``
appends only the verdicts the table does not hold yet, so importing a file twice (or the
page's next export, which repeats the earlier verdicts) adds nothing twice. A reviewer who
changes their mind gives a later ``reviewed_at``: the latest verdict on an image counts
(``latest``), so a ``reviewed_at`` more than ``MAX_CLOCK_SKEW`` after the import is refused
(it would outrank every real later verdict), and binary junk is called that, not UTF-16. ``with_verdicts`` turns confirmed images into labelled training rows.
"""

from __future__ import annotations

import codecs
import datetime as dt
import io
import json

import pyarrow as pa
import pyarrow.compute as pc

from detector_core import schema as S
from detector_core.tables import definitions as T
from detector_core.tables.csv_cells import restore

__all__ = ["FILE_COLUMNS", "KEY", "VerdictError", "known", "latest", "parse_verdicts", "with_verdicts"]

FILE_COLUMNS = (S.URI, S.DETECTOR_ID, S.SCAN_ID, S.VERDICT, S.NOTE, S.REVIEWER, S.REVIEWED_AT)
REQUIRED = (S.URI, S.DETECTOR_ID, S.SCAN_ID, S.VERDICT, S.REVIEWED_AT)
# One verdict is one reviewer's decision at one moment on one card; the note may be edited with it.
KEY = (S.URI, S.DETECTOR_ID, S.SCAN_ID, S.REVIEWER, S.REVIEWED_AT, S.VERDICT)
LABEL_OF = {S.VERDICT_GENERATED: 1, S.VERDICT_REAL: 0}


class VerdictError(ValueError):
    """The verdicts file cannot be imported as it is (the message says which rows and why)."""


def _examples(values: list, n: int = 3) -> str:
    return ", ".join(repr(v) for v in values[:n]) + (", …" if len(values) > n else "")


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


MAX_CLOCK_SKEW = dt.timedelta(minutes=10)  # a reviewer's clock ahead of the importer's by at most this


def _text(data: bytes, name: str) -> str:
    """The file's text: UTF-8 (with or without a BOM), or UTF-16/32 with a BOM (which says so reliably); else ``VerdictError``.

    Other encodings (Latin-1, Windows-1252: what a spreadsheet's "CSV" often is) cannot be
    told apart reliably, so they are refused in one line with the first bad byte and the fix.
    """
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "verdicts"
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise VerdictError(f"{name} starts with a {encoding} byte-order mark but is not {encoding} (byte position "
                                   f"{exc.start}); re-export it from the review page") from None
    head = data[:4096]
    if b"\x00" in head:
        # UTF-16 text of a CSV has a NUL in every other byte and printable ASCII in the rest; anything else is not text.
        for zeros, text in ((head[1::2], head[0::2]), (head[0::2], head[1::2])):
            if zeros.count(0) >= 0.9 * len(zeros) and sum(32 <= b < 127 or b in (9, 10, 13) for b in text) >= 0.9 * len(text):
                raise VerdictError(f"{name} has NUL bytes: UTF-16 without a byte-order mark? Convert it to UTF-8, e.g. "
                                   f"iconv -f utf-16le -t utf-8 {name} > {stem}-utf8.csv")
        raise VerdictError(f"{name} is not a verdicts file: binary data ({head.count(0)} NUL bytes in its first "
                           f"{len(head)}); give the CSV or JSON that the review page exported")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise VerdictError(f"{name} is not UTF-8: byte 0x{data[exc.start]:02x} at byte position {exc.start} (line {line}); "
                           f"if it is Latin-1 (a spreadsheet's CSV often is), convert it: "
                           f"iconv -f latin1 -t utf-8 {name} > {stem}-utf8.csv") from None


def _records(data: bytes, name: str) -> list[dict]:
    text = _text(data, name)
    if name.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VerdictError(f"{name} is not valid JSON: {exc}")
        rows = doc.get("verdicts") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise VerdictError(f"{name}: expected a JSON list of verdict objects (or {{\"verdicts\": [...]}})")
        return rows
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(io.BytesIO(text.encode("utf-8")), parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in FILE_COLUMNS},
                                                                    strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise VerdictError(f"{name} is not a readable CSV: {str(exc).splitlines()[0]}")
    # The page's CSV export neutralised formula-like cells (detector_core.tables.csv_cells): undo it exactly.
    return [{k: restore(v) if isinstance(v, str) else v for k, v in r.items()} for r in table.to_pylist()]


def parse_verdicts(data: bytes, name: str, reviewer: str = "", imported_at: dt.datetime | None = None) -> pa.Table:
    """The verdicts of an exported file (CSV or JSON) as rows of the verdicts table; ``VerdictError`` if any row is unusable.

    ``reviewer`` fills rows that name none. Rows repeated inside the file count once.
    """
    records = _records(data, name)
    if not records:
        raise VerdictError(f"{name} holds no verdicts")
    missing = [c for c in REQUIRED if not any(c in r for r in records)]
    if missing:
        raise VerdictError(f"{name} has no {', '.join(missing)} column; export it from the review page "
                           f"(columns: {', '.join(FILE_COLUMNS)})")
    imported_at = imported_at or dt.datetime.now(dt.timezone.utc)
    rows, bad = [], {}
    for i, r in enumerate(records, start=1):
        v = {c: ("" if r.get(c) is None else str(r.get(c)).strip()) for c in FILE_COLUMNS}
        v[S.VERDICT] = v[S.VERDICT].lower()
        v[S.REVIEWER] = v[S.REVIEWER] or reviewer
        problem, shown = next((f"no {c}" for c in (S.URI, S.DETECTOR_ID, S.SCAN_ID) if not v[c]), None), None
        if problem is None and v[S.VERDICT] not in S.VERDICTS:
            problem, shown = f"a verdict that is not {', '.join(S.VERDICTS)}", r.get(S.VERDICT)
        if problem is None and not v[S.REVIEWER]:
            problem = "no reviewer (pass --reviewer NAME)"
        if problem is None:
            try:
                at = dt.datetime.fromisoformat(v[S.REVIEWED_AT])
                v[S.REVIEWED_AT] = (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
            except ValueError:
                problem, shown = "reviewed_at is not an ISO 8601 time", r.get(S.REVIEWED_AT)
            else:
                # A time in the future would outrank every later verdict on that image (the latest counts).
                if v[S.REVIEWED_AT] > imported_at + MAX_CLOCK_SKEW:
                    problem, shown = (f"reviewed_at in the future (over {MAX_CLOCK_SKEW.seconds // 60} minutes after "
                                      f"{imported_at:%Y-%m-%dT%H:%M}Z)"), r.get(S.REVIEWED_AT)
        if problem:
            rows_of, values = bad.setdefault(problem, ([], []))
            rows_of.append(i)
            if shown is not None and len(values) < 3:
                values.append(shown)
            continue
        v[S.REVIEW_DATE] = v[S.REVIEWED_AT].date()
        v[S.IMPORTED_AT] = imported_at
        v[S.NOTE] = v[S.NOTE] or None
        rows.append(v)
    if bad:
        lines = "; ".join(f"{problem}: {len(idx)} row(s) (rows {_examples(idx)}{'; e.g. ' + _examples(vals) if vals else ''})"
                          for problem, (idx, vals) in bad.items())
        n_bad = sum(len(idx) for idx, _ in bad.values())
        raise VerdictError(f"{name}: nothing imported, {n_bad} of {len(records)} verdicts are unusable: {lines}")
    return T.first_of_keys(pa.Table.from_pylist(rows, schema=T.VERDICTS_SCHEMA), KEY)


def known(verdicts: pa.Table, scored: pa.Table) -> pa.Array:
    """Per verdict, whether ``scored`` (uri, detector_id, scan_id rows of the scores table) holds its object."""
    return T.in_keys(verdicts, scored, (S.URI, S.DETECTOR_ID, S.SCAN_ID))


def latest(verdicts: pa.Table) -> pa.Table:
    """The latest verdict on each image (uri), whoever gave it and for whichever detector: ``uri, verdict``."""
    if verdicts.num_rows == 0:
        return pa.table({S.URI: pa.array([], pa.string()), S.VERDICT: pa.array([], pa.string())})
    ordered = verdicts.select([S.URI, S.REVIEWED_AT, S.VERDICT]).sort_by([(S.URI, "ascending"), (S.REVIEWED_AT, "ascending")])
    last = ordered.group_by(S.URI, use_threads=False).aggregate([(S.VERDICT, "last")])
    return pa.table({S.URI: last[S.URI], S.VERDICT: last[f"{S.VERDICT}_last"]})


def with_verdicts(manifest: pa.Table, verdicts: pa.Table, in_validation: bool = False) -> tuple[pa.Table, dict]:
    """``manifest`` plus the reviewed images as labelled rows; returns (the manifest, counts).

    The latest verdict on each image decides: generated = label 1, real = label 0 (a false
    positive confirmed real becomes a real example), unsure = no row. A reviewed image that
    the manifest also lists takes the verdict's label. Reviewed rows go to the train split
    unless ``in_validation`` (then the manifest's hash split decides, as for unsplit rows).
    """
    last = latest(verdicts)
    decided = last.filter(pc.is_in(last[S.VERDICT], value_set=pa.array(list(LABEL_OF))))
    labels = pc.if_else(pc.equal(decided[S.VERDICT], S.VERDICT_GENERATED), 1, 0).cast(pa.int8()).combine_chunks()
    listed = pc.is_in(manifest[S.URI].cast(pa.string()), value_set=decided[S.URI])
    relabelled = 0
    if S.LABEL in manifest.column_names and pc.any(listed).as_py():
        from detector_core.sources.manifest import _labels  # the manifest's own reading of 0/1/"real"/… labels

        old = pa.table({S.URI: manifest[S.URI].cast(pa.string()), S.LABEL: _labels(manifest[S.LABEL].combine_chunks())}).filter(listed)
        joined = old.join(pa.table({S.URI: decided[S.URI].cast(pa.string()), "_new": labels}), S.URI)
        relabelled = int(pc.sum(pc.fill_null(pc.not_equal(joined[S.LABEL], joined["_new"]), True)).as_py() or 0)
    kept = manifest.filter(pc.invert(listed))
    split = pa.nulls(decided.num_rows, pa.string()) if in_validation else pa.repeat(pa.scalar(S.SPLIT_TRAIN), decided.num_rows)
    added = {S.URI: decided[S.URI].combine_chunks().cast(pa.string()), S.LABEL: labels, S.SPLIT: split}
    cols = {}
    for name in kept.column_names:  # the manifest's columns keep their types; the new rows take them
        extra = added[name].cast(kept[name].type) if name in added else pa.nulls(decided.num_rows, kept[name].type)
        cols[name] = pa.concat_arrays([kept[name].combine_chunks(), extra])
    for name, arr in added.items():
        if name not in cols:
            cols[name] = pa.concat_arrays([pa.nulls(kept.num_rows, arr.type), arr])
    n_generated = int(pc.sum(labels).as_py() or 0)
    counts = {"verdict_rows": decided.num_rows, "generated": n_generated, "real": decided.num_rows - n_generated,
              "unsure_dropped": last.num_rows - decided.num_rows, "already_in_manifest": int(pc.sum(listed).as_py() or 0),
              "relabelled": relabelled, "in_validation": in_validation}
    return pa.table(cols), counts
