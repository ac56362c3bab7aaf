"""Faster convolutions (milbench.accel.conv): the Fourier-transform depthwise convolution is the convolution."""

import pytest
import torch
import torch.nn.functional as F

from milbench.accel.conv import _fft_size, depthwise_conv2d, fft_depthwise_conv2d


@pytest.mark.parametrize("shape, kernel", [((2, 3, 9, 11), (7, 7)), ((1, 4, 5, 5), (5, 3)), ((1, 8, 40, 6), (33, 1)),
                                           ((1, 2, 1, 1), (7, 7))])
def test_fft_depthwise_convolution_equals_the_convolution(shape, kernel):
    """Values and gradients (input, weight, bias) of the Fourier form against F.conv2d, float64."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    weight = torch.randn(shape[1], 1, *kernel, dtype=torch.double, requires_grad=True)
    bias = torch.randn(shape[1], dtype=torch.double, requires_grad=True)
    fast = fft_depthwise_conv2d(x, weight, bias)
    plain = F.conv2d(x, weight, bias, padding=(kernel[0] // 2, kernel[1] // 2), groups=shape[1])
    assert fast.dtype == torch.float32  # computed in float32, whatever the autocast dtype around it
    torch.testing.assert_close(fast.double(), plain, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(plain)
    grads = torch.autograd.grad((fast.double() * probe).sum(), [x, weight, bias])
    grads_plain = torch.autograd.grad((plain * probe).sum(), [x, weight, bias])
    for g, g_plain in zip(grads, grads_plain):
        torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-4)


def test_fft_depthwise_convolution_reads_a_channels_last_view():
    """The token grids are transposed views of [B, N, d] tokens, not contiguous tensors."""
    tokens = torch.randn(1, 36, 8)
    grid = tokens.transpose(1, 2).reshape(1, 8, 6, 6)
    weight = torch.randn(8, 1, 7, 7)
    torch.testing.assert_close(fft_depthwise_conv2d(grid, weight), F.conv2d(grid, weight, padding=3, groups=8),
                               rtol=1e-4, atol=1e-4)


def test_depthwise_convolution_on_the_cpu_is_the_convolution_itself():
    x, weight = torch.randn(1, 4, 40, 6), torch.randn(4, 1, 33, 1)
    assert torch.equal(depthwise_conv2d(x, weight), F.conv2d(x, weight, padding=(16, 0), groups=4))


def test_fft_sizes_have_only_small_prime_factors():
    assert [_fft_size(n) for n in (1, 7, 11, 65, 123, 13_601)] == [1, 7, 12, 70, 125, 13_608]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape, kernel", [((1, 512, 59, 59), (7, 7)), ((1, 8, 13_568, 64), (33, 1))])
def test_depthwise_convolution_on_cuda_equals_the_convolution(shape, kernel):
    """cuFFT at the sizes of an average bag (a CrossFusion grid, TransMIL's residual convolution), float32."""
    torch.manual_seed(0)
    x = torch.randn(*shape, device="cuda")
    weight = torch.randn(shape[1], 1, *kernel, device="cuda") / kernel[0]
    with torch.backends.cudnn.flags(allow_tf32=False):
        plain = F.conv2d(x, weight, padding=(kernel[0] // 2, kernel[1] // 2), groups=shape[1])
    torch.testing.assert_close(fft_depthwise_conv2d(x, weight), plain, rtol=1e-4, atol=1e-4)
