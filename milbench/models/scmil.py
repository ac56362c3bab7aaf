"""SCMIL: sparse context-aware MIL (Yang et al., MICCAI 2024, arXiv 2407.00664) as a discrete-time survival model.

Official configuration (cluster size 64, feature weight 0.8, one attention layer, dropout 0.25, SoftFilter on):
  1. SoftFilter: s = sigmoid(Linear(256 -> 1)(GELU(Linear(D -> 256) x))) per patch; x~ = x * s.
  2. Patches with s > 0.5 are kept for context attention; the rest pass through as x~.
  3. Cluster-local attention on the kept patches (when there are at least two):
     a. k-means (k-means++ seeding, 5 Lloyd iterations, seed 1) with k = max(1, floor(L / 64)) clusters on
        [0.8 z(x~), 0.2 z(coords)], z a scalar z-score over the whole tensor (not per column) with the unbiased
        standard deviation (torch.std, as the reference);
     b. tokens stably sorted by cluster; a cluster of 128 patches or more is cut into floor(size / 64) consecutive,
        nearly equal windows (sizes differ by at most one), so every window holds at most 127 patches;
     c. within each window: 8-head self-attention at width D (q/k/v/out with bias, dropout 0.25 on the
        probabilities and after the output), added to its input (no LayerNorm anywhere).
  4-5. Gated attention pooling (256, dropout 0.25) over attended kept + rest patches.
  6. Head: the shared hazard head Linear(D -> n_bins) (default), or ``head="mdn"``: the official SurvivalMDN.

The clusters are computed per bag in every forward pass (they depend on the trained SoftFilter), in torch on the
bag's device, from that bag alone: nothing is fitted across patients, so nothing leaks between folds. They are
deterministic given ``seed`` on a given device. The windows are batched into one masked SDPA call. The reference's
k-means (cuML) also stops at tol 1e-4; here it stops when no label changes (at most 5 iterations). Bags with
several slides are clustered together on their stored coordinates, as the reference clusters one slide.

Parameter counts: the reference also builds fc1 (Linear(D -> D), skipped when the SoftFilter is on) and a
``SelfAttention`` module it never calls, 5 D^2 + 5 D dead weights (5,248,000 at D = 1024, 20,981,760 at 2048).
They are not built here: this model has the reference's used parameters, 4,990,214 at 1024 and 18,367,750 at
2048 (reference totals 10,238,214 and 39,349,510). The attention runs at the input width, so counts grow with D^2.

MDN head (``head="mdn"``, ``head_kind`` "mdn"): ``logits`` is then [1, 3, K] = (mixture logits, means, scales) of a
K = 100 component Gaussian mixture over inverse-softplus(time in months), not hazard logits. The engine trains it with
``milbench.survival.losses.mdn_nll`` (the official loss: -log density for events, -log S(t) for censored; config
``loss=mdn``, chosen by itself with ``--set head=mdn``) and evaluates it with ``mdn_survival``: S at the right edges of
the fold's time bins gives the survival curve in the same place as the discrete models', and risk = -sum of it.

Attention map (``return_attention=True``): ``"20x"`` [N], the gated-attention pooling weights in patch order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.models.layers.attention import WindowedSelfAttention
from milbench.models.layers.clustering import kmeans
from milbench.models.layers.common import HazardHead, ModelOutput, mlp
from milbench.models.layers.pooling import AttentionPool
from milbench.models.registry import register_model


class SoftFilter(nn.Module):
    """Per-patch gate s in (0, 1): x~ = x * s; patches with s > 0.5 take part in the context attention."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.score = mlp([dim, hidden, 1], act=nn.GELU, last_act=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [N, D] -> (gated features [N, D], kept mask [N])."""
        s = torch.sigmoid(self.score(x))
        return x * s, s.squeeze(1) > 0.5


def zscore(t: torch.Tensor) -> torch.Tensor:
    """Scalar z-score over the whole tensor (one mean and one standard deviation, not per column), with the unbiased
    standard deviation (``torch.std``'s default) as the reference's models/SCMIL.py does (lines 80 and 83)."""
    return (t - t.mean()) / t.std().clamp_min(1e-6)


