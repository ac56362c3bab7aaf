"""Nested grids: level-0 sides per magnification, nesting across magnifications, tissue filtering, the plan."""

import numpy as np
import pytest

from milbench import MilbenchError
from milbench.extract.grid import level0_sides, nested_grid, parse_mags, plan_slide
from milbench.extract.tissue import TissueMask


def _mask(mask: np.ndarray, downsample: float) -> TissueMask:
    return TissueMask(mask=mask, thumbnail=np.zeros((*mask.shape, 3), np.uint8), downsample=(downsample,) * 2,
                      threshold=8)


def test_sides_follow_the_base_magnification():
    assert level0_sides(40, (5, 10, 20), 256) == {5: 2048, 10: 1024, 20: 512}
    assert level0_sides(20, (5, 10, 20), 256) == {5: 1024, 10: 512, 20: 256}
    assert level0_sides(40, (5, 10), 224) == {5: 1792, 10: 896}


def test_a_magnification_above_the_base_is_refused():
    with pytest.raises(MilbenchError, match="scanned at 20x or more, this one is 10x"):
        level0_sides(10, (5, 10, 20), 256)


@pytest.mark.parametrize("text, mags", [("5,10,20", (5, 10, 20)), ("20x, 5x", (5, 20)), ("10", (10,))])
def test_parse_mags(text, mags):
    assert parse_mags(text) == mags


@pytest.mark.parametrize("text", ["", "40", "5,abc"])
def test_bad_mags_are_rejected(text):
    with pytest.raises(MilbenchError, match="--mags"):
        parse_mags(text)


def _random_grid(seed: int):
    rng = np.random.default_rng(seed)
    mask = rng.random((48, 64)) < 0.3  # 1 mask px = 16 level-0 px; a 20x patch (64 px) = 4x4 mask px
    sides = {5: 256, 10: 128, 20: 64}
    return nested_grid((1000, 760), sides, _mask(mask, 16.0), min_tissue=0.25), sides


@pytest.mark.parametrize("seed", [0, 1])
def test_grids_nest_every_patch_has_its_parents(seed):
    coords, sides = _random_grid(seed)
    for fine, coarse in ((20, 10), (20, 5), (10, 5)):
        parents = {tuple(c) for c in coords[coarse]}
        snapped = coords[fine] // sides[coarse] * sides[coarse]
        assert all(tuple(c) in parents for c in snapped)
        # and every coarse patch has at least one child (it exists because of one)
        assert {tuple(c) for c in snapped} == parents
    for mag, side in sides.items():
        assert (coords[mag] % side == 0).all() and coords[mag].dtype == np.int64


def test_a_full_tissue_5x_patch_covers_exactly_4x4_20x_and_2x2_10x_patches():
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8, 8:] = True  # level-0 square x in [256, 512), y in [0, 256): the 5x cell (256, 0)
    coords = nested_grid((512, 512), {5: 256, 10: 128, 20: 64}, _mask(mask, 32.0), min_tissue=0.5)
    assert coords[5].tolist() == [[256, 0]]
    assert {tuple(c) for c in coords[10]} == {(256 + dx, dy) for dx in (0, 128) for dy in (0, 128)}
    assert {tuple(c) for c in coords[20]} == {(256 + dx, dy) for dx in range(0, 256, 64) for dy in range(0, 256, 64)}


def test_min_tissue_filters_the_finest_patches():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = True  # a quarter of the first 20x patch (2x2 mask px)
    sides = {5: 64, 10: 32, 20: 16}
    assert len(nested_grid((64, 64), sides, _mask(mask, 8.0), 0.25)[20]) == 1
    assert len(nested_grid((64, 64), sides, _mask(mask, 8.0), 0.5)[20]) == 0


def test_grids_start_at_the_origin_and_cover_the_slide_edge():
    mask = np.ones((10, 10), dtype=bool)
    coords = nested_grid((100, 100), {5: 64, 20: 16}, _mask(mask, 10.0), 0.5)
    assert coords[5].tolist() == [[0, 0], [64, 0], [0, 64], [64, 64]]  # row-major, the edge cells kept
    assert 64 < coords[20].max() < 100  # 20x cells in the edge 5x cells, none wholly past the slide


def test_plan_of_a_40x_slide(slide_set):
    plan = plan_slide(slide_set[0] / "slide_a.svs", "slide_a", (5, 10, 20), 32, 0.25)
    assert plan.base_mag == 40 and plan.dims == (1024, 768)
    assert {m: r.side0 for m, r in plan.reads.items()} == {5: 256, 10: 128, 20: 64}
    # the stained rectangle [256, 768) x [256, 512) is two 5x cells exactly
    assert sorted(map(tuple, plan.coords[5])) == [(256, 256), (512, 256)]
    assert len(plan.coords[10]) == 8 and len(plan.coords[20]) == 32 and plan.n_patches == 42
