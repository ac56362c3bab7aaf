"""The benchmark file: checked on load, cohorts written once and reused, the whole grid expanded and run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from milbench import MilbenchError
from milbench.runs.benchmark import benchmark_jobs, prepare_cohorts
from milbench.config.benchmark import load_spec
from milbench.cli import app
from milbench.report.aggregate import build

TINY = """
[benchmark]
name = "tiny"
runs_dir = "runs"
data_dir = "data"
cohort_prefix = "tb"

[cohorts]
scenarios = ["coarse", "cross-scale"]
patients = 24
censoring = 0.5
size = 0.25
in_dim = 8
seed = 0
folds = 2

[training]
protocol = "fixed"
recipe = "small"
epochs = 1
seeds = [7, 8]

[models]
names = ["amil", "dsmil"]

[options.dsmil]
instance_loss = false
"""


def write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "bench.toml"
    path.write_text(text)
    return path


def test_the_shipped_benchmark_file_loads():
    spec = load_spec(Path(__file__).parents[2] / "benchmarks" / "synthetic.toml")
    assert spec.scenarios == ("coarse", "fine", "cross-scale", "mixed")
    assert len(spec.seeds) >= 3 and spec.protocol == "fixed"
    from milbench.models.cards import BUILTIN
    assert set(spec.models) == set(BUILTIN)  # every built-in model (plug-ins installed here do not count)


@pytest.mark.parametrize("edit, message", [
    (("patients = 24", "patients = \"24\""), "wrong type"),
    (("epochs = 1", "epochs = 1\nepoch = 2"), "unknown key 'epoch'"),
    (("\"coarse\", ", "\"coarse\", \"blurry\", "), "unknown scenario blurry"),
    (("names = [\"amil\", \"dsmil\"]", "names = [\"amil\", \"nosuchmil\"]"), "nosuchmil"),
    (("[options.dsmil]", "[options.transmil]"), "[options.transmil]"),
    (("protocol = \"fixed\"", "protocol = \"best\""), "unknown protocol"),
])
def test_bad_files_fail_with_one_line_naming_the_file(tmp_path, edit, message):
    path = write(tmp_path, TINY.replace(*edit))
    with pytest.raises(MilbenchError) as err:
        load_spec(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cohorts_are_written_once_and_jobs_cover_the_grid(tmp_path):
    spec = load_spec(write(tmp_path))
    seen = []
    tables = prepare_cohorts(spec, lambda name, fresh: seen.append((name, fresh)))
    assert seen == [("tb_coarse", True), ("tb_cross-scale", True)]
    assert tables["coarse"] == tmp_path / "data" / "tb_coarse" / "tb_coarse.csv"
    seen.clear()
    prepare_cohorts(spec, lambda name, fresh: seen.append((name, fresh)))
    assert seen == [("tb_coarse", False), ("tb_cross-scale", False)]  # reused: same parameters
    jobs = benchmark_jobs(spec, tables)
    assert len(jobs) == 2 * 2 * 2 * 2  # models x scenarios x seeds x folds
    assert {j.cfg.cohort for j in jobs} == {"tb_coarse", "tb_cross-scale"}
    assert {(j.cfg.model, j.cfg.seed) for j in jobs} == {(m, s) for m in ("amil", "dsmil") for s in (7, 8)}
    assert all(j.cfg.epochs == 1 and j.cfg.recipe == "small" for j in jobs)
    assert all(j.cfg.model_options == {"instance_loss": False} for j in jobs if j.cfg.model == "dsmil")
    only = benchmark_jobs(spec, tables, ["amil"])
    assert {j.cfg.model for j in only} == {"amil"}
    with pytest.raises(MilbenchError, match="transmil"):
        benchmark_jobs(spec, tables, ["transmil"])
    one_seed = benchmark_jobs(spec, tables, None, [8])
    assert {j.cfg.seed for j in one_seed} == {8} and len(one_seed) == 2 * 2 * 2
    with pytest.raises(MilbenchError, match="seed '9'"):
        benchmark_jobs(spec, tables, None, [9])


def test_changed_parameters_regenerate_the_cohort(tmp_path):
    spec = load_spec(write(tmp_path))
    prepare_cohorts(spec)
    spec2 = load_spec(write(tmp_path, TINY.replace("patients = 24", "patients = 30")))
    seen = []
    tables = prepare_cohorts(spec2, lambda name, fresh: seen.append(fresh))
    assert seen == [True, True]
    assert sum(1 for _ in open(tables["coarse"])) > 30  # header + one row per slide of 30 patients


@pytest.mark.slow
def test_benchmark_command_runs_resumes_and_feeds_the_leaderboard(tmp_path):
    path = write(tmp_path, TINY.replace('names = ["amil", "dsmil"]', 'names = ["amil"]').replace(
        "[options.dsmil]\ninstance_loss = false\n", ""))
    runner = CliRunner()
    result = runner.invoke(app, ["benchmark", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    board = build(tmp_path / "runs", n_boot=0)
    assert len(board.folds) == 2 * 2 * 2  # scenarios x seeds x folds
    assert set(board.cells.cohort) == {"tb_coarse", "tb_cross-scale"}
    assert board.cells.oracle.between(0.5, 1.0).all() and (board.cells.seeds == 2).all()
    again = runner.invoke(app, ["benchmark", str(path), "--device", "cpu"])
    assert again.exit_code == 0 and "0 to run, 8 already complete" in " ".join(again.output.split())
    one = runner.invoke(app, ["benchmark", str(path), "--seeds", "8", "--dry-run"])
    assert "(1 models x 2 scenarios x 1 seeds x 2 folds); 0 to run, 4 already" in " ".join(one.output.split())
