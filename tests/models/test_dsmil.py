import math

import numpy as np
import pytest
import torch
from sksurv.metrics import concordance_index_censored

from milbench.registry import count_parameters, create_model, get_card
from milbench.survival.losses import nll_loss
from tests.models.learning import held_out_c_index, make_patients


@pytest.mark.parametrize("in_dim,expected", [(1024, 168_200), (2048, 319_752)])
def test_parameter_counts_match_spec(in_dim, expected):
    assert count_parameters(create_model("dsmil", in_dim)) == expected
    assert get_card("dsmil").reference_params[in_dim] == expected


def _label_loss(y: int, censored: float):
    return lambda logits: nll_loss(logits.float(), torch.tensor([y]), torch.tensor([censored]), alpha=0.2)


def test_forward_matches_dual_stream_by_hand(tiny_bag):
    model = create_model("dsmil", 32).eval()
    out = model(tiny_bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    x = tiny_bag.features["20x"]
    with torch.no_grad():
        c = model.instance_classifier(x)
        q = model.query(x)
        q_crit = q[c.argmax(0)]
        a = torch.softmax(q @ q_crit.T / math.sqrt(128), dim=0)  # [N, n_bins], softmax over patches
        expected = model.bag_classifier((a.T @ x).unsqueeze(0)).squeeze(-1)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert out.attention["20x"].shape == (tiny_bag.n_patches("20x"),)
    assert torch.allclose(out.attention["20x"], a.mean(1), atol=1e-6)
    assert torch.isclose(out.attention["20x"].sum(), torch.tensor(1.0))


def test_reference_instance_classifier_gets_no_gradient(tiny_bag):
    model = create_model("dsmil", 32, instance_loss=False).train()
    out = model(tiny_bag)
    assert out.aux_loss is None
    nll_loss(out.logits, torch.tensor([1]), torch.tensor([0.0])).backward()
    assert model.instance_classifier.weight.grad is None
    assert model.query[0].weight.grad is not None


def test_max_instance_loss_trains_instance_classifier(tiny_bag):
    model = create_model("dsmil", 32).train()
    tiny_bag.extras["survival_loss"] = _label_loss(2, 0.0)
    out = model(tiny_bag)
    with torch.no_grad():
        m = model.instance_classifier(tiny_bag.features["20x"]).max(0).values.unsqueeze(0)
    assert torch.isclose(out.aux_loss, _label_loss(2, 0.0)(m))
    out.aux_loss.backward()
    assert model.instance_classifier.weight.grad.abs().sum() > 0


def test_training_without_label_loss_raises(tiny_bag):
    model = create_model("dsmil", 32).train()
    with pytest.raises(RuntimeError, match="survival_loss"):
        model(tiny_bag)
    assert model.eval()(tiny_bag).aux_loss is None


def test_eval_is_deterministic(tiny_bag):
    model = create_model("dsmil", 32).eval()
    assert torch.equal(model(tiny_bag).logits, model(tiny_bag).logits)


def test_reference_variant_learns():
    assert held_out_c_index("dsmil", instance_loss=False) > 0.7


def test_default_with_max_instance_loss_learns():
    """The learning check of tests/models/learning.py with the label's loss handed to the model, as the engine does."""
    torch.manual_seed(0)
    card = get_card("dsmil")
    model = create_model("dsmil", 16)
    train, test = make_patients(48, 4, 16, 0, card), make_patients(32, 4, 16, 1, card)
    edges = np.quantile([t for _, t, _ in train], [0.25, 0.5, 0.75])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(12):
        for bag, t, _ in train:
            bag.extras["survival_loss"] = _label_loss(int(np.searchsorted(edges, t)), 0.0)
            out = model(bag)
            loss = bag.extras["survival_loss"](out.logits) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        risk = np.array([-torch.cumprod(1 - torch.sigmoid(model(b).logits[0]), 0).sum().item() for b, _, _ in test])
    times = np.array([t for _, t, _ in test])
    assert concordance_index_censored(np.ones(len(times), bool), times, risk)[0] > 0.7
