import h5py
import numpy as np
import pytest
import torch

import milbench.training.datasets as dataset_module
from milbench import MilbenchError
from milbench.data.cache import FeatureCache
from milbench.training.datasets import BagDataset
from milbench.models.cards import ModelCard
from milbench.tasks.cohort import resolve_cohort
from tests.data.files import clam_h5, clam_pt, grid, random_features, splits_folder, table_csv

SCALES = ("5x", "20x")
N = {"5x": 2, "20x": 3}  # patches per slide and scale (slide s0b has one more)


def make_cohort(tmp_path, widths=None, pt_slides=()):
    """Cases c0 (slides s0, s0b), c1, c2, c3 (one slide each); features at 5x and 20x."""
    rows = [{"case_id": c, "slide_id": f"{s}.svs", "survival_months": 5.0 + int(c[1]), "censorship": int(c[1]) % 2}
            for c, s in [("c0", "s0"), ("c0", "s0b"), ("c1", "s1"), ("c2", "s2"), ("c3", "s3")]]
    root = tmp_path / "features"
    for j, row in enumerate(rows):
        slide = row["slide_id"][:-4]
        for scale in SCALES:
            n, dim = N[scale] + (slide == "s0b"), (widths or {}).get((slide, scale), 8)
            x = np.full((n, dim), j, dtype=np.float32)
            if slide in pt_slides:
                clam_pt(root, scale, slide, torch.from_numpy(x))
            else:
                clam_h5(root, scale, slide, x, grid(n) + 10_000 * j)
    splits = splits_folder(tmp_path / "splits", [(["c2", "c3"], ["c0", "c1"]), (["c0", "c1"], ["c2", "c3"])])
    return resolve_cohort(table_csv(tmp_path / "t.csv", rows), splits=splits, features=root)


def card(needs=(), kind=None):
    return ModelCard(name="probe", display_name="Probe", scales=("20x",), needs=needs, graph_kind=kind, graph_k=2)


def test_multi_slide_patient_is_concatenated_in_table_order(tmp_path):
    data = BagDataset(make_cohort(tmp_path), ["c0", "c1"], SCALES, cache=FeatureCache())
    assert len(data) == 2 and data.in_dim == 8
    bag = data[0]
    assert bag.case_id == "c0" and set(bag.features) == set(SCALES)
    for scale in SCALES:
        n0, n1 = N[scale], N[scale] + 1
        assert bag.features[scale].dtype == torch.float16 and bag.features[scale].shape == (n0 + n1, 8)
        assert bag.features[scale][:, 0].tolist() == [0.0] * n0 + [1.0] * n1  # s0 rows, then s0b rows
        assert bag.slide_index[scale].tolist() == [0] * n0 + [1] * n1
        assert bag.coords[scale].shape == (n0 + n1, 2) and bag.coords[scale][n0, 0] == 10_000
    one = data[1]
    assert one.slide_index["20x"].tolist() == [0, 0, 0] and one.features["20x"][0, 0] == 2.0


def test_second_read_comes_from_the_cache(tmp_path, monkeypatch):
    cohort = make_cohort(tmp_path)
    opened = []
    real = h5py.File
    monkeypatch.setattr(h5py, "File", lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k))
    cache = FeatureCache()
    BagDataset(cohort, ["c0"], ("20x",), cache=cache)[0]
    assert len(opened) == 2 and cache.misses == 2
    again = BagDataset(cohort, ["c0", "c1"], ("20x",), cache=cache)
    again[0]
    assert len(opened) == 2 and cache.hits >= 2  # c0's slides were not reopened
    again[1]
    assert len(opened) == 3


def test_cache_budget_evicts_least_recently_used(tmp_path):
    cohort = make_cohort(tmp_path)
    one_slide = 3 * 8 * 2 + 3 * 2 * 8  # 3 patches: float16 features + long coords
    cache = FeatureCache(max_bytes=2 * one_slide)
    data = BagDataset(cohort, ["c1", "c2", "c3"], ("20x",), cache=cache)
    for i in (0, 1, 2, 0):
        data[i]
    assert cache.nbytes <= 2 * one_slide and cache.misses == 4  # c1 was evicted by c3, then read again


