"""Pooled IPCW metrics (Uno's C, td-AUC, IBS) against scikit-survival on WHAS500, their bootstrap and paired bootstrap,
and the log-rank and D-calibration tests over seeds against lifelines and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.statistics import logrank_test
from scipy import stats as sps
from sksurv.datasets import load_whas500
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from milbench import MilbenchError
from milbench.survival.calibration import d_calibration, d_calibration_counts, survival_at_own_time
from milbench.survival.comparisons import BOOT_CHUNK, _stratified_weights, bootstrap_c
from milbench.survival.metrics import cohort_times
from milbench.survival.statistics import (
    _ratios,
    _values,
    bootstrap_metric,
    component_values,
    d_calibration_over_seeds,
    logrank_over_seeds,
    metric_parts,
    paired_metric_table,
    pooled_logrank_p,
)

PROPERTY = settings(max_examples=25, deadline=None)


@pytest.fixture(scope="module")
def whas():
    """WHAS500 (whole-day times, many ties), a linear risk, 5 folds, the cohort grid and each fold's training set."""
    x, y = load_whas500()
    time, event = y["lenfol"].astype(float), y["fstat"].astype(bool)
    risk = x[["age", "bmi", "hr"]].to_numpy(float) @ np.array([0.05, -0.03, 0.01])
    fold = np.random.default_rng(1).permutation(np.arange(len(time)) % 5)
    training = {k: (time[fold != k], event[fold != k]) for k in range(5)}
    grid, _ = cohort_times(time, event, [(time[fold == k], time[fold != k]) for k in range(5)])
    return time, event, risk, fold, training, grid


def _surv(risk, grid, scale=1500.0):
    """Exponential survival curves of a risk at the grid [n, K]."""
    return np.exp(-np.exp(risk - 4.0)[:, None] * grid[None, :] / scale)


def _fold_reference(metric, time, event, risk, fold, training, grid, k):
    """scikit-survival's value on fold k, computed as ``metrics.fold_metrics`` does (held-out follow-up censored at the
    last training time for td-AUC and IBS; Uno's C truncated there)."""
    tt, te = training[k]
    mine = fold == k
    train = Surv.from_arrays(te, tt)
    cut = tt.max()
    if metric == "uno_c":
        return concordance_index_ipcw(train, Surv.from_arrays(event[mine], time[mine]), risk[mine], tau=cut)[0]
    t_cut, e_cut = np.minimum(time[mine], cut), event[mine] & (time[mine] < cut)
    test = Surv.from_arrays(e_cut, t_cut)
    if metric == "td_auc":
        return cumulative_dynamic_auc(train, test, risk[mine], grid)
    return integrated_brier_score(train, test, _surv(risk[mine], grid), grid)


@pytest.mark.parametrize("metric", ["uno_c", "td_auc", "ibs"])
def test_one_fold_equals_sksurv(whas, metric):
    time, event, risk, fold, training, grid = whas
    mine = fold == 2
    preds = _surv(risk[mine], grid) if metric == "ibs" else risk[mine]
    parts = metric_parts(metric, time[mine], event[mine], fold[mine], {"m": preds}, training, grid)
    got = bootstrap_metric(parts, "m", n_boot=0).estimate
    ref = _fold_reference(metric, time, event, risk, fold, training, grid, 2)
    if metric == "td_auc":
        aucs, mean = ref
        np.testing.assert_allclose(component_values(parts)["m"], aucs, rtol=0, atol=1e-12)
        ref = mean
    assert got == pytest.approx(ref, abs=1e-12)


