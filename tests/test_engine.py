import numpy as np
import pandas as pd
import pytest

from milbench.config import make_config
from milbench.engine import fit_fold, inner_split


def _cfg(**kw):
    return make_config("amil", "syn", "small", {"epochs": 2, **kw})


def test_fold_record_and_predictions(synth_cohort):
    res = fit_fold(synth_cohort, _cfg(), 0, device="cpu")
    train_ids, test_ids = synth_cohort.folds[0]
    assert list(res.predictions.case_id) == list(test_ids)
    assert {"case_id", "time", "event", "risk", "fold", "surv_0", "surv_3"} <= set(res.predictions.columns)
    m = res.record["metrics"]
    assert 0.0 <= m["c_index"] <= 1.0 and "oracle_c_index" in m and "logrank_p" in m
    # survival curves are non-increasing and the risk is minus their sum
    surv = res.predictions[[f"surv_{k}" for k in range(4)]].to_numpy()
    assert (np.diff(surv, axis=1) <= 1e-7).all()
    assert np.allclose(-surv.sum(axis=1), res.predictions.risk)
    assert res.record["config_hash"] == _cfg().hash
    # bins were fitted on the training fold only
    edges = np.array(res.record["bin_edges"])
    t, e = synth_cohort.labels(train_ids)
    assert edges[0] == pytest.approx(t.min() - 1e-6)


def test_same_seed_same_numbers_on_cpu(synth_cohort):
    a = fit_fold(synth_cohort, _cfg(), 1, device="cpu").predictions
    b = fit_fold(synth_cohort, _cfg(), 1, device="cpu").predictions
    pd.testing.assert_frame_equal(a, b)
    c = fit_fold(synth_cohort, _cfg(seed=123), 1, device="cpu").predictions
    assert not np.allclose(a.risk, c.risk)


@pytest.mark.parametrize("protocol", ["inner-val", "best-val"])
def test_selection_protocols(synth_cohort, protocol):
    res = fit_fold(synth_cohort, _cfg(protocol=protocol, epochs=3, warmup_epochs=1), 0, device="cpu")
    rec = res.record
    assert rec["protocol"] == protocol
    assert 1 <= rec["selected_epoch"] <= 2
    selected = [h for h in rec["history"] if "selection_c_index" in h]
    assert len(selected) == 2
    if protocol == "best-val":
        assert rec["n_select"] == rec["n_test"]
    else:
        assert rec["n_fit"] + rec["n_select"] == rec["n_train"]


def test_inner_split_is_patient_level_and_stratified():
    ids = [f"p{i}" for i in range(40)]
    events = np.array([1, 0] * 20)
    bins = np.repeat([0, 1, 2, 3], 10)
    fit, val = inner_split(ids, events, bins, 0.25, seed=0)
    assert set(fit).isdisjoint(val) and set(fit) | set(val) == set(ids)
    assert len(val) == 8  # round(0.25 * 5) from each of the 8 strata of 5 patients
