import pytest
import torch

from milbench.models.registry import count_parameters, create_model, get_card
from tests.models.learning import held_out_c_index


@pytest.mark.parametrize("in_dim,variant,expected", [
    (1024, "crossfusion", 789_765), (2048, "crossfusion", 1_314_053),
    (1024, "patchgcn", 920_069), (2048, "patchgcn", 1_444_357),
])
def test_parameter_counts_match_spec(in_dim, variant, expected):
    assert count_parameters(create_model("amil", in_dim, variant=variant)) == expected


def test_card_reference_counts():
    assert get_card("amil").reference_params[2048] == 1_314_053


def test_forward_shapes_and_attention(tiny_bag):
    model = create_model("amil", 32)
    out = model(tiny_bag, return_attention=True)
    assert out.logits.shape == (1, 4)
    a = out.attention["20x"]
    assert a.shape == (tiny_bag.n_patches("20x"),)
    assert torch.isclose(a.sum(), torch.tensor(1.0))


def test_learns_marked_region_signal():
    assert held_out_c_index("amil") > 0.75
