"""The comparison with the CrossFusion paper: ours (recomputed from predictions) beside the published figure per cell,
the difference, within ± std, ranks per protocol only, log-rank p beside the paper's, Kaplan-Meier plots for
CrossFusion, submitted runs labelled, and the benchmark file's unstated choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench.config.benchmark import load_spec
from milbench.config.run import RunConfig
from milbench.report.document import Block
from milbench.report.paper import comparison, paper_sections, write_km, write_report
from milbench.runs.benchmark import write_sidecar
from milbench.runs.store import write_fold
from milbench.survival.metrics import harrell_c
from milbench.tasks.cohort import resolve_cohort

TABLE1 = Path(__file__).parents[2] / "benchmarks" / "crossfusion_midl2026.toml"


def store_run(runs: Path, model: str, protocol: str, noise: float, folds=range(5), cohort="tcga_blca",
              backbone="resnet50", source: str | None = None) -> list[float]:
    """A stored run whose risks are minus the time plus noise; the folds' C-indices."""
    the = resolve_cohort(cohort)
    cfg = RunConfig(model=model, cohort=cohort, backbone=backbone, protocol=protocol)
    rng = np.random.default_rng(len(model) + int(noise * 100))
    cs = []
    for k in folds:
        held = the.folds[k][1]
        time, event = the.labels(held)
        risk = -time + rng.normal(0, noise, len(held))
        pred = pd.DataFrame({"case_id": held, "time": time, "event": event, "risk": risk, "fold": k,
                             "train_median_risk": float(np.median(risk))})
        record = {"config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": protocol, "fold": k,
                  "cohort": cohort, "model": model, "backbone": backbone, "metrics": {"c_index": 0.0}}
        if source:
            record["source"] = source
        write_fold(runs, cfg, k, record, pred)
        cs.append(harrell_c(time, event, risk))
    return cs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    runs = tmp_path_factory.mktemp("paper") / "runs"
    cs = {"cf_best": store_run(runs, "crossfusion", "best-val", 20.0),
          "amil_best": store_run(runs, "amil", "best-val", 60.0),
          "amil_inner": store_run(runs, "amil", "inner-val", 5.0),
          "ext": store_run(runs, "extmil", "best-val", 30.0, source="submitted"),
          "dsmil_part": store_run(runs, "dsmil", "best-val", 10.0, folds=[0, 1])}
    write_sidecar(load_spec(TABLE1), runs)
    return runs, cs


def test_each_cell_sits_beside_the_published_figure(runs):
    path, cs = runs
    cmp = comparison(path)
    cf = cmp[(cmp.model == "crossfusion") & (cmp.protocol == "best-val") & (cmp.cohort == "tcga_blca")].iloc[0]
    assert cf["mean"] == pytest.approx(np.mean(cs["cf_best"])) and cf["std"] == pytest.approx(
        np.std(cs["cf_best"], ddof=1))  # recomputed from the predictions, not the records' 0.0
    assert cf.ci_low < cf["mean"] < cf.ci_high and cf.folds == 5 and cf.complete
    assert (cf.paper_mean, cf.paper_std, cf.paper_table) == (0.630, 0.027, "Table 1")
    assert cf["diff"] == pytest.approx(cf["mean"] - 0.630)
    assert cf.within == (abs(cf["mean"] - 0.630) <= 0.027)
    assert cf.paper_logrank_p == pytest.approx(1.79e-4) and 0 <= cf.logrank_p < 0.05
    assert cf.paper_text == "0.630 ± 0.027" and cf.ours_text.endswith("(5×1)")


def test_ranks_stay_within_a_protocol_and_skip_incomplete_cells(runs):
    path, cs = runs
    cmp = comparison(path)
    best = cmp[(cmp.protocol == "best-val") & (cmp.cohort == "tcga_blca") & (cmp.folds > 0)].set_index("model")
    means = best["mean"].drop("dsmil").sort_values(ascending=False)
    assert list(best.loc[means.index, "rank"]) == [1.0, 2.0, 3.0]
    assert np.isnan(best.loc["dsmil", "rank"]) and not best.loc["dsmil", "complete"]  # 2 of 5 folds
    assert "†" in best.loc["dsmil", "ours_text"]
    inner = cmp[(cmp.protocol == "inner-val") & (cmp.folds > 0)]
    assert list(inner.model) == ["amil"] and inner["rank"].iloc[0] == 1  # its own table: never ranked with best-val
    ext = best.loc["extmil"]
    assert ext.submitted and ext.model_label == "extmil (submitted)" and np.isnan(ext.paper_mean)


