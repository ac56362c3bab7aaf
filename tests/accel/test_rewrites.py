"""Speed rewrites (milbench.accel.rewrites) compute the plain layers' function: values and gradients, float64."""

import copy

import pytest
import torch

from milbench.accel.rewrites import accelerate
from milbench.data.bag import Bag
from milbench.models.crossfusion import ConvProcessor, MultiScaleConv
from milbench.models.layers.nystrom import NystromAttention
from milbench.models.layers.position import PPEG
from milbench.models.registry import create_model


def _same_function(plain: torch.nn.Module, call, *inputs: torch.Tensor, params=None) -> None:
    """``accelerate`` changes a copy's forward; outputs and every gradient equal the plain module's."""
    fast = copy.deepcopy(plain)
    assert accelerate(fast) >= 1
    out_plain, out_fast = call(plain, *inputs), call(fast, *inputs)
    torch.testing.assert_close(out_fast, out_plain)
    params = params or (lambda m: list(m.parameters()))
    g_plain = torch.autograd.grad(out_plain.square().sum(), [*inputs, *params(plain)])
    g_fast = torch.autograd.grad(out_fast.square().sum(), [*inputs, *params(fast)])
    for a, b in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b)


def test_ppeg_as_one_summed_kernel():
    torch.manual_seed(0)
    tokens = torch.randn(2, 25, 8, dtype=torch.double, requires_grad=True)
    _same_function(PPEG(8).double(), lambda m, x: m(x, 5), tokens)


@pytest.mark.parametrize("in_dim, out_dim, groups", [(8, 4, 4), (8, 8, 4)])
def test_multiscale_convolution_merged(in_dim, out_dim, groups):
    """One output per group (CrossFusion's d -> d/2): the depthwise form; several: the merged grouped convolution."""
    torch.manual_seed(0)
    grid = torch.randn(2, in_dim, 6, 6, dtype=torch.double, requires_grad=True)
    _same_function(MultiScaleConv(in_dim, out_dim, groups).double(), lambda m, x: m(x), grid)


def test_scale_fusion_as_a_weighted_sum():
    torch.manual_seed(0)
    maps = [torch.randn(1, 9, 8, dtype=torch.double, requires_grad=True) for _ in range(3)]
    _same_function(ConvProcessor(8, 0.0).double(), lambda m, *x: m.fuse_scales(list(x)), *maps,
                   params=lambda m: list(m.scale_fusion.parameters()))


def test_nystrom_residual_convolution_is_rebound():
    attn = NystromAttention(16, n_heads=2, head_dim=8, n_landmarks=4, residual_kernel=33).double().eval()
    x = torch.randn(1, 40, 16, dtype=torch.double, requires_grad=True)
    _same_function(attn, lambda m, t: m(t)[0], x)


@pytest.mark.parametrize("name, scales", [("crossfusion", ("5x", "10x", "20x")), ("crossfusion_single", ("20x",)),
                                          ("transmil", ("20x",))])
def test_whole_models_compute_the_same_logits(name, scales):
    torch.manual_seed(0)
    kwargs = {"embed_dim": 16, "n_heads": 2} if name.startswith("crossfusion") else {"dim": 16, "n_heads": 2}
    model = create_model(name, in_dim=8, **kwargs).double().eval()
    sizes = {"5x": 3, "10x": 11, "20x": 40}
    bag = Bag(case_id="p0", features={s: torch.randn(sizes[s], 8, dtype=torch.double) for s in scales})
    fast = copy.deepcopy(model)
    accelerate(fast)
    torch.testing.assert_close(fast(bag).logits, model(bag).logits)
