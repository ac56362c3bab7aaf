"""A TCGA benchmark's jobs and its dry run on a tiny feature root holding part of the real slides of
milbench/splits/tcga_blca.csv: what is found and missing, bag sizes from headers, the GPU-hour estimate, and the jobs
the one job builder makes (with --exclude-missing) — nothing trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from milbench import MilbenchError
from milbench.config.benchmark import load_spec
from milbench.runs.benchmark import (
    benchmark_jobs,
    cohort_specs,
    dry_run,
    planned_folds,
    tcga_roots,
)
from milbench.runs.estimate import PROXIES, STEP_MS, makespan, step_seconds, step_source
from milbench.runs.inventory import inventory
from tests.runs.tcga_roots import SCALES, chosen_patients, write_root

TABLE1 = Path(__file__).parents[2] / "benchmarks" / "crossfusion_midl2026.toml"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tcga")
    write_root(base / "tcga_blca" / "resnet50", "tcga_blca", per_fold=3)
    return base


def test_inventory_reports_found_missing_unreadable_widths_and_bags(tmp_path):
    write_root(tmp_path, "tcga_blca", per_fold=3)
    h5 = tmp_path / "x20" / "h5_files"
    next(iter(sorted(h5.iterdir()))).write_bytes(b"not an h5 file")  # one unreadable 20x file
    inv = inventory("tcga_blca", tmp_path, "resnet50", ("5x", "10x", "20x"))
    written = 15  # 3 patients per fold x 5 folds
    slides = sum(1 for p in (tmp_path / "x5" / "h5_files").iterdir())
    assert inv.slides == 437 and inv.patients == 373 and written <= slides < 437
    assert len(inv.missing) == 437 - slides and inv.missing_by_scale == {s: 437 - slides for s in SCALES}
    assert len(inv.unreadable) == 1 and "cannot read" in inv.unreadable[0][1]
    assert inv.found == slides - 1 and inv.width == 8 and inv.present == ("5x", "10x", "20x")
    assert len(inv.bags) == written - 1  # the patient with the unreadable file is not complete
    assert set(inv.bags["20x"]) <= {4, 8, 12} and inv.bag_summary("20x")["min"] == 4


def test_step_times_are_interpolated_and_labelled():
    avg, p90, big = (895, 3449, 13496), (2500, 10000, 40000), (8625, 34500, 137990)
    t = step_seconds("crossfusion", ("5x", "10x", "20x"), np.array([(1, 2, 4), avg, p90, big, (0, 0, 276000)]))
    assert t[0] == t[1] == pytest.approx(STEP_MS["crossfusion"][0] / 1000)  # below the avg bag: the avg time
    assert t[2] == pytest.approx(STEP_MS["crossfusion"][1] / 1000) and t[3] == pytest.approx(0.29215)
    assert t[4] > t[3]  # beyond the largest bag: the last segment extended
    mustmil = step_seconds("mustmil", ("5x", "10x"), np.array([(895, 3449), (2500, 10000)]))
    assert mustmil == pytest.approx(np.array(STEP_MS["crossfusion"][:2]) / 1000)  # by 10x, at the 1:4 ratio
    assert step_source("amil") == ("amil", "measured") and step_source("dsmil")[0] == "transmil"
    assert set(PROXIES) | set(STEP_MS) == set(load_spec(TABLE1).models)  # every Table 1 model has a source
    assert makespan([5, 4, 3, 3, 1], 2) == 8 and makespan([5], 4) == 5


def test_planned_folds_follow_the_file_and_the_subsets():
    spec = load_spec(TABLE1)
    folds = {"tcga_blca": [0, 1, 2, 3, 4]}
    jobs = planned_folds(spec, folds, [("tcga_blca", "resnet50")])
    assert len(jobs) == 13 * 2 * 5
    best = [j for j in jobs if j["protocol"] == "best-val" and j["model"] == "amil"]
    assert {(j["epochs"], j["warmup_epochs"], j["seed"]) for j in best} == {(100, 5, 7)}
    few = planned_folds(spec, folds, [("tcga_blca", "resnet50")], models=["amil"], protocols=["inner-val"],
                        folds=[0], overrides={"epochs": 2})
    assert [(j["model"], j["protocol"], j["fold"], j["epochs"]) for j in few] == [("amil", "inner-val", 0, 2)]


def test_dry_run_reports_missing_slides_without_failing(root, tmp_path):
    spec = load_spec(TABLE1)
    template = str(root / "{cohort}" / "{backbone}")
    result = dry_run(spec, template, tmp_path / "runs", gpus=4, cohorts=["blca", "coad"])
    blca, coad = result.inventories[("tcga_blca", "resnet50")], result.inventories[("tcga_coad", "resnet50")]
    assert blca.found > 0 and coad.found == 0 and len(coad.missing) == 424
    assert result.stop is not None and "missing" in result.stop and result.todo is None
    assert result.planned == 13 * 2 * 2 * 5 == len(result.estimate.folds)
    assert result.estimate.gpu_hours > 0 and result.estimate.wall_seconds * 4 >= sum(
        f.seconds for f in result.estimate.folds)
    assert any("average bag" in n for n in result.estimate.notes)  # coad: no patient found
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_jobs_with_excluded_slides_go_through_the_one_job_builder(root, tmp_path):
    spec = load_spec(TABLE1)
    template = str(root / "{cohort}" / "{backbone}")
    with pytest.raises(MilbenchError, match="feature file"):
        benchmark_jobs(spec, specs=cohort_specs(spec, None, template, ["blca"]), models=["amil"], folds=[0])
    specs = cohort_specs(spec, None, template, ["blca"], exclude_missing=True)
    assert [(s.source, s.backbone, s.exclude_missing) for s in specs] == [("tcga_blca", "resnet50", True)]
    jobs = benchmark_jobs(spec, specs=specs, models=["amil", "transmil"], folds=[0], overrides={"epochs": 2})
    assert [(j.cfg.model, j.cfg.protocol, j.fold) for j in jobs] == [  # the file's order: slowest model first
        ("transmil", "best-val", 0), ("transmil", "inner-val", 0), ("amil", "best-val", 0), ("amil", "inner-val", 0)]
    best = jobs[2].cfg
    assert best.bins_on == "cohort" and best.epochs == 2 and best.recipe == "paper" and best.backbone == "resnet50"
    assert jobs[3].cfg.bins_on == "train" and best.inputs["features"] != ""
    assert len({j.cfg.hash for j in jobs}) == 4
    with pytest.raises(MilbenchError, match="protocol 'fixed' is not in"):
        benchmark_jobs(spec, specs=specs, models=["amil"], protocols=["fixed"])


def test_the_features_template_comes_from_the_command_line_or_the_file(tmp_path):
    spec = load_spec(TABLE1)
    with pytest.raises(MilbenchError, match="pass --features ROOT"):
        tcga_roots(spec, None)
    roots = tcga_roots(spec, "/d/{short}/{backbone}", ["blca", "tcga_luad"])
    assert roots == [("tcga_blca", "resnet50", "/d/blca/resnet50"), ("tcga_luad", "resnet50", "/d/luad/resnet50")]
    with pytest.raises(MilbenchError, match="cohort 'tcga_coadread' is not in"):
        tcga_roots(spec, "/d", ["coadread"])


def test_chosen_patients_give_every_fold_events():
    chosen = chosen_patients("tcga_blca", 3)
    assert len(chosen) == 15 and len(set(chosen)) == 15
