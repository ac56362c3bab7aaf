import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from milbench import MilbenchError
from milbench.config.run import make_config
from milbench.survival.binning import fit_bins
from milbench.training.prepare import prepare_bag
from milbench.training.steps import bag_loss, train_epoch, window_loss
from milbench.training.fold import fit_fold
from milbench.training.protocols import inner_split
from milbench.models.registry import create_model, get_card
from milbench.survival.losses import get_loss
from tests.conftest import nested_bag
from tests.models.learning import BagList, held_out_c_index


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
    # the record says what the timings ran on: the CPU model and the torch threads
    assert res.record["environment"]["device_name"].endswith(f"({torch.get_num_threads()} torch threads)")
    # bins were fitted on the training fold only: every edge is the training fold's, not the whole cohort's
    edges = np.array(res.record["bin_edges"])
    np.testing.assert_allclose(edges, fit_bins(*synth_cohort.labels(train_ids), n_bins=4))
    whole = fit_bins(*synth_cohort.labels(synth_cohort.patients.index.tolist()), n_bins=4)
    assert not np.allclose(edges, whole)


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
    selected = [h for h in rec["history"] if "selection_c_index" in h]
    assert [h["epoch"] for h in selected] == [1, 2]  # no epoch of the warm-up is a candidate
    scored = [h for h in selected if np.isfinite(h["selection_c_index"])]  # NaN (no comparable pair) never wins
    # the first of equal best scores, as training keeps it; the last epoch when no epoch could be scored
    best = max(scored, key=lambda h: h["selection_c_index"])["epoch"] if scored else rec["history"][-1]["epoch"]
    assert rec["selected_epoch"] == best
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


PROTO_SMALL = {"hidden": 8, "dim_proto": 24, "proto_hidden": 16, "protos_per_type": 4}


