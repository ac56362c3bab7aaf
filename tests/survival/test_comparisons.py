"""Pooled and paired statistics against scikit-survival, scipy and statsmodels, plus hypothesis property tests."""

from __future__ import annotations

import time as clock
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from sksurv.datasets import load_whas500
from sksurv.metrics import concordance_index_censored
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.survival import comparisons as cmp
from milbench.survival.comparisons import (
    adjust,
    bootstrap_c,
    bootstrap_cross_fold_c,
    bootstrap_within_fold_c,
    corrected_resampled_ttest,
    corrected_ttest_over_seeds,
    cross_fold_c,
    paired_bootstrap_c,
    paired_bootstrap_table,
    rank_marks,
    seed_fold_variance,
    within_fold_c,
)

PROPERTY = settings(max_examples=50, deadline=None)


def sksurv_c(time, event, risk) -> float:
    """scikit-survival's Harrell C (the reference), ties within 1e-8."""
    return float(concordance_index_censored(np.asarray(event, bool), np.asarray(time, float), np.asarray(risk, float),
                                            tied_tol=1e-8)[0])


def cohort(n: int = 1000, folds: int = 5, seed: int = 0, noise: float = 1.0):
    """A censored exponential cohort with a true risk x, a noisy model risk, and a random 5-fold label."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    death, censor = rng.exponential(np.exp(-x)), rng.exponential(2.0, size=n)
    time, event = np.minimum(death, censor), death <= censor
    return time, event, x, x + rng.normal(scale=noise, size=n), rng.permutation(np.arange(n) % folds)


@pytest.fixture(scope="module")
def whas():
    """WHAS500 with a linear risk, whole-day times (many ties) and 5 random folds."""
    x, y = load_whas500()
    risk = x[["age", "bmi", "hr"]].to_numpy(float) @ np.array([0.05, -0.03, 0.01])
    fold = np.random.default_rng(1).permutation(np.arange(len(risk)) % 5)
    return y["lenfol"].astype(float), y["fstat"].astype(bool), risk, fold


# --------------------------------------------------------------------------------------------- pooled C: reference


def test_one_group_equals_sksurv_and_cross_fold(whas):
    time, event, risk, fold = whas
    ref = sksurv_c(time, event, risk)
    one = within_fold_c(time, event, risk, np.zeros(len(time)))
    assert one.estimate == pytest.approx(ref, abs=1e-12) and one.pairs == "within-fold" and one.reason == ""
    cross = cross_fold_c(time, event, risk)
    assert cross.estimate == pytest.approx(ref, abs=1e-12) and cross.pairs == "cross-fold"
    # risk ties within 1e-8 count one half, exactly as scikit-survival
    coarse = np.round(risk, 1)
    assert within_fold_c(time, event, coarse, [0] * len(time)).estimate == pytest.approx(
        sksurv_c(time, event, coarse), abs=1e-12)


def test_within_fold_counts_only_pairs_inside_a_group(whas):
    time, event, risk, fold = whas
    res = within_fold_c(time, event, risk, fold)
    assert set(res.per_group) == {0, 1, 2, 3, 4} and res.n_groups == 5
    for g, (c, _) in res.per_group.items():
        assert c == pytest.approx(sksurv_c(time[fold == g], event[fold == g], risk[fold == g]), abs=1e-12)
    assert res.n_pairs == sum(p for _, p in res.per_group.values())
    assert res.n_pairs < cross_fold_c(time, event, risk).n_pairs / 4  # about 80% of pooled pairs cross folds
    # tuple labels (fold, seed) are groups too
    labels = [(int(f), "s0") for f in fold]
    assert within_fold_c(time, event, risk, labels).estimate == pytest.approx(res.estimate, abs=1e-15)


def test_within_fold_pools_seeds_as_their_mean(whas):
    time, event, risk, fold = whas
    rng = np.random.default_rng(3)
    seeds = [risk + rng.normal(scale=0.3, size=len(risk)) for _ in range(3)]
    per_seed = [within_fold_c(time, event, r, fold).estimate for r in seeds]
    boot = bootstrap_within_fold_c(time, event, seeds, fold, n_boot=0)
    assert boot.estimate == pytest.approx(np.mean(per_seed), abs=1e-12) and boot.n_seeds == 3
    assert np.isnan(boot.low) and boot.n_valid == 0
    # stacking the seeds as rows with (fold, seed) labels gives the same statistic (same pairs per seed)
    stacked = within_fold_c(np.tile(time, 3), np.tile(event, 3), np.concatenate(seeds),
                            [(f, s) for s in range(3) for f in fold])
    assert stacked.estimate == pytest.approx(np.mean(per_seed), abs=1e-12)


# ----------------------------------------------------------------------------------------- pooled C: properties

@st.composite
def small_cohorts(draw, distinct_risk: bool = False):
    """Small cohorts with tied integer times, random events, risks (optionally all distinct) and 1-4 groups."""
    n = draw(st.integers(4, 40))
    time = np.array(draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)), float)
    event = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if distinct_risk:
        risk = np.array(draw(st.permutations(list(range(n)))), float) / n
    else:
        risk = np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), float)
    group = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    return time, event, risk, group


@PROPERTY
@given(small_cohorts())
def test_property_within_fold_c_is_pair_weighted_mean_of_group_cs(data):
    time, event, risk, group = data
    res = within_fold_c(time, event, risk, group)
    cs, weights = [], []
    for g in np.unique(group):
        m = group == g
        c, pairs = res.per_group[int(g)]
        if pairs:
            ref = sksurv_c(time[m], event[m], risk[m])
            assert c == pytest.approx(ref, abs=1e-12)
            cs.append(ref)
            weights.append(pairs)
    if weights:
        assert res.estimate == pytest.approx(np.average(cs, weights=weights), abs=1e-12)
    else:
        assert np.isnan(res.estimate) and res.reason


@PROPERTY
@given(small_cohorts(distinct_risk=True))
def test_property_reversing_risk_gives_one_minus_c(data):
    time, event, risk, group = data
    a, b = within_fold_c(time, event, risk, group), within_fold_c(time, event, -risk, group)
    if a.n_pairs:
        assert a.estimate + b.estimate == pytest.approx(1.0, abs=1e-12)
    c, d = cross_fold_c(time, event, risk), cross_fold_c(time, event, -risk)
    if c.n_pairs:
        assert c.estimate + d.estimate == pytest.approx(1.0, abs=1e-12)


@PROPERTY
@given(small_cohorts(), st.integers(0, 2 ** 16))
def test_property_model_against_itself_differs_by_zero_with_p_one(data, seed):
    time, event, risk, group = data
    res = paired_bootstrap_c(time, event, risk, risk.copy(), group, n_boot=50, seed=seed)
    if res.reason:
        assert np.isnan(res.diff) and np.isnan(res.p)
    else:
        assert res.diff == 0.0 and res.p == 1.0
        assert res.n_valid == 0 or (res.low == 0.0 and res.high == 0.0)


@PROPERTY
@given(small_cohorts(), st.permutations(list(range(4))))
def test_property_group_labels_are_only_names(data, relabel):
    time, event, risk, group = data
    a = bootstrap_within_fold_c(time, event, risk, group, n_boot=20, seed=1)
    b = bootstrap_within_fold_c(time, event, risk, np.asarray(relabel)[group], n_boot=20, seed=1)
    assert a.estimate == b.estimate or (np.isnan(a.estimate) and np.isnan(b.estimate))
    assert a.n_pairs == b.n_pairs


# ------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_replicates_equal_sksurv_on_resampled_patients(whas):
    """A replicate's quadratic form is the pooled C of the duplicated patients (self-pairs are never comparable)."""
    time, event, risk, fold = whas
    n_boot, seed = 5, 7
    strata = [np.flatnonzero(fold == g) for g in range(5)]
    weights = cmp._stratified_weights(np.random.default_rng(seed), strata, len(time), n_boot)
    blocks = cmp._blocks(time, event, [risk[None, :]], fold, "within-fold")
    ours = cmp._replicates(blocks, strata, len(time), n_boot, seed)[0]
    for b in range(n_boot):
        idx = np.repeat(np.arange(len(time)), weights[b].astype(int))
        num = den = 0.0
        for g in range(5):
            m = idx[fold[idx] == g]
            res = concordance_index_censored(event[m], time[m], risk[m], tied_tol=1e-8)
            num += res[1] + 0.5 * res[3]
            den += res[1] + res[2] + res[3]
        assert ours[b] == pytest.approx(num / den, abs=1e-12)
    assert all((weights[:, s].sum(axis=1) == len(s)).all() for s in strata)  # group sizes kept (stratified)


