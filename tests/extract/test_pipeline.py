"""Whole extraction of tiny slides: layout, nesting, coordinates, the 40x rule, report, resume, failures, executors."""

import shutil
import sys
import types

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from milbench import MilbenchError
from milbench.data.multiscale import build_index
from milbench.data.readers import read_slide
from milbench.extract.encoders import EncoderSpec
from milbench.extract.pipeline import REPORT_FILE, bench_extract, extract
from milbench.extract.writer import feature_paths
from tests.extract.conftest import ENCODER, options
from tests.extract.wsi import tissue_image, write_slide

SLIDES = ["slide_a", "slide_b", "slide_c", "slide_d", "slide_e"]
ROOT = "quadrant_means"


def _coords(out, slide):
    return {f"{m}x": read_slide(out, f"{m}x", slide, backbone=ROOT).coords for m in (5, 10, 20)}


def test_every_slide_lands_in_the_clam_layout_and_reads_back(extracted):
    res = extracted.result
    assert res.extracted == SLIDES and not res.skipped and not res.failed
    total = 0
    for slide in SLIDES:
        for mag in (5, 10, 20):
            h5_path, pt_path = feature_paths(extracted.out, ROOT, mag, slide)
            found = read_slide(extracted.out, f"{mag}x", slide, backbone=ROOT)
            assert found.path == h5_path and found.features.shape[1] == 12
            pt = torch.load(pt_path, weights_only=True)
            assert torch.equal(pt.half(), found.features)
            total += len(found.features)
    assert res.patches == total


def test_grids_nest_exactly_in_the_cross_scale_index(extracted):
    for slide in SLIDES:
        coords = _coords(extracted.out, slide)
        index = build_index(coords, {s: torch.zeros(len(c), dtype=torch.long) for s, c in coords.items()})
        counts = index["counts"]
        assert all(v == 0 for v in counts["orphans"].values()), slide  # every patch inside its parents
        assert all(v == 0 for v in counts["centre_only"].values()), slide  # fully inside, not just the centre
        assert all(v == 0 for v in counts["collisions"].values()), slide
        side = 64 if slide != "slide_e" else 32  # 40x slides: 20x = 64 level-0 px; the 20x slide: 32
        assert index["patch_size"]["20x"].tolist() == [side]
        assert index["patch_size"]["5x"].tolist() == [4 * side]
    coords = _coords(extracted.out, "slide_a")  # tissue fills its two 5x cells: each covers all 4x4 20x patches
    index = build_index(coords, {s: torch.zeros(len(c), dtype=torch.long) for s, c in coords.items()})
    assert (index["children_20x_of_5x"] >= 0).all() and index["children_20x_of_5x"].shape == (2, 16)
    assert (index["children_10x_of_5x"] >= 0).all()


def test_coordinates_are_level0_pixels_with_clam_attributes(extracted):
    with h5py.File(feature_paths(extracted.out, ROOT, 20, "slide_a")[0]) as f:
        c = f["coords"]
        assert (c.attrs["patch_level"], c.attrs["patch_size"], c.attrs["level0_patch_size"]) == (0, 64, 64)
        assert c.attrs["output_size"] == 32 and c.attrs["base_magnification"] == 40
        xy = c[()]
        assert f.attrs["encoder"] == ROOT and f.attrs["feature_dim"] == 12
    assert xy.min() >= 256 and xy[:, 0].max() == 768 - 64 and xy[:, 1].max() == 512 - 64  # the stained rectangle
    with h5py.File(feature_paths(extracted.out, ROOT, 5, "slide_a")[0]) as f:
        assert (f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]) == (1, 64)  # 256 px at 4x
    with h5py.File(feature_paths(extracted.out, ROOT, 20, "slide_e")[0]) as f:  # a 20x slide: no resize
        assert (f["coords"].attrs["patch_size"], f["coords"].attrs["level0_patch_size"]) == (32, 32)


def test_40x_rule_end_to_end_features_are_the_resized_level0_squares(extracted):
    found = read_slide(extracted.out, "20x", "slide_c", backbone=ROOT)
    image = extracted.images["slide_c"]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert len(found.coords) > 50
    for row, (x, y) in enumerate(found.coords.tolist()):
        level0 = image[y:y + 64, x:x + 64]  # 64 level-0 px: the 20x patch of a 40x slide
        patch = np.asarray(Image.fromarray(level0).resize((32, 32), Image.Resampling.BILINEAR)) / 255.0
        quads = patch.reshape(2, 16, 2, 16, 3).mean(axis=(1, 3))  # [qy, qx, channel]
        expected = ((quads - mean) / std).transpose(2, 0, 1).reshape(-1)  # flatten(1) of [3, 2, 2]
        # fp16 storage costs < 1e-3; reading 32 level-0 px instead (no 40x rule) misses by > 1.8e-2 on every row
        np.testing.assert_allclose(found.features[row].float().numpy(), expected, atol=3e-3)


def test_report_lists_patches_tissue_and_time_per_slide(extracted):
    report = pd.read_csv(extracted.result.report_path)
    assert report["slide"].tolist() == SLIDES and (report["status"] == "extracted").all()
    assert {"patches_5x", "patches_10x", "patches_20x", "tissue_fraction", "seconds", "base_mag_source"} <= set(report)
    a = report.set_index("slide").loc["slide_a"]
    assert (a.patches_5x, a.patches_10x, a.patches_20x) == (2, 8, 32)
    assert abs(a.tissue_fraction - 1 / 6) < 0.01 and a.base_mag == 40
    assert report.set_index("slide").loc["slide_e", "base_mag_source"] == "--base-mag"
    assert (report["seconds"] >= 0).all()


