"""Faster convolutions that compute the same function: depthwise convolutions through Fourier transforms for long
kernels on CUDA, and the summed kernel of same-centred convolutions (one convolution instead of several)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench.accel.eager import eager


def _fft_size(n: int) -> int:
    """The smallest length >= n with no prime factor above 7 (the sizes cuFFT transforms fastest)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@eager  # the transform sizes depend on the grid: computed eagerly, never a recompilation
def fft_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)`` for odd kernels [C, 1, kh, kw], computed
    as a product of Fourier transforms in float32 (the same function up to float32 rounding): a convolution is a
    product in frequency space, zero-padded past the kernel's reach so no value wraps around. Only the dimensions
    the kernel spans are transformed (a (33, 1) kernel is a 1-D transform along the sequence). A half-precision
    input gives a half-precision result, as the convolution under autocast does, so what follows does not run in
    float32."""
    c, kh, kw = weight.shape[0], weight.shape[-2], weight.shape[-1]
    spans = [(d, k, x.shape[d]) for d, k in ((-2, kh), (-1, kw)) if k > 1]
    dims = [d for d, _, _ in spans]
    sizes = [_fft_size(n + k - 1) for _, k, n in spans]
    with torch.autocast(x.device.type, enabled=False):
        kernel = torch.fft.rfftn(weight.float().reshape(1, c, kh, kw).flip(dims), s=sizes, dim=dims)
        y = torch.fft.irfftn(torch.fft.rfftn(x.float(), s=sizes, dim=dims) * kernel, s=sizes, dim=dims)
        for d, k, n in spans:  # the 'same' window of the full convolution
            y = y.narrow(d, k // 2, n)
        y = y if bias is None else y + bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else y


FFT_MIN_TAPS = 15  # kernels this long or longer (in one dimension) run through Fourier transforms on CUDA


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """'Same'-padded depthwise convolution with odd kernels [C, 1, kh, kw]. On CUDA a long kernel goes through
    Fourier transforms (:func:`fft_depthwise_conv2d`): TransMIL's 33 x 1 residual convolution at the average bag took
    4.9 ms forward and backward in PyTorch's depthwise kernel, 1.3 ms so (H100, docs/performance.md); a 7 x 7
    kernel stays a convolution (there the transforms were slower, 1.2 against 0.8 ms, as was a Triton kernel)."""
    if x.is_cuda and max(weight.shape[-2:]) >= FFT_MIN_TAPS:
        return fft_depthwise_conv2d(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2), groups=weight.shape[0])


def summed_kernel(convs: Sequence[nn.Conv2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the sum of same-centred convolutions (odd square kernels, same groups and 'same' padding):
    each kernel zero-padded to the largest, then added. One convolution with them computes the sum of all."""
    size = max(c.kernel_size[0] for c in convs)
    weight = sum(F.pad(c.weight, [(size - c.kernel_size[0]) // 2] * 4) for c in convs)
    return weight, sum(c.bias for c in convs)
