"""Detector metrics and threshold calibration (docs/method.md sections 6 and 7).

Curves come from scikit-learn. Conventions, used by the scan too: label 1 is
generated, a higher score means "more likely generated", and an image is flagged when
``score >= threshold``. ``calibrate_threshold`` picks the lowest threshold whose false
positive rate on held-out real images is at most the target, so the audit team gets
the recall that the false-positive budget allows and no more false alarms than asked.
``calibration_record`` says how sure that threshold is: the real images it was set on, a
Clopper-Pearson interval on the false-positive rate they give, and a warning when they are
fewer than the rule of three asks (``3 / target_fpr``: with n reals and none flagged, the
95 % upper bound on the rate is about 3/n). ``clopper_pearson`` and ``wilson`` are the two
binomial intervals the product reports (exact for small counts; Wilson for precision).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "roc_auc",
    "average_precision",
    "accuracy_at",
    "tpr_at_fpr",
    "calibrate_threshold",
    "false_positive_rate",
    "summarize",
    "clopper_pearson",
    "wilson",
    "calibration_record",
]

Z95 = 1.959963984540054  # two-sided 95 %


def _arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (generated)")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < y.shape[0]


def roc_auc(labels, scores) -> float:
    """ROC AUC; NaN when only one class is present."""
    y, s = _arrays(labels, scores)
    return float(roc_auc_score(y, s)) if _both_classes(y) else math.nan


def average_precision(labels, scores) -> float:
    """Average precision for the generated class; NaN without a generated example."""
    y, s = _arrays(labels, scores)
    if y.sum() == 0:
        return math.nan
    # scikit-learn sums recall steps times precision in floating point; on a perfect ranking
    # that sum can land an ulp above 1 (19 real + 20 generated, in order: 1.0000000000000002).
    return min(1.0, float(average_precision_score(y, s)))


def accuracy_at(labels, scores, threshold: float) -> float:
    """Fraction of examples whose decision ``score >= threshold`` matches the label."""
    y, s = _arrays(labels, scores)
    return float(((s >= threshold).astype(np.int64) == y).mean()) if y.size else math.nan


def false_positive_rate(scores_of_real, threshold: float) -> float:
    """Fraction of real images flagged at ``threshold``."""
    s = np.asarray(scores_of_real, dtype=np.float64).ravel()
    return float((s >= threshold).mean()) if s.size else math.nan


def tpr_at_fpr(labels, scores, target_fpr: float) -> float:
    """Best true-positive rate among thresholds whose false-positive rate is <= target."""
    y, s = _arrays(labels, scores)
    if not _both_classes(y):
        return math.nan
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ok = fpr <= target_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def calibrate_threshold(scores_of_real, target_fpr: float) -> float:
    """A threshold at which at most ``target_fpr`` of the real images are flagged.

    With ``n`` real scores, at most ``k = floor(target_fpr * n)`` of them may reach the
    threshold; ties at the boundary are kept below it, so the achieved rate never
    exceeds the target. The threshold sits midway between the highest real score that
    must stay unflagged and the next higher real score (or, when none may pass, a
    relative 1e-4 above the highest): no real score lies between it and the tight
    boundary, and a re-computation of the same score with other float rounding (GPU vs
    CPU, another batch size) does not cross it.
    """
    s = np.sort(np.asarray(scores_of_real, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("cannot calibrate a threshold without real images")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if np.isnan(s).any():
        raise ValueError("scores of real images contain NaN")
    allowed = int(math.floor(target_fpr * s.size + 1e-9))
    boundary = s[allowed]
    above = s[:allowed][s[:allowed] > boundary]
    if above.size:
        return float((boundary + above.min()) / 2.0)
    return float(boundary + 1e-4 * max(1.0, abs(boundary)))


def summarize(labels, scores, threshold: float, fprs: tuple[float, ...] = (0.01, 0.001)) -> dict:
    """The metrics the field reports, in one dict (keys are stable: files use them)."""
    y, s = _arrays(labels, scores)
    out = {
        "n": int(y.size),
        "n_generated": int(y.sum()),
        "n_real": int(y.size - y.sum()),
        "auc": roc_auc(y, s),
        "ap": average_precision(y, s),
        "accuracy": accuracy_at(y, s, threshold),
        "threshold": float(threshold),
        "real_accuracy": float((s[y == 0] < threshold).mean()) if (y == 0).any() else math.nan,
        "generated_accuracy": float((s[y == 1] >= threshold).mean()) if (y == 1).any() else math.nan,
    }
    for f in fprs:
        out[f"tpr_at_fpr_{f:g}"] = tpr_at_fpr(y, s, f)
    return out


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial rate, ``k`` of ``n``; (nan, nan) when n = 0."""
    from scipy.stats import beta

    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got {k} of {n}")
    a = (1.0 - confidence) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate ``p`` seen on ``n`` trials (``n`` may be an effective size); (nan, nan) when n = 0."""
    if not n > 0 or math.isnan(p):
        return math.nan, math.nan
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rule_of_three(target_fpr: float) -> int:
    """The real images a threshold at ``target_fpr`` needs: with fewer, even none flagged leaves the 95 % bound above the target."""
    return math.ceil(3.0 / target_fpr - 1e-9) if target_fpr > 0 else 0


def calibration_record(scores_of_real, threshold: float, target_fpr: float, split: str) -> dict:
    """How ``threshold`` was set on ``scores_of_real``: n, flagged, achieved rate, its 95 % Clopper-Pearson interval, warnings."""
    s = np.asarray(scores_of_real, dtype=np.float64).ravel()
    k, n = int((s >= threshold).sum()), int(s.size)
    low, high = clopper_pearson(k, n)
    rec = {"method": "target_fpr", "target_fpr": target_fpr, "split": split, "n_real": n, "flagged_real": k,
           "achieved_fpr": k / n if n else math.nan, "fpr_interval": [low, high], "interval": "clopper-pearson 95%",
           "min_real_for_target": rule_of_three(target_fpr)}
    if n < rec["min_real_for_target"]:
        rec["warning"] = (f"the {split} split holds {n} real images; a {target_fpr:g} false-positive rate needs at least "
                          f"{rec['min_real_for_target']} (3 / target, the rule of three): the rate achieved there, {rec['achieved_fpr']:.4g}, "
                          f"could really be up to {high:.3g} (95 % Clopper-Pearson)")
    return rec
