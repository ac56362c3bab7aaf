"""The Triton depthwise convolution of token grids equals F.conv2d: values and the three gradients.

On a GPU the kernels run as compiled; elsewhere, where Triton is installed, in Triton's interpreter (numpy on the
CPU); without Triton (CPU builds of PyTorch) the tests are skipped and the models use F.conv2d.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from milbench.models import grid_conv

pytestmark = pytest.mark.skipif(not grid_conv.available(), reason="Triton is not installed")


@pytest.fixture
def device(monkeypatch):
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined
    grid_conv._kernels.cache_clear()
    yield torch.device("cpu")
    grid_conv._kernels.cache_clear()


@pytest.mark.parametrize("b, c, h, w, kernel", [(1, 8, 9, 9, (7, 7)), (2, 70, 5, 11, (7, 7)), (1, 3, 13, 4, (5, 3)),
                                                (1, 4, 1, 1, (7, 7))])
@pytest.mark.parametrize("layout", ["channels-last view", "contiguous"])
def test_grid_convolution_equals_the_convolution(device, b, c, h, w, kernel, layout):
    torch.manual_seed(0)
    tokens = torch.randn(b, h * w, c, device=device, requires_grad=True)
    grid = tokens.transpose(1, 2).reshape(b, c, h, w)  # a channels-last view, as the models hold their grids
    if layout == "contiguous":
        grid = grid.contiguous()
    weight = torch.randn(c, 1, *kernel, device=device, requires_grad=True)
    bias = torch.randn(c, device=device, requires_grad=True)
    fast = grid_conv.grid_depthwise_conv2d(grid, weight, bias)
    plain = F.conv2d(grid, weight, bias, padding=(kernel[0] // 2, kernel[1] // 2), groups=c)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    probe = torch.randn_like(plain)
    grads = torch.autograd.grad((fast * probe).sum(), [tokens, weight, bias])
    grads_plain = torch.autograd.grad((plain * probe).sum(), [tokens, weight, bias])
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the models take this path on CUDA only")
@pytest.mark.parametrize("name", ["crossfusion", "crossfusion_single", "transmil"])
def test_models_compute_the_same_with_and_without_the_grid_kernels(name, monkeypatch):
    """Float32 logits and gradients of whole models, Triton / FFT convolutions against F.conv2d."""
    from milbench.bench import parse_bag, random_bag
    from milbench.models import blocks
    from milbench.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, in_dim=32).cuda().eval()
    bag = random_bag(name, parse_bag("60,230,900"), 32, torch.device("cuda"))
    bag = replace(bag, features={k: v.float() for k, v in bag.features.items()})

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(bag).logits
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = run()
    monkeypatch.setattr(blocks, "FFT_MIN_TAPS", 10_000)
    monkeypatch.setattr(grid_conv, "available", lambda: False)
    with torch.backends.cudnn.flags(allow_tf32=False):  # float32 convolutions, as the Triton kernels compute
        plain, plain_grads = run()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    for g, g_plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g, g_plain, rtol=1e-3, atol=1e-4)
