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
- MultiheadSDPA: the q, k and v projections of a self-attention as one matrix product with the concatenated
  weights (k and v of a cross-attention likewise): one larger product instead of three small ones, forward and
  backward, and one cast of the weights under autocast instead of three.
- GatedAttention (AMIL): its two scorer projections (tanh and sigmoid branches) as one product.
- Attention kernels: every MultiheadSDPA calls :func:`milbench.accel.attention.chosen_sdpa`, which runs the fused
  kernel measured fastest for the call's shape class; its projections and heads run eagerly around it
  (:func:`_project_and_attend`). (NystromAttention keeps PyTorch's order, cuDNN first: its calls sit inside
  TransMIL's compiled layer, where a graph break would rebuild its heads as strided views, fills and scatters in
  the backward; docs/performance.md, H200.)
- The bag's features: cast once, in one vectorised pass, to the autocast dtype where they enter the model's first
  Linear (:mod:`milbench.accel.cast`); DSMIL's, which enter three products, before its forward.
- A Conv1d whose kernel spans its input (DSMIL's bag classifier) as the matrix product it is.

Parameters and state dicts are untouched; tests/accel/ checks each rewrite against the plain layer.
"""

from __future__ import annotations

import types
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench.accel.attention import chosen_sdpa
from milbench.accel.cast import autocast_dtype_for, cast_features, linear_cast_forward
from milbench.accel.conv import FFT_MIN_TAPS, depthwise_conv2d, summed_kernel
from milbench.accel.eager import eager
from milbench.data.bag import Bag
from milbench.models.crossfusion import ConvProcessor, MultiScaleConv
from milbench.models.dsmil import DSMIL
from milbench.models.layers.attention import MultiheadSDPA, attend, key_attention
from milbench.models.layers.common import ModelOutput
from milbench.models.layers.nystrom import NystromAttention
from milbench.models.layers.pooling import GatedAttention
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


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(l(x) for l in linears)`` as one product with the concatenated weights (and biases), split after."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else lin.weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])
    return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)


@eager  # eager between a compiled block's halves: no view crosses a compiled graph's boundary
def _project_and_attend(self: MultiheadSDPA, x: torch.Tensor, context: torch.Tensor | None, p: float,
                        need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The projections, the heads and the attention kernel of :meth:`MultiheadSDPA.forward`, the output projection
    left out. Run eagerly because the kernel is chosen per shape at run time: were the heads (views of the
    projections) outputs of a compiled graph, its runtime would rebuild them as strided views whose backward fills
    and scatters the whole projection once per view."""
    if context is None:
        q, k, v = fused_linear(x, (self.q, self.k, self.v))
    else:
        q, (k, v) = self.q(x), fused_linear(context, (self.k, self.v))
    y, qh, kh = attend(q, k, v, self.n_heads, p, kernel=self.kernel)
    return (y, qh, kh) if need_weights else (y, None, None)


def _mha_forward(self: MultiheadSDPA, x: torch.Tensor, context: torch.Tensor | None = None,
                 need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    p = self.attn_dropout if (self.training or self.dropout_in_eval) else 0.0
    y, qh, kh = _project_and_attend(self, x, context, p, need_weights)
    return self.out(y), key_attention(qh, kh) if need_weights else None


def _gated_forward(self: GatedAttention, h: torch.Tensor) -> torch.Tensor:
    a, b = fused_linear(h, (self.attn_a[0], self.attn_b[0]))
    for layer in list(self.attn_a)[1:]:  # Tanh (and Dropout)
        a = layer(a)
    for layer in list(self.attn_b)[1:]:  # Sigmoid (and Dropout)
        b = layer(b)
    return self.attn_c(a * b).squeeze(-1)


def _depthwise_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return depthwise_conv2d(x, self.weight, self.bias)


def _long_depthwise(module: nn.Module) -> bool:
    """A 'same'-padded depthwise convolution with a kernel of at least FFT_MIN_TAPS in one dimension."""
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
            and max(module.kernel_size) >= FFT_MIN_TAPS
            and module.padding == tuple(k // 2 for k in module.kernel_size) and module.stride == (1, 1)
            and module.dilation == (1, 1))


REWRITES = ("ppeg", "multiscale", "scale_fusion", "long_depthwise", "fused_projections", "attention_kernel",
            "feature_cast", "full_conv1d", "dsmil_cast")
FEATURE_LINEARS = ("embed", "embed_coarse", "embed_source", "embed_fine")  # where a model's bag features enter


def _feature_linear(model: nn.Module, name: str) -> nn.Linear | None:
    """The Linear that first takes the bag's features under ``name`` (an ``mlp`` or Linear + LayerNorm), if any."""
    block = getattr(model, name, None)
    first = block[0] if isinstance(block, nn.Sequential) and len(block) else block
    return first if type(first) is nn.Linear else None


def _full_conv1d_forward(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d whose kernel spans its whole input (DSMIL's bag classifier, kernel = feature width) is one matrix
    product: cuDNN ran it as an implicit GEMM at 1 ms forward and backward for a [1, 4, 2048] input (H200)."""
    if x.shape[-1] != self.kernel_size[0]:
        return self._conv_forward(x, self.weight, self.bias)
    return F.linear(x.flatten(-2), self.weight.flatten(1), self.bias).unsqueeze(-1)


def _dsmil_forward(self: DSMIL, bag: Bag, return_attention: bool = False) -> ModelOutput:
    """DSMIL's forward with its features cast once to the autocast dtype: they enter three products (instance
    classifier, query net, attended sum), each of which would cast (and keep) its own copy."""
    x = bag.features["20x"]
    dtype = autocast_dtype_for(x)
    if dtype is not None and x.dtype != dtype:
        bag = replace(bag, features={**bag.features, "20x": cast_features(x, dtype)})
    return type(self).forward(self, bag, return_attention)


def accelerate(model: nn.Module, skip: tuple[str, ...] | frozenset[str] = ()) -> int:
    """Rebind the fast forms in ``model`` (in place, same function, same parameters); returns how many layers.
    ``skip`` names rewrites (of :data:`REWRITES`) to leave out, e.g. to measure what one of them gives."""
    unknown = set(skip) - set(REWRITES)
    if unknown:
        raise ValueError(f"unknown rewrites {sorted(unknown)}: use some of {', '.join(REWRITES)}")
    count = 0
    if "feature_cast" not in skip:
        for name in FEATURE_LINEARS:
            linear = _feature_linear(model, name)
            if linear is not None:
                linear.forward = types.MethodType(linear_cast_forward, linear)
                count += 1
    if isinstance(model, DSMIL) and "dsmil_cast" not in skip:
        model.forward = types.MethodType(_dsmil_forward, model)
        count += 1
    for module in model.modules():
        if type(module) is nn.Conv1d and "full_conv1d" not in skip and module.padding == (0,) \
                and module.stride == (1,) and module.dilation == (1,) and module.groups == 1:
            module.forward = types.MethodType(_full_conv1d_forward, module)
        elif isinstance(module, PPEG) and "ppeg" not in skip:
            module.forward = types.MethodType(_ppeg_forward, module)
        elif isinstance(module, MultiScaleConv) and "multiscale" not in skip:
            module.forward = types.MethodType(_multiscale_forward, module)
        elif isinstance(module, ConvProcessor) and module.scale_fusion is not None and "scale_fusion" not in skip:
            module.fuse_scales = types.MethodType(_fuse_scales, module)
        elif _long_depthwise(module) and "long_depthwise" not in skip:
            module.forward = types.MethodType(_depthwise_forward, module)
        elif isinstance(module, (MultiheadSDPA, NystromAttention, GatedAttention)):
            done = False
            if isinstance(module, MultiheadSDPA) and "fused_projections" not in skip:
                module.forward, done = types.MethodType(_mha_forward, module), True
            if isinstance(module, GatedAttention) and "fused_projections" not in skip:
                module.forward, done = types.MethodType(_gated_forward, module), True
            if isinstance(module, MultiheadSDPA) and "attention_kernel" not in skip:
                module.kernel, done = chosen_sdpa, True
            if not done:
                continue
        else:
            continue
        count += 1
    return count
