"""The SQL of the audit questions (``jobs.audit query QUESTION``) over the views of ``detector_core.tables.views``.

Each question is one DuckDB query over the views ``scores``, ``flagged``, ``errors``,
``runs``, ``verdicts`` and ``precision_sample``; ``question_sql(cfg)`` builds it from the
answering job's config (any object with the question's fields). The reviewers' questions:
``precision`` (per night and detector: the estimate from the night's precision sample only,
weighted by score band, with a 95 % Wilson interval at the effective sample size, and
beside it the *convenience* figure over every verdict given, which reviewers' choice of
images biases; the latest verdict on an image counts, unsure ones are in no denominator), ``drift``
(each night's flagged rate and score quantiles per bucket and detector against the trailing
``--nights`` calendar days; a night outside the band is marked high or low), and
``threshold`` (the threshold that would have flagged about ``--target-daily-flags`` objects a
night over the last ``--nights`` days, next to the bundle's own; ``finish`` adds the flag
rate each would have given, with its 95 % Clopper-Pearson interval). The evidence questions:
``provenance`` (per night and bucket, objects by the evidence's source, what it declares and
the C2PA state) and ``agreement`` (on files that declare themselves generated, the
detector's recall per generator name and night, with a Wilson interval: production recall
on the generators users meet, which no held-out set gives). ``compare`` (a challenger that
``jobs.rescore`` scored from the stored features against production, per night and bucket:
flag counts, both / either / neither, agreement and Cohen's κ, the score shift, reviewers'
verdicts on the disagreements, and each detector's recall on declared-generated files;
``--rows``: the disagreements themselves).
"""

from __future__ import annotations

import pyarrow as pa
from scipy.special import logit as scipy_logit

from detector_core.method.metrics import clopper_pearson, wilson
from detector_core.tables.views import sql_quote

QUESTIONS = ("per-day", "per-prefix", "top", "detectors", "diff", "recut", "errors", "precision", "drift", "threshold", "provenance",
             "agreement", "compare", "sql")
DRIFT_MIN_NIGHTS = 7  # nights in the trailing window before a night is judged
DRIFT_BAND = 3.0  # standard deviations


class QuestionError(ValueError):
    """The question cannot be asked as given (a missing or wrong parameter)."""


def where_clause(cfg) -> str:
    """The SQL condition every table view gets (``views.connect(where=…)``): the ``--detector-id`` filter, except for diff."""
    parts = []
    if cfg.detector_id and cfg.question not in ("diff", "compare"):
        parts.append(f"detector_id = {sql_quote(cfg.detector_id)}")
    return " AND ".join(parts)


def _limit(cfg) -> str:
    return f" LIMIT {int(cfg.limit)}" if cfg.limit > 0 else ""


