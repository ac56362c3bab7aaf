"""Position encoding of a patch sequence on a square token grid (TransMIL, CrossFusion): square padding by
re-appending the first tokens, the PPEG, and folding per-token weights back onto the original patches."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class PPEG(nn.Module):
    """Pyramid position encoding generator (TransMIL): x + DWConv7 + DWConv5 + DWConv3 on the token grid.

    Training runs it as one depthwise convolution with the summed kernel (:mod:`milbench.accel.rewrites`).
    """

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


def fold_square_pad(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Undo ``square_pad`` on per-token weights [B, side^2] -> [B, n]: each re-appended copy adds to its original."""
    extra = weights.shape[-1] - n
    out = weights[..., :n].clone()
    out[..., :extra] += weights[..., n:]
    return out