def test_contact_sheet_is_written(extracted):
    png = extracted.result.contact
    assert png.name == "contact_slide_b.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert Image.open(png).size[0] >= 1000


def _copy(extracted, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(extracted.out, out)
    return out


def test_resume_skips_finished_slides_and_redoes_broken_ones(extracted, tmp_path):
    out = _copy(extracted, tmp_path)
    h5_b = feature_paths(out, ROOT, 10, "slide_b")[0]
    h5_b.write_bytes(h5_b.read_bytes()[:100])  # truncated, as by a crash outside the atomic writer
    feature_paths(out, ROOT, 5, "slide_c")[1].unlink()  # a missing pt twin
    stamp = {s: feature_paths(out, ROOT, 20, s)[0].stat().st_mtime_ns for s in SLIDES}
    res = extract(extracted.slides, out, EncoderSpec(ENCODER), options())
    assert res.extracted == ["slide_b", "slide_c"] and res.skipped == ["slide_a", "slide_d", "slide_e"]
    for slide in ("slide_a", "slide_d", "slide_e"):
        assert feature_paths(out, ROOT, 20, slide)[0].stat().st_mtime_ns == stamp[slide]
    assert read_slide(out, "10x", "slide_b", backbone=ROOT).features.shape[1] == 12
    assert pd.read_csv(out / ROOT / REPORT_FILE)["slide"].tolist() == SLIDES  # merged, one row each
    again = extract(extracted.slides, out, EncoderSpec(ENCODER), options())
    assert again.extracted == [] and len(again.skipped) == 5


def test_changed_settings_into_the_same_folder_are_refused(extracted, tmp_path):
    out = _copy(extracted, tmp_path)
    with pytest.raises(MilbenchError, match="other settings .*min_tissue"):
        extract(extracted.slides, out, EncoderSpec(ENCODER), options(min_tissue=0.5))


def test_failed_slides_are_reported_and_the_others_extracted(slide_set, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide_set[0] / "slide_a.svs", slides)
    write_slide(slides / "blank.svs", tissue_image(256, 256, []), downsamples=(1, 4))
    (slides / "broken.svs").write_bytes(b"not a slide")
    res = extract(slides, tmp_path / "out", EncoderSpec(ENCODER), options(mags=(10, 20)))
    assert res.extracted == ["slide_a"]
    assert set(res.failed) == {"blank", "broken"}
    assert "no tissue found" in res.failed["blank"] and "cannot open" in res.failed["broken"]
    report = pd.read_csv(res.report_path).set_index("slide")
    assert report.loc["broken", "status"] == "failed" and report.loc["slide_a", "patches_20x"] == 32
    assert not (tmp_path / "out" / ROOT / "x5").exists()


@pytest.mark.slow
def test_worker_processes_give_the_same_features(extracted, tmp_path):
    res = extract(extracted.slides, tmp_path, EncoderSpec(ENCODER), options(workers=2, batch=16))
    assert res.extracted == SLIDES
    for slide in ("slide_a", "slide_e"):
        for mag in ("5x", "20x"):
            a = read_slide(tmp_path, mag, slide, backbone=ROOT)
            b = read_slide(extracted.out, mag, slide, backbone=ROOT)
            assert torch.equal(a.features, b.features) and torch.equal(a.coords, b.coords)


def test_ray_executor_without_ray_says_how_to_install_it(slide_set, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MilbenchError, match=r"--executor ray needs ray: pip install 'milbench\[ray\]'"):
        extract(slide_set[0], tmp_path, EncoderSpec(ENCODER), options(executor="ray"))


def _fake_ray(calls):
    """Enough of ray's API to run the executor in-process: tasks run at .remote(), wait returns the first."""
    def remote(**resources):
        def wrap(fn):
            def submit(*args):
                calls.append((resources, list(args[0])))
                return fn(*args)
            return types.SimpleNamespace(remote=submit)
        return wrap
    return types.SimpleNamespace(is_initialized=lambda: True, init=lambda: None, remote=remote,
                                 wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=lambda ref: ref)


def test_ray_executor_runs_one_task_per_slide(extracted, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(calls))
    res = extract(extracted.slides, tmp_path, EncoderSpec(ENCODER), options(executor="ray"))
    assert [c[1] for c in calls] == [[s] for s in SLIDES] and calls[0][0] == {"num_gpus": 0}
    assert res.extracted == SLIDES
    a = read_slide(tmp_path, "20x", "slide_d", backbone=ROOT)
    assert torch.equal(a.features, read_slide(extracted.out, "20x", "slide_d", backbone=ROOT).features)


def test_bench_extract_reports_patches_per_second(slide_set):
    stats = bench_extract(slide_set[0], encoder=ENCODER, mags=(5, 10, 20), patch=32, batch=64, device="cpu",
                          workers=0, base_mag=20, max_slides=2)
    assert stats["slides"] == 2 and stats["patches"] == 42 + 86
    assert stats["patches_per_second"] > 0 and stats["device"] == "cpu"


def test_an_empty_slide_folder_is_a_user_error(tmp_path):
    with pytest.raises(MilbenchError, match="holds no whole-slide images"):
        extract(tmp_path, tmp_path / "out", EncoderSpec(ENCODER), options())


def test_registry_resnet_with_random_init_runs_and_is_recorded(slide_set, tmp_path):
    res = extract(slide_set[0] / "slide_a.svs", tmp_path, EncoderSpec("resnet50_trunc", random_init=True),
                  options(mags=(5, 10)))
    assert res.extracted == ["slide_a"]
    with h5py.File(feature_paths(tmp_path, "resnet50_trunc", 10, "slide_a")[0]) as f:
        assert f["features"].shape == (8, 1024) and f.attrs["encoder_weights"] == "random-init (seed 0)"