def test_bootstrap_is_about_its_estimate_seeded_and_fast():
    time, event, _, risk, fold = cohort(n=1000)
    start = clock.perf_counter()
    res = bootstrap_within_fold_c(time, event, risk, fold, n_boot=1000, seed=0)
    elapsed = clock.perf_counter() - start
    assert res.estimate == pytest.approx(within_fold_c(time, event, risk, fold).estimate, abs=1e-15)
    assert res.inside and res.low < res.estimate < res.high and res.n_valid == 1000
    assert 0.005 < res.se < 0.03 and res.n_groups == 5 and res.n_patients == 1000
    again = bootstrap_within_fold_c(time, event, risk, fold, n_boot=1000, seed=0)
    assert (again.low, again.high) == (res.low, res.high)
    assert bootstrap_within_fold_c(time, event, risk, fold, n_boot=1000, seed=1).low != res.low
    assert elapsed < 5.0, f"1000 patients x 1000 replicates took {elapsed:.2f} s (about 0.5 s on 2 shared cores)"


def test_cross_fold_option_is_labelled_and_differs_when_fold_scales_differ():
    time, event, _, risk, fold = cohort(n=600, seed=2)
    shifted = risk + 3.0 * fold  # each fold model on its own scale: cross-fold pairs compare scales, not patients
    within = bootstrap_within_fold_c(time, event, shifted, fold, n_boot=200)
    cross = bootstrap_cross_fold_c(time, event, shifted, fold, n_boot=200)
    assert within.pairs == "within-fold" and cross.pairs == "cross-fold"
    assert within.estimate == pytest.approx(within_fold_c(time, event, risk, fold).estimate, abs=1e-15)
    assert abs(cross.estimate - within.estimate) > 0.05 and within.inside and cross.inside
    with pytest.raises(MilbenchError, match="pairs must be one of"):
        bootstrap_c(time, event, risk, fold, pairs="pooled")


