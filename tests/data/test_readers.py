import numpy as np
import pytest
import torch

from milbench import MilbenchError
from milbench.data.readers import (available_scales, canonical_scale, find_feature_file, read_slide,
                                   slide_stem)
from tests.data.files import clam_h5, clam_pt, grid, random_features, trident_h5


def test_clam_h5_reads_half_features_and_long_coords(tmp_path):
    x = random_features(5, 8)
    path = clam_h5(tmp_path, "20x", "s1", x, grid(5))
    slide = read_slide(tmp_path, "20x", "s1")
    assert slide.path == path
    assert slide.features.dtype == torch.float16 and slide.features.shape == (5, 8)
    assert torch.allclose(slide.features.float(), torch.from_numpy(x), atol=1e-2)
    assert slide.coords.dtype == torch.long and slide.coords[:, 0].tolist() == [0, 256, 512, 768, 1024]


def test_backbone_folder_is_used_and_optional(tmp_path):
    clam_h5(tmp_path, "10x", "s1", random_features(3, 4), grid(3), backbone="uni")
    clam_h5(tmp_path, "10x", "s1", random_features(3, 6), grid(3), backbone="conch")
    assert read_slide(tmp_path, "10x", "s1", backbone="uni").features.shape[1] == 4
    assert read_slide(tmp_path, "10x", "s1", backbone="conch").features.shape[1] == 6
    # the root may also be the backbone's own folder
    assert read_slide(tmp_path / "conch", "10x", "s1", backbone="conch").features.shape[1] == 6


def test_pt_files_have_no_coords_and_h5_wins(tmp_path):
    clam_pt(tmp_path, "5x", "s1", torch.randn(4, 8))
    slide = read_slide(tmp_path, "5x", "s1")
    assert slide.coords is None and slide.path.suffix == ".pt" and slide.features.shape == (4, 8)
    clam_h5(tmp_path, "5x", "s1", random_features(4, 8), grid(4))
    assert find_feature_file(tmp_path, "5x", "s1").suffix == ".h5"


def test_pt_file_with_batch_axis_is_squeezed(tmp_path):
    clam_pt(tmp_path, "20x", "s1", torch.randn(1, 3, 8), backbone="uni")
    assert read_slide(tmp_path, "20x", "s1", backbone="uni").features.shape == (3, 8)


def test_trident_layout(tmp_path):
    path = trident_h5(tmp_path, "20x", "s1", random_features(6, 8), grid(6), encoder="uni_v1")
    slide = read_slide(tmp_path, "20x", "s1")
    assert slide.path == path and slide.features.shape == (6, 8) and slide.coords.shape == (6, 2)
    assert read_slide(tmp_path, "20x", "s1", backbone="uni_v1").features.shape == (6, 8)
    assert available_scales(tmp_path) == ("20x",)


def test_trident_with_several_encoders_needs_backbone(tmp_path):
    trident_h5(tmp_path, "20x", "s1", random_features(2, 8), grid(2), encoder="uni_v1")
    trident_h5(tmp_path, "20x", "s1", random_features(2, 4), grid(2), encoder="conch_v15")
    with pytest.raises(MilbenchError, match="several encoders.*--backbone"):
        read_slide(tmp_path, "20x", "s1")
    assert read_slide(tmp_path, "20x", "s1", backbone="conch_v15").features.shape == (2, 4)


def test_svs_suffix_is_stripped(tmp_path):
    clam_h5(tmp_path, "20x", "TCGA-AB-1234-01Z-00-DX1.A1B2", random_features(2), grid(2))
    assert slide_stem(" TCGA-AB-1234-01Z-00-DX1.A1B2.svs ") == "TCGA-AB-1234-01Z-00-DX1.A1B2"
    assert read_slide(tmp_path, "x20", "TCGA-AB-1234-01Z-00-DX1.A1B2.svs").features.shape == (2, 8)


def test_scale_names():
    assert canonical_scale("x5") == canonical_scale(5) == canonical_scale("5X") == "5x"
    with pytest.raises(MilbenchError, match="40x"):
        canonical_scale("40x")


