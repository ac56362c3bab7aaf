"""Differentiable top-k selection (ZoomMIL's zoom step): the perturbed top-k indicator of Berthet et al. (2020)
with the authors' or the full backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


TOPK_GRADS = ("authors", "full")


class _PerturbedTopK(torch.autograd.Function):
    """Perturbed top-k indicator (Berthet et al. 2020; Cordonnier et al. 2021), as ZoomMIL trains with it.

    Forward: mean over ``n`` Gaussian perturbations Z_s of the one-hot top-k indicator Y_s = Y(scores + sigma Z_s)
    [k, N] (rows = the selected indices in increasing order). Backward, for an upstream gradient g [k, N]:

    * ``"authors"``: ZoomMIL's code (zoommil/utils/perturbedtopk.py) and the code it comes from (Cordonnier et al.'s
      ptopk_patch_selection): for position d, sum_s sum_k g[k, d] Y_s[k, d] Z_s[d] / (n sigma), the diagonal terms
      dy[k, d] / dscores[d] of the Jacobian only.
    * ``"full"``: the perturbed-maximum estimator sum_s Z_s[d] <g, Y_s> / (n sigma), by Stein's lemma an unbiased
      estimate of the gradient of the smoothed indicator the forward computes (Berthet et al., Prop. 3.1).

    Both need only each sample's k indices and its noise (O(n N) memory, not the [n, k, N] one-hot tensor).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, n: int, sigma: float, grad: str) -> torch.Tensor:
        noise = torch.randn(n, scores.shape[0], device=scores.device, dtype=scores.dtype)
        idx = torch.topk(scores + sigma * noise, k, dim=-1).indices.sort(dim=-1).values  # [n, k]
        indicator = torch.zeros(k, scores.shape[0], device=scores.device, dtype=scores.dtype)
        indicator.scatter_add_(1, idx.T, torch.full((k, n), 1.0 / n, device=scores.device, dtype=scores.dtype))
        ctx.save_for_backward(idx, noise)
        ctx.sigma, ctx.grad = sigma, grad
        return indicator

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, noise = ctx.saved_tensors  # [n, k], [n, N]
        n = noise.shape[0]
        g = grad.gather(1, idx.T).T  # g[k, idx(s, k)] -> [n, k]
        if ctx.grad == "full":  # Z_s <g, Y_s>, summed over samples
            out = noise.T @ g.sum(1)
        else:  # g[k, d] Z_s[d] where sample s put d in row k, summed onto d
            out = torch.zeros_like(noise[0]).index_add_(0, idx.reshape(-1), (g * noise.gather(1, idx)).reshape(-1))
        return out / (n * ctx.sigma), None, None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, n_samples: int = 100, sigma: float = 0.002,
                   differentiable: bool = True, grad: str = "authors") -> torch.Tensor:
    """Selection matrix [k, N] of the top-k of ``scores`` [N], indices in increasing order (ZoomMIL's zoom step).

    ``differentiable=True`` (training): the perturbed top-k, a soft average of one-hot rows with a gradient, whose
    backward is ``grad`` (``"authors"`` or ``"full"``, see :class:`_PerturbedTopK`).
    ``differentiable=False`` (eval): the hard, deterministic one-hot top-k.
    Computed in float32, or in float64 for float64 scores.
    """
    if grad not in TOPK_GRADS:
        raise ValueError(f"perturbed top-k grad must be one of {', '.join(TOPK_GRADS)}, not {grad!r}")
    k = min(k, scores.shape[0])
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if differentiable:
        return _PerturbedTopK.apply(scores.to(dtype), k, n_samples, sigma, grad)
    idx = torch.topk(scores.detach().to(dtype), k).indices.sort().values
    return F.one_hot(idx, scores.shape[0]).to(dtype)