def test_within_fold_pools_fold_terms(whas):
    """IBS pooled within folds is the patient-weighted mean of the fold IBSs; Uno's C the ratio of summed fold terms
    (so it lies between the fold values); a single fold's parts reproduce that fold."""
    time, event, risk, fold, training, grid = whas
    surv = _surv(risk, grid)
    ibs = bootstrap_metric(metric_parts("ibs", time, event, fold, {"m": surv}, training, grid), "m", 0).estimate
    sizes = np.bincount(fold)
    folds = [_fold_reference("ibs", time, event, risk, fold, training, grid, k) for k in range(5)]
    assert ibs == pytest.approx(np.dot(sizes, folds) / sizes.sum(), abs=1e-12)
    uno = bootstrap_metric(metric_parts("uno_c", time, event, fold, {"m": risk}, training, grid), "m", 0).estimate
    per_fold = [_fold_reference("uno_c", time, event, risk, fold, training, grid, k) for k in range(5)]
    assert min(per_fold) < uno < max(per_fold)
    cross = metric_parts("uno_c", time, event, fold, {"m": risk}, training, grid, pairs="cross-fold")
    assert bootstrap_metric(cross, "m", 0).pairs == "cross-fold"
    assert bootstrap_metric(cross, "m", 0).estimate != pytest.approx(uno, abs=1e-6)


@pytest.mark.parametrize("metric", ["uno_c", "td_auc", "ibs"])
def test_bootstrap_replicates_equal_sksurv_on_duplicated_patients(whas, metric):
    """A replicate's multiplicities v give the statistic of the patients duplicated v times, scored by scikit-survival
    with the same training fold (td-AUC: each time's AUC; its mean weights stay fixed)."""
    time, event, risk, fold, training, grid = whas
    mine = np.flatnonzero(fold == 0)
    preds = _surv(risk[mine], grid) if metric == "ibs" else risk[mine]
    parts = metric_parts(metric, time[mine], event[mine], fold[mine], {"m": preds}, training, grid)
    w = _stratified_weights(np.random.default_rng(3), parts.strata, len(mine), 2)
    for row in range(2):
        idx = np.repeat(mine, w[row].astype(int))
        t2, e2, r2 = time[idx], event[idx], risk[idx]
        ref = _fold_reference(metric, t2, e2, r2, np.zeros(len(idx), int), training, grid, 0)
        if metric == "td_auc":
            np.testing.assert_allclose(_ratios(parts, w[row:row + 1])[0, 0], ref[0], rtol=0, atol=1e-10)
        else:
            assert _values(parts, w[row:row + 1])[0, 0] == pytest.approx(ref, abs=1e-10)


def test_bootstrap_is_seeded_uses_comparisons_draws_and_holds_its_estimate(whas):
    time, event, risk, fold, training, grid = whas
    parts = metric_parts("uno_c", time, event, fold, {"m": risk}, training, grid)
    a = bootstrap_metric(parts, "m", n_boot=200, seed=5)
    assert a == bootstrap_metric(parts, "m", n_boot=200, seed=5)
    assert a.low != bootstrap_metric(parts, "m", n_boot=200, seed=6).low
    assert a.low < a.estimate < a.high and a.n_valid == 200 and a.n_seeds == 1
    # the replicate multiplicities are comparisons' stratified draws: the same seed resamples the same patients
    strata = parts.strata
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(_stratified_weights(rng_a, strata, len(time), BOOT_CHUNK),
                                  _stratified_weights(rng_b, strata, len(time), BOOT_CHUNK))
    c = bootstrap_c(time, event, risk, fold, n_boot=0)
    assert 0.5 < c.estimate < 0.9


def test_paired_table_differences_and_self_comparison(whas):
    time, event, risk, fold, training, grid = whas
    worse = risk + np.random.default_rng(2).normal(scale=2.0, size=len(risk))
    for metric, preds in (("uno_c", {"a": risk, "b": worse}), ("ibs", {"a": _surv(risk, grid),
                                                                       "b": _surv(worse, grid)})):
        parts = metric_parts(metric, time, event, fold, preds, training, grid)
        ab, ba, aa = paired_metric_table(parts, [("a", "b"), ("b", "a"), ("a", "a")], n_boot=400, seed=1)
        single = {m: bootstrap_metric(parts, m, 0).estimate for m in ("a", "b")}
        assert ab.diff == pytest.approx(single["a"] - single["b"], abs=1e-12)
        assert (ba.diff, ba.low, ba.high) == pytest.approx((-ab.diff, -ab.high, -ab.low), abs=1e-12)
        assert ba.p == ab.p and ab.p < 0.05  # the noisier risk is worse on 500 patients
        assert (aa.diff, aa.low, aa.high, aa.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(MilbenchError, match="no predictions given"):
        paired_metric_table(parts, [("a", "zzz")], n_boot=10)


@PROPERTY
@given(n=st.integers(8, 40), seed=st.integers(0, 10_000), groups=st.integers(1, 3))
def test_property_reversing_the_risk_gives_one_minus_uno_c(n, seed, groups):
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(10, n), 1) + 0.1
    event = rng.random(n) < 0.7
    risk = rng.permutation(n).astype(float)  # distinct risks: no ties
    fold = np.arange(n) % groups
    training = {g: (np.r_[time, time.max() + 1], np.r_[event, False]) for g in range(groups)}
    try:
        parts = metric_parts("uno_c", time, event, fold, {"r": risk, "minus": -risk}, training)
    except MilbenchError:
        return
    values = {m: bootstrap_metric(parts, m, 0).estimate for m in ("r", "minus")}
    if np.isfinite(values["r"]):
        assert values["r"] + values["minus"] == pytest.approx(1.0, abs=1e-12)


