"""Metrics against scikit-learn and hand-computed cases; threshold calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, roc_auc_score

from detector_core.method.metrics import (
    accuracy_at,
    average_precision,
    calibrate_threshold,
    calibration_record,
    clopper_pearson,
    false_positive_rate,
    roc_auc,
    summarize,
    tpr_at_fpr,
    wilson,
)


def test_auc_and_ap_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + y
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


def test_ap_of_a_perfect_ranking_is_exactly_one():
    # scikit-learn's float sum lands an ulp above 1 here; AP is a weighted mean of precisions <= 1.
    y, s = np.array([0] * 19 + [1] * 20), np.arange(39, dtype=float)
    assert average_precision_score(y, s) > 1.0
    assert average_precision(y, s) == 1.0


def test_tpr_at_fpr_hand_case():
    # 10 real, 10 generated. Reals at 0..9, generated at 5.5..14.5 step 1.
    real = np.arange(10.0)
    gen = np.arange(10.0) + 5.5
    y = np.r_[np.zeros(10), np.ones(10)]
    s = np.r_[real, gen]
    # FPR <= 0.1 lets one real (9) pass: the threshold can drop to 8.5, where the
    # generated 8.5..14.5 (7 of 10) are caught.
    assert tpr_at_fpr(y, s, 0.1) == pytest.approx(0.7)
    # FPR 0: threshold above 9, i.e. 9.5: 9.5..14.5 -> 6 of 10.
    assert tpr_at_fpr(y, s, 0.0) == pytest.approx(0.6)
    # FPR <= 0.3 lets 7, 8, 9 pass: threshold 6.5 -> 9 of 10.
    assert tpr_at_fpr(y, s, 0.3) == pytest.approx(0.9)


def test_accuracy_at_threshold():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.5, 0.9])
    assert accuracy_at(y, s, 0.5) == pytest.approx(0.75)  # 0.6 is a false positive
    assert accuracy_at(y, s, 0.7) == pytest.approx(0.75)  # 0.5 is a miss


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.333])
def test_calibrate_threshold_respects_target_and_is_tight(target):
    rng = np.random.default_rng(1)
    real = rng.normal(size=1000)
    real[:50] = real[50]  # a block of ties
    t = calibrate_threshold(real, target)
    fpr = false_positive_rate(real, t)
    assert fpr <= target + 1e-12
    # Tight: the next lower real score would break the budget.
    below = real[real < t].max()
    assert false_positive_rate(real, below) > target


def test_calibrate_threshold_hand_case():
    real = [0.1, 0.2, 0.3, 0.4, 0.9]
    assert calibrate_threshold(real, 0.2) == pytest.approx(0.65)  # 1 of 5 may pass: between 0.4 and 0.9
    assert calibrate_threshold(real, 0.1) == pytest.approx(0.9 + 1e-4)  # none may pass
    assert calibrate_threshold([0.5, 0.5, 0.5, 0.1], 0.5) == pytest.approx(0.5 + 1e-4)  # ties stay below


def test_one_class_metrics_are_nan_not_errors():
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))
    assert math.isnan(tpr_at_fpr([0, 0], [0.1, 0.2], 0.01))
    with pytest.raises(ValueError):
        calibrate_threshold([], 0.01)
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])


def test_summarize_keys_and_values():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.7, 0.9])
    out = summarize(y, s, 0.5)
    assert out["n_real"] == 3 and out["n_generated"] == 2
    assert out["real_accuracy"] == pytest.approx(2 / 3)
    assert out["generated_accuracy"] == pytest.approx(1.0)
    assert out["auc"] == pytest.approx(roc_auc_score(y, s))
    assert "tpr_at_fpr_0.01" in out and "tpr_at_fpr_0.001" in out


@pytest.mark.parametrize("k,n", [(0, 5), (1, 5), (5, 5), (3, 300), (0, 1), (17, 1000)])
def test_intervals_agree_with_scipy_binomtest(k, n):
    exact = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((exact.low, exact.high), abs=1e-12)
    w = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k / n, n) == pytest.approx((w.low, w.high), abs=1e-12)
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))


def test_calibration_on_five_reals_says_how_unsure_it_is():
    """1 % FPR on 5 real images: 'achieved 0.0' is recorded with its interval (0 to 52 %) and the rule of three's warning."""
    real = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    t = calibrate_threshold(real, 0.01)
    rec = calibration_record(real, t, 0.01, "calib")
    exact = binomtest(0, 5).proportion_ci(confidence_level=0.95, method="exact")
    assert (rec["n_real"], rec["flagged_real"], rec["achieved_fpr"]) == (5, 0, 0.0)
    assert rec["fpr_interval"] == pytest.approx([0.0, exact.high]) and exact.high > 0.5
    assert rec["min_real_for_target"] == 300 and "holds 5 real images" in rec["warning"] and "300" in rec["warning"]
    # enough reals: no warning; the interval is still there
    many = np.random.default_rng(1).random(300)
    rec = calibration_record(many, calibrate_threshold(many, 0.01), 0.01, "calib")
    assert "warning" not in rec and rec["flagged_real"] == 3
    assert rec["fpr_interval"] == pytest.approx(list(binomtest(3, 300).proportion_ci(method="exact")), abs=1e-12)