def question_sql(cfg) -> str:
    """The SQL that answers ``cfg.question`` over the views (shown by the README as examples).

    Every question reads the current rows (``views.current_rows``: one per object, night and
    detector), so a night scanned again counts each object once; ``per-day`` names the repairs
    that changed a night (``repaired_by``).
    """
    q = cfg.question
    if q == "per-day":
        return """
            WITH s AS (SELECT scan_date, detector_id, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged
                       FROM scores GROUP BY ALL),
                 e AS (SELECT scan_date, detector_id, count(*) AS errors FROM errors GROUP BY ALL),
                 r AS (SELECT night, string_agg(scan_id, ', ' ORDER BY committed_at) AS repaired_by
                       FROM (SELECT scan_id, committed_at, unnest(nights) AS night FROM runs WHERE status = 'repair') GROUP BY night)
            SELECT scan_date, detector_id, coalesce(scored, 0) AS scored, coalesce(flagged, 0) AS flagged,
                   coalesce(errors, 0) AS errors, round(coalesce(flagged, 0) / nullif(scored, 0), 4) AS flagged_rate, r.repaired_by
            FROM s FULL OUTER JOIN e USING (scan_date, detector_id) LEFT JOIN r ON r.night = scan_date
            ORDER BY scan_date, detector_id"""
    if q == "per-prefix":
        depth = max(0, int(cfg.depth))
        return f"""
            WITH k AS (SELECT bucket, flagged,
                              string_split(regexp_replace(uri, '^([a-z0-9]+://[^/]*/|/)', ''), '/') AS parts FROM scores)
            SELECT bucket, array_to_string(list_slice(parts, 1, least(len(parts) - 1, {depth})), '/') AS prefix,
                   count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                   round(count(*) FILTER (WHERE flagged) / count(*), 4) AS flagged_rate
            FROM k GROUP BY ALL ORDER BY flagged DESC, scored DESC, bucket, prefix"""
    if q == "top":
        return f"""SELECT scan_date, bucket, uri, score, threshold, detector_id, scan_id FROM flagged
                   ORDER BY score DESC, uri{_limit(cfg)}"""
    if q == "detectors":
        return """SELECT detector_id, any_value(detector_kind) AS detector_kind, any_value(feature_id) AS feature_id,
                         any_value(threshold) AS threshold,
                         count(DISTINCT scan_id) AS scans, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                         min(scan_date) AS first_scan_date, max(scan_date) AS last_scan_date
                  FROM scores GROUP BY detector_id ORDER BY last_scan_date DESC, detector_id"""
    if q == "diff":
        if not (cfg.detector_id and cfg.against_id):
            raise QuestionError("diff needs --detector-id OLD_ID --against-id NEW_ID (list them with: query detectors)")
        latest = "SELECT uri, arg_max(score, scanned_at) AS score, arg_max(flagged, scanned_at) AS flagged FROM scores WHERE detector_id = {} GROUP BY uri"
        return f"""
            WITH a AS ({latest.format(sql_quote(cfg.detector_id))}), b AS ({latest.format(sql_quote(cfg.against_id))})
            SELECT CASE WHEN b.flagged THEN 'newly flagged' ELSE 'no longer flagged' END AS change,
                   uri, a.score AS score_old, b.score AS score_new
            FROM a JOIN b USING (uri) WHERE a.flagged <> b.flagged
            ORDER BY change, abs(b.score - a.score) DESC, uri{_limit(cfg)}"""
    if q == "recut":
        if not (0.0 < cfg.threshold < 1.0):
            raise QuestionError("recut needs --threshold T with 0 < T < 1 (a score)")
        logit = float(scipy_logit(cfg.threshold))  # decisions are made on the logit, as in the scan
        if cfg.rows:
            return f"""SELECT scan_date, bucket, uri, score, logit, flagged AS flagged_at_bundle, detector_id, scan_id FROM scores
                       WHERE logit >= {logit!r} ORDER BY score DESC, uri{_limit(cfg)}"""
        return f"""SELECT scan_date, detector_id, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged_at_bundle,
                          count(*) FILTER (WHERE logit >= {logit!r}) AS flagged_at_threshold,
                          count(*) FILTER (WHERE logit >= {logit!r} AND NOT flagged) AS newly_flagged,
                          count(*) FILTER (WHERE logit < {logit!r} AND flagged) AS no_longer_flagged
                   FROM scores GROUP BY ALL ORDER BY scan_date, detector_id"""
    if q == "errors":
        return """SELECT scan_date, error_stage, error_type, count(*) AS objects, any_value(uri) AS example_uri,
                         any_value(error_message) AS example_message
                  FROM errors GROUP BY ALL ORDER BY scan_date, objects DESC, error_stage, error_type"""
    if q == "precision":
        # The estimate: the precision sample only (jobs.report draws it; detector_core.tables.sampling),
        # each score band's confirmed share weighted by its share of the night's flags (N_h / N),
        # variance sum W_h^2 p_h (1 - p_h) / n_h, and a Wilson interval at the effective size
        # p (1 - p) / variance (the reviewed count when every band is all one verdict).
        # The convenience figure counts whatever reviewers opened: labelled as such, not an estimate.
        return """
            WITH c AS (SELECT f.scan_date, f.detector_id, count(*) AS flagged,
                              count(*) FILTER (WHERE v.verdict IN ('generated', 'real')) AS reviewed,
                              count(*) FILTER (WHERE v.verdict = 'generated') AS confirmed_generated,
                              count(*) FILTER (WHERE v.verdict = 'real') AS confirmed_real,
                              count(*) FILTER (WHERE v.verdict = 'unsure') AS unsure
                       FROM flagged f LEFT JOIN latest_verdicts v USING (uri) GROUP BY ALL),
                 h AS (SELECT s.scan_date, s.detector_id, s.stratum, any_value(s.stratum_flagged) / any_value(s.night_flagged) AS w,
                              any_value(s.sample_size) AS sample_size,
                              count(*) FILTER (WHERE v.verdict IN ('generated', 'real')) AS n_h,
                              count(*) FILTER (WHERE v.verdict = 'generated') AS g_h,
                              count(*) FILTER (WHERE v.verdict = 'unsure') AS unsure_h
                       FROM precision_sample s LEFT JOIN latest_verdicts v USING (uri)
                       GROUP BY s.scan_date, s.detector_id, s.stratum),
                 e AS (SELECT scan_date, detector_id, any_value(sample_size) AS sample_size, sum(n_h) AS sample_reviewed,
                              sum(g_h) AS sample_generated, sum(unsure_h) AS sample_unsure, count(*) AS strata,
                              count(*) FILTER (WHERE n_h > 0) AS strata_reviewed,
                              sum(w * g_h / n_h) FILTER (WHERE n_h > 0) AS p,
                              sum(w * w * (g_h / n_h) * (1 - g_h / n_h) / n_h) FILTER (WHERE n_h > 0) AS variance
                       FROM h GROUP BY ALL),
                 j AS (SELECT c.*, coalesce(e.sample_size, 0) AS sample_size, coalesce(e.sample_reviewed, 0) AS sample_reviewed,
                              coalesce(e.sample_generated, 0) AS sample_generated, coalesce(e.sample_unsure, 0) AS sample_unsure,
                              coalesce(e.strata, 0) AS strata, coalesce(e.strata_reviewed, 0) AS strata_reviewed,
                              CASE WHEN e.strata_reviewed = e.strata THEN e.p END AS precision,
                              CASE WHEN e.variance > 0 THEN e.p * (1 - e.p) / e.variance ELSE e.sample_reviewed END AS n_effective,
                              CASE WHEN e.strata IS NULL THEN 'no sample (jobs.report draws it)'
                                   WHEN e.strata_reviewed < e.strata
                                   THEN 'sample incomplete: ' || e.strata_reviewed || ' of ' || e.strata || ' score bands reviewed'
                                   ELSE 'stratified sample' END AS estimate,
                              confirmed_generated / nullif(reviewed, 0) AS convenience_precision
                       FROM c LEFT JOIN e USING (scan_date, detector_id))
            SELECT scan_date, detector_id, flagged, sample_size, sample_reviewed, sample_generated, sample_unsure, strata,
                   strata_reviewed, precision, n_effective, estimate,
                   reviewed, confirmed_generated, confirmed_real, unsure, convenience_precision
            FROM j ORDER BY scan_date, detector_id"""
    if q == "drift":
        nights, k = int(cfg.nights), DRIFT_BAND
        # The band: the trailing nights' spread, but never narrower than this night's own
        # binomial noise around the baseline rate (a steady rate has no spread to learn).
        sd = "greatest(coalesce(sd_rate, 0), sqrt(baseline_rate * (1 - baseline_rate) / scored), 0.5 / scored)"
        return f"""
            WITH n AS (SELECT scan_date, bucket, detector_id, count(*) AS scored, count(*) FILTER (WHERE flagged) AS flagged,
                              quantile_cont(score, 0.5) AS median_score, quantile_cont(score, 0.9) AS p90_score
                       FROM scores GROUP BY ALL),
                 w AS (SELECT *, flagged / scored AS flagged_rate, count(*) OVER win AS baseline_nights,
                              avg(flagged / scored) OVER win AS baseline_rate, stddev_samp(flagged / scored) OVER win AS sd_rate,
                              avg(p90_score) OVER win AS baseline_p90, stddev_samp(p90_score) OVER win AS sd_p90
                       FROM n WINDOW win AS (PARTITION BY bucket, detector_id ORDER BY scan_date
                                             RANGE BETWEEN INTERVAL {nights} DAYS PRECEDING AND INTERVAL 1 DAYS PRECEDING))
            SELECT scan_date, bucket, detector_id, scored, flagged, flagged_rate, baseline_nights, baseline_rate,
                   greatest(baseline_rate - {k!r} * {sd}, 0) AS band_low, least(baseline_rate + {k!r} * {sd}, 1) AS band_high,
                   median_score, p90_score, baseline_p90,
                   CASE WHEN baseline_nights < {DRIFT_MIN_NIGHTS} THEN 'no baseline'
                        WHEN flagged_rate > baseline_rate + {k!r} * {sd} THEN 'high'
                        WHEN flagged_rate < baseline_rate - {k!r} * {sd} THEN 'low'
                        WHEN abs(p90_score - baseline_p90) > {k!r} * greatest(coalesce(sd_p90, 0), 0.01) THEN 'scores shifted'
                        ELSE 'ok' END AS drift
            FROM w ORDER BY scan_date, bucket, detector_id"""
    if q == "threshold":
        n, nights = int(cfg.target_daily_flags), int(cfg.nights)
        if n < 1:
            raise QuestionError("threshold needs --target-daily-flags N (objects a night, N >= 1)")
        return f"""
            WITH last AS (SELECT detector_id, max(scan_date) AS last_date FROM scores GROUP BY ALL),
                 s AS (SELECT detector_id, scan_date, logit, flagged, threshold FROM scores JOIN last USING (detector_id)
                       WHERE scan_date > last_date - INTERVAL {nights} DAYS),
                 a AS (SELECT detector_id, count(DISTINCT scan_date) AS nights, count(*) AS scored,
                              any_value(threshold) AS bundle_threshold, count(*) FILTER (WHERE flagged) AS flagged_at_bundle
                       FROM s GROUP BY ALL),
                 r AS (SELECT detector_id, logit, row_number() OVER (PARTITION BY detector_id ORDER BY logit DESC) AS rank FROM s),
                 t AS (SELECT a.*, r.logit AS threshold_logit FROM a JOIN r USING (detector_id)
                       WHERE r.rank = least({n} * a.nights, a.scored))
            SELECT t.detector_id, t.nights, t.scored, {n} AS target_daily_flags, 1 / (1 + exp(-t.threshold_logit)) AS threshold,
                   t.threshold_logit, count(*) FILTER (WHERE s.logit >= t.threshold_logit) / t.nights AS flags_per_night,
                   count(*) FILTER (WHERE s.logit >= t.threshold_logit) AS flagged_at_threshold,
                   t.bundle_threshold, t.flagged_at_bundle / t.nights AS flags_per_night_at_bundle, t.flagged_at_bundle
            FROM t JOIN s USING (detector_id)
            GROUP BY t.detector_id, t.nights, t.scored, t.threshold_logit, t.bundle_threshold, t.flagged_at_bundle
            ORDER BY t.detector_id"""
    if q == "provenance":
        # Each object once per night (it has a row per detector, and the same evidence in each).
        return """
            WITH o AS (SELECT DISTINCT scan_date, bucket, uri, declared, evidence_source, c2pa_state,
                              evidence_error IS NOT NULL AS unreadable_evidence FROM scores
                       UNION SELECT DISTINCT scan_date, bucket, uri, declared, evidence_source, c2pa_state,
                              evidence_error IS NOT NULL FROM errors)
            SELECT scan_date, bucket, coalesce(evidence_source, 'none') AS evidence_source, coalesce(declared, 'none') AS declared,
                   coalesce(c2pa_state, '') AS c2pa_state, count(DISTINCT uri) AS objects,
                   count(DISTINCT uri) FILTER (WHERE unreadable_evidence) AS with_evidence_errors
            FROM o GROUP BY ALL ORDER BY scan_date, bucket, objects DESC, evidence_source, declared"""
    if q == "agreement":
        # The detector's recall on files that declare themselves generated (an invalid manifest does
        # not count): flagged by its score, whatever --flag-declared added.
        return """
            WITH d AS (SELECT scan_date, detector_id, coalesce(declared_generator, '(not named)') AS generator,
                              count(*) AS declared_generated, count(*) FILTER (WHERE flag_reason IN ('score', 'both')) AS flagged_by_score
                       FROM scores WHERE declared = 'declared_generated' AND coalesce(c2pa_state, '') NOT IN ('invalid', 'unreadable')
                       GROUP BY ALL),
                 r AS (SELECT *, flagged_by_score / declared_generated AS recall FROM d)
            SELECT scan_date, detector_id, generator, declared_generated, flagged_by_score, recall
            FROM r ORDER BY scan_date, detector_id, declared_generated DESC, generator"""
    if q == "compare":
        if not cfg.challenger:
            raise QuestionError("compare needs --challenger ID (a detector id jobs.rescore wrote; list them with: query sql --sql "
                                "\"SELECT DISTINCT detector_id FROM challenger_scores\")")
        prod = f"detector_id = {sql_quote(cfg.detector_id)}" if cfg.detector_id else "true"
        chal = sql_quote(cfg.challenger)
        # Production: the current rows (one per object and night). The challenger: its latest row per object and night.
        joined = f"""
            p AS (SELECT uri, scan_date, bucket, flagged AS pf, score AS ps, declared, c2pa_state FROM scores WHERE {prod}),
            c AS (SELECT uri, scan_date, arg_max(flagged, scanned_at) AS cf, arg_max(score, scanned_at) AS cs
                  FROM challenger_scores WHERE detector_id = {chal} GROUP BY uri, scan_date),
            j AS (SELECT p.*, c.cf, c.cs, v.verdict FROM p JOIN c USING (uri, scan_date) LEFT JOIN latest_verdicts v USING (uri))"""
        if cfg.rows:
            return f"""WITH {joined}
                SELECT scan_date, bucket, uri, CASE WHEN cf THEN 'challenger only' ELSE 'production only' END AS flagged_by,
                       ps AS score_production, cs AS score_challenger, verdict
                FROM j WHERE pf <> cf ORDER BY scan_date, flagged_by, abs(cs - ps) DESC, uri{_limit(cfg)}"""
        return f"""WITH {joined},
            a AS (SELECT scan_date, bucket, count(*) AS objects, count(*) FILTER (WHERE pf) AS flagged_production,
                         count(*) FILTER (WHERE cf) AS flagged_challenger, count(*) FILTER (WHERE pf AND cf) AS flagged_both,
                         count(*) FILTER (WHERE pf <> cf) AS flagged_either_only, count(*) FILTER (WHERE NOT pf AND NOT cf) AS flagged_neither,
                         avg(cs - ps) AS mean_score_shift, quantile_cont(cs, 0.9) - quantile_cont(ps, 0.9) AS p90_score_shift,
                         count(*) FILTER (WHERE pf <> cf AND verdict IN ('generated', 'real')) AS disagreements_reviewed,
                         count(*) FILTER (WHERE pf <> cf AND ((cf AND verdict = 'generated') OR (pf AND verdict = 'real')))
                             AS challenger_right,
                         count(*) FILTER (WHERE declared = 'declared_generated' AND coalesce(c2pa_state, '') NOT IN ('invalid', 'unreadable'))
                             AS declared_generated,
                         count(*) FILTER (WHERE pf AND declared = 'declared_generated' AND coalesce(c2pa_state, '') NOT IN ('invalid', 'unreadable'))
                             AS declared_flagged_production,
                         count(*) FILTER (WHERE cf AND declared = 'declared_generated' AND coalesce(c2pa_state, '') NOT IN ('invalid', 'unreadable'))
                             AS declared_flagged_challenger
                  FROM j GROUP BY ALL)
            SELECT *, (flagged_both + flagged_neither) / objects AS agreement,
                   -- Cohen's kappa: observed agreement against the agreement two independent raters with these rates would reach
                   CASE WHEN 1 - ((flagged_production * flagged_challenger) + (objects - flagged_production) * (objects - flagged_challenger))
                             / (objects * objects) = 0 THEN NULL
                        ELSE ((flagged_both + flagged_neither) / objects
                              - ((flagged_production * flagged_challenger) + (objects - flagged_production) * (objects - flagged_challenger))
                                / (objects * objects))
                             / (1 - ((flagged_production * flagged_challenger) + (objects - flagged_production) * (objects - flagged_challenger))
                                    / (objects * objects)) END AS cohens_kappa,
                   declared_flagged_production / nullif(declared_generated, 0) AS recall_declared_production,
                   declared_flagged_challenger / nullif(declared_generated, 0) AS recall_declared_challenger
            FROM a ORDER BY scan_date, bucket"""
    if q == "sql":
        if not cfg.sql:
            raise QuestionError("sql needs --sql 'SELECT … FROM scores|flagged|errors|runs|verdicts'")
        return cfg.sql
    raise QuestionError(f"unknown question {q!r}; one of {', '.join(QUESTIONS)}")


