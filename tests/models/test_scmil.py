import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from milbench import MilbenchError
from milbench.models.layers.attention import WindowedSelfAttention
from milbench.models.scmil import cluster_windows
from milbench.models.registry import count_parameters, create_model, get_card
from milbench.survival.losses import mdn_nll, mdn_survival
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index

DEAD = {1024: 5_248_000, 2048: 20_981_760}  # the reference's fc1 + unused SelfAttention: 5 D^2 + 5 D


@pytest.mark.parametrize("in_dim,used,reference", [(1024, 4_990_214, 10_238_214), (2048, 18_367_750, 39_349_510)])
def test_parameter_counts_match_spec_used_weights(in_dim, used, reference):
    assert count_parameters(create_model("scmil", in_dim)) == used
    assert used + DEAD[in_dim] == reference == get_card("scmil").reference_params[in_dim]


@pytest.mark.parametrize("in_dim,reference", [(1024, 10_608_406), (2048, 39_977_750)])
def test_mdn_parameter_counts_match_spec(in_dim, reference):
    assert count_parameters(create_model("scmil", in_dim, head="mdn")) + DEAD[in_dim] == reference


def test_cluster_windows_cut_large_clusters_into_near_equal_windows():
    labels = torch.tensor([2, 0, 0, 1, 2, 2] + [3] * 300 + [1] * 128)
    order, lengths = cluster_windows(labels, 64)
    assert torch.equal(labels[order], labels.sort(stable=True).values)
    assert torch.equal(order[:2], torch.tensor([1, 2]))  # stable within a cluster
    # cluster 0: 2; cluster 1: 129 -> 2 windows; cluster 2: 3; cluster 3: 300 -> 4 windows of 75
    assert lengths.tolist() == [2, 65, 64, 3, 75, 75, 75, 75]


def test_windowed_attention_equals_attention_per_window():
    torch.manual_seed(0)
    attn = WindowedSelfAttention(16, 4).eval()
    x, lengths = torch.randn(10, 16), torch.tensor([3, 1, 6])
    y = attn(x, lengths)
    parts = []
    for chunk in x.split(lengths.tolist()):
        q, k, v = (t.view(len(chunk), 4, 4).transpose(0, 1) for t in (attn.q(chunk), attn.k(chunk), attn.v(chunk)))
        p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
        parts.append(attn.out((p @ v).transpose(0, 1).reshape(len(chunk), 16)))
    assert torch.allclose(y, torch.cat(parts), atol=1e-5)


def test_forward_shapes_and_attention_follow_the_patches(tiny_bag):
    model = create_model("scmil", 32).eval()
    out = model(tiny_bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    a = out.attention["20x"]
    assert a.shape == (tiny_bag.n_patches("20x"),) and torch.isclose(a.sum(), torch.tensor(1.0))
    # fewer than 128 kept patches: one cluster, so the model is permutation invariant and the map follows the patches
    perm = torch.randperm(tiny_bag.n_patches("20x"), generator=torch.Generator().manual_seed(0))
    tiny_bag.features["20x"], tiny_bag.coords["20x"] = tiny_bag.features["20x"][perm], tiny_bag.coords["20x"][perm]
    out_perm = model(tiny_bag, return_attention=True)
    assert torch.allclose(out_perm.logits, out.logits, atol=1e-5)
    assert torch.allclose(out_perm.attention["20x"], a[perm], atol=1e-6)


def test_clusters_are_deterministic_and_windows_bounded():
    bag = nested_bag(n5=20, in_dim=8, seed=3)  # 320 patches -> 5 clusters
    model = create_model("scmil", 8).eval()
    x, c = bag.features["20x"], bag.coords["20x"]
    order, lengths = model.context.windows(x, c)
    order2, lengths2 = model.context.windows(x, c)
    assert torch.equal(order, order2) and torch.equal(lengths, lengths2)
    assert lengths.sum() == len(x) and lengths.max() < 128
    assert torch.equal(order.sort().values, torch.arange(len(x)))
    assert torch.equal(model(bag).logits, model(bag).logits)


def test_soft_filter_closed_skips_context_attention(tiny_bag):
    model = create_model("scmil", 32).eval()
    with torch.no_grad():
        model.soft_filter.score[-1].bias.fill_(-50.0)  # every gate ~0: nothing kept
    x = tiny_bag.features["20x"]
    gated = x * torch.sigmoid(model.soft_filter.score(x))
    expected = model.head(model.pool(gated)[0])
    assert torch.allclose(model(tiny_bag).logits, expected, atol=1e-6)


def test_backward_reaches_filter_and_attention(tiny_bag):
    model = create_model("scmil", 32)
    model(tiny_bag).logits.sum().backward()
    assert model.soft_filter.score[0].weight.grad.abs().sum() > 0
    assert model.context.attn.q.weight.grad.abs().sum() > 0


def test_missing_coordinates_is_a_user_error(tiny_bag):
    tiny_bag.coords.clear()
    with pytest.raises(MilbenchError, match="coordinates"):
        create_model("scmil", 32)(tiny_bag)


def test_mdn_head_matches_torch_mixture(tiny_bag):
    model = create_model("scmil", 32, head="mdn").eval()
    params = model(tiny_bag).logits
    assert params.shape == (1, 3, 100)
    months = torch.tensor([3.0, 30.0])
    y = months + torch.log(-torch.expm1(-months))  # inverse softplus
    mix = MixtureSameFamily(Categorical(logits=params[:, 0]), Normal(params[:, 1], params[:, 2]))
    surv = mdn_survival(params, months)
    assert torch.allclose(surv, 1 - mix.cdf(y.view(2, 1)).T, atol=1e-5)
    assert (surv[:, 1] <= surv[:, 0]).all()
    loss = mdn_nll(params.expand(2, -1, -1), months, torch.tensor([0.0, 1.0]))
    expected = -(mix.log_prob(y[0]) + torch.log(1 - mix.cdf(y[1]))) / 2
    assert torch.isclose(loss, expected.squeeze(), atol=1e-4)
    loss.backward()
    assert model.head.mu.weight.grad is not None


def test_mdn_log_density_is_normalised_in_transformed_time():
    params = torch.stack([torch.zeros(1, 3), torch.tensor([[1.0, 5.0, 9.0]]), torch.ones(1, 3)], dim=1)
    grid = torch.linspace(0.01, 30, 1500)
    y = grid + torch.log(-torch.expm1(-grid))
    density = torch.exp(-torch.stack([mdn_nll(params, t.view(1), torch.zeros(1)) for t in grid]))
    assert math.isclose(torch.trapezoid(density, y).item(), 1.0, abs_tol=1e-2)


def test_eval_is_deterministic(tiny_bag):
    model = create_model("scmil", 32).eval()
    assert torch.equal(model(tiny_bag).logits, model(tiny_bag).logits)


@pytest.mark.slow
def test_learns_marked_region_signal():
    assert held_out_c_index("scmil") > 0.7


@pytest.mark.slow
def test_mdn_head_learns_through_the_engine():
    """The official head trained with its mixture NLL on the times (about 6 s)."""
    assert held_out_c_index("scmil", head="mdn") > 0.65
