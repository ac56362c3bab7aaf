"""Nystrom self-attention (Xiong et al. 2021), O(N m d) for m landmarks, as TransMIL uses it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench.models.layers.common import upcast


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of square ``a`` [..., m, m] by the Nystromformer's cubic iteration.

    Starts from a^T / (max row sum * max column sum), both maxima taken over the whole tensor (all heads).
    """
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    z = a.transpose(-1, -2) / (a.abs().sum(-1).max() * a.abs().sum(-2).max())
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al. 2021) as TransMIL uses it, O(N m d) for m landmarks.

    The sequence is zero-padded on the left to a multiple of m; landmarks are segment means of q and k;
    softmax(q k^T) ~ softmax(q k_l^T) pinv(softmax(q_l k_l^T)) softmax(q_l k^T); a depthwise conv over the
    sequence (per head) adds a residual on the values. Both N x m softmax products run in
    scaled_dot_product_attention; only the m x m kernel and its pseudo-inverse are formed (in float32).
    ``slicing="last"`` returns the last N rows (nystrom-attention >= 0.0.12, the CrossFusion repository);
    ``"first"`` returns the first N rows, as nystrom-attention 0.0.9 (the TransMIL repository) does. ``kernel`` is
    the attention function of both products (``milbench.accel`` replaces it on an instance).
    """

    kernel = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, dim: int, n_heads: int = 8, head_dim: int = 64, n_landmarks: int = 256, pinv_iters: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.0, slicing: str = "last") -> None:
        super().__init__()
        if slicing not in ("last", "first"):
            raise ValueError(f"Nystrom slicing must be 'last' or 'first', not {slicing!r}")
        self.n_heads, self.head_dim, self.n_landmarks = n_heads, head_dim, n_landmarks
        self.pinv_iters, self.slicing = pinv_iters, slicing
        self.qkv = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)
        self.residual_conv = nn.Conv2d(n_heads, n_heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                       groups=n_heads, bias=False)
        self.out = nn.Sequential(nn.Linear(n_heads * head_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, weights_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, N, d] -> (output [B, N, d], approximate attention of output row ``weights_of`` to every
        input token [B, N], mean over heads, or None)."""
        b, n, _ = x.shape
        m, h, dh = self.n_landmarks, self.n_heads, self.head_dim
        pad = -n % m
        x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self.qkv(x).view(b, n + pad, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [B, h, L, dh]
        q_land = q.reshape(b, h, m, -1, dh).mean(3)
        k_land = k.reshape(b, h, m, -1, dh).mean(3)
        landmark_values = self.kernel(q_land, k, v)  # softmax(q_l k^T) v: [B, h, m, dh]
        with torch.autocast(x.device.type, enabled=False):
            kernel = torch.softmax(upcast(q_land) @ upcast(k_land).transpose(-1, -2) / math.sqrt(dh), dim=-1)
            kernel_inv = iterative_pinv(kernel, self.pinv_iters)
            mixed = (kernel_inv @ upcast(landmark_values)).to(landmark_values.dtype)
        y = self.kernel(q, k_land, mixed) + self.residual_conv(v)
        y = self.out(y.transpose(1, 2).reshape(b, n + pad, h * dh))
        first = pad if self.slicing == "last" else 0
        weights = None
        if weights_of is not None:
            weights = self._row_weights(q[:, :, first + weights_of], k, q_land, k_land, kernel_inv)[:, pad:]
        return y[:, first : first + n], weights

    @torch.no_grad()
    def _row_weights(self, q_row: torch.Tensor, k: torch.Tensor, q_land: torch.Tensor, k_land: torch.Tensor,
                     kernel_inv: torch.Tensor) -> torch.Tensor:
        """softmax(q_row k_l^T) pinv softmax(q_l k^T) for one query row [B, h, dh] -> [B, L] mean over heads."""
        s = 1.0 / math.sqrt(self.head_dim)
        with torch.autocast(k.device.type, enabled=False):
            left = torch.softmax(q_row.float().unsqueeze(2) @ k_land.float().transpose(-1, -2) * s, -1) @ kernel_inv
            right = torch.softmax(q_land.float() @ k.float().transpose(-1, -2) * s, dim=-1)  # [B, h, m, L]: O(N m)
            return (left @ right).squeeze(2).mean(1)
