"""Saturation thresholding: Otsu, fixed thresholds, tissue fractions of level-0 squares."""

import numpy as np
import pytest

from milbench import MilbenchError
from milbench.extract.slides import open_slide
from milbench.extract.tissue import TissueMask, otsu_threshold, parse_threshold, segment, tissue_mask
from tests.extract.wsi import tissue_image


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 130)]).astype(np.uint8)
    cut = otsu_threshold(values)
    assert 10 <= cut < 130


def test_segment_recovers_a_drawn_rectangle():
    rgb = tissue_image(200, 100, [("rect", 50, 20, 150, 80)])
    mask, cut = segment(rgb)
    assert cut >= 8
    assert abs(mask.mean() - 100 * 60 / 20000) < 0.02
    assert mask[50, 100] and not mask[5, 5]


def test_a_fixed_threshold_above_the_stain_finds_nothing():
    mask, cut = segment(tissue_image(64, 64, [("rect", 0, 0, 32, 64)]), threshold=250)
    assert cut == 250 and not mask.any()


@pytest.mark.parametrize("text", ["auto", "-1", "300"])
def test_bad_threshold_is_rejected(text):
    with pytest.raises(MilbenchError, match="--tissue-threshold"):
        parse_threshold(text)


def test_parse_threshold_accepts_otsu_and_numbers():
    assert parse_threshold("Otsu") == "otsu" and parse_threshold("8") == 8.0


def test_fraction_in_counts_level0_squares_on_the_mask():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :5] = True  # left half, each mask pixel = 4x4 level-0 px
    tm = TissueMask(mask=mask, thumbnail=np.zeros((10, 10, 3), np.uint8), downsample=(4.0, 4.0), threshold=8)
    xy = np.array([[0, 0], [20, 0], [8, 8], [36, 36]])
    np.testing.assert_allclose(tm.fraction_in(xy, 8), [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(tm.fraction_in(np.array([[16, 0]]), 8), [0.5])
    np.testing.assert_allclose(tm.fraction_in(np.array([[-4, 0]]), 8), [0.5])  # half outside the slide


def test_tissue_mask_on_a_slide_reports_its_scale(slide_set):
    tm = tissue_mask(open_slide(slide_set[0] / "slide_a.svs"), downsample=8)
    assert tm.mask.shape == (96, 128) and tm.downsample == (8.0, 8.0)
    assert abs(tm.fraction - 512 * 256 / (1024 * 768)) < 0.01
