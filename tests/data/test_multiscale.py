import time

import numpy as np
import pytest
import torch

from milbench import MilbenchError
from milbench.data.multiscale import bag_index, build_index, take_rows
from tests.conftest import PATCH_20X, nested_bag

DEPTH_FIRST = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # raster 4x4 positions in depth-first order


def grid(origin, side, nx, ny):
    return np.array([[origin[0] + i * side, origin[1] + j * side] for j in range(ny) for i in range(nx)])


def as_tensors(coords: dict, slides: dict | None = None):
    c = {s: torch.as_tensor(np.asarray(v), dtype=torch.long).reshape(-1, 2) for s, v in coords.items()}
    sl = {s: torch.as_tensor(slides[s] if slides else np.zeros(len(c[s])), dtype=torch.long) for s in c}
    return c, sl


def brute_parents(child, cside, parent, pside):
    """O(N^2) reference: the parent whose square contains the child's centre, -1 if none."""
    centre = child + cside / 2
    inside = np.all((parent[None] <= centre[:, None]) & (centre[:, None] < parent[None] + pside), axis=2)
    return np.where(inside.any(1), inside.argmax(1), -1)


def test_aligned_nested_grid_parents_and_depth_first_children():
    bag = nested_bag(n5=4)
    ix = build_index(bag.coords, bag.slide_index)
    # nested_bag lists 10x children per 5x patch in raster order and 20x children in 4x4 raster order
    assert ix["parent_5x_of_10x"].tolist() == [i // 4 for i in range(16)]
    assert ix["parent_5x_of_20x"].tolist() == [i // 16 for i in range(64)]
    assert ix["children_10x_of_5x"].tolist() == [[4 * p + j for j in range(4)] for p in range(4)]
    assert ix["children_20x_of_5x"].tolist() == [[16 * p + j for j in DEPTH_FIRST] for p in range(4)]
    # depth-first: the 20x block of 10x child j is columns 4j..4j+3 and lies inside that child
    kids20, kids10 = ix["children_20x_of_5x"], ix["children_10x_of_5x"]
    assert torch.equal(ix["parent_10x_of_20x"][kids20].view(4, 4, 4), kids10.unsqueeze(-1).expand(4, 4, 4))
    assert {k: v.tolist() for k, v in ix["patch_size"].items()} == {"5x": [1024], "10x": [512], "20x": [256]}
    counts = ix["counts"]
    assert sum(counts["orphans"].values()) == 0 and sum(counts["centre_only"].values()) == 0
    assert counts["missing"] == {"10x": 0, "20x": 0}


def test_shifted_grids_use_the_centre_rule_like_brute_force():
    rng = np.random.default_rng(0)
    c5 = grid((0, 0), 1024, 5, 4)
    c10 = grid((300, -200), 512, 11, 9)  # not aligned with the 5x grid
    c20 = grid((-90, 40), 256, 22, 18)
    keep10, keep20 = rng.uniform(size=len(c10)) < 0.8, rng.uniform(size=len(c20)) < 0.8
    c10, c20 = c10[keep10], c20[keep20]
    coords, slides = as_tensors({"5x": c5, "10x": c10, "20x": c20})
    ix = build_index(coords, slides)
    assert ix["parent_5x_of_10x"].tolist() == brute_parents(c10, 512, c5, 1024).tolist()
    assert ix["parent_5x_of_20x"].tolist() == brute_parents(c20, 256, c5, 1024).tolist()
    assert ix["parent_10x_of_20x"].tolist() == brute_parents(c20, 256, c10, 512).tolist()
    counts = ix["counts"]
    assert counts["centre_only"]["parent_5x_of_10x"] > 0  # straddling 10x patches were placed by their centre
    assert counts["orphans"]["parent_5x_of_10x"] == int((ix["parent_5x_of_10x"] < 0).sum()) > 0
    # every placed child sits in the sub-square of its parent that holds its centre
    kids = ix["children_10x_of_5x"]
    for p, row in enumerate(kids.tolist()):
        for slot, child in enumerate(row):
            if child >= 0:
                centre = c10[child] + 256
                assert list((centre - c5[p]) // 512) == [slot % 2, slot // 2]


def test_orphans_and_missing_children_are_minus_one():
    bag = nested_bag(n5=2)
    c10 = bag.coords["10x"][[0, 1, 2, 5, 6, 7]]  # 5x patch 0 lacks its bottom-right 10x child, patch 1 its first
    c20 = torch.cat([bag.coords["20x"][1:], torch.tensor([[50_000, 50_000]])])  # drop one, add one far away
    coords, slides = as_tensors({"5x": bag.coords["5x"], "10x": c10, "20x": c20})
    ix = build_index(coords, slides, patch_size={"5x": 1024, "10x": 512, "20x": 256})
    assert ix["children_10x_of_5x"].tolist() == [[0, 1, 2, -1], [-1, 3, 4, 5]]
    assert ix["children_20x_of_5x"][0, 0] == -1  # raster position 0 of 5x patch 0 was dropped
    assert ix["parent_5x_of_20x"][-1] == -1 and ix["parent_10x_of_20x"][-1] == -1
    # 20x patches under the missing 10x children have no 10x parent
    counts = ix["counts"]
    assert counts["missing"] == {"10x": 2, "20x": 1}
    assert counts["orphans"] == {"parent_10x_of_20x": 4 + 4 + 1, "parent_5x_of_20x": 1, "parent_5x_of_10x": 0}


def test_parents_never_cross_slides():
    a, b = nested_bag(n5=3, seed=0), nested_bag(n5=2, seed=1)
    coords = {s: torch.cat([a.coords[s], b.coords[s]]) for s in a.coords}  # same pixels on both slides
    slides = {s: torch.cat([torch.zeros(len(a.coords[s])), torch.ones(len(b.coords[s]))]).long() for s in a.coords}
    ix = build_index(coords, slides)
    for child, parent in (("20x", "10x"), ("20x", "5x"), ("10x", "5x")):
        p = ix[f"parent_{parent}_of_{child}"]
        assert (p >= 0).all()
        assert torch.equal(slides[parent][p], slides[child])
    kids = ix["children_20x_of_5x"]
    assert torch.equal(slides["20x"][kids], slides["5x"].unsqueeze(1).expand_as(kids))
    assert ix["children_10x_of_5x"][3].tolist() == [12, 13, 14, 15]  # first 5x patch of slide 1


def test_side_inference_is_base_magnification_agnostic():
    bag = nested_bag(n5=6)
    ix20 = build_index(bag.coords, bag.slide_index)
    ix40 = build_index({s: 2 * c + 7 for s, c in bag.coords.items()}, bag.slide_index)  # 40x base, other origin
    assert ix40["patch_size"]["20x"].tolist() == [512]
    for key in ("parent_10x_of_20x", "parent_5x_of_20x", "parent_5x_of_10x", "children_20x_of_5x"):
        assert torch.equal(ix20[key], ix40[key])


def test_side_inference_ignores_nearby_contour_grids_and_sparse_scales():
    # CLAM starts a grid per tissue contour: a second contour whose grid starts 8 px right of a column of the first
    # (overlapping bounding boxes) makes 8 px the smallest gap; the grid step is still the most common one
    origins = ((0, 0), (2056, 0))
    c5 = np.concatenate([grid(o, 1024, 3, 3) for o in origins])
    c10 = np.concatenate([grid(o, 512, 6, 6) for o in origins])
    c20 = np.concatenate([grid(o, 256, 12, 12) for o in origins])[::2]  # every other 20x column: a sparse scale
    coords, slides = as_tensors({"5x": c5, "10x": c10, "20x": c20})
    ix = build_index(coords, slides)
    assert {k: v.tolist() for k, v in ix["patch_size"].items()} == {"5x": [1024], "10x": [512], "20x": [256]}
    assert sum(ix["counts"]["orphans"].values()) == 0
    # with overlapping parents, the parent still contains the child's centre
    parent = c5[ix["parent_5x_of_20x"].numpy()]
    centre = c20 + 128
    assert np.all((parent <= centre) & (centre < parent + 1024))


def test_bad_ratio_and_bad_patch_size_are_user_errors():
    c5, c10 = grid((0, 0), 1000, 3, 3), grid((0, 0), 512, 6, 6)
    coords, slides = as_tensors({"5x": c5, "10x": c10})
    with pytest.raises(MilbenchError, match="4:2:1"):
        build_index(coords, slides)
    with pytest.raises(MilbenchError, match="4:2:1"):
        build_index(coords, slides, patch_size={"5x": 1000, "10x": 512})
    with pytest.raises(MilbenchError, match="no side for 10x"):
        build_index(coords, slides, patch_size={"5x": 1024})


def test_subset_of_scales_builds_only_what_it_can():
    bag = nested_bag(n5=2)
    ix = build_index({s: bag.coords[s] for s in ("5x", "10x")}, bag.slide_index)
    assert "parent_5x_of_10x" in ix and "children_10x_of_5x" in ix
    assert not {"parent_10x_of_20x", "parent_5x_of_20x", "children_20x_of_5x"} & set(ix)


def test_bag_index_caches_and_names_what_is_missing():
    bag = nested_bag(n5=2)
    index = bag_index(bag, "children_20x_of_5x")
    assert bag.extras["hierarchy"] is index and bag_index(bag) is index
    bag = nested_bag(n5=2, case_id="TCGA-01")
    bag.coords = {}  # features read from pt files carry no coordinates
    with pytest.raises(MilbenchError, match="TCGA-01.*children_20x_of_5x.*coordinates"):
        bag_index(bag, "children_20x_of_5x")


def test_take_rows_fills_missing_with_zeros():
    x = torch.arange(6.0).view(3, 2)
    out = take_rows(x, torch.tensor([[2, -1], [0, 1]]))
    assert out.tolist() == [[[4, 5], [0, 0]], [[0, 1], [2, 3]]]


def test_index_of_20k_patches_is_fast():
    bag = nested_bag(n5=1250, in_dim=1)  # 21,250 patches over the three scales
    start = time.perf_counter()
    ix = build_index(bag.coords, bag.slide_index)
    assert time.perf_counter() - start < 5.0  # ~0.05 s here; generous for a loaded CI machine
    assert ix["children_20x_of_5x"].shape == (1250, 16) and ix["counts"]["missing"]["20x"] == 0
    assert PATCH_20X == ix["patch_size"]["20x"].item()
