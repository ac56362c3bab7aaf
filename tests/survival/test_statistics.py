"""The leaderboard statistics against scikit-survival, lifelines, scipy and statsmodels on the same inputs."""

import numpy as np
import pytest
from lifelines.statistics import logrank_test
from scipy import stats as sps
from sksurv.metrics import concordance_index_censored
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.survival.statistics import BOOT_CHUNK, corrected_resampled_ttest
from milbench.survival.statistics import (bootstrap_c_index, concordance_matrices, holm, pooled_logrank_p, weighted_c_index)


def _data(n=60, seed=0):
    """Survival data with tied times (including event/censored ties) and tied risks."""
    rng = np.random.default_rng(seed)
    time = np.round(rng.exponential(10, n))  # many ties
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n) - 0.05 * time, 1)  # ties in risk too
    return time, event, risk


def _sksurv_c(time, event, risk):
    return concordance_index_censored(np.asarray(event, bool), np.asarray(time, float), np.asarray(risk, float))[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_matrices_give_sksurv_harrell_c(seed):
    time, event, risk = _data(seed=seed)
    comparable, score = concordance_matrices(time, event, risk)
    expected = _sksurv_c(time, event, risk)
    assert weighted_c_index(comparable, score, np.ones((1, len(time))))[0] == pytest.approx(expected)


def test_weights_equal_a_resampled_dataset():
    time, event, risk = _data(seed=3)
    rng = np.random.default_rng(5)
    comparable, score = concordance_matrices(time, event, risk)
    for _ in range(5):
        idx = rng.integers(0, len(time), len(time))
        w = np.bincount(idx, minlength=len(time))[None].astype(float)
        assert weighted_c_index(comparable, score, w)[0] == pytest.approx(_sksurv_c(time[idx], event[idx], risk[idx]))


def test_bootstrap_ci_equals_a_plain_sksurv_bootstrap():
    time, event, risk = _data(n=50, seed=4)
    n_boot, seed = 300, 11
    ci = bootstrap_c_index(time, event, risk, n_boot=n_boot, seed=seed)
    # the same resamples, drawn the same way, scored one by one with scikit-survival
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, BOOT_CHUNK):
        for w in rng.multinomial(len(time), np.full(len(time), 1 / len(time)), size=min(BOOT_CHUNK, n_boot - start)):
            idx = np.repeat(np.arange(len(time)), w)
            reps.append(_sksurv_c(time[idx], event[idx], risk[idx]))
    assert ci.estimate == pytest.approx(_sksurv_c(time, event, risk))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    assert ci.low < ci.estimate < ci.high


def test_bootstrap_is_seeded_and_averages_seeds():
    time, event, risk = _data(seed=6)
    other = risk + np.random.default_rng(1).normal(size=len(risk))
    a = bootstrap_c_index(time, event, [risk, other], n_boot=100, seed=3)
    assert a == bootstrap_c_index(time, event, [risk, other], n_boot=100, seed=3)
    assert a != bootstrap_c_index(time, event, [risk, other], n_boot=100, seed=4)
    assert a.estimate == pytest.approx((_sksurv_c(time, event, risk) + _sksurv_c(time, event, other)) / 2)
    assert np.isnan(bootstrap_c_index(time, event, risk, n_boot=0).low)


def test_bootstrap_rejects_bad_input():
    time, event, risk = _data()
    with pytest.raises(MilbenchError, match="no observed event"):
        bootstrap_c_index(time, np.zeros_like(event), risk)
    with pytest.raises(MilbenchError, match="one time, event and risk per patient"):
        bootstrap_c_index(time, event, risk[:-1])


def test_pooled_logrank_uses_each_patients_own_cutoff():
    time, event, risk = _data(n=80, seed=7)
    fold = np.arange(80) % 4
    cutoff = np.array([0.3, -0.2, 0.0, 0.5])[fold]  # one training median per fold
    high = risk > cutoff
    expected = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
    assert pooled_logrank_p(time, event, risk, cutoff) == pytest.approx(expected)
    # a single global cutoff gives another answer: the per-fold cut matters
    assert pooled_logrank_p(time, event, risk, np.median(risk)) != pytest.approx(expected)
    assert np.isnan(pooled_logrank_p(time, event, risk, risk.max() + 1))


def test_corrected_ttest_reduces_to_ttest_rel_and_inflates_the_variance():
    rng = np.random.default_rng(8)
    a, b = rng.normal(0.65, 0.05, 5), rng.normal(0.6, 0.05, 5)
    plain = corrected_resampled_ttest(a, b, 0.0)
    ref = sps.ttest_rel(a, b)
    assert plain.t == pytest.approx(ref.statistic) and plain.p == pytest.approx(ref.pvalue)
    ratio = 0.25  # 5-fold CV: n_test / n_train = 1 / 4
    corrected = corrected_resampled_ttest(a, b, ratio)
    t = ref.statistic * np.sqrt((1 / 5) / (1 / 5 + ratio))
    assert corrected.t == pytest.approx(t)
    assert corrected.p == pytest.approx(2 * sps.t.sf(abs(t), df=4))
    assert corrected.p > plain.p and corrected.mean_diff == pytest.approx(np.mean(a - b)) and corrected.n_folds == 5
    assert np.isnan(corrected_resampled_ttest([0.6], [0.5], ratio).p)
    assert corrected_resampled_ttest([0.6, 0.7], [0.6, 0.7], ratio).p == 1.0


def test_holm_matches_statsmodels_and_leaves_nan_out():
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.2])
    out = holm(p)
    ok = ~np.isnan(p)
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[ok], multipletests(p[ok], method="holm")[1])
    # Holm by hand: sorted p times (m - rank), running maximum, capped at 1
    order = np.sort(p[ok])
    by_hand = np.minimum(1, np.maximum.accumulate(order * (len(order) - np.arange(len(order)))))
    np.testing.assert_allclose(np.sort(out[ok]), by_hand)
