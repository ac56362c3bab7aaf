"""Metrics against direct scikit-survival and lifelines calls on WHAS500, plus error and NaN handling."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sksurv.datasets import load_whas500
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from milbench import MilbenchError
from milbench.survival.metrics import (EVAL_QUANTILES, cohort_times, evaluation_times, fold_metrics, harrell_c, integrated_brier, logrank_p, survival_at, td_auc, uno_c)
from milbench.survival.binning import fit_bins


@pytest.fixture(scope="module")
def whas():
    """WHAS500 split 300 / 200, a linear risk of age, BMI and heart rate, and 4-bin survival curves from it."""
    x, y = load_whas500()
    time, event = y["lenfol"].astype(float), y["fstat"].astype(float)
    risk = x[["age", "bmi", "hr"]].to_numpy(float) @ np.array([0.05, -0.03, 0.01])
    surv_bins = np.exp(-np.exp(risk - risk.mean())[:, None] * np.arange(1, 5) / 4)
    order = np.random.default_rng(0).permutation(len(time))
    tr, te = order[:300], order[300:]
    return dict(train_time=time[tr], train_event=event[tr], time=time[te], event=event[te], risk=risk[te],
                train_risk=risk[tr], surv_bins=surv_bins[te], edges=fit_bins(time[tr], event[tr]))


def test_harrell_c_matches_sksurv_and_lifelines(whas):
    t, e, r = whas["time"], whas["event"], whas["risk"]
    ours = harrell_c(t, e, r)
    assert ours == pytest.approx(concordance_index_censored(e.astype(bool), t, r)[0], abs=1e-12)
    assert ours == pytest.approx(concordance_index(t, -r, e), abs=1e-12)  # lifelines ranks predicted survival times
    assert 0.65 < ours < 0.8  # age and heart rate are known risk factors after myocardial infarction
    # dying earlier = higher risk (times are whole days; a death outranks a censoring on the same day)
    assert harrell_c(t, e, -t + 0.5 * e) == 1.0 and harrell_c(t, e, t - 0.5 * e) == 0.0


def test_uno_td_auc_ibs_match_sksurv(whas):
    # censoring estimated on all 500 patients, so the held-out follow-up lies inside it for the direct sksurv calls
    all_time = np.concatenate([whas["train_time"], whas["time"]])
    all_event = np.concatenate([whas["train_event"], whas["event"]])
    train = Surv.from_arrays(all_event.astype(bool), all_time)
    test = Surv.from_arrays(whas["event"].astype(bool), whas["time"])
    for tau in (None, 1500.0):
        assert uno_c(all_time, all_event, whas["time"], whas["event"], whas["risk"], tau=tau) == \
            pytest.approx(concordance_index_ipcw(train, test, whas["risk"], tau=tau)[0], abs=1e-12)
    times = np.array([100.0, 400.0, 800.0, 1200.0])
    aucs, mean_auc = td_auc(all_time, all_event, whas["time"], whas["event"], whas["risk"], times)
    ref_aucs, ref_mean = cumulative_dynamic_auc(train, test, whas["risk"], times)
    assert np.allclose(aucs, ref_aucs, rtol=0, atol=1e-12) and mean_auc == pytest.approx(ref_mean, abs=1e-12)
    assert 0.6 < mean_auc < 0.9
    surv = survival_at(whas["surv_bins"], whas["edges"], times)
    ibs = integrated_brier(all_time, all_event, whas["time"], whas["event"], surv, times)
    assert ibs == pytest.approx(integrated_brier_score(train, test, surv, times), abs=1e-12)
    assert 0.0 < ibs < 0.25


def test_logrank_p_matches_lifelines(whas):
    t, e, r = whas["time"], whas["event"], whas["risk"]
    cutoff = float(np.median(whas["train_risk"]))
    high = r > cutoff
    ref = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high]).p_value
    assert logrank_p(t, e, r, cutoff) == pytest.approx(ref, rel=1e-12)
    assert logrank_p(t, e, r, cutoff) < 1e-3
    assert np.isnan(logrank_p(t, e, r, r.max())) and np.isnan(logrank_p(t, e, r, r.min() - 1))


def test_survival_at_is_a_step_at_the_bin_ends():
    surv_bins = np.array([[0.9, 0.6, 0.3, 0.1]])
    edges = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    got = survival_at(surv_bins, edges, [0.0, 9.9, 10.0, 19.9, 20.0, 30.0, 39.9, 40.0, 99.0])
    assert got.tolist() == [[1.0, 1.0, 0.9, 0.9, 0.6, 0.3, 0.3, 0.1, 0.1]]


def test_fold_metrics_matches_direct_calls(whas):
    out = fold_metrics(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"],
                       whas["surv_bins"], whas["edges"])
    assert set(out) == {"c_index", "uno_c", "ibs", "td_auc"}
    assert all(np.isfinite(v) for v in out.values())
    assert out["c_index"] == pytest.approx(harrell_c(whas["time"], whas["event"], whas["risk"]))
    tau = whas["train_time"].max()
    assert out["uno_c"] == pytest.approx(uno_c(whas["train_time"], whas["train_event"], whas["time"], whas["event"],
                                               whas["risk"], tau=tau))
    # this split holds a held-out time past the last training time; those patients are censored there for IBS and
    # td-AUC (a direct sksurv call refuses to extrapolate the censoring estimate)
    assert whas["time"].max() > tau
    with pytest.raises(MilbenchError, match="largest observed time"):
        td_auc(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"], [100.0, 200.0])


def test_censoring_at_the_last_training_time_leaves_ibs_and_td_auc_unchanged():
    rng = np.random.default_rng(1)
    risk = rng.normal(size=400)
    death, cens = rng.exponential(np.exp(-risk) * 10), rng.exponential(15, 400)
    time, event = np.minimum(death, cens), (death <= cens).astype(float)
    tr, te = np.arange(300), np.arange(300, 400)
    last = tr[np.argmax(time[tr])]
    event[last] = 0  # training follow-up ends on a censoring, so sksurv accepts later held-out censorings
    event[te[time[te] >= time[last]]] = 0
    time[te[:3]], event[te[:3]] = time[last] + np.array([1.0, 2.0, 3.0]), 0  # held-out follow-up beyond training
    surv_bins = np.exp(-np.exp(risk)[:, None] * np.arange(1, 5) / 4)
    edges = fit_bins(time[tr], event[tr])
    out = fold_metrics(time[tr], event[tr], time[te], event[te], risk[te], surv_bins[te], edges)
    times = evaluation_times(time[tr], time[te], event[te])
    train = Surv.from_arrays(event[tr].astype(bool), time[tr])
    test = Surv.from_arrays(event[te].astype(bool), time[te])
    assert out["td_auc"] == pytest.approx(cumulative_dynamic_auc(train, test, risk[te], times)[1], abs=1e-12)
    surv = survival_at(surv_bins[te], edges, times)
    assert out["ibs"] == pytest.approx(integrated_brier_score(train, test, surv, times), abs=1e-12)


def test_cohort_grid_is_fixed_from_the_whole_cohort_and_shared_by_every_fold():
    rng = np.random.default_rng(2)
    risk = rng.normal(size=500)
    death, cens = rng.exponential(np.exp(-risk) * 10), rng.exponential(15, 500)
    time, event = np.minimum(death, cens), death <= cens
    fold = np.arange(500) % 5
    held_out = [(time[fold == k], time[fold != k]) for k in range(5)]
    grid, note = cohort_times(time, event, held_out)
    # the cohort's event-time quantiles, whatever the fold
    np.testing.assert_allclose(grid, np.quantile(time[event], EVAL_QUANTILES))
    assert note == ""
    surv_bins = np.exp(-np.exp(risk)[:, None] * np.arange(1, 5) / 4)
    ibs = []
    for k in range(5):
        tr, te = fold != k, fold == k
        edges = fit_bins(time[tr], event[tr].astype(float))
        out = fold_metrics(time[tr], event[tr], time[te], event[te], risk[te], surv_bins[te], edges, times=grid)
        train, test = Surv.from_arrays(event[tr], time[tr]), Surv.from_arrays(event[te], time[te])
        ibs.append(integrated_brier_score(train, test, survival_at(surv_bins[te], edges, grid), grid))
        assert out["ibs"] == pytest.approx(ibs[-1], abs=1e-12)
        assert out["td_auc"] == pytest.approx(cumulative_dynamic_auc(train, test, risk[te], grid)[1], abs=1e-12)
        # a fold's own times differ from the cohort's: the grid is what makes the folds comparable
        assert not np.array_equal(evaluation_times(time[tr], time[te], event[te]), grid)
    # a grid time outside one fold's follow-up is dropped for every fold, and the note names it
    short = [(t[t < grid[-1]], tr_) if k == 0 else (t, tr_) for k, (t, tr_) in enumerate(held_out)]
    kept, note = cohort_times(time, event, short)
    assert grid[-1] not in kept and len(kept) == len(grid) - 1 and "dropped" in note
    assert cohort_times(time, np.zeros(500, bool))[0].size == 0


def test_fold_metrics_nan_with_logged_reason(whas, caplog):
    args = (whas["train_time"], whas["train_event"], whas["time"], np.zeros_like(whas["event"]), whas["risk"],
            whas["surv_bins"], whas["edges"])
    with caplog.at_level(logging.WARNING, logger="milbench.survival.metrics"):
        out = fold_metrics(*args)
    assert all(np.isnan(v) for v in out.values())
    assert "c_index is NaN for this fold: harrell_c: no observed event" in caplog.text
    assert "fewer than 2 evaluation times" in caplog.text


def test_a_head_without_survival_curves_gets_every_metric_but_ibs(whas, caplog):
    full = fold_metrics(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"],
                        whas["surv_bins"], whas["edges"])
    with caplog.at_level(logging.WARNING, logger="milbench.survival.metrics"):
        out = fold_metrics(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"], None,
                           whas["edges"])
    assert np.isnan(out["ibs"]) and "no survival curve" in caplog.text
    assert {k: out[k] for k in ("c_index", "uno_c", "td_auc")} == {k: full[k] for k in ("c_index", "uno_c", "td_auc")}


def test_fold_metrics_rejects_malformed_predictions(whas):
    with pytest.raises(MilbenchError, match="one entry per patient"):
        fold_metrics(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"][:-1],
                     whas["surv_bins"], whas["edges"])
    with pytest.raises(MilbenchError, match="n_bins \\+ 1 edges"):
        fold_metrics(whas["train_time"], whas["train_event"], whas["time"], whas["event"], whas["risk"],
                     whas["surv_bins"][:, :3], whas["edges"])


@pytest.mark.parametrize("call", [
    lambda t, e, r: harrell_c(t, e, r),
    lambda t, e, r: uno_c(t, e, t, e, r),
    lambda t, e, r: td_auc(t, e, t, e, r, [5.0]),
    lambda t, e, r: integrated_brier(t, e, t, e, np.tile(r[:, None], 2), [3.0, 5.0]),
    lambda t, e, r: logrank_p(t, e, r, 0.0),
])
def test_input_validation(call):
    t, e, r = np.arange(1.0, 11.0), np.array([1, 0] * 5, dtype=float), np.linspace(1, -1, 10)
    with pytest.raises(MilbenchError, match="one entry per patient"):
        call(t, e, r[:-1])
    with pytest.raises(MilbenchError, match="NaN"):
        call(t, e, np.where(np.arange(10) == 3, np.nan, r))
    with pytest.raises(MilbenchError, match="no observed event"):
        call(t, np.zeros(10), r)
    with pytest.raises(MilbenchError, match="0 or 1"):
        call(t, e * 2, r)
