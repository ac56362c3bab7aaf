"""Attention pooling of a bag's instances (Ilse et al. 2018): gated and non-gated scorers, the pooled embedding."""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench.models.layers.common import upcast
from milbench.models.layers.segment import segment_softmax, segment_sum


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
        a = segment_softmax(upcast(self.score(h)), segment, n_segments).to(h.dtype)
        if segment is None:  # one bag: the attention-weighted sum of its instances
            return a.unsqueeze(0) @ h, a
        return segment_sum(a.unsqueeze(-1) * h, segment, n_segments), a


class AdditiveAttention(nn.Module):
    """Ilse et al.'s non-gated attention scorer: score_i = W act(V h_i) -> [N] (or [N, n_heads]); MuSTMIL, CS-MIL."""

    def __init__(self, dim: int, hidden: int, n_heads: int = 1, act: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.attn_v = nn.Linear(dim, hidden)
        self.act = act()
        self.attn_w = nn.Linear(hidden, n_heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self.attn_w(self.act(self.attn_v(h)))
        return s.squeeze(-1) if s.shape[-1] == 1 else s