def test_bad_input_raises(whas):
    time, event, risk, fold, training, grid = whas
    with pytest.raises(MilbenchError, match="metric must be one of"):
        metric_parts("brier", time, event, fold, {"m": risk}, training, grid)
    with pytest.raises(MilbenchError, match="no training labels for fold"):
        metric_parts("uno_c", time, event, fold, {"m": risk}, {0: training[0]}, grid)
    with pytest.raises(MilbenchError, match="grid times"):
        metric_parts("ibs", time, event, fold, {"m": _surv(risk, grid)}, training, grid[:1])
    with pytest.raises(MilbenchError, match="risks"):
        metric_parts("uno_c", time, event, fold, {"m": risk[:-1]}, training, grid)
    with pytest.raises(MilbenchError, match="NaN"):
        metric_parts("td_auc", time, event, fold, {"m": np.r_[risk[:-1], np.nan]}, training, grid)


def test_pooled_logrank_uses_each_patients_own_cutoff(whas):
    time, event, risk, fold, _, _ = whas
    cutoff = np.array([4.0, 4.2, 4.1, 3.9, 4.3])[fold]  # one training median per fold
    high = risk > cutoff
    expected = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
    assert pooled_logrank_p(time, event, risk, cutoff) == pytest.approx(expected)
    assert np.isnan(pooled_logrank_p(time, event, risk, risk.max() + 1))


def test_logrank_over_seeds_is_one_test_on_the_mean_margin(whas):
    time, event, risk, fold, _, _ = whas
    rng = np.random.default_rng(4)
    risks = np.stack([risk + rng.normal(scale=0.3, size=len(risk)) for _ in range(3)])
    cutoffs = np.stack([np.array([4.0, 4.2, 4.1, 3.9, 4.3])[fold] + rng.normal(scale=0.05) for _ in range(3)])
    high = (risks - cutoffs).mean(axis=0) > 0
    expected = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
    assert logrank_over_seeds(time, event, risks, cutoffs) == pytest.approx(expected)
    assert logrank_over_seeds(time, event, risks[:1], cutoffs[:1]) == pooled_logrank_p(time, event, risks[0],
                                                                                      cutoffs[0])
    with pytest.raises(MilbenchError, match="differ in shape"):
        logrank_over_seeds(time, event, risks, cutoffs[:2])


def test_d_calibration_over_seeds_averages_the_bin_masses():
    rng = np.random.default_rng(0)
    event = rng.random(200) < 0.6
    s = rng.uniform(size=(3, 200))
    res = d_calibration_over_seeds(event, s)
    mean = np.mean([d_calibration_counts(row, event) for row in s], axis=0)
    np.testing.assert_allclose(res.counts, mean)
    assert (res.statistic, res.p) == pytest.approx(tuple(sps.chisquare(mean)))
    # one seed: the plain D-calibration of the curves read at each patient's own time
    times = np.linspace(0, 2, 50)
    surv = np.exp(-np.outer(rng.uniform(0.5, 2, 200), times))
    t = rng.uniform(0.1, 1.9, 200)
    plain = d_calibration(t, event, surv, times)
    one = d_calibration_over_seeds(event, survival_at_own_time(surv, times, t)[None])
    assert (one.statistic, one.p) == pytest.approx((plain.statistic, plain.p))
