"""MuSTMIL: multi-scale task MIL (Marini et al., MICCAI COMPAY 2021), as a discrete-time survival model (spec §11).

Instances are paired rows: each 10x patch with the 5x patch containing it (rows without a parent are dropped and
counted in the index). Each scale gets its own embedding and K-branch attention pooling with a per-scale head (an
auxiliary task predicting the same target); the row-wise concatenation of the embeddings gets a joint K-branch
attention and the WSI head. K = number of time bins (K = N_CLASSES in the reference), and every head is a
hazard head: its sigmoid outputs are the bins' hazards.

``scales=("5x", "10x", "20x")`` is the 3-scale extension of the spec: rows are 20x patches with their 10x and 5x
parents. The reference's declared Dropout(0.2) is never applied, so there is none here.

Training: the reference loss is the WSI loss plus one loss per scale on the same target, with equal weights. The
output's ``logits`` are the WSI prediction and its ``tasks`` the per-scale logits ``{scale: [1, n_bins]}``, which the
engine trains with the same loss on the same target.

Attention maps (``return_attention=True``), K branches averaged: ``"<scale>"`` the per-scale attention summed onto
that scale's patches ([N_s]; a 5x patch collects the weight of all its rows), ``"joint"`` the joint attention per
row, on the finest scale's patches ([N_finest], 0 for dropped orphans).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.data.multiscale import bag_index
from milbench.models.layers.common import HazardHead, ModelOutput, upcast
from milbench.models.layers.pooling import AdditiveAttention
from milbench.models.registry import register_model


@register_model("mustmil")
class MuSTMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, embed_dim: int = 128, attn_dim: int = 64,
                 scales: tuple[str, ...] = ("5x", "10x")) -> None:
        super().__init__()
        if tuple(scales) not in (("5x", "10x"), ("5x", "10x", "20x")):
            raise MilbenchError(f"MuSTMIL scales must be ('5x', '10x') or ('5x', '10x', '20x'), not {scales}")
        self.scales = tuple(scales)
        # 1. per-scale embedding (no activation)
        self.embed = nn.ModuleDict({s: nn.Linear(in_dim, embed_dim) for s in self.scales})
        # 2. per-scale attention (K branches) and per-scale head on the flattened K pooled embeddings
        self.attention = nn.ModuleDict({s: AdditiveAttention(embed_dim, attn_dim, n_bins) for s in self.scales})
        self.scale_head = nn.ModuleDict({s: HazardHead(n_bins * embed_dim, n_bins) for s in self.scales})
        # 3. joint attention on the row-wise concatenation and the WSI head
        joint = embed_dim * len(self.scales)
        self.joint_attention = AdditiveAttention(joint, attn_dim, n_bins)
        self.head = HazardHead(n_bins * joint, n_bins)

    def _rows(self, bag: Bag) -> dict[str, torch.Tensor]:
        """Paired rows: finest-scale patches with all their parents, and the parent row at each scale."""
        finest = self.scales[-1]
        index = bag_index(bag, *(f"parent_{s}_of_{finest}" for s in self.scales[:-1]))
        parents = {s: index[f"parent_{s}_of_{finest}"] for s in self.scales[:-1]}
        keep = torch.stack([p >= 0 for p in parents.values()]).all(0).nonzero().squeeze(1)
        if not len(keep):
            raise MilbenchError(f"case {bag.case_id}: no {finest} patch lies within a {'/'.join(parents)} patch; "
                                f"check the coordinates of every magnification")
        return {finest: keep, **{s: p[keep] for s, p in parents.items()}}

    def _pool(self, attention: nn.Module, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K-branch attention pooling: A = softmax over rows of the K scores [K, N]; M = A e flattened -> [1, K*E]."""
        a = torch.softmax(upcast(attention(e)), dim=0).T.to(e.dtype)
        return (a @ e).reshape(1, -1), a

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        """WSI logits, with the per-scale task logits {scale: [1, n_bins]} as ``tasks``."""
        rows = self._rows(bag)
        # 1. per-scale embeddings of the paired rows
        e = {s: self.embed[s](bag.features[s][rows[s]]) for s in self.scales}
        # 2. per-scale attention pooling and heads
        pooled = {s: self._pool(self.attention[s], e[s]) for s in self.scales}
        tasks = {s: self.scale_head[s](pooled[s][0]) for s in self.scales}
        # 3. joint attention on [e_5x, e_10x(, e_20x)] per row -> WSI head
        m, a = self._pool(self.joint_attention, torch.cat([e[s] for s in self.scales], dim=1))
        logits = self.head(m)
        maps = {}
        if return_attention:
            with torch.no_grad():
                for s in self.scales:
                    w = pooled[s][1].float().mean(0)
                    maps[s] = torch.zeros(bag.n_patches(s), device=w.device).index_add_(0, rows[s], w)
                finest = self.scales[-1]
                maps["joint"] = torch.zeros(bag.n_patches(finest), device=a.device).index_add_(
                    0, rows[finest], a.float().mean(0))
        return ModelOutput(logits, None, maps, tasks)
