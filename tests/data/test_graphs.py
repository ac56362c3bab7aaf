import pytest
import torch

from milbench import MilbenchError
from milbench.data.graphs import patch_graph
from milbench.training.prepare import prepare_bag
from milbench.models.registry import get_card
from tests.conftest import nested_bag


def brute_knn(queries: torch.Tensor, points: torch.Tensor, k: int) -> list[set[int]]:
    """Reference kNN by full distance matrix, self excluded (queries[i] is points[i]'s query)."""
    d = torch.cdist(queries.double(), points.double())
    d.fill_diagonal_(float("inf"))
    return [set(row.tolist()) for row in d.topk(min(k, len(points) - 1), largest=False).indices]


def neighbours(edge_index: torch.Tensor, n: int) -> list[set[int]]:
    out = [set() for _ in range(n)]
    for s, t in edge_index.T.tolist():
        out[s].add(t)
    return out


def two_slides(n0: int = 30, n1: int = 25, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(n0 + n1, 2, generator=g) * 1e4).long()
    feats = torch.randn(n0 + n1, dim, generator=g)
    slide = torch.tensor([0] * n0 + [1] * n1)[torch.randperm(n0 + n1, generator=g)]  # interleaved slides
    return feats, coords, slide


def test_spatial_knn_matches_brute_force_per_slide():
    feats, coords, slide = two_slides()
    g = patch_graph(feats, coords, slide, kind="spatial", k=8)
    ei = g["edge_index"]
    assert ei.dtype == torch.long and ei.shape == (2, 8 * len(feats))
    got = neighbours(ei, len(feats))
    for s in (0, 1):
        nodes = (slide == s).nonzero().squeeze(1)
        expected = brute_knn(coords[nodes].float(), coords[nodes].float(), 8)
        for local, node in enumerate(nodes.tolist()):
            assert got[node] == {nodes[j].item() for j in expected[local]}


def test_no_edge_crosses_slides_and_no_self_loops():
    feats, coords, slide = two_slides()
    for kind in ("spatial", "latent"):
        ei = patch_graph(feats, coords, slide, kind=kind, k=8)["edge_index"]
        assert torch.equal(slide[ei[0]], slide[ei[1]])
        assert not (ei[0] == ei[1]).any()


def test_small_slides_connect_to_all_others():
    feats, coords, slide = two_slides(n0=5, n1=1)
    ei = patch_graph(feats, coords, slide, kind="spatial", k=8)["edge_index"]
    got = neighbours(ei, 6)
    small = (slide == 0).nonzero().squeeze(1).tolist()
    for node in small:
        assert got[node] == set(small) - {node}
    lonely = (slide == 1).nonzero().item()
    assert got[lonely] == set() and ei.shape[1] == 5 * 4


def test_duplicate_coordinates_still_drop_self():
    coords = torch.tensor([[0, 0], [0, 0], [0, 0], [5, 5], [9, 9]])
    ei = patch_graph(torch.randn(5, 3), coords, None, kind="spatial", k=2)["edge_index"]
    assert not (ei[0] == ei[1]).any()
    assert neighbours(ei, 5)[0] == {1, 2}


def test_latent_edges_are_feature_space_knn():
    feats, coords, slide = two_slides(n0=40, n1=0, dim=12)
    latent = patch_graph(feats, coords, slide, kind="latent", k=8)["edge_index"]
    assert neighbours(latent, 40) == brute_knn(feats, feats, 8)
    spatial = patch_graph(feats, coords, slide, kind="spatial", k=8)["edge_index"]
    assert neighbours(latent, 40) != neighbours(spatial, 40)


def test_latent_needs_no_coordinates():
    feats = torch.randn(10, 4)
    assert patch_graph(feats, None, None, kind="latent", k=3)["edge_index"].shape == (2, 30)


def test_latent_reference_queries_the_feature_index_with_coordinates():
    feats, coords, _ = two_slides(n0=30, n1=0, dim=5)
    g = patch_graph(feats, coords, None, kind="latent_reference", k=4)
    queries = torch.zeros(30, 5)
    queries[:, :2] = coords.float()
    order = torch.cdist(queries.double(), feats.double()).argsort(dim=1)[:, 1:5]  # first hit dropped, self or not
    assert neighbours(g["edge_index"], 30) == [set(r.tolist()) for r in order]
    assert g["kind"] == "latent_reference" and g["k"] == 4


def test_bad_inputs_raise_one_line_errors():
    feats, coords, slide = two_slides()
    with pytest.raises(MilbenchError, match="kind"):
        patch_graph(feats, coords, slide, kind="radius")
    with pytest.raises(MilbenchError, match="coordinates"):
        patch_graph(feats, None, slide, kind="spatial")
    with pytest.raises(MilbenchError, match="coordinates"):
        patch_graph(feats, coords[:-1], slide, kind="spatial")


def test_prepare_bag_builds_the_cards_graph_once():
    bag = prepare_bag(get_card("deepgraphsurv"), nested_bag(n5=2, in_dim=8))
    graph = bag.extras["graph"]
    assert graph["kind"] == "latent" and graph["k"] == 8
    assert neighbours(graph["edge_index"], 32) == brute_knn(bag.features["20x"], bag.features["20x"], 8)
    assert prepare_bag(get_card("deepgraphsurv"), bag).extras["graph"] is graph
