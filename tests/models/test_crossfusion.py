import pytest
import torch
import torch.nn.functional as F

from milbench.models.crossfusion import ConvProcessor, PadTransformer, TransformerLayer
from milbench.models.registry import count_parameters, create_model, get_card
from tests.conftest import nested_bag
from tests.models.learning import held_out_c_index

NAMES = ("crossfusion", "crossfusion_concat", "crossfusion_single")
TINY = dict(embed_dim=32, n_heads=4)


@pytest.mark.parametrize("name,in_dim,expected", [
    ("crossfusion", 2048, 24_536_584), ("crossfusion", 1024, 22_963_720),
    ("crossfusion_concat", 2048, 25_147_908), ("crossfusion_concat", 1024, 23_575_044),
    ("crossfusion_single", 2048, 9_730_564), ("crossfusion_single", 1024, 9_206_276),
])
def test_parameter_counts_match_spec(name, in_dim, expected):
    assert count_parameters(create_model(name, in_dim)) == expected
    assert get_card(name).reference_params[in_dim] == expected


def test_input_projection_is_identity_at_embed_width():
    # spec: backbone width 512 makes the three projections identities (21,386,248 parameters)
    assert count_parameters(create_model("crossfusion", 512)) == 21_386_248


def test_cards():
    assert get_card("crossfusion").scales == ("5x", "10x", "20x")
    assert get_card("crossfusion").group == "multi_scale"
    assert get_card("crossfusion_concat").group == get_card("crossfusion_single").group == "ablation"
    assert get_card("crossfusion_single").scales == ("20x",)
    assert all(get_card(n).needs == () for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_dim", [32, 48])  # 32 = embed width: identity projections
@pytest.mark.parametrize("n5", [4, 3])  # 3: N10 = 12 and N20 = 48 are not squares, so padding happens
def test_forward_backward_shapes_and_attention(name, in_dim, n5):
    bag = nested_bag(n5=n5, in_dim=in_dim)
    model = create_model(name, in_dim, **TINY)
    out = model(bag, return_attention=True)
    assert out.logits.shape == (1, 4) and out.aux_loss is None
    expected = ({"20x": 16 * n5, "final": 16 * n5} if name == "crossfusion_single"
                else {"coarse": n5, "fine": 16 * n5, "source": 4 * n5, "final": 4 * n5})
    assert {k: tuple(v.shape) for k, v in out.attention.items()} == {k: (n,) for k, n in expected.items()}
    for a in out.attention.values():
        assert not a.requires_grad and (a >= 0).all()
        assert torch.isclose(a.sum(), torch.tensor(1.0), atol=1e-5)
    out.logits.sum().backward()
    assert model(bag).attention == {}


def test_single_needs_only_20x():
    bag = nested_bag(n5=2, in_dim=32)
    bag.features = {"20x": bag.features["20x"]}
    assert create_model("crossfusion_single", 32, **TINY)(bag).logits.shape == (1, 4)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, 48, **TINY).train()
    model(nested_bag(n5=3, in_dim=48)).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_square_padding_repeats_first_tokens_and_folds_attention_back():
    torch.manual_seed(0)
    pt = PadTransformer(16, 2, 1, 2.0, 0.0, 0.0, False).eval()
    x = torch.randn(1, 12, 16)
    y, side, w = pt(x, need_weights=True)
    assert side == 4 and y.shape == (1, 16, 16) and w.shape == (1, 12)
    # padding 12 tokens = appending tokens 0..3 by hand (16 is square: no further padding)
    y_manual, _, w_manual = pt(torch.cat([x, x[:, :4]], dim=1), need_weights=True)
    assert torch.allclose(y, y_manual, atol=1e-6)
    folded = w_manual[:, :12].clone()
    folded[:, :4] += w_manual[:, 12:]
    assert torch.allclose(w, folded, atol=1e-6)


def test_class_token_transformer_keeps_class_token_out_of_ppeg():
    torch.manual_seed(0)
    pt = PadTransformer(16, 2, 1, 2.0, 0.0, 0.0, False).eval()
    cls = torch.randn(1, 1, 16)
    y, side, w = pt(torch.randn(1, 9, 16), cls_token=cls, need_weights=True)
    assert side == 3 and y.shape == (1, 10, 16) and w.shape == (1, 9)
    assert torch.isclose(w.sum(), torch.tensor(1.0))


def test_transformer_layer_normalises_the_residual_stream():
    # reference order: x = LN1(x); x = x + MHA(x); x = LN2(x); x = x + FFN(x)
    torch.manual_seed(0)
    layer = TransformerLayer(16, 2, 2.0, 0.0, 0.0, False).eval()
    x = torch.randn(1, 7, 16)
    h = layer.norm1(x)
    h = layer.norm2(h + layer.attn(h)[0])
    assert torch.allclose(layer(x)[0], h + layer.ffn(h), atol=1e-6)


def test_scale_fusion_is_the_conv3d_it_replaces():
    torch.manual_seed(0)
    cp = ConvProcessor(16, 0.0, n_scales=3)
    torch.nn.init.normal_(cp.scale_fusion.bias)
    maps = [torch.randn(1, 9, 16) for _ in range(3)]
    grids = torch.stack([m.transpose(1, 2).reshape(1, 16, 3, 3) for m in maps], dim=1)
    ref = F.conv3d(grids, cp.scale_fusion.weight, cp.scale_fusion.bias).squeeze(1)
    assert torch.allclose(cp.fuse_scales(maps), ref.flatten(2).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic_and_reference_dropout_bug_reproducible(name):
    bag = nested_bag(n5=3, in_dim=32)
    torch.manual_seed(0)
    fixed = create_model(name, 32, **TINY).eval()
    assert torch.equal(fixed(bag).logits, fixed(bag).logits)
    torch.manual_seed(0)
    buggy = create_model(name, 32, attn_dropout_in_eval=True, **TINY).eval()
    assert not torch.equal(buggy(bag).logits, buggy(bag).logits)
    # the option keeps only attention dropout on: with attn_dropout 0 eval is deterministic again
    no_attn_drop = create_model(name, 32, attn_dropout_in_eval=True, attn_dropout=0.0, **TINY).eval()
    assert torch.equal(no_attn_drop(bag).logits, no_attn_drop(bag).logits)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward(name):
    bag = nested_bag(n5=3, in_dim=32)
    model = create_model(name, 32, **TINY).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(bag, return_attention=True)
    assert torch.isfinite(out.logits).all() and torch.allclose(out.logits.float(), model(bag).logits, atol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_learns_marked_region_signal(name):
    assert held_out_c_index(name, epochs=3, lr=1e-3, embed_dim=32) > 0.7


@pytest.mark.parametrize("in_dim, out_dim, groups", [(16, 8, 8), (16, 16, 8)])
def test_multi_scale_conv_is_the_sum_of_its_four_convolutions(in_dim, out_dim, groups):
    """One merged (depthwise) convolution computes the reference's four grouped ones: values and gradients."""
    from milbench.models.crossfusion import MultiScaleConv

    torch.manual_seed(0)
    conv = MultiScaleConv(in_dim, out_dim, groups).double()
    x = torch.randn(2, in_dim, 6, 6, dtype=torch.double, requires_grad=True)
    fast = conv(x)
    reference = conv.shortcut(x) + conv.conv7(x) + conv.conv5(x) + conv.conv3(x)
    torch.testing.assert_close(fast, reference)
    grads = torch.autograd.grad(fast.square().sum(), [x, *conv.parameters()])
    grads_ref = torch.autograd.grad(reference.square().sum(), [x, *conv.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
