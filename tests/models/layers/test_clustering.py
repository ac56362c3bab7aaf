import pytest
import torch

from milbench.models.layers.clustering import kmeans, nearest_centroid


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    truth = torch.arange(3).repeat_interleave(40)
    return centres[truth] + 0.3 * torch.randn(120, 3, generator=g), truth


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs()
    centroids, labels = kmeans(x, 3, iters=20, seed=0)
    assert centroids.shape == (3, 3) and labels.shape == (120,)
    for c in range(3):  # each true blob is exactly one cluster
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 3
    assert torch.equal(labels, nearest_centroid(x, centroids))


def test_kmeans_is_deterministic_per_seed_and_leaves_global_rng_alone():
    x, _ = blobs()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = kmeans(x, 4, seed=7)
    assert torch.equal(torch.rand(1), before)
    b = kmeans(x, 4, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k=5"):
        kmeans(torch.randn(3, 2), 5)
