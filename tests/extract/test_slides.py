"""OpenSlide access: base magnification from metadata or override, pyramid level choice, the 40x resize rule."""

import numpy as np
import pytest
from PIL import Image

from milbench import MilbenchError
from milbench.extract.slides import base_magnification, open_slide, read_patches, read_spec
from tests.extract.wsi import tissue_image, write_slide


def test_aperio_metadata_gives_the_base_magnification(slide_set):
    slides, _ = slide_set
    slide = open_slide(slides / "slide_a.svs")
    assert slide.properties["aperio.AppMag"] == "40"
    assert base_magnification(slide, "slide_a.svs", override=20) == (40.0, "openslide.objective-power")


def test_generic_tiff_needs_the_override(slide_set):
    slides, _ = slide_set
    slide = open_slide(slides / "slide_e.tif")
    assert base_magnification(slide, "slide_e.tif", override=20) == (20.0, "--base-mag")
    with pytest.raises(MilbenchError, match=r"slide_e.tif records no base magnification.*--base-mag"):
        base_magnification(slide, "slide_e.tif")


def test_unreadable_file_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(MilbenchError, match="cannot open .*broken.svs with OpenSlide"):
        open_slide(bad)


def test_each_magnification_reads_the_finest_level_not_coarser_than_needed(slide_set):
    slide = open_slide(slide_set[0] / "slide_a.svs")  # levels at downsample 1, 4, 16
    spec20, spec10, spec5 = (read_spec(slide, side, 32) for side in (64, 128, 256))
    assert (spec20.level, spec20.size) == (0, 64)  # 2x: no such level, read level 0 and halve
    assert (spec10.level, spec10.size) == (1, 32)  # 4x: level 1 as is
    assert (spec5.level, spec5.size) == (1, 64)  # 8x: level 1, then halve


def test_40x_rule_a_20x_patch_is_the_level0_square_of_twice_the_side_resized(slide_set):
    slides, images = slide_set
    slide = open_slide(slides / "slide_c.svs")
    spec = read_spec(slide, 64, 32)
    x, y = 64, 128
    patch = read_patches(slides / "slide_c.svs", np.array([[x, y]]), spec)[0]
    level0 = images["slide_c"][y:y + 64, x:x + 64]
    expected = np.asarray(Image.fromarray(level0).resize((32, 32), Image.Resampling.BILINEAR))
    assert patch.shape == (32, 32, 3)
    np.testing.assert_array_equal(patch, expected)


def test_area_outside_the_slide_reads_as_white_glass(tmp_path):
    path = write_slide(tmp_path / "s.svs", tissue_image(256, 256, [("rect", 0, 0, 256, 256)]), downsamples=(1,))
    spec = read_spec(open_slide(path), 64, 64)
    patch = read_patches(path, np.array([[224, 224]]), spec)[0]
    assert (patch[32:, :] == 255).all() and (patch[:, 32:] == 255).all()
    assert (patch[:32, :32] != 255).any()
