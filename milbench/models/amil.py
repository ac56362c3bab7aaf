"""AMIL: attention-based deep MIL with gated attention (Ilse et al., ICML 2018), as a discrete-time survival model.

Default = the CrossFusion-repository variant behind the paper's baseline numbers: Linear(D->512)+ReLU, gated
attention (256), attention-weighted sum, Linear(512->n_bins). ``variant="patchgcn"`` is Patch-GCN's
``MIL_Attention_FC_surv``: dropout 0.25, a rho layer Linear(512->256)+ReLU+Dropout before the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench.data.bag import Bag
from milbench.models.layers.common import HazardHead, ModelOutput, mlp
from milbench.models.layers.pooling import AttentionPool
from milbench.models.registry import register_model


@register_model("amil")
class AMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, hidden: int = 512, attn_dim: int = 256,
                 variant: str = "crossfusion", dropout: float | None = None) -> None:
        super().__init__()
        if variant not in ("crossfusion", "patchgcn"):
            raise ValueError(f"AMIL variant must be 'crossfusion' or 'patchgcn', not {variant!r}")
        p = (0.25 if variant == "patchgcn" else 0.0) if dropout is None else dropout
        # 1. instance embedding
        self.embed = mlp([in_dim, hidden], dropout=p)
        # 2-3. gated attention, softmax over the bag's patches, weighted sum
        self.pool = AttentionPool(hidden, attn_dim, dropout=p)
        # (Patch-GCN only) rho: a bag-level layer before the head
        self.rho = mlp([hidden, hidden // 2], dropout=p) if variant == "patchgcn" else nn.Identity()
        # 4. discrete-time hazard head
        self.head = HazardHead(hidden // 2 if variant == "patchgcn" else hidden, n_bins)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        h = self.embed(bag.features["20x"])
        z, a = self.pool(h)
        logits = self.head(self.rho(z))
        return ModelOutput(logits, None, {"20x": a.detach()} if return_attention else {})

    def forward_packed(self, features: torch.Tensor, segment: torch.Tensor, n_bags: int) -> ModelOutput:
        """Several bags in one pass: 20x ``features`` [sum N, D] of ``n_bags`` bags (float32, or the autocast dtype
        under autocast: they only enter the embedding's Linear), ``segment`` [sum N] the bag of each row -> logits
        [n_bags, n_bins]; the softmax runs per bag, so each row equals ``forward`` of its bag."""
        z, _ = self.pool(self.embed(features), segment, n_bags)
        return ModelOutput(self.head(self.rho(z)))
