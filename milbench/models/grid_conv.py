"""Depthwise convolution of a token grid on CUDA, in Triton: the PPEG's and Conv Processor's 7 x 7 convolutions.

Why: the token grids are channels-last ([B, H*W, C] tokens viewed as [B, C, H, W]), and PyTorch's depthwise
kernels took 0.8 ms forward and backward per 7 x 7 convolution on the 59 x 59 grid of an average bag (1.3 ms at
117 x 117; H100, docs/performance.md), most of it for the weight gradient: five such convolutions were a third of
a CrossFusion step. Here each output is a sum of K_H x K_W shifted rows of the token matrix, read with the
channels contiguous; the weight gradient sums, per block of positions, the products of the output gradient with
the same shifted rows, and the blocks' partial sums are added in a fixed order (deterministic). Arithmetic is
float32 whatever the input dtype. The same function as ``F.conv2d(x, w, padding=(K_H // 2, K_W // 2),
groups=C)``: tests compare them (tests/models/test_grid_conv.py, on a GPU).
"""

from __future__ import annotations

import functools

import torch

BLOCK_P, BLOCK_C = 64, 64  # positions x channels per program


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (it comes with PyTorch's CUDA builds, not with the CPU ones)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use (Triton is imported only where it exists)."""
    import triton
    import triton.language as tl

    ints = ["n", "c", "h", "w", "x_sb", "x_sn", "o_sb", "o_sn"]

    @triton.jit(do_not_specialize=ints)
    def shifted_sum(x_ptr, w_ptr, o_ptr, n, c, h, w, x_sb, x_sn, o_sb, o_sn, KH: tl.constexpr, KW: tl.constexpr,
                    FLIP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        """o[b, p, ch] = sum over taps t of w[ch, t] * x[b, p + shift(t), ch] (zero outside the grid); with FLIP the
        kernel is mirrored, which turns the forward into the input gradient."""
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        ch = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2)
        p_ok, ch_ok = p < n, ch < c
        py, px = p // w, p % w
        acc = tl.zeros((BP, BC), dtype=tl.float32)
        for t in tl.static_range(KH * KW):
            sy = py + (t // KW - KH // 2)
            sx = px + (t % KW - KW // 2)
            ok = p_ok & (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
            rows = x_ptr + b * x_sb + (sy * w + sx)[:, None] * x_sn + ch[None, :]
            xv = tl.load(rows, mask=ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
            tap = t + FLIP * (KH * KW - 1 - 2 * t)  # FLIP (0 or 1) mirrors the kernel
            wv = tl.load(w_ptr + ch * (KH * KW) + tap, mask=ch_ok, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
        tl.store(o_ptr + b * o_sb + p[:, None] * o_sn + ch[None, :], acc, mask=p_ok[:, None] & ch_ok[None, :])

    @triton.jit(do_not_specialize=ints + ["blocks"])
    def weight_grad(x_ptr, g_ptr, part_ptr, n, c, h, w, x_sb, x_sn, o_sb, o_sn, blocks, KH: tl.constexpr,
                    KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
        """part[b, block, t, ch] = sum over the block's positions p of g[b, p, ch] * x[b, p + shift(t), ch]."""
        block = tl.program_id(0)
        p = block * BP + tl.arange(0, BP)
        ch = tl.program_id(1) * BC + tl.arange(0, BC)
        b = tl.program_id(2)
        p_ok, ch_ok = p < n, ch < c
        py, px = p // w, p % w
        g = tl.load(g_ptr + b * o_sb + p[:, None] * o_sn + ch[None, :], mask=p_ok[:, None] & ch_ok[None, :],
                    other=0.0).to(tl.float32)
        out = part_ptr + ((b * blocks + block) * (KH * KW)) * c + ch
        for t in tl.static_range(KH * KW):
            sy = py + (t // KW - KH // 2)
            sx = px + (t % KW - KW // 2)
            ok = p_ok & (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
            rows = x_ptr + b * x_sb + (sy * w + sx)[:, None] * x_sn + ch[None, :]
            xv = tl.load(rows, mask=ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
            tl.store(out + t * c, tl.sum(g * xv, axis=0), mask=ch_ok)

    return shifted_sum, weight_grad


def _as_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] with unit channel stride: a view of a channels-last grid, else a copy."""
    b, c, h, w = grid.shape
    tokens = grid.permute(0, 2, 3, 1)
    if not tokens.is_contiguous():
        tokens = tokens.contiguous()
    return tokens.reshape(b, h * w, c)


def _shifted_sum(x: torch.Tensor, weight: torch.Tensor, h: int, w: int, flip: bool) -> torch.Tensor:
    b, n, c = x.shape
    kh, kw = weight.shape[-2:]
    out = torch.empty(b, n, c, device=x.device, dtype=torch.float32)
    grid = (_cdiv(n, BLOCK_P), _cdiv(c, BLOCK_C), b)
    _kernels()[0][grid](x, weight.contiguous(), out, n, c, h, w, x.stride(0), x.stride(1), out.stride(0),
                        out.stride(1), KH=kh, KW=kw, FLIP=int(flip), BP=BLOCK_P, BC=BLOCK_C)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _GridDepthwise(torch.autograd.Function):
    """Depthwise convolution of tokens [B, H*W, C] laid out on an H x W grid, weight [C, 1, K_H, K_W], no bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.hw = (h, w)
        return _shifted_sum(x, weight, h, w, flip=False)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        h, w = ctx.hw
        g = g.contiguous()
        grad_x = _shifted_sum(g, weight, h, w, flip=True).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            b, n, c = x.shape
            kh, kw = weight.shape[-2:]
            blocks = _cdiv(n, BLOCK_P)
            part = torch.empty(b, blocks, kh * kw, c, device=x.device, dtype=torch.float32)
            _kernels()[1][(blocks, _cdiv(c, BLOCK_C), b)](
                x, g, part, n, c, h, w, x.stride(0), x.stride(1), g.stride(0), g.stride(1), blocks,
                KH=kh, KW=kw, BP=BLOCK_P, BC=BLOCK_C)
            grad_w = part.sum((0, 1)).t().reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w, None, None


@torch.compiler.disable  # launched as it is inside compiled blocks (the grid size is a plain integer here)
def grid_depthwise_conv2d(grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(grid, weight, bias, padding=(K_H // 2, K_W // 2), groups=C)`` for odd kernels, on CUDA through
    the Triton kernels; returns a channels-last float32 [B, C, H, W] (a view of [B, H*W, C] tokens)."""
    b, c, h, w = grid.shape
    x = _as_tokens(grid)
    with torch.autocast("cuda", enabled=False):
        y = _GridDepthwise.apply(x, weight.float(), h, w)
        if bias is not None:
            y = y + bias.float()
    return y.view(b, h, w, c).permute(0, 3, 1, 2)