def test_missing_file_names_expected_paths_and_fix(tmp_path):
    clam_h5(tmp_path, "20x", "other", random_features(2), grid(2))
    with pytest.raises(MilbenchError) as err:
        read_slide(tmp_path, "20x", "s1.svs")
    msg = str(err.value)
    assert str(tmp_path / "x20" / "h5_files" / "s1.h5") in msg and str(tmp_path / "x20" / "pt_files" / "s1.pt") in msg
    assert "--features/--backbone" in msg and "milbench synth" in msg and "\n" not in msg


@pytest.mark.parametrize("suffix", [".h5", ".pt"])
def test_unreadable_file(tmp_path, suffix):
    folder = tmp_path / "x20" / ("h5_files" if suffix == ".h5" else "pt_files")
    folder.mkdir(parents=True)
    (folder / f"s1{suffix}").write_bytes(b"not a feature file at all")
    with pytest.raises(MilbenchError, match="re-extract it or remove the slide from the table") as err:
        read_slide(tmp_path, "20x", "s1")
    assert str(folder / f"s1{suffix}") in str(err.value) and "\n" not in str(err.value)


def test_truncated_h5(tmp_path):
    path = clam_h5(tmp_path, "20x", "s1", random_features(500, 64), grid(500))
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(MilbenchError, match="cannot read .*s1.h5"):
        read_slide(tmp_path, "20x", "s1")


def test_missing_features_dataset(tmp_path):
    path = clam_h5(tmp_path, "20x", "s1", random_features(3), grid(3))
    import h5py

    with h5py.File(path, "a") as f:
        f["feats"] = f["features"][()]
        del f["features"]
    with pytest.raises(MilbenchError, match=r"s1\.h5 has no 'features' dataset \(it has: coords, feats\)"):
        read_slide(tmp_path, "20x", "s1")


@pytest.mark.parametrize("features,pattern", [
    (np.zeros(5, dtype=np.float32), r"shape \(5,\), expected \[patches, dim\]"),
    (np.zeros((2, 3, 4), dtype=np.float32), r"shape \(2, 3, 4\)"),
    (np.zeros((0, 8), dtype=np.float32), "zero patches"),
])
def test_bad_feature_shapes(tmp_path, features, pattern):
    clam_h5(tmp_path, "20x", "s1", features)
    with pytest.raises(MilbenchError, match=pattern) as err:
        read_slide(tmp_path, "20x", "s1")
    assert "s1.h5" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(tmp_path, bad):
    x = random_features(4)
    x[2, 3] = bad
    clam_h5(tmp_path, "20x", "s1", x, grid(4))
    with pytest.raises(MilbenchError, match=r"s1\.h5 has NaN or infinite features in 1 of 4 patches"):
        read_slide(tmp_path, "20x", "s1")


def test_values_beyond_half_precision(tmp_path):
    x = random_features(4)
    x[0, 0] = 1e6
    clam_h5(tmp_path, "20x", "s1", x, grid(4))
    with pytest.raises(MilbenchError, match="beyond half precision"):
        read_slide(tmp_path, "20x", "s1")


def test_coords_length_mismatch(tmp_path):
    clam_h5(tmp_path, "20x", "s1", random_features(4), grid(3))
    with pytest.raises(MilbenchError, match=r"s1\.h5 has 3 coords but 4 feature rows"):
        read_slide(tmp_path, "20x", "s1")


def test_coords_wrong_shape(tmp_path):
    clam_h5(tmp_path, "20x", "s1", random_features(4), np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(MilbenchError, match=r"coords in .*s1\.h5 have shape \(4, 3\)"):
        read_slide(tmp_path, "20x", "s1")


def test_available_scales_clam_with_backbone(tmp_path):
    for scale in ("5x", "20x"):
        clam_h5(tmp_path, scale, "s1", random_features(2), grid(2), backbone="uni")
    assert available_scales(tmp_path, "uni") == ("5x", "20x")
    assert available_scales(tmp_path) == ()