def test_what_the_file_asks_for_and_nothing_scored_shows_the_paper_alone(runs):
    path, _ = runs
    cmp = comparison(path)
    waiting = cmp[cmp.folds == 0]
    assert len(waiting) == 2 * 6 * 13 - 4  # protocols x cohorts x models, less the cells that have runs
    luad = waiting[(waiting.model == "protosurv") & (waiting.cohort == "tcga_luad") & (waiting.protocol == "best-val")]
    assert luad.paper_text.iloc[0] == "0.619 ± 0.046" and luad.ours_text.iloc[0] == "not run"


@pytest.mark.slow
def test_sections_and_files(runs, tmp_path):
    path, _ = runs
    sections = paper_sections(path)
    blocks = [b for s in sections for b in s.blocks if isinstance(b, Block)]
    keys = [b.key for b in blocks]
    assert keys[:2] == ["paper-best-val-resnet50", "paper-inner-val-resnet50"] and "paper-choices" in keys
    main = blocks[0]
    assert main.columns[2] == "Paper (best-val)" and "Log-rank p" in main.columns
    assert any("0.630 ± 0.027" in row[2].text for row in main.rows)
    choices = blocks[keys.index("paper-choices")]
    assert any(row[0].text == "schedule" and "cosine" in row[1].text for row in choices.rows)
    assert any("optimistic" in line for s in sections for line in s.text)
    written = write_km(path, tmp_path / "km")
    assert len(written) == 2 and {p.suffix for p in written} == {".png", ".pdf"}
    assert "crossfusion_best-val_resnet50_tcga_blca" in written[0].name
    report = write_report(path, tmp_path / "board")
    text = report[0].read_text()
    assert report[0].name == "paper.md" and "| CrossFusion |" in text and "0.630 ± 0.027" in text
    assert "extmil (submitted)" in text and "What the paper leaves unstated" in text
    assert json.loads((path / "benchmarks" / "crossfusion_midl2026.json").read_text())["paper"] == "table1"


def test_an_empty_store_or_one_without_tcga_runs_gives_nothing(tmp_path):
    (tmp_path / "runs").mkdir()
    assert comparison(tmp_path / "runs").empty and paper_sections(tmp_path / "runs") == []


def test_crossfusion_over_six_cohorts_sits_beside_table2s_mean(tmp_path):
    runs = tmp_path / "runs"
    cohorts = ["tcga_blca", "tcga_brca", "tcga_coad", "tcga_gbmlgg", "tcga_luad", "tcga_ucec"]
    means = [np.mean(store_run(runs, "crossfusion", "best-val", 30.0, cohort=c, backbone="conch")) for c in cohorts]
    store_run(runs, "crossfusion", "inner-val", 30.0, cohort="tcga_blca", backbone="conch")
    blocks = {b.key: b for s in paper_sections(runs) for b in s.blocks if isinstance(b, Block)}
    table = blocks["paper-table2-means"]
    best, inner = table.rows
    assert [c.text for c in best[:2]] == ["conch", "6 of 6"] and best[2].value == pytest.approx(np.mean(means))
    assert best[3].text == "0.695" and best[4].text == f"{np.mean(means) - 0.695:+.3f}"
    assert [c.text for c in inner[1:3]] == ["1 of 6", "–"]  # five cohorts missing: no mean
    assert table.groups == ["protocol best-val", "protocol inner-val"]
    cells = blocks["paper-best-val-conch"]
    assert "Table 2" in cells.title and any("0.675 ± 0.060" in row[2].text for row in cells.rows)  # BRCA, conch


@pytest.mark.slow
def test_the_leaderboard_carries_the_comparison_labels_submissions_and_writes_the_plots(runs, tmp_path):
    from milbench.report.aggregate import build
    from milbench.report.write import write

    path, _ = runs
    written = write(build(path, n_boot=0), tmp_path / "board", ["md", "html"])
    names = {p.name for p in written}
    assert any(n.startswith("km_crossfusion_best-val_resnet50_tcga_blca_") and n.endswith(".png") for n in names)
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles[-3:] == ["## Beside the paper: Soraki et al., CrossFusion, MIDL 2026 (PMLR 315:2906-2921)",
                           "## Kaplan-Meier curves of CrossFusion (pooled out-of-fold risk groups)", "## Runs"]
    main = text.split("## Protocol: best-val")[1].split("###")[1]  # the protocol's first table
    assert "| extmil (submitted) |" in main
    assert "km_crossfusion_best-val_resnet50_tcga_blca_" in (tmp_path / "board" / "leaderboard.html").read_text()
