"""Both paper benchmark files end to end on tiny feature roots holding part of the real TCGA slides (a few patches
per slide and magnification, width 8 or 16): the dry run reports what is found and missing and estimates the
compute without training; one model on one fold runs for real and the paper's figures appear beside ours; a
submission is added from the command line, and a bad one is refused with exit 2 and the store unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from milbench.cli import app
from milbench.cli.app import console
from tests.runs.tcga_roots import write_root

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TABLE1 = str(BENCHMARKS / "crossfusion_midl2026.toml")
TABLE2 = str(BENCHMARKS / "crossfusion_midl2026_table2.toml")


N = 18  # slides of the 15 patients written (3 per fold; some have two slides)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    """ROOT/{cohort}/{backbone}: BLCA at resnet50 (width 8) and conch (width 16), 3 patients per fold each."""
    root = tmp_path_factory.mktemp("features")
    assert len(write_root(root / "tcga_blca" / "resnet50", "tcga_blca", per_fold=3, width=8)) == N
    assert len(write_root(root / "tcga_blca" / "conch", "tcga_blca", per_fold=3, width=16)) == N
    return str(root / "{cohort}" / "{backbone}")


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setattr(console, "_width", 250)  # whole table cells in the captured output


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    """The output on one line, table borders dropped."""
    return " ".join(text.translate({ord(c): " " for c in "│┃"}).split())


@pytest.mark.slow
def test_table1_dry_run_reports_found_and_missing_slides_and_the_estimate(features, tmp_path, wide):
    result = invoke("benchmark", TABLE1, "--features", features, "--dry-run", "--cohorts", "blca,coad",
                    "--gpus", "8", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"{N}/437" in out and "0/424" in out  # slides found of the shipped tables' slides
    assert f"missing {437 - N} of 437 slides" in out and "missing 424 of 424 slides" in out
    assert "TCGA-" in out and "--list-missing lists them all" in out
    assert "8 (paper: 2048)" in out and "5x 10x 20x" in out
    assert "4 (8, 8)" in out  # 20x patches per patient: median (p90, max)
    assert "measured on an NVIDIA H200" in out and "estimated from transmil" in out
    assert "dsmil: no H200 measurement" in out and "wall-clock on 8 GPU(s)" in out
    assert "a run would stop before training" in out and "260 folds planned" in out
    assert not (tmp_path / "runs").exists()


def test_table2_dry_run_names_each_backbone_and_its_width(features, tmp_path, wide):
    result = invoke("benchmark", TABLE2, "--features", features, "--dry-run", "--cohorts", "blca",
                    "--backbones", "resnet50,conch", "--exclude-missing", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"blca resnet50 {N}/437 8 (paper: 2048)" in out and f"blca conch {N}/437 16 (paper: 512)" in out
    assert "crossfusion 20" in out  # 2 backbones x 2 protocols x 5 folds
    assert "benchmark crossfusion_midl2026_table2: 20 folds; 20 to run, 0 already complete" in out
    missing = invoke("benchmark", TABLE2, "--features", features, "--dry-run", "--cohorts", "blca", "--backbones",
                     "quiltnet", "--list-missing", "--runs-dir", str(tmp_path / "runs"))
    assert missing.exit_code == 0 and "0/437" in flat(missing.output) and "--list-missing" not in missing.output


@pytest.mark.slow
def test_table1_one_model_one_fold_for_real_beside_the_paper(features, tmp_path, wide):
    runs = tmp_path / "runs"
    result = invoke("benchmark", TABLE1, "--features", features, "--cohorts", "blca", "--models", "amil",
                    "--folds", "0", "--exclude-missing", "--set", "epochs=2", "--device", "cpu",
                    "--runs-dir", str(runs))
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "2 folds (1 models x 1 cohorts x 1 backbones x 2 protocols x 1 seeds x 1 folds)" in out
    assert "protocol best-val" in out and "protocol inner-val" in out and "0.559 ± 0.059" in out
    assert len(list(runs.rglob("record.json"))) == 2
    board = (runs / "leaderboard" / "paper.md").read_text()
    amil = [line for line in board.splitlines() if line.startswith("| AMIL | 0.")]
    assert len(amil) == 2 and all("0.559 ± 0.059" in line and "(1×1) †" in line for line in amil)
    assert "| CrossFusion | not run | 0.630 ± 0.027 |" in board  # the rest of Table 1, waiting
    again = invoke("benchmark", TABLE1, "--features", features, "--cohorts", "blca", "--models", "amil",
                   "--folds", "0", "--exclude-missing", "--set", "epochs=2", "--runs-dir", str(runs), "--dry-run")
    assert "2 folds; 0 to run, 2 already complete" in flat(again.output)


@pytest.mark.slow
def test_table2_crossfusion_one_fold_for_real_with_its_kaplan_meier_plot(features, tmp_path, wide):
    runs = tmp_path / "runs"
    result = invoke("benchmark", TABLE2, "--features", features, "--cohorts", "blca", "--backbones", "conch",
                    "--protocols", "best-val", "--folds", "0", "--exclude-missing", "--set", "epochs=1",
                    "--set", "embed_dim=32", "--device", "cpu", "--runs-dir", str(runs))
    assert result.exit_code == 0, result.output
    board = (runs / "leaderboard" / "paper.md").read_text()
    assert "C-index beside the paper (Table 2) — protocol best-val, backbone conch" in board
    assert any(line.startswith("| CrossFusion | 0.") and "0.649 ± 0.053" in line for line in board.splitlines())
    assert len(list((runs / "leaderboard").glob("km_crossfusion_best-val_conch_tcga_blca_*.png"))) == 1


def _milbench(*args: str) -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("milbench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([str(command), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_submit_from_the_command_line(tmp_path):
    import numpy as np
    import pandas as pd

    from milbench.tasks.cohort import resolve_cohort

    cohort = resolve_cohort("tcga_ucec")
    rows = [{"case_id": c, "fold": k, "risk": float(i % 7)} for k, (_, held) in cohort.folds.items()
            for i, c in enumerate(held)]
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(good, index=False)
    pd.DataFrame(rows).assign(risk=lambda f: np.where(f.index == 3, np.nan, f.risk)).to_csv(bad, index=False)
    runs = tmp_path / "runs"
    ok = _milbench("submit", str(good), "--cohort", "ucec", "--model", "groupx_mil", "--backbone", "resnet50",
                   "--protocol", "inner-val", "--runs-dir", str(runs), "--by", "group X")
    assert ok.returncode == 0, ok.stderr
    assert "5 fold(s) written" in " ".join(ok.stdout.split())
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    refused = _milbench("submit", str(bad), "--cohort", "ucec", "--model", "groupy_mil", "--runs-dir", str(runs))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "refused (1 problem(s)); nothing was written" in lines[0]
    assert "line 5" in lines[1] and "risk is empty" in lines[1] and len(lines) == 2
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
