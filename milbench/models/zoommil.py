"""ZoomMIL: differentiable zooming MIL (Thandiackal et al., ECCV 2022), as a discrete-time survival model (spec §10).

Three magnifications of a x2 pyramid (5x -> 10x -> 20x). At each but the highest, gated attention pools the
patches into a bag embedding while a second, auxiliary gated attention picks the k patches to zoom into with a
perturbed (differentiable) top-k; the next magnification sees only the children of the picked patches. The three
bag embeddings are summed and the classification layer is the shared hazard head.

Children come from the cross-scale index (``children_*_of_5x``, depth-first, missing children as zero vectors, spec
§2.2), so every low patch has exactly 4 mid and 16 high children and the zoom steps always select the right rows.
Zooming is computed on the selected 5x patches only (einsum over the support of the selection matrix), which is the
reference's dense Kronecker product without materialising it.

Training: the perturbed top-k's backward is the authors' (``topk_grad="authors"``, the default): ZoomMIL's code, like
the differentiable patch-selection code it comes from (Cordonnier et al. 2021), keeps only the diagonal terms of the
Jacobian of the perturbed indicator. ``topk_grad="full"`` is the perturbed-maximum estimator of Berthet et al. (2020),
the unbiased gradient of the smoothed top-k the forward computes; the authors' estimate is biased (on the golden
fixture's scores its expectation has cosine 0.49-0.59 with that gradient), though at ZoomMIL's 100 samples both are
about as noisy per step (relative error ~1). Both use the same noise and give the same forward.

Attention maps (``return_attention=True``), each on the patches of its magnification:
``"5x"`` the G1 pooling weights [N5]; ``"10x"`` / ``"20x"`` the G2 / G3 pooling weights of the zoomed patches,
attributed back through the selection matrices to the patches they came from ([N10], [N20], zero where never
zoomed into); ``"5x_zoom"`` / ``"10x_zoom"`` the auxiliary A1 / A2 selection scores ([N5]; [N10], on zoomed patches).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.data.multiscale import bag_index, take_rows
from milbench.models.layers.common import HazardHead, ModelOutput, mlp, upcast
from milbench.models.layers.pooling import AttentionPool, GatedAttention
from milbench.models.layers.topk import TOPK_GRADS, perturbed_topk
from milbench.models.registry import register_model


@register_model("zoommil")
class ZoomMIL(nn.Module):
    def __init__(self, in_dim: int, n_bins: int = 4, hidden: int = 512, attn_dim: int = 256, dropout: float = 0.25,
                 k: int = 12, sigma: float = 0.002, n_samples: int = 100, topk_grad: str = "authors") -> None:
        super().__init__()
        if topk_grad not in TOPK_GRADS:
            raise MilbenchError(f"ZoomMIL topk_grad must be one of {', '.join(TOPK_GRADS)}, not {topk_grad!r}")
        self.k, self.sigma, self.n_samples, self.topk_grad = k, sigma, n_samples, topk_grad
        # 1. low magnification: projection, gated attention pooling G1, auxiliary selection attention A1
        self.proj_low = mlp([in_dim, hidden], dropout=dropout)
        self.pool_low = AttentionPool(hidden, attn_dim, dropout)
        self.select_low = GatedAttention(hidden, attn_dim, dropout)
        # 5. mid magnification: projection, G2, A2
        self.proj_mid = mlp([in_dim, hidden], dropout=dropout)
        self.pool_mid = AttentionPool(hidden, attn_dim, dropout)
        self.select_mid = GatedAttention(hidden, attn_dim, dropout)
        # 6. high magnification: projection, G3
        self.proj_high = mlp([in_dim, hidden], dropout=dropout)
        self.pool_high = AttentionPool(hidden, attn_dim, dropout)
        # 7. M1 + M2 + M3 -> hazard head
        self.head = HazardHead(hidden, n_bins)

    def _select(self, scorer: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3: softmax of the auxiliary attention [N] and its top-k selection matrix [k, N] (perturbed in
        training, hard in eval)."""
        scores = torch.softmax(upcast(scorer(h)), dim=0)
        return scores, perturbed_topk(scores, self.k, self.n_samples, self.sigma, differentiable=self.training,
                                      grad=self.topk_grad)

    def forward(self, bag: Bag, return_attention: bool = False) -> ModelOutput:
        index = bag_index(bag, "children_10x_of_5x", "children_20x_of_5x")
        x_low = bag.features["5x"]
        # 1. low magnification
        h1 = self.proj_low(x_low)
        m1, a1 = self.pool_low(h1)
        # 2-3. which low patches to zoom into
        z1, sel1 = self._select(self.select_low, h1)
        support = sel1.detach().sum(0).nonzero().squeeze(1)  # low patches with any selection weight
        s1 = sel1[:, support].to(x_low.dtype)
        # 4. zoom: (selection (x) I_4) x_mid and (selection (x) I_16) x_high, on the support only
        kids_mid, kids_high = index["children_10x_of_5x"][support], index["children_20x_of_5x"][support]
        x_mid = torch.einsum("ks,srd->krd", s1, take_rows(bag.features["10x"], kids_mid)).flatten(0, 1)
        x_high = torch.einsum("ks,srd->krd", s1, take_rows(bag.features["20x"], kids_high))
        x_high = x_high.reshape(x_mid.shape[0], 4, -1)  # depth-first: 4 high children per zoomed mid patch
        # 5. mid magnification on the zoomed patches, then zoom again (selection (x) I_4)
        h2 = self.proj_mid(x_mid)
        m2, a2 = self.pool_mid(h2)
        z2, sel2 = self._select(self.select_mid, h2)
        x_high = torch.einsum("kj,jcd->kcd", sel2.to(x_high.dtype), x_high).flatten(0, 1)
        # 6. high magnification on the twice-zoomed patches
        h3 = self.proj_high(x_high)
        m3, a3 = self.pool_high(h3)
        # 7. sum of the three bag embeddings -> hazard logits
        logits = self.head(m1 + m2 + m3)
        if not return_attention:
            return ModelOutput(logits)
        maps = _maps(bag, a1, a2, a3, z1, z2, sel1[:, support], sel2, kids_mid, kids_high)
        return ModelOutput(logits, None, maps)


