"""Differentiable top-k selection (ZoomMIL's zoom step): the perturbed maximum of Berthet et al. (2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _PerturbedTopK(torch.autograd.Function):
    """Perturbed maximum (Berthet et al. 2020) of the top-k indicator, as ZoomMIL uses it.

    Forward: mean over ``n`` Gaussian perturbations of the one-hot top-k indicator [k, N] (rows = the selected
    indices in increasing order). Backward: the Monte-Carlo estimate E[indicator * noise] / sigma, which only needs
    each sample's k indices and its noise (O(n N) memory, not the [n, k, N] one-hot tensor).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, n: int, sigma: float) -> torch.Tensor:
        noise = torch.randn(n, scores.shape[0], device=scores.device, dtype=scores.dtype)
        idx = torch.topk(scores + sigma * noise, k, dim=-1).indices.sort(dim=-1).values  # [n, k]
        indicator = torch.zeros(k, scores.shape[0], device=scores.device, dtype=scores.dtype)
        indicator.scatter_add_(1, idx.T, torch.full((k, n), 1.0 / n, device=scores.device, dtype=scores.dtype))
        ctx.save_for_backward(idx, noise)
        ctx.sigma = sigma
        return indicator

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, noise = ctx.saved_tensors
        per_sample = grad.gather(1, idx.T).sum(0)  # <grad, one-hot of sample s> -> [n]
        return noise.T @ per_sample / (noise.shape[0] * ctx.sigma), None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, n_samples: int = 100, sigma: float = 0.002,
                   differentiable: bool = True) -> torch.Tensor:
    """Selection matrix [k, N] of the top-k of ``scores`` [N], indices in increasing order (ZoomMIL's zoom step).

    ``differentiable=True`` (training): the perturbed top-k, a soft average of one-hot rows with a gradient.
    ``differentiable=False`` (eval): the hard, deterministic one-hot top-k.
    """
    k = min(k, scores.shape[0])
    if differentiable:
        return _PerturbedTopK.apply(scores.float(), k, n_samples, sigma)
    idx = torch.topk(scores.detach().float(), k).indices.sort().values
    return F.one_hot(idx, scores.shape[0]).float()
