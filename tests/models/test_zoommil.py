import numpy as np
import pytest
import torch

from milbench.data.multiscale import build_index, take_rows
from milbench.models.layers.topk import perturbed_topk
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index


@pytest.mark.parametrize("in_dim,expected", [(1024, 2_891_017), (2048, 4_463_881)])
def test_parameter_counts_match_spec(in_dim, expected):
    assert count_parameters(create_model("zoommil", in_dim)) == expected


def test_card():
    card = get_card("zoommil")
    assert card.scales == ("5x", "10x", "20x") and "hierarchy" in card.needs and card.group == "multi_scale"
    assert card.reference_params == {1024: 2_891_017, 2048: 4_463_881}


def test_forward_backward_shapes_and_attention():
    torch.manual_seed(0)
    bag = nested_bag(n5=20, in_dim=32)
    model = create_model("zoommil", 32, hidden=64, attn_dim=32)
    out = model(bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    att = out.attention
    assert {k: tuple(v.shape) for k, v in att.items()} == {
        "5x": (20,), "10x": (80,), "20x": (320,), "5x_zoom": (20,), "10x_zoom": (80,)}
    for v in att.values():
        assert torch.isclose(v.sum(), torch.tensor(1.0), atol=1e-5)
    out.logits.sum().backward()
    # every weight learns; a bias added to all scores before a softmax has no gradient by construction
    trained = [p for n, p in model.named_parameters() if not n.endswith("attn_c.bias")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert model(bag).attention == {}


def test_eval_is_deterministic_and_zooms_into_the_right_children():
    bag = nested_bag(n5=20, in_dim=32, seed=3)
    index = build_index(bag.coords, bag.slide_index)
    model = create_model("zoommil", 32, hidden=64, attn_dim=32, k=3).eval()
    seen = {}
    model.proj_mid.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", i[0]))
    model.proj_high.register_forward_hook(lambda m, i, o: seen.__setitem__("high", i[0]))
    out = model(bag, return_attention=True)
    assert torch.equal(out.logits, model(bag).logits)
    # hard top-3 of the 5x selection scores, in index order; the mid magnification sees their 4 children each
    low = out.attention["5x_zoom"].topk(3).indices.sort().values
    assert torch.equal(seen["mid"], take_rows(bag.features["10x"], index["children_10x_of_5x"][low]).flatten(0, 1))
    # then the top-3 zoomed mid patches, and their 2x2 20x blocks (depth-first: contiguous)
    mid_scores = out.attention["10x_zoom"][index["children_10x_of_5x"][low].flatten()]
    mid = mid_scores.topk(3).indices.sort().values
    high_rows = index["children_20x_of_5x"][low].view(12, 4)[mid]
    assert torch.equal(seen["high"], take_rows(bag.features["20x"], high_rows).flatten(0, 1))
    # attention maps live only on the patches that were zoomed into
    assert set(out.attention["20x"].nonzero().squeeze(1).tolist()) <= set(high_rows.flatten().tolist())


def test_missing_children_are_zero_vectors():
    bag = nested_bag(n5=2, in_dim=8)
    keep = torch.arange(32) % 5 != 0  # drop some 20x patches
    bag.features["20x"], bag.coords["20x"] = bag.features["20x"][keep], bag.coords["20x"][keep]
    bag.slide_index["20x"] = bag.slide_index["20x"][keep]
    model = create_model("zoommil", 8, hidden=16, attn_dim=8).eval()
    seen = {}
    model.proj_high.register_forward_hook(lambda m, i, o: seen.__setitem__("high", i[0]))
    model(bag)
    assert bag.extras["hierarchy"]["counts"]["missing"]["20x"] == 7
    assert (seen["high"].abs().sum(1) == 0).any()


def test_perturbed_topk_forward_and_monte_carlo_gradient():
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3], requires_grad=True)
    hard = perturbed_topk(scores, 2, differentiable=False)
    assert hard.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]
    grad_out = torch.randn(2, 5)
    torch.manual_seed(0)
    noise = torch.randn(50, 5)
    idx = torch.topk(scores.detach() + 0.5 * noise, 2).indices.sort().values
    one_hot = torch.nn.functional.one_hot(idx, 5).float()  # [n, k, N]
    jacobian = torch.einsum("nkd,ne->kde", one_hot, noise) / (50 * 0.5)  # E[Y[k, d] Z[e]] / sigma
    expected = {"full": torch.einsum("kd,kde->e", grad_out, jacobian),  # the whole Jacobian (Berthet et al.)
                "authors": torch.einsum("kd,kdd->d", grad_out, jacobian)}  # its diagonal e = d (ZoomMIL's code)
    for grad in ("authors", "full"):
        scores.grad = None
        torch.manual_seed(0)
        soft = perturbed_topk(scores, 2, n_samples=50, sigma=0.5, grad=grad)
        assert torch.allclose(soft.sum(1), torch.ones(2)) and soft.min() >= 0
        (soft * grad_out).sum().backward()
        assert torch.allclose(scores.grad, expected[grad], atol=1e-5), grad
    assert not torch.allclose(expected["authors"], expected["full"], atol=1e-3)


@pytest.mark.slow
def test_learns_marked_region_signal():
    assert held_out_c_index("zoommil", epochs=6, hidden=64, attn_dim=32) > 0.7
