"""Issue 19 at process and cluster level (slow): no worker outlives a killed driver, a killed driver's fold resumes at
its last epoch with the same result, a Ray session of milbench's own leaves the home folder alone, and on a two-node
local Ray cluster (both nodes on 127.0.0.1, the worker in its own mount namespace) a run store one node cannot see is
refused at start, and a worker node killed mid-fold still gives the local executor's records."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from milbench.runs.executors import execute
from milbench.runs.jobs import RunOptions, build_jobs, grid_specs

CLI = [sys.executable, "-m", "milbench.cli"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A 20-patient synthetic cohort table beside its splits/ and features/ folders."""
    from milbench.tasks.synthetic import generate_cohort

    folder = generate_cohort(tmp_path_factory.mktemp("syn"), "coarse", patients=20, seed=3, size=0.5, in_dim=8)
    (folder / "cohort.csv").rename(folder / "syn_c.csv")
    return folder / "syn_c.csv"


def _grid(table, runs, *extra):
    return [*CLI, "grid", "--models", "amil", "--cohorts", str(table), "--recipe", "small", "--runs-dir", str(runs),
            "--device", "cpu", *extra]


def _wait(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _children(pid):
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _claimed(runs):
    return [json.loads(c.read_text()) for c in Path(runs).rglob("*.claim") if c.stat().st_size]


def test_no_worker_outlives_a_killed_driver(table, tmp_path):
    runs = tmp_path / "runs"
    driver = subprocess.Popen(_grid(table, runs, "--epochs", "400", "--max-parallel", "2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: len(_claimed(runs)) >= 2, 60, "two workers training")
        workers = _children(driver.pid)
        assert {c["pid"] for c in _claimed(runs)} <= set(workers)
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, not its process group
        driver.wait()
        _wait(lambda: not any(_running(p) for p in workers), 10, "the workers to die with their driver")
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _checkpoint_epoch(runs):
    found = list(Path(runs).rglob("fold_0.resume.pt"))
    if not found:
        return None
    try:
        return torch.load(found[0], map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # being replaced at this very moment
        return None


def test_a_killed_driver_resumes_the_fold_at_its_last_epoch(table, tmp_path):
    reference = subprocess.run(_grid(table, tmp_path / "reference", "--folds", "0", "--epochs", "60"),
                               capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr
    runs = tmp_path / "runs"
    driver = subprocess.Popen(_grid(table, runs, "--folds", "0", "--epochs", "60"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(lambda: (_checkpoint_epoch(runs) or 0) >= 3, 60, "epoch 3 checkpointed")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not list(runs.rglob("record.json")), "the kill should land mid-fold"
    last = _checkpoint_epoch(runs)
    rerun = subprocess.run(_grid(table, runs, "--folds", "0", "--epochs", "60"), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    (record,) = runs.rglob("record.json")
    assert json.loads(record.read_text())["execution"]["resumed_after_epoch"] == last
    (expected,) = (tmp_path / "reference").rglob("predictions.csv")
    pd.testing.assert_frame_equal(pd.read_csv(expected), pd.read_csv(record.parent / "predictions.csv"),
                                  check_exact=True)
    assert not list(runs.rglob("*.resume.pt")) and not list(runs.rglob("*.claim"))


def test_a_ray_session_of_its_own_leaves_home_alone(table, tmp_path):
    pytest.importorskip("ray")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    before = set(Path("/tmp").glob("milbench-ray-*"))
    res = subprocess.run(_grid(table, tmp_path / "runs", "--folds", "0", "--epochs", "1", "--executor", "ray"),
                         capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "runs").rglob("record.json"))) == 1
    assert list(home.iterdir()) == []  # no ~/.ray/auth_token, nothing else
    assert set(Path("/tmp").glob("milbench-ray-*")) == before  # its temp dir is gone


# ---- a two-node local Ray cluster ----------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and worker node on 127.0.0.1, one CPU each, separate temp dirs; the worker runs in its own mount
    namespace where ``<base>/hidden`` is an empty tmpfs (a folder that node cannot see). No authentication."""
    pytest.importorskip("ray")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces)")
    base = tmp_path_factory.mktemp("cluster")
    (base / "hidden").mkdir()
    (base / "shared").mkdir()
    ray_bin = str(Path(sys.executable).parent / "ray")
    temps = Path(tempfile.mkdtemp(prefix="mbr-", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_AUTH_MODE": "disabled",
           "HOME": str(base)}
    head = subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "1", "--num-gpus", "0",
                             "--include-dashboard", "false", "--temp-dir", str(temps / "h"), "--block"],
                            stdout=open(base / "head.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    worker_cmd = (f"mount -t tmpfs tmpfs {base / 'hidden'} && exec {ray_bin} start --address 127.0.0.1:{port} "
                  f"--num-cpus 1 --num-gpus 0 --temp-dir {temps / 'w'} --block")
    nodes = {"head": head}
    try:
        _wait(lambda: "Ray runtime started" in (base / "head.log").read_text(), 60, "the head node")
        nodes["worker"] = subprocess.Popen(["unshare", "-rm", "sh", "-c", worker_cmd],
                                           stdout=open(base / "worker.log", "w"), stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
        _wait(lambda: "Ray runtime started" in (base / "worker.log").read_text() or nodes["worker"].poll() is not None,
              60, "the worker node")
        assert nodes["worker"].poll() is None, (base / "worker.log").read_text()[-2000:]
        time.sleep(2)
        yield {"address": f"127.0.0.1:{port}", "base": base, "env": env, "nodes": nodes}
    finally:
        for proc in nodes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        shutil.rmtree(temps, ignore_errors=True)


def test_a_runs_dir_one_node_cannot_see_is_refused_at_start(table, cluster):
    runs = cluster["base"] / "hidden" / "runs"
    res = subprocess.run(_grid(table, runs, "--folds", "0", "--epochs", "1", "--executor", "ray", "--ray-address",
                               cluster["address"]), capture_output=True, text=True, timeout=180, env=cluster["env"])
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "is not shared with Ray node" in line and str(runs) in line and "Traceback" not in res.stderr
    assert not list(runs.rglob("record.json")) and not list(runs.glob(".probe-*"))


def test_a_worker_node_killed_mid_fold_still_gives_the_local_records(table, cluster, tmp_path, monkeypatch):
    for key, value in cluster["env"].items():
        if key.startswith("RAY_"):
            monkeypatch.setenv(key, value)
    jobs = build_jobs(["amil"], grid_specs([str(table)], ["default"], None)[0], [0, 1], "small", {"epochs": 40})
    local = execute(jobs, RunOptions(str(tmp_path / "local"), device="cpu"))
    assert local.count("trained") == 2
    runs = cluster["base"] / "shared" / "runs"
    worker = cluster["nodes"]["worker"]

    node_ns = os.readlink(f"/proc/{worker.pid}/ns/mnt")

    def on_worker_node(pid):  # the worker node's processes share its mount namespace
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt") == node_ns
        except OSError:
            return False

    import threading

    killed = []

    def kill_the_worker_node():
        (pid,) = _wait(lambda: [c["pid"] for c in _claimed(runs) if on_worker_node(c["pid"])], 120,
                       "a fold on the worker node")
        time.sleep(1.0)  # a few epochs in
        os.killpg(worker.pid, signal.SIGKILL)  # the node: ray start, its raylet and agents
        os.kill(pid, signal.SIGKILL)  # and the worker process training the fold (Ray gives it its own group)
        killed.append(pid)

    threading.Thread(target=kill_the_worker_node, daemon=True).start()
    seen = []
    report = execute(jobs, RunOptions(str(runs), device="cpu", driver="driver-1"), executor="ray",
                     ray_address=cluster["address"], on_outcome=seen.append)
    assert killed and report.count("trained") == 2, [(o.status, o.error) for o in seen]
    assert any("worker died" in o.error for o in seen), [(o.status, o.error) for o in seen]
    for fold in (0, 1):
        (a,) = (tmp_path / "local").rglob(f"fold_{fold}/predictions.csv")
        (b,) = runs.rglob(f"fold_{fold}/predictions.csv")
        pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), check_exact=True)
    assert not list(runs.rglob("*.claim")) and not list(runs.rglob("*.resume.pt"))