@pytest.mark.parametrize("name", ["dsmil", "mustmil"])
def test_training_loss_includes_every_task_output(name):
    """bag_loss and window_loss train each task output with the same loss: shifting the task logits changes the
    loss by exactly the change of their losses, and the bag logits' loss is the rest."""
    torch.manual_seed(0)
    card = get_card(name)
    model = create_model(name, 16).eval()  # neither model has dropout; eval keeps the passes identical anyway
    bags = [prepare_bag(card, nested_bag(n5=3, in_dim=16, seed=s)) for s in range(3)]
    y, c, t = torch.tensor([1, 3, 0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([5.0, 9.0, 2.0])
    nll, cox = get_loss("nll", 0.2), get_loss("cox")
    out = model(bags[0])
    assert out.tasks and all(v.shape == out.logits.shape for v in out.tasks.values())
    task_part = sum(nll(v, y[:1], c[:1]) for v in out.tasks.values())
    base = bag_loss(model, bags[0], y[:1], c[:1], nll, None)
    torch.testing.assert_close(base, nll(out.logits, y[:1], c[:1]) + task_part)

    shift = lambda o: o._replace(tasks={k: v + 2.0 for k, v in o.tasks.items()})  # noqa: E731
    forward = model.forward
    model.forward = lambda bag, **kw: shift(forward(bag, **kw))
    shifted_part = sum(nll(v + 2.0, y[:1], c[:1]) for v in out.tasks.values())
    assert abs((shifted_part - task_part).item()) > 1e-3
    torch.testing.assert_close(bag_loss(model, bags[0], y[:1], c[:1], nll, None) - base, shifted_part - task_part)

    # the window loss (Cox over the window) ranks the tasks' outputs as it ranks the logits
    outs = [forward(b) for b in bags]
    expected = {k: cox(torch.cat([o.tasks[k] + 2.0 for o in outs]), y, c, t) for k in out.tasks}
    main = cox(torch.cat([o.logits for o in outs]), y, c, t)
    got = window_loss(model, bags, y, c, t, cox, None)
    torch.testing.assert_close(got, 3 * (main + sum(expected.values())))


def test_cox_windows_without_an_event_are_skipped():
    """Under the Cox loss each window of grad_accum bags is one ranking; an all-censored window has none: no forward
    pass, no update."""
    torch.manual_seed(0)
    bags = BagList([prepare_bag(get_card("amil"), nested_bag(n5=2, in_dim=8, seed=s, case_id=f"b{s}"))
                    for s in range(8)])
    model = create_model("amil", 8)
    seen = []
    forward = model.forward
    model.forward = lambda bag, **kw: seen.append(bag.case_id) or forward(bag, **kw)
    c = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # window 1 (bags 0-3) all censored
    before = [p.detach().clone() for p in model.parameters()]
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, bags, list(range(8)), torch.zeros(8, dtype=torch.long), c, get_loss("cox"), optim,
                grad_accum=4, months=torch.arange(8.0) + 1)
    assert seen == ["b4", "b5", "b6", "b7"]  # only the window with events went through the model
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(MilbenchError, match="survival times"):
        train_epoch(model, bags, list(range(8)), torch.zeros(8, dtype=torch.long), c, get_loss("cox"), optim, 4)


def test_protosurv_cox_head_trains_end_to_end_and_records_its_node_cap(synth_cohort):
    cfg = make_config("protosurv", "syn", "small", {"epochs": 2, "head": "cox", "max_train_nodes": 10,
                                                    **PROTO_SMALL})
    assert cfg.loss == "cox"  # chosen from the head
    res = fit_fold(synth_cohort, cfg, 0, device="cpu")
    pred, rec = res.predictions, res.record
    assert rec["head"] == "cox" and rec["config"]["loss"] == "cox"
    assert np.isfinite(pred.risk).all() and pred.risk.nunique() == len(pred)  # a strict ranking of the patients
    assert not [col for col in pred.columns if col.startswith("surv_")]  # a Cox head has no survival curve
    m = rec["metrics"]
    assert 0.0 <= m["c_index"] <= 1.0 and np.isnan(m["ibs"])
    assert all(np.isfinite(h["train_loss"]) for h in rec["history"])
    # the large-bag policy: every bag here has more than 10 nodes, so every one that trained (those of the windows
    # with an event) was subsampled
    cap = rec["policies"]["max_train_nodes"]
    assert cap["cap"] == 10 and 0 < cap["bags_subsampled"] <= rec["n_fit"] and "training" in cap["applies_to"]
    assert "seed" in cap["seed"] and "k-means" in rec["policies"]["tissue_priors"]
    assert "gradient_checkpointing" in rec["policies"]
    json.dumps(rec)  # the record stays JSON


def test_scmil_mdn_head_trains_end_to_end(synth_cohort):
    cfg = make_config("scmil", "syn", "small", {"epochs": 2, "head": "mdn", "n_components": 8})
    assert cfg.loss == "mdn"
    res = fit_fold(synth_cohort, cfg, 0, device="cpu")
    pred, rec = res.predictions, res.record
    assert rec["head"] == "mdn" and "cluster_windows" in rec["policies"]
    surv = pred[[f"surv_{k}" for k in range(4)]].to_numpy()  # S at the right edges of the fold's bins
    assert np.isfinite(surv).all() and ((surv >= 0) & (surv <= 1)).all()
    assert (np.diff(surv, axis=1) <= 1e-7).all()
    assert np.allclose(-surv.sum(axis=1), pred.risk) and pred.risk.nunique() == len(pred)
    assert np.isfinite(rec["metrics"]["c_index"]) and all(np.isfinite(h["train_loss"]) for h in rec["history"])


def test_a_loss_that_contradicts_the_head_is_refused(synth_cohort):
    with pytest.raises(MilbenchError, match="loss=cox"):
        fit_fold(synth_cohort, replace(_cfg(), model="protosurv", model_options={"head": "cox", **PROTO_SMALL}), 0,
                 device="cpu")
    with pytest.raises(MilbenchError, match="pack=1"):
        fit_fold(synth_cohort, _cfg(loss="cox", pack=2), 0, device="cpu")


def test_hazard_head_trains_with_the_cox_loss_over_windows(synth_cohort):
    res = fit_fold(synth_cohort, _cfg(loss="cox"), 0, device="cpu")
    assert res.record["head"] == "hazard" and res.record["policies"] == {}
    assert "surv_3" in res.predictions and np.isfinite(res.predictions.risk).all()
    assert held_out_c_index("amil", loss="cox", grad_accum=8) > 0.7  # and it learns the ranking


@pytest.mark.parametrize("name", ["amil", "transmil", "crossfusion", "crossfusion_single"])
def test_half_precision_features_give_the_float32_logits_under_autocast(name):
    """Models declaring autocast_inputs are fed the stored float16 features under autocast: the same logits, bit for
    bit, as from the float32 copy (float16 converts to bf16 exactly as through float32)."""
    from milbench.bench.bags import parse_bag, random_bag
    from milbench.training.device import float_bag as _as_float
    from milbench.training.device import model_input

    torch.manual_seed(0)
    model = create_model(name, in_dim=16).eval()
    bag = random_bag(name, parse_bag("6,20,80"), 16, torch.device("cpu"))
    assert all(v.dtype == torch.float16 for v in bag.features.values())
    fed = model_input(model, bag, torch.bfloat16)
    assert all(v.dtype == torch.float16 for v in fed.features.values())
    assert all(v.dtype == torch.float32 for v in model_input(model, bag, None).features.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(fed).logits, model(_as_float(bag)).logits)


def test_models_that_do_not_declare_it_get_float32_features():
    from milbench.bench.bags import parse_bag, random_bag
    from milbench.training.device import model_input

    bag = random_bag("dsmil", parse_bag("6,20,80"), 16, torch.device("cpu"))
    fed = model_input(create_model("dsmil", in_dim=16), bag, torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in fed.features.values())
