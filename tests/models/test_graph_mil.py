import pytest
import torch

from milbench import MilbenchError
from milbench.data.graphs import patch_graph
from milbench.training.prepare import prepare_bag
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index

MODELS = ("deepgraphsurv", "patchgcn")


@pytest.mark.parametrize("name,in_dim,expected", [
    ("deepgraphsurv", 1024, 790_021), ("deepgraphsurv", 2048, 1_052_165),
    ("patchgcn", 1024, 1_383_304), ("patchgcn", 2048, 1_514_376),
])
def test_parameter_counts_match_spec(name, in_dim, expected):
    assert count_parameters(create_model(name, in_dim)) == expected
    assert get_card(name).reference_params[in_dim] == expected


def test_cards_ask_for_the_published_graphs():
    dgc, pgcn = get_card("deepgraphsurv"), get_card("patchgcn")
    assert "graph" in dgc.needs and (dgc.graph_kind, dgc.graph_k) == ("latent", 8)
    assert {"coords", "graph"} <= set(pgcn.needs) and (pgcn.graph_kind, pgcn.graph_k) == ("spatial", 8)


def two_slide_bag(name: str, in_dim: int):
    """One patient with two slides of different sizes, graph built by the data layer."""
    a, b = nested_bag(n5=2, in_dim=in_dim, seed=1), nested_bag(n5=1, in_dim=in_dim, seed=2)
    a.features["20x"] = torch.cat([a.features["20x"], b.features["20x"]])
    a.coords["20x"] = torch.cat([a.coords["20x"], b.coords["20x"]])
    a.slide_index["20x"] = torch.cat([a.slide_index["20x"], torch.ones(16, dtype=torch.long)])
    return prepare_bag(get_card(name), a)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_dim", [1024, 2048])
def test_forward_backward_and_attention_over_all_slides(name, in_dim):
    bag = two_slide_bag(name, in_dim)
    model = create_model(name, in_dim)
    out = model(bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    a = out.attention["20x"]
    assert a.shape == (48,) and torch.isclose(a.sum(), torch.tensor(1.0))
    assert (a[32:] > 0).all()  # the second slide's patches share the same softmax
    out.logits.sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad <= {"gcn.layers.0.norm.weight", "gcn.layers.0.norm.bias"}  # the reference's unused LayerNorm
    assert model(bag).attention == {}


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic(name):
    bag = two_slide_bag(name, 16)
    model = create_model(name, 16).eval()
    assert torch.equal(model(bag).logits, model(bag).logits)


@pytest.mark.parametrize("name", MODELS)
def test_graph_changes_the_output(name):
    bag = two_slide_bag(name, 16)
    model = create_model(name, 16).eval()
    before = model(bag).logits
    bag.extras["graph"] = patch_graph(bag.features["20x"], bag.coords["20x"], bag.slide_index["20x"], "spatial", k=2)
    assert not torch.allclose(model(bag).logits, before)


@pytest.mark.parametrize("name", MODELS)
def test_missing_graph_is_a_clear_error(name):
    with pytest.raises(MilbenchError, match="prepare_bag"):
        create_model(name, 32)(nested_bag(n5=1, in_dim=32))


@pytest.mark.parametrize("name", MODELS)
def test_resample_runs_in_training(name):
    """PatchGCN's reference resample path is a shape error (fc 256 vs GENConv 128); fixed here for both models."""
    bag = two_slide_bag(name, 16)
    model = create_model(name, 16, resample=0.5).train()
    torch.manual_seed(0)
    a = model(bag).logits
    assert a.shape == (1, 4)
    assert not torch.equal(a, model(bag).logits)  # the input dropout is active


def test_dgc_runs_on_the_reference_latent_graph():
    bag = two_slide_bag("deepgraphsurv", 16)
    bag.extras["graph"] = patch_graph(bag.features["20x"], bag.coords["20x"], bag.slide_index["20x"],
                                      kind="latent_reference", k=8)
    assert create_model("deepgraphsurv", 16)(bag).logits.shape == (1, 4)


@pytest.mark.slow
def test_dgc_learns_marked_region_signal():
    assert held_out_c_index("deepgraphsurv", lr=3e-4) > 0.7


@pytest.mark.slow
def test_patchgcn_learns_marked_region_signal():
    assert held_out_c_index("patchgcn", epochs=6) > 0.7