def cluster_windows(labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort tokens by cluster label (stable) and cut clusters of >= 2 * size into floor(n / size) near-equal windows.

    Returns (token order [L], window lengths [W] in that order).
    """
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    pieces = torch.where(counts >= 2 * size, counts // size, torch.ones_like(counts))
    cluster = torch.repeat_interleave(torch.arange(len(counts), device=labels.device), pieces)
    rank = torch.arange(len(cluster), device=labels.device) - (torch.cumsum(pieces, 0) - pieces)[cluster]
    lengths = counts[cluster] // pieces[cluster] + (rank < counts[cluster] % pieces[cluster]).long()
    return order, lengths


class ClusterLocalAttention(nn.Module):
    """k-means windows over (features, coordinates), self-attention within each window, residual add."""

    def __init__(self, dim: int, n_heads: int = 8, cluster_size: int = 64, feature_weight: float = 0.8,
                 dropout: float = 0.25, seed: int = 1) -> None:
        super().__init__()
        self.cluster_size, self.feature_weight, self.seed = cluster_size, feature_weight, seed
        self.attn = WindowedSelfAttention(dim, n_heads, attn_dropout=dropout, proj_dropout=dropout)

    @torch.no_grad()
    def windows(self, x: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster ``x`` [L, D] with ``coords`` [L, 2]: (token order [L], window lengths [W])."""
        z = torch.cat([self.feature_weight * zscore(x.float()), (1 - self.feature_weight) * zscore(coords.float())], 1)
        with torch.autocast(x.device.type, enabled=False):  # float32 distances, no per-step casts under bf16
            _, labels = kmeans(z, max(1, len(x) // self.cluster_size), iters=5, seed=self.seed)
        return cluster_windows(labels, self.cluster_size)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [L, D] -> (attended tokens in cluster order [L, D], that order [L])."""
        order, lengths = self.windows(x, coords)
        x = x[order]
        return x + self.attn(x, lengths), order


class SurvivalMDN(nn.Module):
    """SCMIL's official head: a K-component Gaussian mixture over inverse-softplus(time), weights from the bag.

    Means and scales are shared learnable vectors (init linspace(0, 200, K) and 1), each through Linear(K -> K);
    means clamped to [-200, 200], scales = softplus clamped to [0.01, 100]. Returns [B, 3, K].
    """

    def __init__(self, dim: int, n_components: int = 100, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.weights = mlp([dim, hidden, hidden, n_components], dropout=dropout, act=nn.GELU, last_act=False)
        self.mu_init = nn.Parameter(torch.linspace(0, 200, n_components))
        self.mu = nn.Linear(n_components, n_components)
        self.sigma_init = nn.Parameter(torch.ones(n_components))
        self.sigma = nn.Linear(n_components, n_components)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weights(z)
        mu = self.mu(self.mu_init).clamp(-200, 200).expand_as(w)
        sigma = F.softplus(self.sigma(self.sigma_init)).clamp(0.01, 100).expand_as(w)
        return torch.stack([w, mu, sigma], dim=1)


@register_model("scmil")
class SCMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, n_heads: int = 8, cluster_size: int = 64,
                 feature_weight: float = 0.8, dropout: float = 0.25, attn_dim: int = 256, seed: int = 1,
                 head: str = "hazard", n_components: int = 100) -> None:
        super().__init__()
        if head not in ("hazard", "mdn"):
            raise ValueError(f"SCMIL head must be 'hazard' or 'mdn', not {head!r}")
        self.head_kind = head  # what the engine trains and reads (milbench.survival.losses)
        # 1-2. SoftFilter
        self.soft_filter = SoftFilter(in_dim)
        # 3. cluster-local attention at the input width
        self.context = ClusterLocalAttention(in_dim, n_heads, cluster_size, feature_weight, dropout, seed)
        # 5. gated attention pooling
        self.pool = AttentionPool(in_dim, attn_dim, dropout=dropout)
        # 6. survival head
        self.head = HazardHead(in_dim, n_bins) if head == "hazard" else SurvivalMDN(in_dim, n_components)

    def policies(self) -> dict[str, str]:
        """Large-bag policy for the run record (milbench.engine.fit_fold): the method's own windowed attention."""
        size = self.context.cluster_size
        return {"cluster_windows": f"self-attention only within windows of at most {2 * size - 1} patches of one "
                                   f"k-means cluster (the method's sparse attention, memory linear in the bag; k-means "
                                   f"seed {self.context.seed}); every patch is used"}

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        x = bag.features["20x"]
        if "20x" not in bag.coords:
            raise MilbenchError(f"scmil clusters patches on their coordinates, but case {bag.case_id} has no 20x "
                                "coordinates: use h5 feature files (with a coords dataset)")
        gated, kept = self.soft_filter(x)
        kept_idx, rest_idx = kept.nonzero().squeeze(1), (~kept).nonzero().squeeze(1)
        context = gated[kept_idx]
        if len(kept_idx) > 1:
            context, order = self.context(context, bag.coords["20x"][kept_idx])
            kept_idx = kept_idx[order]
        # 4. attended kept patches, then the rest
        z, a = self.pool(torch.cat([context, gated[rest_idx]]))
        out = self.head(z)
        if not return_attention:
            return ModelOutput(out)
        patch_order = torch.cat([kept_idx, rest_idx])
        return ModelOutput(out, None, {"20x": torch.zeros_like(a).index_copy_(0, patch_order, a).detach().float()})
