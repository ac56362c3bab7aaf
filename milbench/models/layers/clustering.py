"""Clustering in torch (runs wherever the tensors live, GPU included): k-means for ProtoSurv's tissue priors and
SCMIL's on-the-fly clusters."""

from __future__ import annotations

import torch


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for each row of ``x`` [N, D] -> [N] long, in bounded memory."""
    x, c = x.float(), centroids.float()
    c_sq = (c * c).sum(1)
    rows = max(1, chunk // max(1, c.shape[0]))
    out = [(c_sq - 2.0 * xs @ c.T).argmin(1) for xs in x.split(rows)]  # ||x||^2 is constant per row
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on ``x`` [N, D]: returns (centroids [k, D] float32, labels [N]).

    Deterministic for a given ``seed`` (its own generator, global RNG untouched). Stops early when no label
    changes; an empty cluster keeps its previous centroid. Labels are the assignment to the returned centroids.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k} for N={n} points")
    x = x.float()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    # k-means++ seeding: each next centre drawn with probability proportional to its squared distance
    x_sq = (x * x).sum(1)

    def sq_dist(i: torch.Tensor) -> torch.Tensor:  # squared distance of every point to point i, as a mat-vec
        return (x_sq - 2.0 * (x @ x[i].T).squeeze(1) + x_sq[i]).clamp_min(0)

    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centroids, d2 = x[first], sq_dist(first)
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        nxt = torch.multinomial(weights, 1, generator=gen)
        centroids = torch.cat([centroids, x[nxt]])
        d2 = torch.minimum(d2, sq_dist(nxt))
    labels = nearest_centroid(x, centroids)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        new = nearest_centroid(x, centroids)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels
