import math

import pytest
import torch

from milbench.models.registry import count_parameters, create_model, get_card
from milbench.survival.losses import nll_loss
from tests.models.learning import held_out_c_index


@pytest.mark.parametrize("in_dim,expected", [(1024, 168_200), (2048, 319_752)])
def test_parameter_counts_match_spec(in_dim, expected):
    assert count_parameters(create_model("dsmil", in_dim)) == expected
    assert get_card("dsmil").reference_params[in_dim] == expected


def test_forward_matches_dual_stream_by_hand(tiny_bag):
    model = create_model("dsmil", 32).eval()
    out = model(tiny_bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None and set(out.tasks) == {"max_instance"}
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
    assert out.aux_loss is None and out.tasks == {}
    nll_loss(out.logits, torch.tensor([1]), torch.tensor([0.0])).backward()
    assert model.instance_classifier.weight.grad is None
    assert model.query[0].weight.grad is not None


def test_max_instance_logits_are_a_task_that_trains_the_instance_classifier(tiny_bag):
    model = create_model("dsmil", 32).train()
    out = model(tiny_bag)
    with torch.no_grad():
        m = model.instance_classifier(tiny_bag.features["20x"]).max(0).values.unsqueeze(0)
    assert torch.allclose(out.tasks["max_instance"], m)
    nll_loss(out.tasks["max_instance"], torch.tensor([2]), torch.tensor([0.0])).backward()
    assert model.instance_classifier.weight.grad.abs().sum() > 0


def test_eval_is_deterministic(tiny_bag):
    model = create_model("dsmil", 32).eval()
    assert torch.equal(model(tiny_bag).logits, model(tiny_bag).logits)


def test_reference_variant_learns():
    assert held_out_c_index("dsmil", instance_loss=False) > 0.7


def test_default_with_max_instance_loss_learns():
    """The learning check with the engine's loss, which trains the max-instance task too."""
    assert held_out_c_index("dsmil") > 0.7
