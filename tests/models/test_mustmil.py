import pytest
import torch

from milbench import MilbenchError
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index

THREE = ("5x", "10x", "20x")


@pytest.mark.parametrize("in_dim,scales,expected", [
    (1024, ("5x", "10x"), 304_344), (2048, ("5x", "10x"), 566_488),
    (1024, THREE, 456_352), (2048, THREE, 849_568),  # the spec's 3-scale extension
])
def test_parameter_counts_match_spec(in_dim, scales, expected):
    assert count_parameters(create_model("mustmil", in_dim, scales=scales)) == expected


def test_card():
    card = get_card("mustmil")
    assert card.scales == ("5x", "10x") and "hierarchy" in card.needs and card.group == "multi_scale"
    assert card.reference_params == {1024: 304_344, 2048: 566_488}


@pytest.mark.parametrize("scales", [("5x", "10x"), THREE])
def test_scale_tasks_attention_and_backward(scales):
    bag = nested_bag(n5=3, in_dim=16)
    model = create_model("mustmil", 16, scales=scales)
    out = model(bag, return_attention=True)
    tasks = out.tasks
    assert out.logits.shape == (1, 4) and set(tasks) == set(scales)
    assert all(t.shape == (1, 4) for t in tasks.values())
    sizes = {"5x": 3, "10x": 12, "20x": 48}
    expected = {s: (sizes[s],) for s in scales} | {"joint": (sizes[scales[-1]],)}
    assert {k: tuple(v.shape) for k, v in out.attention.items()} == expected
    for v in out.attention.values():
        assert torch.isclose(v.sum(), torch.tensor(1.0), atol=1e-5)
    (out.logits.sum() + sum(t.sum() for t in tasks.values())).backward()
    # every weight learns; a bias added to all scores before a softmax has no gradient by construction
    trained = [p for n, p in model.named_parameters() if not n.endswith("attention.attn_w.bias")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    again = model(bag)  # deterministic
    assert torch.equal(again.logits, out.logits) and torch.equal(again.tasks[scales[0]], tasks[scales[0]])


def test_orphan_rows_are_dropped():
    bag = nested_bag(n5=2, in_dim=8)
    far = torch.tensor([[90_000, 90_000]])
    bag.coords["10x"] = torch.cat([bag.coords["10x"], far])
    bag.features["10x"] = torch.cat([bag.features["10x"], torch.full((1, 8), 1e6)])
    bag.slide_index["10x"] = torch.cat([bag.slide_index["10x"], torch.zeros(1, dtype=torch.long)])
    model = create_model("mustmil", 8)
    out = model(bag, return_attention=True)
    assert torch.isfinite(out.logits).all()
    assert out.attention["joint"][-1] == 0 and bag.extras["hierarchy"]["counts"]["orphans"]["parent_5x_of_10x"] == 1


def test_bad_scales_are_rejected():
    with pytest.raises(MilbenchError, match="scales"):
        create_model("mustmil", 8, scales=("10x", "20x"))


@pytest.mark.slow
def test_learns_marked_region_signal():
    assert held_out_c_index("mustmil", epochs=6) > 0.7
