"""ProtoSurv (Wu et al., NeurIPS 2024): a GNN over the patch graph and per-tissue-type prototypes that read the
whole slide by cross-attention, fused by prototype-to-node cross-attention (spec §9).

milbench variant, and how it differs from the reference (``LINKX_PROTO_oldv``):

* Head: the shared discrete-time hazard head (Linear(768 -> n_bins) with bias) by default. ``head="cox"`` is the
  original Linear(768 -> 1, no bias), ``head_kind`` "cox": ``logits`` is then [1, 1] = the log-risk (higher =
  worse), not hazard logits. The engine trains it with the Cox partial likelihood over each accumulation window of
  bags (config ``loss=cox``, chosen by itself with ``--set head=cox``; windows without an event are skipped, as the
  reference skips all-censored batches) and ranks patients by that value; it has no survival curve (that would need
  a Breslow baseline), so IBS is NaN for it.
* Tissue priors: the paper's fine-tuned UNI tissue classifier is not released and the code's CONCH zero-shot
  prompts are colorectal-specific. Here each patch's type is ``bag.extras["tissue_labels"]`` when a user supplies
  them (LongTensor [N], values in 0..n_types-1, for every bag), otherwise its nearest centroid of a k-means
  (k = n_types) fitted by :meth:`ProtoSurv.fit_priors` on the training fold's patches only. The centroids (or,
  with user labels, the per-type means over the training fold) are also the backbone-matched "pre-prototypes"
  that stand in for a type a patient lacks. Cluster semantics (tumour, stroma, ...) are lost.
* ``.view`` on a non-contiguous tensor (a crash on current PyTorch) cannot happen: heads are split by reshape and
  attention runs on scaled_dot_product_attention.
* Three modules the reference builds but never calls (ProtoGNN.norm/lin/proto_mlp, 919,552 parameters) are not
  built, so parameter counts are the spec's minus 919,552 (and with the hazard head plus 3,076 - 768).
* Kept from the reference: during training the prototype branch and the fusion context see a random subset of
  at most ``max_train_nodes`` = 25,000 nodes (drawn from torch's global RNG, so the run seed fixes it); eval
  uses every node; ``max_train_nodes=None`` disables it. :meth:`ProtoSurv.policies` writes the cap, its seed and
  how many training bags it cut into the run record. Not implemented: the reference dataset's training-time
  graph augmentation (feature noise, node and edge dropping).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.models.graph_mil import DeepGCNStack, graph_edges
from milbench.models.layers.attention import key_attention
from milbench.models.layers.clustering import kmeans, nearest_centroid
from milbench.models.layers.common import HazardHead, ModelOutput, upcast
from milbench.models.registry import register_model


class PrototypeCrossAttention(nn.Module):
    """ProtoSurv's cross-attention block: prototypes (queries) read tokens (keys/values).

    Per-head LayerNorm (no affine) on queries and keys, softmax attention, output projection + dropout,
    x = x + LN(attention); then x = x + LN(dropout(MLP(x))) with MLP = Linear -> LayerNorm -> GELU -> Linear.
    """

    def __init__(self, dim: int, kv_dim: int, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"prototype width {dim} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.attn_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.mlp_norm = nn.LayerNorm(dim)

    def _heads(self, x: torch.Tensor, norm: bool) -> torch.Tensor:
        b, n, d = x.shape
        x = x.reshape(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)
        return F.layer_norm(x, x.shape[-1:]) if norm else x

    def forward(self, protos: torch.Tensor, tokens: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``protos`` [B, P, dim] attend to ``tokens`` [B, N, kv_dim] -> (protos, attention per token [B, N])."""
        q, k = self._heads(self.q(protos), norm=True), self._heads(self.k(tokens), norm=True)
        v = self._heads(self.v(tokens), norm=False)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(protos.shape)
        x = protos + self.attn_norm(self.out(y))
        x = x + self.mlp_norm(self.mlp(x))
        return x, key_attention(q, k) if need_weights else None


