"""TransMIL (Shao et al., NeurIPS 2021) as a discrete-time survival model.

Default = the CrossFusion-repository variant behind the paper's baseline numbers: configurable input width, two
TransLayers of Nystrom attention (8 heads of 64, 256 landmarks, 6 pseudo-inverse iterations, residual value conv
of kernel 33) with a PPEG between them, class-token read-out, Linear(512 -> n_bins) hazard logits. No
feed-forward block, as in the paper's code. The token grid for the PPEG is the patch order made square by
re-appending the first patches (no coordinates are used).

Fix-or-reproduce: the TransMIL repository pins nystrom-attention 0.0.9, which keeps the *first* N rows of the
left-padded attention output, so the class token and the first tokens receive the outputs of zero padding rows
and the last tokens lose theirs. The default keeps the last N rows (nystrom-attention >= 0.0.12 and the
CrossFusion repository); ``nystrom_slicing="first"`` reproduces 0.0.9. (0.0.9's in-place ops, which fail under
autograd on current PyTorch, are not reproduced: they change nothing but the crash.) The pseudo-inverse runs in
float32 even under bf16 autocast.

Attention map (``return_attention=True``): ``"20x"`` [N], the class token's approximate Nystrom attention to
each patch in the second TransLayer (the one read out), mean over heads, re-appended copies folded onto their
originals, renormalised over the patches. Nystrom rows are approximations: entries can be slightly negative.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench.data.bag import Bag
from milbench.models.layers.common import HazardHead, ModelOutput, mlp
from milbench.models.layers.nystrom import NystromAttention
from milbench.models.layers.position import PPEG, fold_square_pad, square_pad
from milbench.models.registry import register_model


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)): TransMIL's layer (pre-norm, no feed-forward)."""

    def __init__(self, dim: int, n_heads: int, n_landmarks: int, dropout: float, slicing: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, n_heads, dim // n_heads, n_landmarks, pinv_iters=6, residual_kernel=33,
                                     dropout=dropout, slicing=slicing)

    def forward(self, x: torch.Tensor, weights_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, w = self.attn(self.norm(x), weights_of)
        return x + y, w


@register_model("transmil")
class TransMIL(nn.Module):

    def __init__(self, in_dim: int, n_bins: int = 4, dim: int = 512, n_heads: int = 8, n_landmarks: int | None = None,
                 dropout: float = 0.1, nystrom_slicing: str = "last") -> None:
        super().__init__()
        landmarks = dim // 2 if n_landmarks is None else n_landmarks
        # 1. patch embedding
        self.embed = mlp([in_dim, dim])
        # 3. class token (N(0, 1) init)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        # 4-6. TransLayer, PPEG, TransLayer
        self.layer1 = TransLayer(dim, n_heads, landmarks, dropout, nystrom_slicing)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, n_heads, landmarks, dropout, nystrom_slicing)
        # 7. LayerNorm, class token, hazard head
        self.norm = nn.LayerNorm(dim)
        self.head = HazardHead(dim, n_bins)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        h = self.embed(bag.features["20x"]).unsqueeze(0)  # [1, N, dim]
        n = h.shape[1]
        # 2. square padding (re-appended first tokens), 3. class token in front
        h, side = square_pad(h)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h, _ = self.layer1(h)
        # PPEG on the feature tokens only; the class token bypasses it
        h = torch.cat([h[:, :1], self.ppeg(h[:, 1:], side)], dim=1)
        h, w = self.layer2(h, weights_of=0 if return_attention else None)
        logits = self.head(self.norm(h)[:, 0])
        if not return_attention:
            return ModelOutput(logits)
        a = fold_square_pad(w[:, 1:], n)[0]
        return ModelOutput(logits, None, {"20x": (a / a.sum()).float()})
