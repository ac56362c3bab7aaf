"""CS-MIL: cross-scale MIL (Deng et al., MedIA 2024; MMMI 2022), as a discrete-time survival model (spec §12).

Each instance is a 20x patch seen at three scales: itself, its 10x parent and its 5x parent (the cross-scale index,
spec §2.2, stands in for the reference's co-centred 512 / 1024 px crops). A shared embedding maps every view to 64-d,
a cross-scale attention weighs the three views of an instance, attention pooling over instances gives the bag
embedding, and the last layer is the shared hazard head (Linear(32 -> n_bins) instead of Linear(32 -> 1) + sigmoid).

As in the reference code the cross-scale weights are raw scores, with no softmax over scales (the paper's figure
shows one: ``scale_softmax=True``). Views a patch has no parent for are left out of its cross-scale sum
(``orphans="mask"``; the reference always has all three crops), or the patch is dropped (``orphans="drop"``).

Bag sampling as in the authors' scripts: MIL_global_Stage1_Training.py and MIL_global_Stage1_Testing.py pass
mean_bag_length=3, var_bag_length=1 to their loader (MIL_dataloader_csv_clustering_pair_stack.MILBags), which draws
one length per bag, L = max(1, int(N(3, 1))) (truncated; the "var" is a standard deviation), and takes min(L,
cluster size) instances from every one of the 8 k-means clusters of the slide, uniformly with replacement: about
8 x 2.5 = 20 instances per bag (``bag_length``, ``bag_length_std``). The loader class's own defaults, N(64, 4), are
overridden by the scripts. Clusters: per slide, k-means (k = 8) of the 20x features, recomputed per step (seeded,
so always the same for a bag); they only choose instances, as in the reference. A bag of several slides draws one
length for all the clusters of all its slides. The reference also re-samples at evaluation, which makes its scores
stochastic; here evaluation uses every instance (deterministic), and ``sample_in_eval=True`` reproduces the
reference. ``bag_length=None`` turns sampling off (every instance, also in training).

Attention maps (``return_attention=True``): ``"20x"`` the instance attention per 20x patch ([N20], summed over
repeated draws, 0 for patches not drawn); ``"10x"`` / ``"5x"`` the same attention summed onto each parent
([N10], [N5]); ``"cross_scale"`` the cross-scale weights of each 20x patch's views, columns 20x, 10x, 5x ([N20, 3]).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.data.multiscale import bag_index, take_rows
from milbench.models.layers.clustering import kmeans
from milbench.models.layers.common import HazardHead, ModelOutput, mlp, upcast
from milbench.models.layers.pooling import AdditiveAttention
from milbench.models.registry import register_model

VIEWS = ("20x", "10x", "5x")


@register_model("csmil")
class CSMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, embed_dim: int = 64, attn_dim: int = 32, dropout: float = 0.5,
                 n_clusters: int = 8, bag_length: float | None = 3.0, bag_length_std: float = 1.0,
                 sample_in_eval: bool = False, scale_softmax: bool = False, orphans: str = "mask") -> None:
        super().__init__()
        if orphans not in ("mask", "drop"):
            raise MilbenchError(f"CS-MIL orphans must be 'mask' or 'drop', not {orphans!r}")
        self.n_clusters, self.bag_length, self.bag_length_std = n_clusters, bag_length, bag_length_std
        self.sample_in_eval, self.scale_softmax, self.orphans = sample_in_eval, scale_softmax, orphans
        # 1. shared embedding of every view (1x1 convolution = linear) + ReLU
        self.embed = mlp([in_dim, embed_dim])
        # 2. cross-scale attention: one raw weight per view
        self.scale_attention = AdditiveAttention(embed_dim, attn_dim, act=nn.ReLU)
        # 4. instance attention pooling
        self.instance_attention = AdditiveAttention(embed_dim, attn_dim)
        # 5. head: Linear -> ReLU -> Dropout -> hazard head
        self.fc = mlp([embed_dim, attn_dim], dropout=dropout)
        self.head = HazardHead(attn_dim, n_bins)

    def policies(self) -> dict[str, str]:
        """Large-bag policy for the run record: training bags are the authors' cluster samples, not the whole bag."""
        if self.bag_length is None:
            return {}
        where = "training and evaluation" if self.sample_in_eval else "training only (evaluation uses every patch)"
        return {"cluster_sampling": f"{where}: per step one bag length L = max(1, trunc(N({self.bag_length:g}, "
                                    f"{self.bag_length_std:g}))) and min(L, cluster size) 20x patches drawn with "
                                    f"replacement from each of the {self.n_clusters} k-means clusters of every slide "
                                    "(the authors' loader; about 20 patches per bag), drawn from torch's global RNG"}

    def _instances(self, bag: Bag, parents: torch.Tensor) -> torch.Tensor:
        """20x rows forming the bag: all (or those with both parents), re-sampled by cluster in training."""
        rows = torch.arange(parents.shape[0], device=parents.device)
        if self.orphans == "drop":
            rows = rows[(parents >= 0).all(1)]
            if not len(rows):
                raise MilbenchError(f"case {bag.case_id}: no 20x patch has both a 10x and a 5x parent; "
                                    f"use orphans='mask' or check the coordinates of every magnification")
        if self.bag_length is None or not (self.training or self.sample_in_eval):
            return rows
        slide = bag.slide_index.get("20x", torch.zeros_like(parents[:, 0]))
        return rows[self._sample(bag.features["20x"][rows], slide[rows])]

    def _sample(self, x: torch.Tensor, slide: torch.Tensor) -> torch.Tensor:
        """Per slide, k-means of the features; one bag length L = max(1, trunc(N(bag_length, bag_length_std))), then
        min(L, cluster size) draws with replacement from every cluster (the authors' loader)."""
        groups = torch.empty_like(slide)
        for s in slide.unique():
            at = (slide == s).nonzero().squeeze(1)
            groups[at] = kmeans(x[at], min(self.n_clusters, len(at)))[1] + int(s) * self.n_clusters
        _, group, size = groups.unique(return_inverse=True, return_counts=True)
        order = group.argsort()
        start = torch.cumsum(size, 0) - size
        length = torch.trunc(torch.randn((), device=x.device) * self.bag_length_std + self.bag_length).clamp(min=1)
        draws = torch.minimum(size, length.long())
        which = torch.repeat_interleave(torch.arange(len(size), device=x.device), draws)
        pick = start[which] + (torch.rand(len(which), device=x.device) * size[which]).long().clamp(max=size[which] - 1)
        return order[pick]

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        index = bag_index(bag, "parent_10x_of_20x", "parent_5x_of_20x")
        parents = torch.stack([index["parent_10x_of_20x"], index["parent_5x_of_20x"]], dim=1)  # [N20, 2]
        rows = self._instances(bag, parents)  # 3. the instances of all clusters, concatenated
        p = parents[rows]
        f = bag.features
        views = (f["20x"][rows], take_rows(f["10x"], p[:, 0]), take_rows(f["5x"], p[:, 1]))
        present = torch.cat([torch.ones_like(p[:, :1], dtype=torch.bool), p >= 0], dim=1)
        # 1. shared embedding of the three views -> [n, 3, 64]
        e = torch.stack([self.embed(v) for v in views], dim=1)
        # 2. cross-scale attention: h_i = sum_s w_is e_is (raw weights as coded; softmax over scales on request)
        w = upcast(self.scale_attention(e))
        w = torch.softmax(w.masked_fill(~present, float("-inf")), 1) if self.scale_softmax else w * present
        h = (w.to(e.dtype).unsqueeze(-1) * e).sum(1)
        # 4. instance attention: softmax over the bag's instances, weighted sum
        a = torch.softmax(upcast(self.instance_attention(h)), dim=0)
        m = a.to(h.dtype).unsqueeze(0) @ h
        # 5. head
        logits = self.head(self.fc(m))
        if not return_attention:
            return ModelOutput(logits)
        return ModelOutput(logits, None, _maps(bag, rows, p, a.detach(), w.detach()))


def _maps(bag: Bag, rows: torch.Tensor, parents: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> dict:
    """Instance attention on 20x patches and summed onto their parents; cross-scale weights per 20x patch."""
    maps = {"20x": torch.zeros(bag.n_patches("20x"), device=a.device).index_add_(0, rows, a)}
    for col, scale in ((0, "10x"), (1, "5x")):
        keep = parents[:, col] >= 0
        maps[scale] = torch.zeros(bag.n_patches(scale), device=a.device).index_add_(0, parents[keep, col], a[keep])
    maps["cross_scale"] = torch.zeros(bag.n_patches("20x"), len(VIEWS), device=a.device).index_copy_(0, rows, w)
    return maps