def test_missing_coords_only_matter_when_the_card_needs_them(tmp_path):
    cohort = make_cohort(tmp_path, pt_slides=("s0b",))
    bag = BagDataset(cohort, ["c0"], ("20x",), cache=FeatureCache())[0]
    assert bag.coords == {} and bag.slide_index["20x"].tolist() == [0, 0, 0, 1, 1, 1, 1]
    latent = BagDataset(cohort, ["c0"], ("20x",), card=card(("graph",), "latent"), cache=FeatureCache())
    assert latent._coords_reason is None
    for needs, kind in ((("coords",), None), (("graph",), "spatial"), (("hierarchy",), None)):
        data = BagDataset(cohort, ["c0"], ("20x",), card=card(needs, kind), cache=FeatureCache())
        with pytest.raises(MilbenchError, match=r"s0b\.pt has no coordinates, but model 'probe' needs"):
            data[0]


def test_width_mismatch_between_slides_names_both(tmp_path):
    cohort = make_cohort(tmp_path, widths={("s0b", "20x"): 6})
    with pytest.raises(MilbenchError, match=r"slide s0b has 6 features per patch at 20x \(.*s0b\.h5\) "
                                            r"but slide s0 has 8 at 5x"):
        BagDataset(cohort, ["c0"], SCALES, cache=FeatureCache())[0]


def test_width_mismatch_between_scales_and_patients(tmp_path):
    cohort = make_cohort(tmp_path, widths={("s1", "20x"): 4, ("s2", "5x"): 4, ("s2", "20x"): 4})
    with pytest.raises(MilbenchError, match="slide s1 has 4 features per patch at 20x .* but slide s1 has 8 at 5x"):
        BagDataset(cohort, ["c1"], SCALES, cache=FeatureCache())[0]
    data = BagDataset(cohort, ["c0", "c2"], SCALES, cache=FeatureCache())
    data[0]
    with pytest.raises(MilbenchError, match="slide s2 has 4 features per patch at 5x .* but slide s0 has 8"):
        data[1]


def test_zero_patch_slide_is_an_empty_bag_error(tmp_path):
    cohort = make_cohort(tmp_path)
    clam_h5(cohort.features_root, "20x", "s3", np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(MilbenchError, match=r"s3\.h5 has zero patches"):
        BagDataset(cohort, ["c3"], ("20x",), cache=FeatureCache())[0]


def test_prepared_bag_is_built_once_and_shared(tmp_path, monkeypatch):
    cohort = make_cohort(tmp_path)
    calls = []

    def fake_prepare(the_card, bag):
        calls.append(bag.case_id)
        bag.extras["graph"] = {"edge_index": torch.zeros(2, 5, dtype=torch.long)}
        return bag

    monkeypatch.setattr(dataset_module, "prepare_bag", fake_prepare)
    cache, the_card = FeatureCache(), card(("graph",), "spatial")
    data = BagDataset(cohort, ["c0", "c1"], ("20x",), card=the_card, cache=cache)
    first = data[0]
    first.extras["scratch"] = 1  # a caller's addition must not leak into the cache
    for _ in range(3):
        for i in range(len(data)):
            data[i]
    BagDataset(cohort, ["c1", "c0"], ("20x",), card=the_card, cache=cache)[1]  # another fold, same patients
    assert calls == ["c0", "c1"]
    again = data[0]
    assert "scratch" not in again.extras and again.extras["graph"] is first.extras["graph"]


def test_unknown_case_and_missing_root(tmp_path):
    cohort = make_cohort(tmp_path)
    with pytest.raises(MilbenchError, match="case zz is not in cohort 't'"):
        BagDataset(cohort, ["c0", "zz"], ("20x",))
    with pytest.raises(MilbenchError, match="unknown magnification '40x'"):
        BagDataset(cohort, ["c0"], ("40x",))
    cohort.features_root = None
    with pytest.raises(MilbenchError, match="has no feature folder: pass --features ROOT"):
        BagDataset(cohort, ["c0"], ("20x",))


def test_missing_feature_file_fails_when_read(tmp_path):
    cohort = make_cohort(tmp_path)
    (cohort.features_root / "x5" / "h5_files" / "s2.h5").unlink()
    data = BagDataset(cohort, ["c2"], SCALES, cache=FeatureCache())
    with pytest.raises(MilbenchError, match=r"no features for slide s2 at 5x: expected .*x5/h5_files/s2\.h5"):
        data[0]