def test_undefined_c_is_nan_with_a_reason():
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4)
    res = bootstrap_within_fold_c(time, event, [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], n_boot=10)
    assert np.isnan(res.estimate) and np.isnan(res.low) and "no observed event" in res.reason
    single = within_fold_c(time, [1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0, 1, 2, 3])  # one patient per fold
    assert np.isnan(single.estimate) and "no comparable pair inside any group" in single.reason
    paired = paired_bootstrap_c(time, event, [1, 2, 3, 4], [4, 3, 2, 1], [0, 0, 1, 1], n_boot=10)
    assert np.isnan(paired.diff) and np.isnan(paired.p) and paired.reason


@pytest.mark.parametrize("kwargs, match", [
    (dict(risk=[0.1, 0.2, 0.3]), "one risk per patient"),
    (dict(risk=[0.1, np.nan, 0.3, 0.4]), "NaN or infinite risks"),
    (dict(event=[0, 2, 1, 0]), "event flags must be 0 or 1"),
    (dict(group=[0, 1]), "one group label"),
    (dict(time=[1.0, np.inf, 2.0, 3.0]), "NaN or infinite times"),
    (dict(time=[], event=[], risk=[], group=[]), "no patients"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(time=[1.0, 2.0, 3.0, 4.0], event=[1, 0, 1, 0], risk=[0.4, 0.3, 0.2, 0.1], group=[0, 0, 1, 1]) | kwargs
    with pytest.raises(MilbenchError, match=match):
        within_fold_c(**args)


# ------------------------------------------------------------------------------------------ paired comparisons


def test_paired_bootstrap_detects_a_better_model_and_agrees_with_point_estimates():
    time, event, truth, noisy, fold = cohort(n=800, seed=4, noise=2.0)
    res = paired_bootstrap_c(time, event, truth, noisy, fold, n_boot=500, seed=0)
    c_truth = within_fold_c(time, event, truth, fold).estimate
    c_noisy = within_fold_c(time, event, noisy, fold).estimate
    assert res.diff == pytest.approx(c_truth - c_noisy, abs=1e-12) and res.diff > 0.05
    assert res.low > 0 and res.p == pytest.approx(2 / 501) and res.low <= res.diff <= res.high
    flipped = paired_bootstrap_c(time, event, noisy, truth, fold, n_boot=500, seed=0)
    assert flipped.diff == pytest.approx(-res.diff, abs=1e-15) and flipped.p == res.p
    assert flipped.high == pytest.approx(-res.low, abs=1e-12)
    assert "paired bootstrap" in res.method and "two-sided" in res.method


def test_paired_table_shares_replicates_across_comparisons():
    time, event, truth, noisy, fold = cohort(n=400, seed=5, noise=1.0)
    rng = np.random.default_rng(0)
    risks = {"truth": truth, "noisy": noisy, "seeds": [noisy + rng.normal(size=400) for _ in range(2)]}
    table = paired_bootstrap_table(time, event, risks, fold, n_boot=200, seed=3)
    assert [(r.model_a, r.model_b) for r in table] == [("truth", "noisy"), ("truth", "seeds"), ("noisy", "seeds")]
    single = paired_bootstrap_c(time, event, truth, noisy, fold, n_boot=200, seed=3)
    assert (table[0].diff, table[0].low, table[0].high, table[0].p) == pytest.approx(
        (single.diff, single.low, single.high, single.p), abs=1e-12)
    # one set of replicates: differences add up exactly on every statistic computed from the point estimates
    assert table[0].diff + table[2].diff == pytest.approx(table[1].diff, abs=1e-12)
    vs_base = paired_bootstrap_table(time, event, risks, fold, [("noisy", "truth"), ("seeds", "truth")], n_boot=50)
    assert [r.model_b for r in vs_base] == ["truth", "truth"]
    with pytest.raises(MilbenchError, match="no risks given"):
        paired_bootstrap_table(time, event, risks, fold, [("truth", "nope")], n_boot=10)


def test_corrected_ttest_reduces_to_scipy_paired_t_without_correction():
    rng = np.random.default_rng(0)
    a, b = 0.7 + rng.normal(scale=0.02, size=5), 0.68 + rng.normal(scale=0.02, size=5)
    plain = corrected_resampled_ttest(a, b, test_train_ratio=0.0)
    ref = sps.ttest_rel(a, b)
    assert plain.t == pytest.approx(ref.statistic, rel=1e-12) and plain.p == pytest.approx(ref.pvalue, rel=1e-12)
    corrected = corrected_resampled_ttest(a, b, test_train_ratio=0.25)
    d = a - b
    t = d.mean() / np.sqrt((1 / 5 + 0.25) * d.var(ddof=1))
    assert corrected.t == pytest.approx(t, rel=1e-12) and corrected.df == 4
    assert corrected.p == pytest.approx(2 * sps.t.sf(abs(t), 4), rel=1e-12) and corrected.p > plain.p


def test_corrected_ttest_over_seeds_tests_per_fold_means_once():
    rng = np.random.default_rng(1)
    a = 0.70 + rng.normal(scale=0.02, size=(3, 5))
    b = 0.68 + rng.normal(scale=0.02, size=(3, 5))
    res = corrected_ttest_over_seeds(a, b, 0.25)
    ref = corrected_resampled_ttest(a.mean(axis=0), b.mean(axis=0), 0.25)
    assert (res.t, res.p, res.n_folds, res.n_seeds) == (ref.t, ref.p, 5, 3)
    a[0, 2] = np.nan  # a failed seed-fold: that fold's mean uses the other seeds
    assert corrected_ttest_over_seeds(a, b, 0.25).n_folds == 5
    one = corrected_ttest_over_seeds(a[:, :1], b[:, :1], 0.25)
    assert np.isnan(one.p) and "at least two" in one.reason
    same = corrected_resampled_ttest(a[1], a[1], 0.25)
    assert same.p == 1.0 and same.mean_diff == 0.0 and "identical" in same.reason


def test_seed_fold_variance_matches_statsmodels_two_way_anova():
    rng = np.random.default_rng(2)
    scores = 0.7 + rng.normal(scale=0.03, size=(1, 5)) + rng.normal(scale=0.01, size=(4, 1)) \
        + rng.normal(scale=0.005, size=(4, 5))
    res = seed_fold_variance(scores)
    frame = pd.DataFrame([(s, f, scores[s, f]) for s in range(4) for f in range(5)], columns=["seed", "fold", "y"])
    table = anova_lm(ols("y ~ C(seed) + C(fold)", frame).fit())
    ms = table["mean_sq"]
    assert res.var_residual == pytest.approx(ms["Residual"], rel=1e-10)
    assert res.var_fold == pytest.approx(max(0, (ms["C(fold)"] - ms["Residual"]) / 4), rel=1e-10)
    assert res.var_seed == pytest.approx(max(0, (ms["C(seed)"] - ms["Residual"]) / 5), rel=1e-10)
    assert res.fold_sd == pytest.approx(scores.mean(axis=0).std(ddof=1))
    assert res.seed_sd == pytest.approx(scores.mean(axis=1).std(ddof=1))
    assert res.seed_sd_within_fold == pytest.approx(np.sqrt(scores.var(axis=0, ddof=1).mean()))
    assert res.fold_sd > res.seed_sd and res.reason == ""


def test_seed_fold_variance_nan_with_reason():
    one_seed = seed_fold_variance([0.7, 0.72, 0.69, 0.71, 0.7])
    assert np.isnan(one_seed.seed_sd) and np.isfinite(one_seed.fold_sd) and "seed sd needs two" in one_seed.reason
    gaps = seed_fold_variance([[0.7, np.nan, 0.7], [0.71, 0.72, 0.69]])
    assert np.isnan(gaps.var_fold) and "complete table" in gaps.reason and np.isfinite(gaps.fold_sd)


# -------------------------------------------------------------------------------------------------- adjustment


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh"])
def test_adjust_matches_statsmodels_and_keeps_nan_out(method):
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.2, np.nan, 0.001])
    out = adjust(p, method)
    ok = np.isfinite(p)
    assert np.isnan(out[~ok]).all()
    assert np.allclose(out[ok], multipletests(p[ok], method=method)[1], rtol=0, atol=1e-15)


@PROPERTY
@given(st.lists(st.one_of(st.floats(0.0, 1.0), st.just(float("nan")), st.sampled_from([0.01, 0.02, 0.05])),
                min_size=1, max_size=30))
def test_property_holm_equals_statsmodels(values):
    p = np.array(values)
    ok = np.isfinite(p)
    out = adjust(p)
    assert np.isnan(out[~ok]).all()
    if ok.any():
        with mock.patch("gc.collect"):  # statsmodels' holm collects garbage on every call: 0.2 s with torch loaded
            ref = multipletests(p[ok], method="holm")[1]
        assert np.allclose(out[ok], ref, rtol=0, atol=1e-15)


def test_adjust_per_family_equals_separate_adjustments():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.02, np.nan])
    family = ["a", "b", "a", "b", "a", "b"]
    out = adjust(p, family=family)
    assert np.allclose(out[[0, 2, 4]], multipletests(p[[0, 2, 4]], method="holm")[1])
    assert np.allclose(out[[1, 3]], multipletests(p[[1, 3]], method="holm")[1]) and np.isnan(out[5])
    assert (adjust(p)[:5] >= out[:5] - 1e-15).all()  # one family over the table is the stricter one
    with pytest.raises(MilbenchError, match="unknown method"):
        adjust(p, method="magic")


