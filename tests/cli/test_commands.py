"""The command line as a user runs it: subprocesses, exit codes, no tracebacks, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "milbench.cli"]
# one torch thread (2 shared cores thrash with more) and a wide terminal so rich tables are not truncated
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def milbench(*args, cwd=None, timeout=300, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**ENV, **(env or {})})


def _custom(synth_dir):
    return ["--cohort", synth_dir / "cohort.csv", "--splits", synth_dir / "splits", "--features", synth_dir / "features"]


def test_models_and_cohorts_fit_80_columns():
    """Every built-in model with its reference parameter count (AMIL: 789,765 at 1024 -> 0.79, 1,314,053 -> 1.31),
    every line within 80 columns, no name cut short."""
    from milbench.models.cards import BUILTIN

    res = milbench("models", env={"COLUMNS": "80"})
    assert res.returncode == 0 and "0.79 / 1.31" in res.stdout
    assert all(len(line) <= 80 for line in res.stdout.splitlines())
    assert all(f" {name} " in res.stdout for name in BUILTIN) and "…" not in res.stdout
    res = milbench("cohorts", env={"COLUMNS": "80"})
    assert res.returncode == 0 and "tcga_brca" in res.stdout and "synthetic_cross-scale" in res.stdout
    assert all(len(line) <= 80 for line in res.stdout.splitlines()) and "…" not in res.stdout


def test_unknown_model_is_one_line_exit_2(synth_dir, tmp_path):
    res = milbench("run", "--model", "nosuch", *_custom(synth_dir), "--runs-dir", tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "unknown model 'nosuch'" in res.stderr


def test_missing_features_is_one_line_exit_2(synth_dir, tmp_path):
    res = milbench("run", "--model", "amil", "--cohort", synth_dir / "cohort.csv", "--splits", synth_dir / "splits",
                   "--features", tmp_path / "nowhere", "--runs-dir", tmp_path / "runs", "--epochs", "1")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    assert "nowhere" in res.stderr and len(res.stderr.strip().splitlines()) <= 3  # one message, maybe soft-wrapped


def test_bad_option_is_rejected(synth_dir, tmp_path):
    res = milbench("run", "--model", "amil", *_custom(synth_dir), "--runs-dir", tmp_path, "--set", "nosuch=1",
                   "--epochs", "1", "--folds", "0")
    assert res.returncode == 2 and "--set nosuch: valid keys are" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_killed_run_resumes_and_keeps_completed_folds(synth_dir, tmp_path):
    runs = tmp_path / "runs"
    args = [*CLI, "run", "--model", "amil", *map(str, _custom(synth_dir)), "--runs-dir", str(runs),
            "--epochs", "40", "--folds", "0,1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.rglob("fold_0/record.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list(runs.rglob("fold_0/record.json"))
    assert len(done) == 1, "fold 0 should have completed before the kill"
    assert not list(runs.rglob("fold_1/record.json")), "fold 1 must not look complete after the kill"
    before = done[0].read_bytes()
    res = milbench("run", "--model", "amil", *_custom(synth_dir), "--runs-dir", runs, "--epochs", "40",
                   "--folds", "0,1")
    assert res.returncode == 0, res.stderr
    assert "1 fold(s) to run, 1 already complete" in res.stdout
    assert done[0].read_bytes() == before
    assert len(list(runs.rglob("record.json"))) == 2
    assert not list(runs.rglob(".tmp-*"))


@pytest.mark.slow
def test_run_then_leaderboard_recomputes_from_predictions(synth_dir, tmp_path):
    runs = tmp_path / "runs"
    res = milbench("run", "--model", "amil", *_custom(synth_dir), "--runs-dir", runs, "--epochs", "2")
    assert res.returncode == 0, res.stderr
    assert "oracle C" in res.stdout
    records = list(runs.rglob("record.json"))
    assert len(records) == 5
    # tamper with a cached metric: the leaderboard must not use it
    rec = json.loads(records[0].read_text())
    rec["metrics"]["c_index"] = 0.999
    records[0].write_text(json.dumps(rec))
    res = milbench("leaderboard", "--runs-dir", runs, "--out", tmp_path / "lb")
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "amil" in md and "0.999" not in md



def test_debug_shows_the_traceback_the_plain_error_hides(synth_dir, tmp_path):
    """README: bad input is one plain line, exit 2; `--debug` shows the traceback instead."""
    args = ("run", "--model", "amil", *_custom(synth_dir), "--runs-dir", tmp_path, "--set", "lr=fast")
    plain = milbench(*args)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = milbench("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "lr must be a number" in debug.stderr
