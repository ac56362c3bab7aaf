"""Kaplan-Meier curves and attention heatmaps from a run store: groups, p-value, checkpoints, patch positions."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines.statistics import logrank_test

from milbench import MilbenchError
from milbench.report import plots
from milbench.config.run import make_config
from milbench.training.datasets import BagDataset
from milbench.report.document import fmt_p
from milbench.models.registry import create_model, get_card
from milbench.runs.store import write_fold
from milbench.survival.binning import fit_bins
from milbench.survival.losses import hazards_to_survival
from milbench.tasks.cohort import resolve_cohort
from tests.conftest import nested_bag
from tests.runstore import Spec, write_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_km_groups_pvalue_and_files(tmp_path):
    _, written = write_run(tmp_path, Spec("amil", "tcga_blca", 1.0))
    run = plots.select_run(tmp_path, "amil", "blca")
    fig = plots.km_figure(run, "AMIL")
    pred = pd.concat([wf.predictions for wf in written])
    high = pred.risk > pred.train_median_risk
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"low risk (n={(~high).sum()})", f"high risk (n={high.sum()})"]
    p = logrank_test(pred.time[high], pred.time[~high], pred.event[high], pred.event[~high]).p_value
    assert f"log-rank p = {fmt_p(p)}" in [t.get_text() for t in ax.texts]
    at_risk = " ".join(t.get_text() for a in fig.axes[1:] for t in a.get_xticklabels())
    assert "At risk" in at_risk and str((~high).sum()) in at_risk  # the at-risk table starts with the group sizes
    paths = plots.save_figure(fig, tmp_path / "plots" / "km.png")
    assert [p.name for p in paths] == ["km.png", "km.pdf"]
    assert paths[0].read_bytes()[:8] == PNG and paths[1].read_bytes()[:5] == b"%PDF-"


def test_select_run_names_the_choices(tmp_path):
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0, seed=1))
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0, seed=2))
    with pytest.raises(MilbenchError, match="2 runs match.*--seed"):
        plots.select_run(tmp_path, "amil", "tcga_blca")
    assert plots.select_run(tmp_path, "amil", "tcga_blca", seed=2).record["config"]["seed"] == 2
    with pytest.raises(MilbenchError, match="no stored run of model 'transmil'"):
        plots.select_run(tmp_path, "transmil")


def test_panels_follow_the_maps_scales():
    bag = nested_bag(n5=4, in_dim=16)
    torch.manual_seed(0)
    model = create_model("crossfusion", 16, 4, embed_dim=32).eval()
    maps = model(bag, return_attention=True).attention
    maps["cross_scale"] = torch.rand(bag.n_patches("20x"), 3)  # a two-dimensional map: one panel per column
    maps["prototypes"] = torch.rand(7)  # matches no magnification: not drawn
    panels, skipped = plots.attention_panels(bag, maps)
    assert {p.title: p.scale for p in panels} == {
        "coarse (5x)": "5x", "fine (20x)": "20x", "source (10x)": "10x", "final (10x)": "10x",
        "cross_scale[0] (20x)": "20x", "cross_scale[1] (20x)": "20x", "cross_scale[2] (20x)": "20x"}
    assert skipped == ["prototypes"]
    fine = next(p for p in panels if p.scale == "20x")
    np.testing.assert_array_equal(fine.coords, bag.coords["20x"].numpy())
    np.testing.assert_allclose(fine.values, maps["fine"].numpy())


def test_raster_puts_each_patch_at_its_coordinates():
    coords = np.array([[1024, 512], [1280, 512], [1024, 768], [1792, 1024]])
    values = np.array([0.1, 0.2, 0.3, 0.4])
    img, extent = plots._raster(coords, values)
    assert img.shape == (3, 4) and extent == (1024, 2048, 1280, 512)  # step 256 px, y downwards
    assert img[0, 0] == 0.1 and img[0, 1] == 0.2 and img[1, 0] == 0.3 and img[2, 3] == 0.4
    assert np.isnan(img).sum() == 8


@pytest.fixture
def checkpoint_store(synth_dir, tmp_path):
    """Fold 0 of an untrained AMIL on the small synthetic cohort, stored with its weights and predictions."""
    cohort = resolve_cohort(str(synth_dir / "cohort.csv"), splits=synth_dir / "splits", features=synth_dir / "features")
    train_ids, test_ids = cohort.folds[0]
    card = get_card("amil")
    data = BagDataset(cohort, test_ids, card.scales, card=card)
    torch.manual_seed(0)
    model = create_model("amil", data.in_dim, 4).eval()
    with torch.no_grad():
        logits = torch.cat([model(data[i].to("cpu", dtype=torch.float32)).logits for i in range(len(data))])
    time, event = cohort.labels(test_ids)
    risk = -hazards_to_survival(logits).sum(dim=1).numpy()
    cfg = make_config("amil", cohort.name, "small")
    pred = pd.DataFrame({"case_id": test_ids, "time": time, "event": event, "risk": risk, "fold": 0,
                         "train_median_risk": float(np.median(risk))})
    record = {"config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": cfg.protocol, "fold": 0,
              "cohort": cfg.cohort, "model": "amil", "backbone": "default", "in_dim": data.in_dim,
              "n_train": len(train_ids), "bin_edges": fit_bins(*cohort.labels(train_ids)).tolist(), "metrics": {}}
    write_fold(tmp_path / "runs", cfg, 0, record, pred, model.state_dict())
    return tmp_path / "runs", cohort, test_ids


def test_heatmap_rebuilds_the_fold_model_from_its_checkpoint(checkpoint_store, synth_dir, tmp_path):
    runs, cohort, test_ids = checkpoint_store
    case = test_ids[0]
    run = plots.select_run(runs, "amil")
    found = plots.case_attention(run, case, str(synth_dir / "cohort.csv"), synth_dir / "features", synth_dir / "splits")
    assert found.risk == pytest.approx(found.stored_risk, abs=1e-5)  # the same model as the one that was scored
    assert found.slides == cohort.slides_of(case)
    a = found.maps["20x"]
    assert a.shape == (found.bag.n_patches("20x"),) and float(a.sum()) == pytest.approx(1.0, abs=1e-5)
    panels, skipped = plots.attention_panels(found.bag, found.maps, slide=0)
    first_slide = (found.bag.slide_index["20x"] == 0).numpy()
    assert not skipped and len(panels) == 1 and len(panels[0].values) == first_slide.sum()
    paths = plots.save_figure(plots.heatmap_figure(panels, f"AMIL, case {case}"), tmp_path / "heat")
    assert paths[0].read_bytes()[:8] == PNG and paths[1].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(MilbenchError, match="not held out in any stored fold"):
        plots.case_attention(run, test_ids[0] + "x", str(synth_dir / "cohort.csv"), synth_dir / "features")


def test_heatmap_without_checkpoint_says_how_to_get_one(tmp_path):
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0, folds=(0,)))
    run = plots.select_run(tmp_path, "amil")
    case = run.folds[0].predictions.case_id.iloc[0]
    with pytest.raises(MilbenchError, match="--save-checkpoints"):
        plots.case_attention(run, case)


def test_slide_number():
    assert plots.slide_number("c", ["s1", "s2"], None) == 0
    assert plots.slide_number("c", ["s1", "s2"], "s2") == 1 and plots.slide_number("c", ["s1", "s2"], "1") == 1
    with pytest.raises(MilbenchError, match="case c has slides s1, s2"):
        plots.slide_number("c", ["s1", "s2"], "s3")


@pytest.mark.slow
def test_plot_commands(checkpoint_store, synth_dir, tmp_path):
    runs, _, test_ids = checkpoint_store
    cli = [sys.executable, "-m", "milbench.cli", "plot"]
    res = subprocess.run([*cli, "km", "--runs-dir", str(runs), "--model", "amil", "--cohort", "cohort",
                          "--out", str(tmp_path / "km.pdf")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "km.png").is_file() and (tmp_path / "km.pdf").is_file()
    res = subprocess.run([*cli, "heatmap", "--runs-dir", str(runs), "--model", "amil", "--case", test_ids[1],
                          "--cohort", str(synth_dir / "cohort.csv"), "--features", str(synth_dir / "features"),
                          "--splits", str(synth_dir / "splits")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list((runs / "plots").glob(f"heatmap_cohort_amil_{test_ids[1]}_fold0.*"))) == 2
