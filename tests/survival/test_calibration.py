"""D-calibration against a loop written from Haider et al. (2020)'s text and scipy's chi-square, on calibrated and
miscalibrated exponential models, plus property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from milbench import MilbenchError
from milbench.survival.calibration import (
    d_calibration,
    d_calibration_counts,
    head_curve,
    survival_at_own_time,
)
from milbench.survival.metrics import survival_at

PROPERTY = settings(max_examples=50, deadline=None)


def paper_counts(s, event, n_bins=10) -> np.ndarray:
    """Haider et al. 2020, section 4.4 / appendix B.3, one patient at a time: an uncensored patient adds 1 to the bin
    holding S(t); a censored one adds 1 - l/S(c) to the bin [l, u) holding S(c) and 1/(B S(c)) to each bin below."""
    counts = np.zeros(n_bins)
    for value, died in zip(s, event, strict=True):
        b = max(k for k in range(n_bins) if k / n_bins <= value)
        if died:
            counts[b] += 1
        elif value == 0:
            counts[0] += 1
        else:
            counts[b] += 1 - (b / n_bins) / value
            for lower in range(b):
                counts[lower] += 1 / (n_bins * value)
    return counts


def exponential_cohort(n: int, seed: int, rate_factor: float = 1.0, censor_rate: float = 0.5):
    """True exponential deaths with rate exp(x), random censoring, and each patient's predicted curve
    exp(-rate_factor exp(x) t) on a grid of 400 times (rate_factor 1: the true, calibrated model)."""
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(scale=0.5, size=n))
    death, censor = rng.exponential(1 / rate), rng.exponential(1 / censor_rate, size=n)
    time, event = np.minimum(death, censor), death <= censor
    grid = np.linspace(0, time.max() * 1.01, 400)
    surv = np.exp(-rate_factor * rate[:, None] * grid[None, :])
    return time, event, surv, grid


def test_counts_match_the_papers_rule_and_sum_to_n():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(size=200), [0.0, 1.0, 0.1, 0.95, 0.3]])
    event = rng.uniform(size=len(s)) < 0.6
    counts = d_calibration_counts(s, event)
    assert np.allclose(counts, paper_counts(s, event), rtol=0, atol=1e-12)
    assert counts.sum() == pytest.approx(len(s))
    only_deaths = d_calibration_counts(s, np.ones(len(s), bool))
    assert np.array_equal(only_deaths, np.histogram(s, bins=np.arange(11) / 10)[0])


@PROPERTY
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=60), st.integers(2, 20))
def test_property_counts_follow_the_paper_and_keep_every_patient(rows, n_bins):
    s = np.array([r[0] for r in rows])
    event = np.array([r[1] for r in rows])
    counts = d_calibration_counts(s, event, n_bins)
    assert (counts >= -1e-12).all() and counts.sum() == pytest.approx(len(rows))
    assert np.allclose(counts, paper_counts(s, event, n_bins), rtol=0, atol=1e-9)


def test_statistic_is_pearson_chi_square_against_uniform():
    time, event, surv, grid = exponential_cohort(500, seed=1)
    res = d_calibration(time, event, surv, grid)
    expected = len(time) / 10
    stat = float(((res.counts - expected) ** 2 / expected).sum())
    assert res.statistic == pytest.approx(stat, rel=1e-12)
    assert res.p == pytest.approx(sps.chi2.sf(stat, 9), rel=1e-12)
    assert res.n_patients == 500 and res.n_events == int(event.sum()) and res.reason == "" and res.note == ""


def test_calibrated_model_passes_and_miscalibrated_fails():
    time, event, surv, grid = exponential_cohort(3000, seed=2)
    good = d_calibration(time, event, surv, grid)
    assert good.p > 0.05
    assert np.abs(good.counts / 300 - 1).max() < 0.15  # every bin near n / B
    for factor in (0.4, 2.5):  # hazards too low (optimistic) or too high (pessimistic)
        _, _, wrong, _ = exponential_cohort(3000, seed=2, rate_factor=factor)
        assert d_calibration(time, event, wrong, grid).p < 1e-6


def test_step_reading_equals_the_heads_survival_at():
    rng = np.random.default_rng(3)
    edges = np.array([0.5, 6.0, 14.0, 30.0, 80.0])
    surv_bins = np.cumprod(rng.uniform(0.6, 0.99, size=(50, 4)), axis=1)
    t = np.concatenate([rng.uniform(0, 100, size=46), [0.1, 6.0, 30.0, 80.0]])
    surv, times = head_curve(surv_bins, edges)
    ours = survival_at_own_time(surv, times, t, "step")
    ref = np.array([survival_at(surv_bins[i:i + 1], edges, [t[i]])[0, 0] for i in range(len(t))])
    assert np.array_equal(ours, ref)


def test_linear_reading_interpolates_each_patients_curve():
    rng = np.random.default_rng(4)
    times = np.array([2.0, 5.0, 9.0])
    surv = np.sort(rng.uniform(size=(30, 3)), axis=1)[:, ::-1]
    t = rng.uniform(0, 12, size=30)
    ours = survival_at_own_time(surv, times, t, "linear")
    ref = [np.interp(t[i], np.r_[0.0, times], np.r_[1.0, surv[i]]) for i in range(30)]  # holds the last value
    assert np.allclose(ours, ref, rtol=0, atol=1e-12)
    assert np.array_equal(survival_at_own_time(surv, times, np.full(30, 5.0)), surv[:, 1])


def test_undefined_and_bad_input():
    no_curve = d_calibration([1.0, 2.0], [1, 0], None, None)
    assert np.isnan(no_curve.p) and "no survival curve" in no_curve.reason
    empty = d_calibration([], [], np.empty((0, 3)), [1.0, 2.0, 3.0])
    assert np.isnan(empty.statistic) and empty.reason == "no patients"
    small = d_calibration([1.0, 2.0, 3.0], [1, 0, 1], np.full((3, 2), 0.5), [1.0, 4.0])
    assert np.isfinite(small.p) and "rough" in small.note
    with pytest.raises(MilbenchError, match="strictly increasing"):
        survival_at_own_time(np.ones((2, 2)), [2.0, 1.0], [1.0, 1.0])
    with pytest.raises(MilbenchError, match="NaN"):
        d_calibration([1.0, 2.0], [1, 0], np.array([[0.5, np.nan], [0.5, 0.4]]), [1.0, 2.0])
    with pytest.raises(MilbenchError, match="0/1 event flag"):
        d_calibration([1.0, 2.0], [1, 3], np.full((2, 2), 0.5), [1.0, 2.0])
    with pytest.raises(MilbenchError, match="at least 2 bins"):
        d_calibration_counts([0.5], [True], n_bins=1)
