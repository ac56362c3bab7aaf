"""DSMIL: dual-stream multiple instance learning (Li et al., CVPR 2021) as a discrete-time survival model.

Architecture = the CrossFusion-repository variant behind the paper's baseline numbers (dsmil.py's structure,
no orthogonal init), with one output per time bin where the paper has one per class:
  instance stream: Linear(D -> n_bins) gives every patch a hazard logit per bin; the critical instance of bin k
  is the patch with the highest logit in bin k;
  bag stream: a query net Linear(D -> 128) -> ReLU -> Linear(128 -> 128) -> Tanh embeds all patches and the
  critical ones; each critical query attends to all patches (softmax over patches of q_i . q_crit / sqrt(128),
  values = raw features); the n_bins attended vectors [n_bins, D] go through Conv1d(n_bins -> n_bins, kernel D),
  giving the bag's hazard logits.

Fix-or-reproduce: in the reference the instance classifier only picks critical instances through a
non-differentiable argmax/sort, so it never receives a gradient and stays at its random initialisation. The
default adds the paper's max-instance loss so it trains (``instance_loss=False`` reproduces the reference).

Max-instance survival loss. The bag's max-instance logits are m_k = max_i c_ik per time bin. Since sigmoid is
monotone, sigmoid(m_k) = max_i h_ik: the bag's hazard in interval k is that of its most hazardous patch in k, the
survival analogue of "a bag is positive if any instance is" (the maximiser may differ between bins). ``forward``
returns m as the task ``"max_instance"`` of its output (``ModelOutput.tasks``), which the engine scores with the
same discrete-time loss as the bag logits, under the same label, and adds. The paper trains on
0.5 * bag loss + 0.5 * max-instance loss; the engine's loss(bag logits) + loss(m) is twice the paper's mix: same
minimiser, and Adam's steps are invariant to a constant loss scale (up to eps and the relative strength of weight
decay). A training loop that ignores ``tasks`` trains the reference variant.

Attention map (``return_attention=True``): ``"20x"`` [N], the bag stream's attention averaged over the n_bins
critical queries (sums to 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench.data.bag import Bag
from milbench.models.layers.common import ModelOutput, mlp, upcast
from milbench.models.layers.segment import segment_argmax, segment_softmax
from milbench.models.registry import register_model


@register_model("dsmil")
class DSMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, query_dim: int = 128, instance_loss: bool = True) -> None:
        super().__init__()
        self.instance_loss = instance_loss
        # instance stream: one hazard logit per patch and time bin
        self.instance_classifier = nn.Linear(in_dim, n_bins)
        # bag stream: nonlinear query net (values are the raw features)
        self.query = nn.Sequential(*mlp([in_dim, query_dim, query_dim], last_act=False), nn.Tanh())
        # bag classifier: Conv1d over the n_bins attended vectors, kernel = the feature width
        self.bag_classifier = nn.Conv1d(n_bins, n_bins, kernel_size=in_dim)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        x = bag.features["20x"]
        c = self.instance_classifier(x)  # [N, n_bins]
        critical = c.detach().argmax(dim=0)  # the critical instance of every bin
        q = self.query(x)  # [N, 128]
        q_crit = q[critical]  # [n_bins, 128]
        with torch.autocast(x.device.type, enabled=False):  # float32 scores
            scores = upcast(q_crit) @ upcast(q).T  # [n_bins, N]
        a = torch.softmax(scores / math.sqrt(q.shape[1]), dim=1)  # each critical query's attention over the patches
        b = (a.to(x.dtype) @ x).unsqueeze(0)  # [1, n_bins, D]: the attended features (values = raw features)
        logits = self.bag_classifier(b).squeeze(-1)  # [1, n_bins]
        attention = {"20x": a.detach().float().mean(dim=0)} if return_attention else {}
        return ModelOutput(logits, None, attention, self._tasks(c.max(dim=0).values.unsqueeze(0)))

    def forward_packed(self, features: torch.Tensor, segment: torch.Tensor, n_bags: int) -> ModelOutput:
        """Several bags in one pass: 20x ``features`` [sum N, D] of ``n_bags`` bags (float32, or the autocast dtype
        under autocast: they only enter autocast matmuls, where they are cast to it anyway), ``segment`` [sum N] the
        bag of each row -> logits and max-instance logits [n_bags, n_bins], each row equal to ``forward`` of its bag.

        Every bag's critical instances are its own (per-bag argmax) and its critical queries attend to its own
        patches only (softmax per bag); the attended vectors are one matmul with a bag-block-diagonal weight matrix.
        """
        x = features
        c = self.instance_classifier(x)  # [N, n_bins]
        critical = segment_argmax(c.detach(), segment, n_bags)  # [n_bags, n_bins] rows of the critical instances
        q = self.query(x)  # [N, 128]
        k = c.shape[1]
        q_crit = q[critical.view(-1)]  # [n_bags * n_bins, 128]
        with torch.autocast(x.device.type, enabled=False):  # float32 scores, as inside the fused attention kernel
            scores = (upcast(q) @ upcast(q_crit).T).view(-1, n_bags, k)  # every patch against every bag's queries,
        scores = scores[torch.arange(x.shape[0], device=x.device), segment]  # keeping its own bag's: [N, n_bins]
        a = segment_softmax(scores / math.sqrt(q.shape[1]), segment, n_bags).to(x.dtype)
        blocks = F.one_hot(segment, n_bags).to(a.dtype).unsqueeze(-1) * a.unsqueeze(1)  # [N, n_bags, n_bins]
        b = (blocks.view(x.shape[0], -1).T @ x).view(n_bags, k, -1)  # [n_bags, n_bins, D]
        logits = self.bag_classifier(b).squeeze(-1)  # [n_bags, n_bins]
        return ModelOutput(logits, tasks=self._tasks(c.gather(0, critical)))  # each bag's max-instance logits

    def _tasks(self, max_instance: torch.Tensor) -> dict[str, torch.Tensor]:
        """The max-instance logits as a task trained on the label, unless the reference variant is asked for."""
        return {"max_instance": max_instance} if self.instance_loss else {}
