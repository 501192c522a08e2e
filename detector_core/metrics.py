"""Detector metrics and threshold calibration (docs/method.md sections 6 and 7).

Curves come from scikit-learn. Conventions, used by the scan too: label 1 is
generated, a higher score means "more likely generated", and an image is flagged when
``score >= threshold``. ``calibrate_threshold`` picks the lowest threshold whose false
positive rate on held-out real images is at most the target, so the audit team gets
the recall that the false-positive budget allows and no more false alarms than asked.
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
]


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