@torch.no_grad()
def _maps(bag: Bag, a1, a2, a3, z1, z2, s1, sel2, kids_mid, kids_high) -> dict[str, torch.Tensor]:
    """Pooling (a*) and selection (z*) weights per magnification, attributed back to the patches they came from
    through the selection matrices (exact in eval, where they are one-hot)."""
    s1, sel2 = s1.float(), sel2.float()
    k1 = s1.shape[0]
    with torch.autocast(s1.device.type, enabled=False):  # maps in float32 also under bf16 autocast
        mid_slots = torch.einsum("ks,km->sm", s1, a2.float().view(k1, 4))
        high = (sel2.T @ a3.float().view(-1, 4)).view(k1, 4, 4)
        high_slots = torch.einsum("ks,kmc->smc", s1, high).flatten(1)
        zoom_mid = torch.einsum("ks,km->sm", s1, z2.detach().float().view(k1, 4))
    return {
        "5x": a1.detach().float(),
        "10x": _scatter(mid_slots, kids_mid, bag.n_patches("10x")),
        "20x": _scatter(high_slots, kids_high, bag.n_patches("20x")),
        "5x_zoom": z1.detach(),
        "10x_zoom": _scatter(zoom_mid, kids_mid, bag.n_patches("10x")),
    }


def _scatter(slot_values: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-slot values [S, r] onto the patches filling the slots ([S, r] rows, -1 = empty) -> [n]."""
    keep = slots >= 0
    return torch.zeros(n, device=slot_values.device).index_add_(0, slots[keep], slot_values[keep])