# The Wilson intervals ``finish`` adds: question -> (rate, the size it was seen on, the interval's column prefix); the
# size columns that only serve an interval are dropped after.
WILSON_COLUMNS = {
    "precision": (("precision", "n_effective", "precision"), ("convenience_precision", "reviewed", "convenience")),
    "agreement": (("recall", "declared_generated", "recall"),),
}
_INTERVAL_ONLY = {"precision": ("n_effective",)}


def _with_wilson(table: pa.Table, rate: str, n: str, prefix: str) -> pa.Table:
    """``table`` with ``<prefix>_low``/``_high``, the 95 % Wilson interval (``metrics.wilson``) of ``rate`` on ``n``, after ``rate``."""
    lows, highs = [], []
    for p, size in zip(table[rate].to_pylist(), table[n].to_pylist()):
        low, high = wilson(p, size) if p is not None and size is not None else (None, None)
        lows.append(None if low is None or low != low else low)  # nan: no interval (n = 0)
        highs.append(None if high is None or high != high else high)
    at = table.schema.get_field_index(rate) + 1
    table = table.add_column(at, f"{prefix}_low", pa.array(lows, pa.float64()))
    return table.add_column(at + 1, f"{prefix}_high", pa.array(highs, pa.float64()))


def finish(cfg, table: pa.Table) -> pa.Table:
    """The answer with what SQL does not compute: the Wilson intervals of ``precision`` and ``agreement`` (one implementation,
    ``metrics.wilson``), and for ``threshold`` each threshold's flag rate with its 95 % Clopper-Pearson interval."""
    for rate, n, prefix in WILSON_COLUMNS.get(cfg.question, ()):
        table = _with_wilson(table, rate, n, prefix)
    table = table.drop_columns(list(_INTERVAL_ONLY.get(cfg.question, ())))
    if cfg.question != "threshold" or table.num_rows == 0:
        return table
    scored = table["scored"].to_pylist()
    for name, counts in (("flag_rate", table["flagged_at_threshold"].to_pylist()),
                         ("flag_rate_at_bundle", table["flagged_at_bundle"].to_pylist())):
        rates, lows, highs = [], [], []
        for k, n in zip(counts, scored):
            low, high = clopper_pearson(int(k), int(n))
            rates.append(k / n if n else None)
            lows.append(low)
            highs.append(high)
        table = table.append_column(name, pa.array(rates, pa.float64()))
        table = table.append_column(f"{name}_low", pa.array(lows, pa.float64()))
        table = table.append_column(f"{name}_high", pa.array(highs, pa.float64()))
    return table
