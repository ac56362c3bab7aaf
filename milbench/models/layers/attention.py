"""Softmax attention: one core (:func:`attend`, on ``scaled_dot_product_attention``) behind every multi-head block.

CrossFusion's cross-attention and transformer layers (:class:`MultiheadSDPA`), SCMIL's cluster-local attention
(:class:`WindowedSelfAttention`) and ProtoSurv's prototype attention split heads, attend and merge through the same
functions; attention maps are materialised only when asked, in chunks (:func:`key_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, N, d] -> [B, heads, N, d / heads]."""
    b, n, d = x.shape
    return x.view(b, n, n_heads, d // n_heads).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, dh] -> [B, N, heads * dh]."""
    b, h, n, dh = y.shape
    return y.transpose(1, 2).reshape(b, n, h * dh)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, dropout_p: float = 0.0,
           qk_norm: bool = False, mask: torch.Tensor | None = None, kernel: Callable | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-head softmax attention of projected queries ``q`` [B, Nq, d] over keys/values [B, Nk, d].

    ``qk_norm`` applies a per-head LayerNorm without affine to queries and keys (ProtoSurv). ``kernel``: the
    scaled-dot-product attention function, ``F.scaled_dot_product_attention`` unless given (``milbench.accel`` gives
    one that picks the fused kernel per shape). Returns (output [B, Nq, d], per-head queries and keys
    [B, h, N, dh], for :func:`key_attention`).
    """
    qh, kh, vh = split_heads(q, n_heads), split_heads(k, n_heads), split_heads(v, n_heads)
    if qk_norm:
        qh, kh = F.layer_norm(qh, qh.shape[-1:]), F.layer_norm(kh, kh.shape[-1:])
    y = (kernel or F.scaled_dot_product_attention)(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p)
    return merge_heads(y), qh, kh


class MultiheadSDPA(nn.Module):
    """Multi-head attention with separate q/k/v projections on ``scaled_dot_product_attention``.

    ``attn_dropout`` applies while training; ``dropout_in_eval=True`` reproduces the CrossFusion reference, which
    keeps it on in eval. ``need_weights`` also returns the attention each key receives (averaged over heads and
    queries, see :func:`key_attention`), computed in chunks so heatmaps never cost N^2 memory. ``kernel`` is the
    attention function (:func:`attend`); ``milbench.accel`` replaces it on an instance.
    """

    kernel = staticmethod(F.scaled_dot_product_attention)

    def __init__(
        self, dim: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True, dropout_in_eval: bool = False
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.attn_dropout, self.dropout_in_eval = n_heads, attn_dropout, dropout_in_eval
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, Nq, d] attends to ``context`` [B, Nk, d] (itself when None).

        Returns (output [B, Nq, d], weights [B, Nk] = attention each key receives averaged over queries and
        heads, or None).
        """
        ctx = x if context is None else context
        p = self.attn_dropout if (self.training or self.dropout_in_eval) else 0.0
        y, q, k = attend(self.q(x), self.k(ctx), self.v(ctx), self.n_heads, p, kernel=self.kernel)
        return self.out(y), key_attention(q, k) if need_weights else None


@torch.no_grad()
def key_attention(q: torch.Tensor, k: torch.Tensor, max_scores: int = 2**26) -> torch.Tensor:
    """Mean attention each key receives, over heads and queries, in query chunks of at most ``max_scores`` scores."""
    b, h, nq, dh = q.shape
    chunk = max(1, max_scores // (b * h * k.shape[2]))
    total = torch.zeros(b, k.shape[2], device=q.device, dtype=torch.float32)
    for s in range(0, nq, chunk):
        att = torch.softmax((q[:, :, s : s + chunk].float() @ k.float().transpose(-1, -2)) / math.sqrt(dh), dim=-1)
        total += att.sum(dim=(1, 2))
    return total / (h * nq)


class WindowedSelfAttention(nn.Module):
    """Multi-head self-attention within contiguous windows of one token sequence (SCMIL's cluster-local attention).

    Windows are padded into one batch with a key mask, so a single scaled_dot_product_attention call serves them
    all; memory is O(N w) for windows of at most w tokens. q/k/v/out projections with bias, dropout on the
    attention probabilities (training only) and after the output projection.
    """

    def __init__(self, dim: int, n_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(proj_dropout))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x`` [L, d], ``lengths`` [W] (window sizes in order, summing to L) -> [L, d]."""
        n, d = x.shape
        w = lengths.numel()
        window = torch.repeat_interleave(torch.arange(w, device=x.device), lengths, output_size=n)
        pos = torch.arange(n, device=x.device) - (torch.cumsum(lengths, 0) - lengths)[window]
        width = int(lengths.max())

        def windows(t: torch.Tensor) -> torch.Tensor:
            grid = t.new_zeros(w, width, d)
            grid[window, pos] = t
            return grid

        mask = (torch.arange(width, device=x.device) < lengths.unsqueeze(1)).view(w, 1, 1, width)
        y, _, _ = attend(windows(self.q(x)), windows(self.k(x)), windows(self.v(x)), self.n_heads,
                         self.attn_dropout if self.training else 0.0, mask=mask)
        return self.out(y[window, pos])
