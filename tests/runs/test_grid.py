"""The grid: plan, status from the store, Ray gives exactly the local results, a killed driver resumes, a killed
worker's fold is retried, and two drivers on one store never train the same fold."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from milbench import MilbenchError
from milbench.runs.jobs import build_jobs, cohort_spec, grid_specs
from milbench.runs.status import grid_status, status_table
from milbench.runs.plan import read_plan, write_plan
from milbench.runs.claims import Claim, claim_path, failure_path
from milbench.runs.jobs import RunOptions
from milbench.runs.executors import execute
from milbench.runs.store import write_fold

CLI = [sys.executable, "-m", "milbench.cli"]
MODELS = ("amil", "mustmil")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """Two tiny custom-table cohorts (20 patients, 5 folds) written by the synthetic generator."""
    from milbench.tasks.synthetic import generate_cohort

    tables = []
    for name, scenario, seed in (("syn_a", "coarse", 1), ("syn_b", "fine", 2)):
        folder = generate_cohort(tmp_path_factory.mktemp(name), scenario, patients=20, seed=seed, size=0.2, in_dim=8,
                                 censoring=0.4)
        (folder / "cohort.csv").rename(folder / f"{name}.csv")
        tables.append(str(folder / f"{name}.csv"))
    return tables


def _jobs(cohorts, models=MODELS, folds=None):
    jobs = build_jobs(models, grid_specs(cohorts, ["default"], None)[0], folds, "small", {"epochs": 1})
    return jobs


def _store(runs):
    """Every fold in a store: relative fold folder -> (record, predictions)."""
    return {p.parent.relative_to(runs).as_posix(): (json.loads(p.read_text()),
                                                    pd.read_csv(p.parent / "predictions.csv", dtype={"case_id": str}))
            for p in sorted(Path(runs).rglob("record.json"))}


def milbench(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_grid_cohort_uses_its_folders_and_the_cohort_placeholder(cohorts, tmp_path):
    spec = cohort_spec(cohorts[0], "uni", None)
    folder = Path(cohorts[0]).parent
    assert (spec.splits, spec.features, spec.backbone) == (str(folder / "splits"), str(folder / "features"), "uni")
    assert cohort_spec(cohorts[0], "default", str(tmp_path / "{cohort}")).features == str(tmp_path / "syn_a")


def test_two_cohorts_with_one_name_are_rejected(cohorts, tmp_path):
    clash = shutil.copytree(Path(cohorts[0]).parent, tmp_path / "copy") / "syn_a.csv"
    with pytest.raises(MilbenchError, match="both named 'syn_a'"):
        build_jobs(["amil"], grid_specs([cohorts[0], str(clash)], ["default"], None)[0], None, "small", {})


def test_status_counts_folds_from_the_store(cohorts, tmp_path):
    jobs = _jobs(cohorts[:1], models=("amil",))
    path = write_plan(tmp_path, jobs, "ray", None)
    plan = read_plan(tmp_path)
    assert plan["id"] == path.stem and len(plan["jobs"]) == 5
    cfg = jobs[0].cfg
    record = {"timings": {"total_s": 4.0}, "metrics": {}}
    for fold in (0, 1):
        write_fold(tmp_path, cfg, fold, record, pd.DataFrame({"case_id": ["a"]}))
    held = Claim.acquire(claim_path(tmp_path, cfg, 2))
    failure_path(tmp_path, cfg, 3).write_text(json.dumps({"error": "RuntimeError: boom"}))
    status = grid_status(tmp_path, plan)
    assert [status.total(s) for s in ("done", "running", "failed", "pending")] == [2, 1, 1, 1]
    assert status.failures == [("amil · syn_a · default · fold 3", "RuntimeError: boom")]
    assert status.eta == pytest.approx(status.elapsed)  # 2 folds left at the rate of 2 done so far
    assert "2 done, 1 running, 1 failed, 1 pending" in status_table(status).title
    held.release()
    assert grid_status(tmp_path, plan).total("pending") == 2
    res = milbench("status", "--runs-dir", tmp_path)
    assert res.returncode == 0 and "RuntimeError: boom" in res.stdout and "syn_a" in res.stdout


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module (start-up takes 10-20 s)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    from milbench.runs.ray_session import end_local, start_local

    session = start_local(ray, num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray  # its own temp dir, no ~/.ray/auth_token
    ray.shutdown()
    end_local(*session)


@pytest.mark.slow
def test_ray_grid_gives_exactly_the_local_results(cohorts, tmp_path, ray_cluster):
    jobs = _jobs(cohorts)
    assert len(jobs) == 2 * 2 * 5
    local = execute(jobs, RunOptions(str(tmp_path / "local")))
    remote = execute(jobs, RunOptions(str(tmp_path / "ray")), executor="ray")
    assert local.count("trained") == remote.count("trained") == 20
    a, b = _store(tmp_path / "local"), _store(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 20
    for key in a:
        pd.testing.assert_frame_equal(a[key][1], b[key][1], check_exact=True)
        assert a[key][0]["metrics"] == b[key][0]["metrics"], key
        assert a[key][0]["environment"]["torch_threads"] == b[key][0]["environment"]["torch_threads"] == 1


@pytest.mark.slow
def test_cli_grid_joins_a_running_ray_cluster(cohorts, tmp_path, ray_cluster):
    address = ray_cluster.get_runtime_context().gcs_address
    runs = tmp_path / "runs"
    res = milbench("grid", "--models", "amil", "--cohorts", ",".join(cohorts), "--folds", "0", "--epochs", "1",
                   "--recipe", "small", "--executor", "ray", "--ray-address", address, "--runs-dir", runs)
    assert res.returncode == 0, res.stderr
    assert "2 fold(s) trained" in res.stdout and "(ray)" in res.stdout
    assert len(list(runs.rglob("record.json"))) == 2
    assert "2 done, 0 running, 0 failed, 0 pending" in milbench("status", "--runs-dir", runs).stdout


def _grid_cmd(cohorts, runs, *extra):
    """amil on both cohorts: 10 folds."""
    return [*CLI, "grid", "--models", "amil", "--cohorts", ",".join(cohorts), "--recipe", "small", "--runs-dir",
            str(runs), *extra]


def _text(out):
    return " ".join(out.split())  # rich wraps long lines


@pytest.mark.slow
def test_killed_grid_reruns_only_the_missing_folds(cohorts, tmp_path):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(_grid_cmd(cohorts, runs, "--epochs", "4", "--max-parallel", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and (len(list(runs.rglob("record.json"))) < 3 or not list(runs.rglob("*.claim"))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, mid-fold
    proc.wait()
    before = {p: p.read_bytes() for p in runs.rglob("record.json")}
    assert 3 <= len(before) < 10, "the kill should land mid-grid"
    assert list(runs.rglob("*.claim")), "the killed workers leave their claims behind"
    res = subprocess.run(_grid_cmd(cohorts, runs, "--epochs", "4"), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    missing = 10 - len(before)
    assert f"{missing} to run, {len(before)} already complete" in _text(res.stdout)
    assert f"{missing} fold(s) trained" in _text(res.stdout)  # the dead workers' claims were taken over
    after = list(runs.rglob("record.json"))
    assert len(after) == 10 and all(p.read_bytes() == b for p, b in before.items())
    folds = {(p.parent.parent.as_posix(), json.loads(p.read_text())["fold"]) for p in after}
    assert len(folds) == 10  # one record per fold, each readable
    assert all(len(pd.read_csv(p.parent / "predictions.csv")) > 0 for p in after)
    assert not list(runs.rglob("*.claim")) and not list(runs.rglob(".tmp-*"))


@pytest.mark.slow
def test_two_drivers_on_one_store_never_train_the_same_fold(cohorts, tmp_path):
    runs = tmp_path / "runs"
    drivers = [subprocess.Popen(_grid_cmd(cohorts, runs, "--epochs", "3"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [d.communicate(timeout=400) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), [err for _, err in outputs]
    trained = [int(re.search(r"(\d+) fold\(s\) trained", _text(out)).group(1)) for out, _ in outputs]
    assert sum(trained) == 10, outputs
    assert len(list(runs.rglob("record.json"))) == 10


@pytest.mark.slow
def test_a_killed_ray_worker_loses_only_its_fold_which_is_retried(cohorts, tmp_path, ray_cluster):
    jobs = build_jobs(["amil"], grid_specs(cohorts[:1], ["default"], None)[0], [0], "small", {"epochs": 60})
    runs = tmp_path / "runs"
    killed = []

    def kill_the_worker_holding_the_claim():
        while not killed:
            for claim in runs.rglob("*.claim"):
                if claim.read_text():
                    killed.append(json.loads(claim.read_text())["pid"])
                    os.kill(killed[0], signal.SIGKILL)
                    return
            time.sleep(0.05)

    threading.Thread(target=kill_the_worker_holding_the_claim, daemon=True).start()
    seen = []
    report = execute(jobs, RunOptions(str(runs), driver="driver-1"), executor="ray", on_outcome=seen.append)
    assert killed and [(o.status, o.attempt) for o in seen] == [("failed", 0), ("trained", 1)]
    assert "worker died" in seen[0].error and seen[0].will_retry
    assert report.count("trained") == 1 and len(list(runs.rglob("record.json"))) == 1
    assert not list(runs.rglob("*.claim"))  # the retry took over the dead attempt's claim, then released it
