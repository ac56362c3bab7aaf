"""The attention kernel chosen per shape class (milbench.accel.attention) and the fast forms around it
(milbench.accel.rewrites): the same function as the plain layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from milbench.accel import attention
from milbench.accel.attention import DEFAULT, KernelChoice, chosen_sdpa, shape_class
from milbench.accel.cast import cast_features
from milbench.accel.rewrites import accelerate
from milbench.data.bag import Bag
from milbench.models.layers.attention import MultiheadSDPA
from milbench.models.layers.pooling import GatedAttention
from milbench.models.registry import create_model

CUDA = torch.cuda.is_available()


def test_chosen_sdpa_on_the_cpu_is_the_attention_itself():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (5, 7, 7))
    out = chosen_sdpa(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_fused_projections_and_eager_core_compute_the_same_attention(cross, weights):
    torch.manual_seed(0)
    plain = MultiheadSDPA(16, 4).double()
    fast = copy.deepcopy(plain)
    assert accelerate(fast) == 1 and fast.kernel is chosen_sdpa
    x = torch.randn(1, 9, 16, dtype=torch.double, requires_grad=True)
    ctx = torch.randn(1, 13, 16, dtype=torch.double, requires_grad=True) if cross else None
    (y_plain, w_plain), (y_fast, w_fast) = plain(x, ctx, weights), fast(x, ctx, weights)
    torch.testing.assert_close(y_fast, y_plain)
    if weights:
        torch.testing.assert_close(w_fast, w_plain)
    inputs = [x] + ([ctx] if cross else [])
    g_plain = torch.autograd.grad(y_plain.square().sum(), inputs + list(plain.parameters()))
    g_fast = torch.autograd.grad(y_fast.square().sum(), inputs + list(fast.parameters()))
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b)
    assert plain.state_dict().keys() == fast.state_dict().keys()


def test_gated_attention_scorer_as_one_product():
    torch.manual_seed(0)
    plain = GatedAttention(12, 6).double()
    fast = copy.deepcopy(plain)
    accelerate(fast)
    h = torch.randn(20, 12, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(fast(h), plain(h))
    g_plain = torch.autograd.grad(plain(h).sum(), [h, *plain.parameters()])
    g_fast = torch.autograd.grad(fast(h).sum(), [h, *fast.parameters()])
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b)


def test_the_choice_is_the_fastest_kernel_measured_once_per_class(monkeypatch):
    calls = []

    def fake_measure(shapes, dtype, device, dropout_p, grad):
        calls.append(shapes)
        return {SDPBackend.CUDNN_ATTENTION: 2.0, SDPBackend.FLASH_ATTENTION: 1.0,
                SDPBackend.EFFICIENT_ATTENTION: None}

    monkeypatch.setattr(attention, "measure_kernels", fake_measure)
    choice = KernelChoice()
    q, k = torch.randn(1, 4, 100, 8), torch.randn(1, 4, 300, 8)
    order = choice.order(q, k, k, 0.2)
    assert order[0] == SDPBackend.FLASH_ATTENTION and set(order) == set(DEFAULT)
    # a bag of similar size shares the decision: no second measurement
    assert choice.order(torch.randn(1, 4, 120, 8), torch.randn(1, 4, 260, 8), torch.randn(1, 4, 260, 8), 0.2) == order
    assert len(calls) == 1
    # dropout or not is another class
    choice.order(q, k, k, 0.0)
    assert len(calls) == 2
    [rec, _] = choice.summary()
    assert rec["kernel"] == "flash" and rec["measured"] and rec["ms"] == {"cudnn": 2.0, "flash": 1.0,
                                                                          "efficient": None}
    assert rec["queries_upto"] == 128 and rec["keys_upto"] == 512 and rec["dropout"]


def test_a_class_met_during_a_capture_runs_the_default_and_is_measured_after(monkeypatch):
    monkeypatch.setattr(attention, "measure_kernels", lambda *a: {SDPBackend.CUDNN_ATTENTION: 3.0,
                                                                  SDPBackend.FLASH_ATTENTION: 1.0})
    monkeypatch.setattr(attention, "capturing", lambda t: True)
    choice = KernelChoice()
    q = torch.randn(1, 4, 64, 8)
    assert choice.order(q, q, q, 0.0) == DEFAULT and choice.pending
    assert not choice.summary()[0]["measured"]
    monkeypatch.setattr(attention, "capturing", lambda t: False)
    assert choice.tune_pending() is True  # flash wins: graphs recorded with the default must be recorded again
    assert not choice.pending and choice.order(q, q, q, 0.0)[0] == SDPBackend.FLASH_ATTENTION
    assert choice.tune_pending() is False


def test_shape_classes_round_lengths_up_to_powers_of_two():
    q = torch.randn(1, 4, 3449, 128)
    k = torch.randn(1, 4, 13496, 128)
    assert shape_class(q, k, k, 0.0)[-2:] == (4096, 16384)


def test_the_feature_cast_is_the_plain_cast():
    x = torch.randn(50, 8, dtype=torch.float16)
    assert torch.equal(cast_features(x, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize("name, scales, kwargs", [
    ("crossfusion", ("5x", "10x", "20x"), {"embed_dim": 16, "n_heads": 2}),
    ("crossfusion_concat", ("5x", "10x", "20x"), {"embed_dim": 16, "n_heads": 2}),
    ("crossfusion_single", ("20x",), {"embed_dim": 16, "n_heads": 2}),
    ("transmil", ("20x",), {"dim": 16, "n_heads": 2}),
    ("amil", ("20x",), {}),
    ("dsmil", ("20x",), {}),
])
def test_accelerated_bf16_model_stays_within_bf16_of_the_float32_eager_model(name, scales, kwargs):
    """The fast path as training runs it on the CPU's bf16 autocast (half-precision features, every rewrite)
    against the plain float32 model, random inputs: logits and the loss gradient of the first layer agree within
    bf16 rounding."""
    torch.manual_seed(0)
    model = create_model(name, in_dim=24, **kwargs).train()
    for m in model.modules():  # dropout off: both sides compute the same deterministic function
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.p = 0.0
        if isinstance(m, MultiheadSDPA):
            m.attn_dropout = 0.0
    fast = copy.deepcopy(model)
    accelerate(fast)
    sizes = {"5x": 4, "10x": 14, "20x": 56}
    feats = {s: torch.randn(sizes[s], 24).half() for s in scales}
    plain_out = model(Bag(case_id="p", features={s: f.float() for s, f in feats.items()})).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out = fast(Bag(case_id="p", features=dict(feats))).logits.float()
    scale = plain_out.abs().max().clamp(min=1.0)
    assert ((fast_out - plain_out).abs().max() / scale) < 5e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_cuda_the_chosen_kernel_computes_the_attention_and_keeps_the_random_stream():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n in (300, 700, 700))
    out = chosen_sdpa(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert any(c["measured"] for c in attention.choices())
    # with dropout: a measurement (first call of a new class) leaves the generator where it was
    torch.manual_seed(1)
    first = chosen_sdpa(q[:, :, :40], k[:, :, :90], v[:, :, :90], dropout_p=0.3)
    torch.manual_seed(1)
    again = chosen_sdpa(q[:, :, :40], k[:, :, :90], v[:, :, :90], dropout_p=0.3)
    torch.testing.assert_close(first, again)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_cuda_the_compiled_feature_cast_is_bit_identical():
    x = torch.randn(5000, 2048, device="cuda").half()
    assert torch.equal(cast_features(x, torch.bfloat16), x.to(torch.bfloat16))
