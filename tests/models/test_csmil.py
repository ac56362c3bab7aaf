import pytest
import torch

from milbench import MilbenchError
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index


@pytest.mark.parametrize("in_dim,expected", [(1024, 72_038), (2048, 137_574)])
def test_parameter_counts_match_spec(in_dim, expected):
    assert count_parameters(create_model("csmil", in_dim)) == expected


def test_card():
    card = get_card("csmil")
    assert card.scales == ("5x", "10x", "20x") and "hierarchy" in card.needs and card.group == "multi_scale"
    assert card.reference_params == {1024: 72_038, 2048: 137_574}


def test_forward_shapes_attention_and_backward():
    bag = nested_bag(n5=3, in_dim=16)
    model = create_model("csmil", 16)
    out = model(bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    att = out.attention
    shapes = {k: tuple(v.shape) for k, v in att.items()}
    assert shapes == {"20x": (48,), "10x": (12,), "5x": (3,), "cross_scale": (48, 3)}
    for scale in ("20x", "10x", "5x"):
        assert torch.isclose(att[scale].sum(), torch.tensor(1.0), atol=1e-5)
    out.logits.sum().backward()
    # every weight learns; a bias added to all scores before a softmax has no gradient by construction
    trained = [p for n, p in model.named_parameters() if not n.endswith("instance_attention.attn_w.bias")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_training_samples_by_cluster_and_eval_uses_every_instance():
    bag = nested_bag(n5=3, in_dim=16)
    model = create_model("csmil", 16, bag_length=1, bag_length_std=0.0)
    seen = []
    model.instance_attention.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    torch.manual_seed(0)
    model(bag)
    assert seen[-1] == 8 * 1  # one draw from each of the 8 clusters
    model.bag_length = 100.0  # min(L, cluster size): every cluster is taken whole (with replacement)
    model(bag)
    assert seen[-1] == 48
    assert "cluster_sampling" in model.policies() and create_model("csmil", 16, bag_length=None).policies() == {}
    model.eval()
    first = model(bag)
    assert seen[-1] == 48 and torch.equal(first.logits, model(bag).logits)


def test_sample_in_eval_reproduces_the_stochastic_reference_evaluation():
    bag = nested_bag(n5=3, in_dim=16)
    model = create_model("csmil", 16, sample_in_eval=True).eval()
    torch.manual_seed(0)
    assert not torch.equal(model(bag).logits, model(bag).logits)


def test_scale_weights_raw_by_default_softmax_on_request():
    bag = nested_bag(n5=2, in_dim=8)
    raw = create_model("csmil", 8).eval()(bag, return_attention=True).attention["cross_scale"]
    assert not torch.allclose(raw.sum(1), torch.ones(32))
    soft = create_model("csmil", 8, scale_softmax=True).eval()(bag, return_attention=True).attention["cross_scale"]
    assert torch.allclose(soft.sum(1), torch.ones(32)) and (soft > 0).all()


@pytest.mark.parametrize("orphans", ["mask", "drop"])
def test_patches_without_parents(orphans):
    bag = nested_bag(n5=2, in_dim=8)
    keep = torch.arange(8) != 0  # drop a 10x patch: 4 20x patches lose their 10x parent
    bag.features["10x"], bag.coords["10x"] = bag.features["10x"][keep], bag.coords["10x"][keep]
    bag.slide_index["10x"] = bag.slide_index["10x"][keep]
    out = create_model("csmil", 8, orphans=orphans, scale_softmax=True).eval()(bag, return_attention=True)
    orphan_rows = bag.extras["hierarchy"]["parent_10x_of_20x"] < 0
    assert int(orphan_rows.sum()) == 4
    if orphans == "mask":  # kept, with their 10x view left out of the cross-scale sum
        assert (out.attention["20x"][orphan_rows] > 0).all()
        assert (out.attention["cross_scale"][orphan_rows, 1] == 0).all()
    else:
        assert (out.attention["20x"][orphan_rows] == 0).all()


def test_bad_orphans_option():
    with pytest.raises(MilbenchError, match="orphans"):
        create_model("csmil", 8, orphans="zero")


@pytest.mark.slow
def test_learns_marked_region_signal():
    assert held_out_c_index("csmil", epochs=6) > 0.7
