"""Ranks across cohorts against scipy, statsmodels and Demsar (2006)'s worked example, plus property tests."""

from __future__ import annotations

from itertools import combinations
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.survival.ranks import (
    average_ranks,
    cliques,
    friedman_test,
    iman_davenport,
    nemenyi,
    nemenyi_cd,
    nemenyi_q,
    rank_analysis,
    rank_table,
    wilcoxon_holm,
)

PROPERTY = settings(max_examples=50, deadline=None)

# Demsar (2006), table 5(a): Nemenyi q_alpha for k = 2..10 models, at alpha 0.05 and 0.10
DEMSAR_Q05 = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
DEMSAR_Q10 = [1.645, 2.052, 2.291, 2.459, 2.589, 2.693, 2.780, 2.855, 2.920]


def table(seed: int = 0, cohorts: int = 12, models: int = 5, ties: bool = False) -> dict[str, list[float]]:
    """Per-cohort C-indices of ``models`` models of rising skill (rounded to 2 decimals when ``ties``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in range(models):
        v = 0.6 + 0.02 * m + rng.normal(scale=0.03, size=cohorts)
        out[f"model{m}"] = list(np.round(v, 2) if ties else v)
    return out


def test_ranks_average_ties_and_follow_the_direction():
    scores = {"a": [0.7, 0.6, 0.5], "b": [0.7, 0.8, 0.4], "c": [0.6, 0.5, 0.9]}
    t = rank_table(scores)
    assert np.array_equal(t.ranks, [[1.5, 1.5, 3.0], [2.0, 1.0, 3.0], [2.0, 3.0, 1.0]])
    assert average_ranks(scores) == pytest.approx({"a": 11 / 6, "b": 11 / 6, "c": 7 / 3})
    assert average_ranks(scores, higher_is_better=False) == pytest.approx({"a": 13 / 6, "b": 13 / 6, "c": 5 / 3})


def test_incomplete_cohorts_are_left_out_and_named():
    scores = {"a": [0.7, np.nan, 0.5, 0.6], "b": [0.6, 0.8, 0.6, 0.5], "c": [0.5, 0.7, 0.7, 0.4]}
    res = friedman_test(scores)
    assert res.dropped == (1,) and res.n_cohorts == 3
    ref = sps.friedmanchisquare(*[np.delete(np.asarray(v), 1) for v in scores.values()])
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    with pytest.raises(MilbenchError, match="one score per cohort"):
        rank_table({"a": [0.1, 0.2], "b": [0.3]})


@pytest.mark.parametrize("ties", [False, True])
def test_friedman_matches_scipy(ties):
    scores = table(seed=3, ties=ties)
    res = friedman_test(scores)
    ref = sps.friedmanchisquare(*scores.values())
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12) and res.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert res.df == 4 and res.n_cohorts == 12 and res.n_models == 5 and res.reason == ""
    f = (12 - 1) * res.statistic / (12 * 4 - res.statistic)
    assert res.iman_davenport == pytest.approx(f) and res.p_iman_davenport == pytest.approx(sps.f.sf(f, 4, 44))


@PROPERTY
@given(st.integers(3, 6), st.integers(2, 10), st.integers(0, 10 ** 6), st.booleans())
def test_property_friedman_matches_scipy(k, n, seed, ties):
    scores = table(seed=seed, cohorts=n, models=k, ties=ties)
    res = friedman_test(scores)
    ref = sps.friedmanchisquare(*scores.values())
    if np.isfinite(ref.statistic):
        assert res.statistic == pytest.approx(ref.statistic, rel=1e-9, abs=1e-12)
    else:
        assert np.isnan(res.statistic) and res.reason


def test_demsar_worked_example():
    """Demsar (2006)'s worked example: 4 classifiers on 14 data sets, chi2_F = 9.28, F_F = 3.69, CD = 1.25."""
    avg = np.array([3.143, 2.000, 2.893, 1.964])
    n, k = 14, 4
    chi2 = 12 * n / (k * (k + 1)) * ((avg ** 2).sum() - k * (k + 1) ** 2 / 4)
    assert chi2 == pytest.approx(9.28, abs=0.01)
    f, p = iman_davenport(chi2, n, k)
    assert f == pytest.approx(3.69, abs=0.01) and p == pytest.approx(sps.f.sf(f, 3, 39))
    assert sps.f.ppf(0.95, 3, 39) == pytest.approx(2.85, abs=0.01)  # the critical value Demsar quotes
    assert nemenyi_cd(4, 14) == pytest.approx(1.25, abs=0.005)
    assert iman_davenport(n * (k - 1), n, k) == (float("inf"), 0.0)