# --------------------------------------------------------------------------------------------------------- marks


def test_rank_marks_only_mark_what_the_tests_separate():
    scores = {"A": 0.75, "B": 0.70, "C": 0.65, "D": np.nan}
    p_all = {("A", "B"): 0.001, ("A", "C"): 0.001, ("B", "C"): 0.01}
    assert rank_marks(scores, p_all) == {"A": "best", "B": "second", "C": None, "D": None}
    p_top_tie = p_all | {("A", "B"): 0.2}
    assert rank_marks(scores, p_top_tie) == {"A": "tied-best", "B": "tied-best", "C": None, "D": None}
    p_second_tie = {("A", "B"): 0.001, ("A", "C"): 0.001, ("C", "B"): 0.3}  # either order of the pair
    assert rank_marks(scores, p_second_tie) == {"A": "best", "B": "tied-second", "C": "tied-second", "D": None}
    nan_p = p_all | {("A", "B"): np.nan}  # a comparison that could not be made separates nothing
    assert rank_marks(scores, nan_p)["A"] == "tied-best"
    ci = {("A", "B"): (0.01, 0.09), ("A", "C"): (0.05, 0.15), ("B", "C"): (-0.01, 0.1)}
    assert rank_marks(scores, lambda a, b: not (lambda lo, hi: lo <= 0 <= hi)(*ci.get((a, b), ci.get((b, a)))))[
        "B"] == "tied-second"
    lower = rank_marks({"A": 0.1, "B": 0.2, "C": 0.3}, p_all, higher_is_better=False)
    assert lower == {"A": "best", "B": "second", "C": None}
    assert rank_marks({"A": 0.7}, {}) == {"A": None}
    with pytest.raises(MilbenchError, match="no paired test result"):
        rank_marks(scores, {("A", "B"): 0.01})
    with pytest.raises(MilbenchError, match="conflicting"):
        rank_marks(scores, p_all | {("B", "A"): 0.5})


@PROPERTY
@given(st.lists(st.floats(0.4, 0.9), min_size=2, max_size=6), st.randoms(use_true_random=False),
       st.floats(0.0, 1.0))
def test_property_marks_do_not_depend_on_model_order(values, rnd, threshold):
    names = [f"m{i}" for i in range(len(values))]
    p = {(a, b): (int(a[1:]) * 7 + int(b[1:]) * 13) % 10 / 10 * threshold for a in names for b in names if a < b}
    scores = dict(zip(names, values, strict=True))
    shuffled = names[:]
    rnd.shuffle(shuffled)
    assert rank_marks(scores, p) == rank_marks({m: scores[m] for m in shuffled}, p)
    marks = rank_marks(scores, p)
    assert sum(v == "best" for v in marks.values()) <= 1 and sum(v == "second" for v in marks.values()) <= 1
    assert not ({"best", "tied-best"} <= set(marks.values()))
