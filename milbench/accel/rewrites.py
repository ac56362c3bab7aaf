"""Speed rewrites applied to a built model: the same function as the method's plain layers, fewer and faster kernels.

The model files state each method plainly (PPEG's three depthwise convolutions, the Conv Processor's four grouped
convolutions and its Conv3d over the scales, the Nystrom residual convolution); :func:`accelerate` rebinds the
forward of those layers in one model instance:

- PPEG: the three depthwise convolutions as one with their summed kernel (a third of the kernels, whose backward
  dominated TransMIL's GPU step); the residual stays a separate sum.
- MultiScaleConv: the four same-centred grouped convolutions as one, run as a depthwise convolution over the input
  channels and a sum over each group's inputs when each group has one output (CrossFusion: d -> d/2 in d/2 groups).
- ConvProcessor: the 1x1x1 Conv3d over the stacked scales as the weighted sum it is (no stacked copy).
- Long depthwise kernels (the Nystrom residual, 33 x 1): through Fourier transforms on CUDA.

Parameters and state dicts are untouched; tests/accel/ checks each rewrite against the plain layer.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench.accel.conv import FFT_MIN_TAPS, depthwise_conv2d, summed_kernel
from milbench.models.crossfusion import ConvProcessor, MultiScaleConv
from milbench.models.layers.position import PPEG


def _ppeg_forward(self: PPEG, tokens: torch.Tensor, side: int) -> torch.Tensor:
    b, n, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    weight, bias = summed_kernel((self.proj7, self.proj5, self.proj3))
    grid = grid + depthwise_conv2d(grid, weight, bias)
    return grid.flatten(2).transpose(1, 2)


def _multiscale_forward(self: MultiScaleConv, grid: torch.Tensor) -> torch.Tensor:
    weight, bias = summed_kernel((self.conv7, self.conv5, self.conv3, self.shortcut))
    out, per = weight.shape[:2]
    if out != self.conv7.groups:  # several outputs per group: the merged grouped convolution itself
        return F.conv2d(grid, weight, bias, padding=3, groups=self.conv7.groups)
    b, _, h, w = grid.shape
    y = depthwise_conv2d(grid, weight.reshape(out * per, 1, 7, 7))
    return y.view(b, out, per, h, w).sum(2) + bias.view(1, -1, 1, 1)


def _fuse_scales(self: ConvProcessor, maps: list[torch.Tensor]) -> torch.Tensor:
    w, b = self.scale_fusion.weight.view(-1), self.scale_fusion.bias
    out = b + w[0] * maps[0]
    for i in range(1, len(maps)):
        out = out + w[i] * maps[i]
    return out


def _depthwise_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return depthwise_conv2d(x, self.weight, self.bias)


def _long_depthwise(module: nn.Module) -> bool:
    """A 'same'-padded depthwise convolution with a kernel of at least FFT_MIN_TAPS in one dimension."""
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
            and max(module.kernel_size) >= FFT_MIN_TAPS
            and module.padding == tuple(k // 2 for k in module.kernel_size) and module.stride == (1, 1)
            and module.dilation == (1, 1))


def accelerate(model: nn.Module) -> int:
    """Rebind the fast forms in ``model`` (in place, same function, same parameters); returns how many layers."""
    count = 0
    for module in model.modules():
        if isinstance(module, PPEG):
            module.forward = types.MethodType(_ppeg_forward, module)
        elif isinstance(module, MultiScaleConv):
            module.forward = types.MethodType(_multiscale_forward, module)
        elif isinstance(module, ConvProcessor) and module.scale_fusion is not None:
            module.fuse_scales = types.MethodType(_fuse_scales, module)
        elif _long_depthwise(module):
            module.forward = types.MethodType(_depthwise_forward, module)
        else:
            continue
        count += 1
    return count