@pytest.mark.parametrize("k", range(2, 11))
def test_nemenyi_q_matches_demsar_table(k):
    assert nemenyi_q(k, 0.05) == pytest.approx(DEMSAR_Q05[k - 2], abs=1e-3)
    assert nemenyi_q(k, 0.10) == pytest.approx(DEMSAR_Q10[k - 2], abs=1e-3)


def test_nemenyi_pvalues_agree_with_the_cd_rule():
    res = nemenyi(table(seed=1, cohorts=20, models=6))
    cd = nemenyi_cd(6, 20)
    assert res.cd == pytest.approx(cd) and res.method == "nemenyi"
    for (a, b), p in res.pvalues.items():
        assert (p < 0.05) == (abs(res.avg_ranks[a] - res.avg_ranks[b]) > cd)
    for group in res.cliques:
        ranks = [res.avg_ranks[m] for m in group]
        assert max(ranks) - min(ranks) < cd


def test_wilcoxon_holm_matches_scipy_and_statsmodels():
    scores = table(seed=2, cohorts=15, models=4)
    res = wilcoxon_holm(scores)
    pairs = list(combinations(scores, 2))
    raw = [sps.wilcoxon(scores[a], scores[b]).pvalue for a, b in pairs]
    assert [res.pvalues[pair] for pair in pairs] == pytest.approx(raw, rel=1e-12)
    with mock.patch("gc.collect"):
        holm = multipletests(raw, method="holm")[1]
    assert [res.adjusted[pair] for pair in pairs] == pytest.approx(holm, rel=1e-12)
    assert np.isnan(res.cd) and res.method == "wilcoxon-holm"
    for group in res.cliques:
        assert not any(res.differ(a, b) for a, b in combinations(group, 2))


def test_wilcoxon_small_sample_note_and_identical_models():
    scores = table(seed=0, cohorts=4, models=3)
    scores["copy"] = list(scores["model0"])
    res = wilcoxon_holm(scores)
    assert res.pvalues[("model0", "copy")] == 1.0
    assert any("smallest two-sided exact Wilcoxon p" in note for note in res.notes)
    assert not any(res.differ(a, b) for a, b in res.pvalues)  # 4 cohorts: no pair can differ at 0.05


def test_cliques_are_maximal_runs():
    avg = {"a": 1.0, "b": 1.5, "c": 2.2, "d": 3.5, "e": 3.6}
    assert cliques(avg, lambda x, y: abs(avg[x] - avg[y]) >= 1.0) == (("a", "b"), ("b", "c"), ("d", "e"))
    assert cliques(avg, lambda x, y: True) == ()
    assert cliques(avg, lambda x, y: False) == (("a", "b", "c", "d", "e"),)


def test_undefined_ranks_are_nan_with_a_reason():
    one = friedman_test({"a": [0.7], "b": [0.6], "c": [0.5]})
    assert np.isnan(one.statistic) and "at least two" in one.reason
    all_tied = friedman_test({"a": [0.7, 0.6], "b": [0.7, 0.6], "c": [0.7, 0.6]})
    assert np.isnan(all_tied.p) and "ties all models" in all_tied.reason
    assert "one model" in friedman_test({"a": [0.7, 0.6]}).reason
    with pytest.raises(MilbenchError, match="post-hoc"):
        rank_analysis(table(), posthoc="tukey")


@settings(max_examples=12, deadline=None)  # two full analyses an example (scipy's exact Wilcoxon is ~3 ms a pair)
@given(st.integers(2, 6), st.integers(2, 8), st.integers(0, 10 ** 6), st.randoms(use_true_random=False),
       st.sampled_from(["nemenyi", "wilcoxon-holm"]))
def test_property_ranks_do_not_depend_on_model_order(k, n, seed, rnd, posthoc):
    scores = table(seed=seed, cohorts=n, models=k, ties=True)
    names = list(scores)
    rnd.shuffle(names)
    a = rank_analysis(scores, posthoc=posthoc)
    b = rank_analysis({m: scores[m] for m in names}, posthoc=posthoc)
    assert a.avg_ranks == pytest.approx(b.avg_ranks)
    assert sum(a.avg_ranks.values()) == pytest.approx(k * (k + 1) / 2)
    assert a.posthoc.cliques == b.posthoc.cliques
    same = (a.friedman.statistic == pytest.approx(b.friedman.statistic)) or (
        np.isnan(a.friedman.statistic) and np.isnan(b.friedman.statistic))
    assert same
    for (x, y), p in a.posthoc.adjusted.items():
        q = b.posthoc.adjusted.get((x, y), b.posthoc.adjusted.get((y, x)))
        assert p == pytest.approx(q) or (np.isnan(p) and np.isnan(q))
