import math

import pytest
import torch
import torch.nn.functional as F

from milbench.models.layers.nystrom import NystromAttention, iterative_pinv
from milbench.models.registry import count_parameters, create_model, get_card
from tests.models.learning import held_out_c_index


@pytest.mark.parametrize("in_dim,expected", [(1024, 2_673_172), (2048, 3_197_460)])
def test_parameter_counts_match_spec(in_dim, expected):
    assert count_parameters(create_model("transmil", in_dim)) == expected
    assert get_card("transmil").reference_params[in_dim] == expected


def _heads(t, h):
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


def _literal_nystrom(attn: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """The spec's formula written out: left zero-pad, segment-mean landmarks of scaled q and k, three explicit
    softmax kernels, (A1 pinv(A2)) (A3 v) + conv(v), output rows sliced as the block's ``slicing`` says."""
    b, n, _ = x.shape
    m, h, dh = attn.n_landmarks, attn.n_heads, attn.head_dim
    pad = -n % m
    xp = F.pad(x, (0, 0, pad, 0))
    q, k, v = (_heads(t, h) for t in attn.qkv(xp).chunk(3, dim=-1))
    q = q / math.sqrt(dh)
    seg = (n + pad) // m
    q_l = q.reshape(b, h, m, seg, dh).sum(3) / seg
    k_l = k.reshape(b, h, m, seg, dh).sum(3) / seg
    a1, a2, a3 = (torch.softmax(s, -1) for s in (q @ k_l.transpose(-1, -2), q_l @ k_l.transpose(-1, -2),
                                                   q_l @ k.transpose(-1, -2)))
    y = (a1 @ iterative_pinv(a2, attn.pinv_iters)) @ (a3 @ v) + attn.residual_conv(v)
    y = attn.out(y.transpose(1, 2).reshape(b, n + pad, h * dh))
    return y[:, pad:] if attn.slicing == "last" else y[:, :n]


@pytest.mark.parametrize("slicing", ["last", "first"])
def test_nystrom_block_matches_literal_formula(slicing):
    torch.manual_seed(0)
    attn = NystromAttention(16, n_heads=2, head_dim=8, n_landmarks=4, residual_kernel=5, slicing=slicing).eval()
    x = torch.randn(1, 21, 16)  # 21 tokens: 3 zero rows of left padding, landmarks are means of 6
    y, _ = attn(x)
    assert y.shape == x.shape
    assert torch.allclose(y, _literal_nystrom(attn, x), atol=1e-5)


def test_slicings_differ_only_when_padded():
    torch.manual_seed(0)
    last = NystromAttention(16, n_heads=2, head_dim=8, n_landmarks=4, residual_kernel=5).eval()
    first = NystromAttention(16, n_heads=2, head_dim=8, n_landmarks=4, residual_kernel=5, slicing="first").eval()
    first.load_state_dict(last.state_dict())
    padded = torch.randn(1, 21, 16)  # 3 rows of left padding: the two slicings keep different rows
    assert not torch.allclose(last(padded)[0], first(padded)[0])
    x = torch.randn(1, 20, 16)
    assert torch.allclose(last(x)[0], first(x)[0])


def test_every_token_a_landmark_gives_exact_attention():
    torch.manual_seed(0)
    attn = NystromAttention(16, n_heads=2, head_dim=8, n_landmarks=6, pinv_iters=40, residual_kernel=3).eval()
    with torch.no_grad():
        attn.qkv.weight.mul_(4.0)  # peaked kernels: a well-conditioned pseudo-inverse
    x = torch.randn(1, 6, 16)
    y, w = attn(x, weights_of=2)
    q, k, v = (_heads(t, 2) for t in attn.qkv(x).chunk(3, dim=-1))
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    ref = attn.out((exact @ v + attn.residual_conv(v)).transpose(1, 2).reshape(1, 6, 16))
    assert torch.allclose(y, ref, atol=1e-4)
    assert torch.allclose(w, exact[:, :, 2].mean(1), atol=1e-4)


def test_iterative_pinv_converges_to_pseudo_inverse():
    a = torch.softmax(4 * torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)), -1)
    assert torch.allclose(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-3)


def test_forward_shapes_and_attention(tiny_bag):
    model = create_model("transmil", 32).eval()
    out = model(tiny_bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    a = out.attention["20x"]
    assert a.shape == (tiny_bag.n_patches("20x"),)
    assert torch.isclose(a.sum(), torch.tensor(1.0))
    assert torch.allclose(model(tiny_bag).logits, out.logits)


def test_non_square_bag_and_backward(tiny_bag):
    tiny_bag.features["20x"] = tiny_bag.features["20x"][:50]  # 50 -> 64 tokens on the 8 x 8 grid
    model = create_model("transmil", 32, dim=64, n_heads=4)
    out = model(tiny_bag, return_attention=True)
    out.logits.sum().backward()
    assert out.attention["20x"].shape == (50,)
    assert model.cls_token.grad is not None and model.layer1.attn.residual_conv.weight.grad is not None


def test_reference_slicing_option_changes_output(tiny_bag):
    model = create_model("transmil", 32).eval()
    reference = create_model("transmil", 32, nystrom_slicing="first").eval()
    reference.load_state_dict(model.state_dict())
    assert not torch.allclose(model(tiny_bag).logits, reference(tiny_bag).logits)


def test_eval_is_deterministic(tiny_bag):
    model = create_model("transmil", 32).eval()
    assert torch.equal(model(tiny_bag).logits, model(tiny_bag).logits)


def test_bf16_autocast_close_to_float32(tiny_bag):
    model = create_model("transmil", 32).eval()
    with torch.no_grad():
        full = model(tiny_bag).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(tiny_bag).logits.float()
    assert torch.allclose(full, half, atol=0.1)


@pytest.mark.slow
def test_learns_marked_region_signal():
    # a narrower model (64 wide, 4 heads, 32 landmarks: 65 tokens padded to 96, landmarks average 3) keeps it fast
    assert held_out_c_index("transmil", dim=64, n_heads=4) > 0.7