@register_model("protosurv")
class ProtoSurv(nn.Module):
    """GNN branch (pre_fc, 3 GENConv layers, post_fc), prototype branch (per-type means -> 8 prototypes per type,
    each type refined by cross-attention to all patches), fusion (prototypes attend to the GNN node tokens),
    mean over prototypes, head; auxiliary compatibility and orthogonality losses while training."""

    def __init__(self, in_dim: int, n_bins: int = 4, hidden: int = 128, n_gcn_layers: int = 3,
                 dim_proto: int = 768, proto_hidden: int = 512, n_types: int = 5, protos_per_type: int = 8,
                 proto_iters: int = 2, proto_heads: int = 3, fusion_layers: int = 4, fusion_heads: int = 3,
                 dropout: float = 0.25, proto_dropout: float = 0.2, comp_alpha: float = 0.01,
                 ortho_beta: float = 0.1, max_train_nodes: int | None = 25_000, head: str = "hazard",
                 prior_samples: int = 200_000, prior_iters: int = 50, prior_seed: int = 0) -> None:
        super().__init__()
        if head not in ("hazard", "cox"):
            raise ValueError(f"ProtoSurv head must be 'hazard' or 'cox', not {head!r}")
        self.head_kind, self.n_types, self.protos_per_type = head, n_types, protos_per_type
        self.proto_iters = proto_iters
        self.comp_alpha, self.ortho_beta, self.max_train_nodes = comp_alpha, ortho_beta, max_train_nodes
        self.prior_samples, self.prior_iters, self.prior_seed = prior_samples, prior_iters, prior_seed
        self.subsampled_cases: set[str] = set()  # training bags cut to max_train_nodes, for the run record
        self.prior_source = "none"  # how fit_priors got the tissue priors, for the run record
        # tissue priors: one centroid per type, fitted on the training fold (fit_priors)
        self.register_buffer("centroids", torch.zeros(n_types, in_dim))
        self.register_buffer("priors_fitted", torch.tensor(False))
        # GNN branch
        self.pre_fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))
        self.gcn = DeepGCNStack(hidden, n_gcn_layers, nn.GELU)
        self.post_fc = nn.Sequential(nn.Linear(hidden * (n_gcn_layers + 1), dim_proto), nn.LayerNorm(dim_proto),
                                     nn.GELU(), nn.Dropout(dropout), nn.Linear(dim_proto, dim_proto))
        # prototype branch: type means -> prototypes (mean + learned spread), refined per type over all patches
        self.proto_mlp = nn.Sequential(nn.Linear(in_dim, dim_proto), nn.LayerNorm(dim_proto), nn.GELU(),
                                       nn.Dropout(proto_dropout))
        self.proto_logsigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_types, 1, dim_proto)))
        self.proto_offsets = nn.Parameter(torch.randn(n_types, protos_per_type, dim_proto))
        self.refine = nn.ModuleList(
            PrototypeCrossAttention(dim_proto, in_dim, proto_hidden, proto_heads, proto_dropout)
            for _ in range(n_types * proto_iters))
        # fusion: prototypes attend to the GNN node tokens
        self.fusion = nn.ModuleList(
            PrototypeCrossAttention(dim_proto, dim_proto, proto_hidden, fusion_heads, proto_dropout)
            for _ in range(fusion_layers))
        # head
        self.pred_norm = nn.LayerNorm(dim_proto, elementwise_affine=False)
        self.head = HazardHead(dim_proto, n_bins) if head == "hazard" else nn.Linear(dim_proto, 1, bias=False)
        # prototypes mapped back to feature space for the compatibility and orthogonality losses
        self.mlp_comp = nn.Sequential(nn.Linear(dim_proto, in_dim, bias=False), nn.LayerNorm(in_dim), nn.GELU(),
                                      nn.Linear(in_dim, in_dim, bias=False))

    @torch.no_grad()
    def fit_priors(self, train_bags: list[Bag]) -> None:
        """Fit the tissue priors on the training fold only: per-type means of user-supplied tissue labels when
        every bag has them, else k-means (k = n_types, in torch on the model's device) on at most
        ``prior_samples`` training patches drawn evenly from the bags with ``prior_seed``."""
        if not train_bags:
            raise MilbenchError("protosurv: fit_priors got no training bags")
        labelled = ["tissue_labels" in b.extras for b in train_bags]
        if any(labelled) and not all(labelled):
            case = train_bags[labelled.index(False)].case_id
            raise MilbenchError(f"case {case}: tissue labels are given for some training bags but not this one; "
                                "supply bag.extras['tissue_labels'] for all bags or for none")
        device = self.centroids.device
        if all(labelled):  # per-type means, accumulated bag by bag
            sums = torch.zeros_like(self.centroids)
            counts = torch.zeros(self.n_types, 1, device=device)
            for b in train_bags:
                labels = self._user_labels(b).to(device)
                sums.index_add_(0, labels, b.features["20x"].to(device, torch.float32))
                counts += torch.bincount(labels, minlength=self.n_types).unsqueeze(1)
            overall = sums.sum(0) / counts.sum().clamp_min(1)
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1), overall)  # unseen type: overall mean
            self.prior_source = "user tissue labels: per-type means over every training patch"
        else:
            gen = torch.Generator().manual_seed(self.prior_seed)
            per_bag = max(1, math.ceil(self.prior_samples / len(train_bags)))
            parts = []
            for b in train_bags:
                feats = b.features["20x"]
                pick = torch.randperm(feats.shape[0], generator=gen)[:per_bag]
                parts.append(feats[pick.to(feats.device)].to(device, torch.float32))
            sample = torch.cat(parts)
            centroids, _ = kmeans(sample, self.n_types, self.prior_iters, self.prior_seed)
            self.prior_source = (f"k-means on {len(sample)} training patches, at most {per_bag} drawn per bag with "
                                 f"prior_seed={self.prior_seed}")
        self.centroids.copy_(centroids)
        self.priors_fitted.fill_(True)

    def _user_labels(self, bag: Bag) -> torch.Tensor:
        labels = bag.extras["tissue_labels"]
        n = bag.n_patches("20x")
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise MilbenchError(f"case {bag.case_id}: tissue_labels must be an integer tensor of shape [{n}]")
        if n and (labels.min() < 0 or labels.max() >= self.n_types):
            raise MilbenchError(f"case {bag.case_id}: tissue labels must lie in 0..{self.n_types - 1}")
        return labels.long()

    def tissue_types(self, bag: Bag) -> torch.Tensor:
        """Per-patch tissue type [N]: the user's labels, else the nearest fitted centroid."""
        if "tissue_labels" in bag.extras:
            return self._user_labels(bag).to(self.centroids.device)
        if not bool(self.priors_fitted):
            raise MilbenchError(f"case {bag.case_id}: protosurv has no tissue priors; call fit_priors(train_bags) "
                                "before training, or supply bag.extras['tissue_labels']")
        return nearest_centroid(bag.features["20x"], self.centroids)

    def type_means(self, x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """Mean raw feature of each tissue type [n_types, D]; all-zero rows are left out; a type the patient lacks
        takes its training-fold prior (pre-prototype), or the patient's mean before priors are fitted. Summed in
        float32 (half-precision sums over 100k patches overflow)."""
        x = upcast(x)
        keep = (x != 0).any(1)
        counts = torch.bincount(types[keep], minlength=self.n_types).unsqueeze(1)
        sums = x.new_zeros(self.n_types, x.shape[1]).index_add_(0, types[keep], x[keep])
        fallback = torch.where(self.priors_fitted, self.centroids, x.mean(0))
        return torch.where(counts > 0, sums / counts.clamp_min(1), fallback)

    def policies(self) -> dict[str, Any]:
        """Large-bag policies for the run record (milbench.engine.fit_fold): the training-time node cap with its seed
        and the number of distinct training bags it has cut so far, the tissue-prior sample, and the GNN's
        checkpointing."""
        applies = ("training forward passes only: the prototype branch's keys and the fusion context each see an "
                   "independent random subset of at most cap nodes; the GNN and evaluation use every node")
        return {
            "max_train_nodes": {
                "cap": self.max_train_nodes,
                "applies_to": applies if self.max_train_nodes is not None else "nothing: no cap, every node is used",
                "seed": "torch's global RNG, seeded per fold with the run seed + fold",
                "bags_subsampled": len(self.subsampled_cases),
            },
            "tissue_priors": self.prior_source,
            **self.gcn.policies(),
        }

    def _subsample(self, bag: Bag, n: int, device: torch.device) -> torch.Tensor | None:
        """Training-time node subset for the attention branches (reference: <= 25,000 nodes), None = all."""
        if not self.training or self.max_train_nodes is None or n <= self.max_train_nodes:
            return None
        self.subsampled_cases.add(bag.case_id)
        return torch.randperm(n, device=device)[: self.max_train_nodes].sort().values

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        x = bag.features["20x"]
        n = x.shape[0]
        edge_index = graph_edges(bag, "protosurv")
        types = self.tissue_types(bag)
        # prototype branch: 8 prototypes per type, each type refined by attending to (a subset of) all patches
        sub = self._subsample(bag, n, x.device)
        keys, key_types = (x, types) if sub is None else (x[sub], types[sub])
        mu = self.proto_mlp(self.type_means(keys, key_types))
        protos = mu.unsqueeze(1) + self.proto_logsigma.exp() * self.proto_offsets  # [n_types, per_type, dim]
        refined = []
        for t in range(self.n_types):
            p = protos[t].unsqueeze(0)
            for layer in self.refine[t * self.proto_iters : (t + 1) * self.proto_iters]:
                p, _ = layer(p, keys.unsqueeze(0))
            refined.append(p)
        prototypes = torch.cat(refined, dim=1)  # [1, n_types * per_type, dim]
        # GNN branch: node context tokens
        tokens = self.post_fc(self.gcn(self.pre_fc(x), edge_index))
        ctx_sub = self._subsample(bag, n, x.device)
        context = (tokens if ctx_sub is None else tokens[ctx_sub]).unsqueeze(0)
        # fusion: prototypes attend to the node tokens
        fused, weights = prototypes, None
        for i, layer in enumerate(self.fusion):
            fused, weights = layer(fused, context, need_weights=return_attention and i == len(self.fusion) - 1)
        logits = self.head(self.pred_norm(fused.mean(dim=1)))
        aux = self.prototype_losses(x, types, self.mlp_comp(prototypes[0])) if self.training else None
        attention = {}
        if return_attention:
            a = weights[0]
            attention["20x"] = a if ctx_sub is None else torch.zeros(n, device=a.device).index_copy_(0, ctx_sub, a)
        return ModelOutput(logits, aux, attention)

    def prototype_losses(self, x: torch.Tensor, types: torch.Tensor, protos: torch.Tensor) -> torch.Tensor | None:
        """comp_alpha * compatibility + ortho_beta * orthogonality, on the prototypes mapped to feature space."""
        loss = None
        if self.comp_alpha:
            loss = self.comp_alpha * self.compatibility_loss(x.float(), types, protos.float())
        if self.ortho_beta:
            ortho = self.ortho_beta * orthogonality_loss(protos.float())
            loss = ortho if loss is None else loss + ortho
        return loss

    def compatibility_loss(self, x: torch.Tensor, types: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """Pull each patch to its own type's prototypes, push it from the others: with d[i, t] the mean L2
        distance of patch i to type t's prototypes, (sum_i d[i, own] + logsumexp(-d[other types])) / (N * T)."""
        n = x.shape[0]
        d = torch.cdist(x, protos).reshape(n, self.n_types, self.protos_per_type).mean(-1)  # [N, T]
        own = F.one_hot(types, self.n_types).bool()
        return (d[own].sum() + torch.logsumexp(-d[~own], dim=0)) / (n * self.n_types)


def orthogonality_loss(p: torch.Tensor) -> torch.Tensor:
    """|| P^T P / ||P^T P||_F - I / ||I||_F ||_F for prototypes P [K, D], via the K x K Gram matrix:
    it equals sqrt(2 - 2 ||P||_F^2 / (||P P^T||_F sqrt(D))), with no D x D matrix."""
    gram = p @ p.T
    return (2.0 - 2.0 * (p * p).sum() / (gram.norm() * math.sqrt(p.shape[1]))).clamp_min(1e-12).sqrt()
