"""Shared layers: every model in the zoo is assembled from these.

All softmax attention goes through ``scaled_dot_product_attention`` so memory stays linear in the number of
tokens (the fused kernels on CPU and GPU); attention maps are materialised only when a caller asks for them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelOutput(NamedTuple):
    """What every model's ``forward(bag)`` returns.

    ``logits``: [1, n_bins] discrete-time hazard logits (hazards = sigmoid(logits)).
    ``aux_loss``: an optional scalar added to the survival loss (e.g. DSMIL's instance loss).
    ``attention``: named attention maps for heatmaps, e.g. ``{"20x": [N]}``; filled only when asked.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    attention: dict[str, torch.Tensor] = {}


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Transformer-style init: Linear weights trunc-normal(std), zero bias; LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mlp(dims: list[int], dropout: float = 0.0, act: type[nn.Module] = nn.ReLU, last_act: bool = True) -> nn.Sequential:
    """Linear -> act -> dropout stacks; ``mlp([2048, 512])`` is AMIL's Linear+ReLU feature layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Softmax of ``scores`` [N] within each segment (bag); one segment when ``segment`` is None.

    Used to pack several bags into one forward pass: numerically the same as one softmax per bag.
    """
    if segment is None:
        return torch.softmax(scores, dim=0)
    seg_max = torch.full((n_segments,), float("-inf"), device=scores.device, dtype=scores.dtype)
    seg_max = seg_max.scatter_reduce(0, segment, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - seg_max[segment])
    denom = torch.zeros(n_segments, device=scores.device, dtype=e.dtype).index_add_(0, segment, e)
    return e / denom[segment]


def segment_sum(values: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Sum rows of ``values`` [N, d] per segment -> [n_segments, d]."""
    if segment is None:
        return values.sum(dim=0, keepdim=True)
    out = torch.zeros(n_segments, values.shape[1], device=values.device, dtype=values.dtype)
    return out.index_add_(0, segment, values)


class GatedAttention(nn.Module):
    """Ilse et al.'s gated attention scorer: score_i = w^T (tanh(V h_i) * sigmoid(U h_i)) -> [N]."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.0, n_heads: int = 1) -> None:
        super().__init__()
        self.attn_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else []))
        self.attn_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), *([nn.Dropout(dropout)] if dropout else []))
        self.attn_c = nn.Linear(hidden, n_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_c(self.attn_a(h) * self.attn_b(h)).squeeze(-1)


class AttentionPool(nn.Module):
    """Gated-attention pooling of instances into one embedding per bag (softmax over the bag's instances)."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.score = GatedAttention(dim, hidden, dropout)

    def forward(
        self, h: torch.Tensor, segment: torch.Tensor | None = None, n_segments: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` [N, d] -> (pooled [n_segments, d], attention weights [N])."""
        a = segment_softmax(self.score(h).float(), segment, n_segments).to(h.dtype)
        return segment_sum(a.unsqueeze(-1) * h, segment, n_segments), a


class HazardHead(nn.Linear):
    """The shared discrete-time survival head: one logit per time bin (hazard = sigmoid(logit))."""

    def __init__(self, dim: int, n_bins: int = 4) -> None:
        super().__init__(dim, n_bins)


class MultiheadSDPA(nn.Module):
    """Multi-head attention with separate q/k/v projections on ``scaled_dot_product_attention``.

    ``attn_dropout`` applies while training; ``dropout_in_eval=True`` reproduces the CrossFusion reference, which
    keeps it on in eval. ``need_weights`` returns the head-averaged attention of the first query token (or of all
    queries averaged over keys, see ``weights_of``) computed in chunks, so heatmaps do not cost N^2 memory.
    """

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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, Nq, d] attends to ``context`` [B, Nk, d] (itself when None).

        Returns (output [B, Nq, d], weights [B, Nk] = attention each key receives averaged over queries and
        heads, or None).
        """
        ctx = x if context is None else context
        q, k, v = self._heads(self.q(x)), self._heads(self.k(ctx)), self._heads(self.v(ctx))
        p = self.attn_dropout if (self.training or self.dropout_in_eval) else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = self.out(y.transpose(1, 2).reshape(x.shape))
        weights = key_attention(q, k) if need_weights else None
        return y, weights


@torch.no_grad()
def key_attention(q: torch.Tensor, k: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean attention each key receives, over heads and queries, computed in query chunks: [B, Nk]."""
    b, h, nq, dh = q.shape
    total = torch.zeros(b, k.shape[2], device=q.device, dtype=torch.float32)
    for s in range(0, nq, chunk):
        att = torch.softmax((q[:, :, s : s + chunk].float() @ k.float().transpose(-1, -2)) / math.sqrt(dh), dim=-1)
        total += att.sum(dim=(1, 2))
    return total / (h * nq)


class PPEG(nn.Module):
    """Pyramid position encoding generator (TransMIL): x + DWConv7 + DWConv5 + DWConv3 on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` [B, side*side, d] (no class token) -> same shape."""
        b, n, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return grid.flatten(2).transpose(1, 2)


def square_pad(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pad [B, N, d] to side^2 tokens by re-appending the first tokens (TransMIL / CrossFusion); returns side."""
    n = tokens.shape[1]
    side = max(1, math.ceil(math.sqrt(n)))
    extra = side * side - n
    if extra:  # side^2 - N < N for every N >= 1, so the first tokens always suffice
        tokens = torch.cat([tokens, tokens[:, :extra]], dim=1)
    return tokens, side
