"""Fold claims (exclusive, stale ones taken over), the fold task, retries and reported failures."""

import json
import os
import subprocess
import sys
import time

import pytest

from milbench import MilbenchError
from milbench.runs import executors as runner
from milbench.config.run import make_config
from milbench.runs.claims import Claim, ClaimInfo, claim_path, failure_path, node_id, read_claim
from milbench.runs.jobs import CohortSpec, RunOptions, expand, plan
from milbench.runs.executors import check_executor, execute, run_fold
from milbench.runs.store import is_complete


def _claim_file(path, age=0.0, **fields):
    """A claim written by someone else: ``fields`` override a live holder on another node."""
    body = {"host": "elsewhere", "node": "elsewhere/boot/pid:[1]", "pid": 1, "driver": "", "attempt": 0,
            "token": "theirs", **fields}
    path.write_text(json.dumps(body))
    then = time.time() - age
    os.utime(path, (then, then))


def test_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "fold_0.claim"
    mine = Claim.acquire(path)
    assert isinstance(mine, Claim)
    other = Claim.acquire(path)
    assert isinstance(other, ClaimInfo) and other.pid == os.getpid() and not other.stale(600)
    mine.release()
    assert not path.exists()
    assert isinstance(Claim.acquire(path), Claim)


def test_claim_of_a_dead_local_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "fold_0.claim"
    _claim_file(path, node=node_id(), pid=dead.pid)
    assert isinstance(Claim.acquire(path), Claim)
    assert read_claim(path).pid == os.getpid()


def test_claim_of_another_host_is_taken_over_only_when_its_heartbeat_stopped(tmp_path):
    path = tmp_path / "fold_0.claim"
    _claim_file(path, age=30)
    held = Claim.acquire(path, stale_after=600)
    assert isinstance(held, ClaimInfo) and held.holder == "elsewhere:1"
    _claim_file(path, age=900)
    assert isinstance(Claim.acquire(path, stale_after=600), Claim)


def test_half_written_claim_is_held_briefly_then_taken(tmp_path):
    path = tmp_path / "fold_0.claim"
    path.write_text("")
    assert isinstance(Claim.acquire(path), ClaimInfo)
    then = time.time() - 120
    os.utime(path, (then, then))
    assert isinstance(Claim.acquire(path), Claim)


def test_a_retry_takes_over_the_claim_of_its_crashed_attempt_only(tmp_path):
    path = tmp_path / "fold_0.claim"
    _claim_file(path, driver="driver-1", attempt=0)
    assert isinstance(Claim.acquire(path, driver="driver-2", attempt=1), ClaimInfo)
    assert isinstance(Claim.acquire(path, driver="driver-1", attempt=1), Claim)


def test_heartbeat_refreshes_the_claim_and_releases_it(tmp_path):
    path = tmp_path / "fold_0.claim"
    claim = Claim.acquire(path)
    then = time.time() - 500
    os.utime(path, (then, then))
    with claim.heartbeat(every=0.05):
        time.sleep(0.3)
        assert read_claim(path).age < 5
    assert not path.exists()


def _jobs(synth_dir, folds, **overrides):
    spec = CohortSpec.of(synth_dir / "cohort.csv", synth_dir / "splits", synth_dir / "features")
    cfg = make_config("amil", "cohort", "small", {"epochs": 1, **overrides})
    return expand(spec, spec.resolve(), [cfg], folds)


def test_run_fold_skips_a_claimed_fold_and_a_complete_one(synth_dir, tmp_path):
    (job,) = _jobs(synth_dir, [0])
    opts = RunOptions(str(tmp_path))
    held = Claim.acquire(claim_path(tmp_path, job.cfg, 0))
    out = run_fold(job, opts)
    assert out.status == "claimed" and out.holder.endswith(f":{os.getpid()}")
    assert not is_complete(tmp_path, job.cfg, 0)
    held.release()
    assert run_fold(job, opts).status == "trained" and is_complete(tmp_path, job.cfg, 0)
    assert not claim_path(tmp_path, job.cfg, 0).exists()
    assert run_fold(job, opts).status == "complete"
    assert plan([job], tmp_path) == ([], 1)


def test_failed_folds_are_retried_then_reported_while_the_rest_goes_on(synth_dir, tmp_path, monkeypatch):
    calls = {}
    real = runner.fit_fold

    def flaky(cohort, cfg, fold, **kw):
        calls[fold] = calls.get(fold, 0) + 1
        if fold == 1:
            raise RuntimeError("out of memory")
        if fold == 3 and calls[fold] == 1:
            raise RuntimeError("transient")
        if fold == 4:
            raise MilbenchError("bad slide")
        return real(cohort, cfg, fold, **kw)

    monkeypatch.setattr(runner, "fit_fold", flaky)
    jobs = _jobs(synth_dir, [0, 1, 3, 4])
    report = execute(jobs, RunOptions(str(tmp_path)), retries=2)
    status = {o.job.fold: (o.status, o.attempt) for o in report.outcomes}
    assert status == {0: ("trained", 0), 1: ("failed", 2), 3: ("trained", 1), 4: ("failed", 0)}
    assert calls == {0: 1, 1: 3, 3: 2, 4: 1}  # bad input is never retried
    cfg = jobs[0].cfg
    assert json.loads(failure_path(tmp_path, cfg, 1).read_text())["error"] == "RuntimeError: out of memory"
    assert not failure_path(tmp_path, cfg, 3).exists()  # cleared by the successful retry
    assert sorted(o.job.fold for o in report.failed) == [1, 4]
    assert not list(tmp_path.rglob("*.claim"))


@pytest.mark.parametrize("args, match", [
    (("slurm", None, None, None, 1), "unknown executor"),
    (("local", None, "auto", None, 1), "apply to --executor ray"),
    (("ray", 0, None, None, 1), "--max-parallel"),
    (("ray", None, None, -1.0, 1), "--gpus-per-fold"),
    (("local", None, None, None, 0), "--cpus-per-fold"),
])
def test_impossible_executor_settings_are_rejected(args, match):
    with pytest.raises(MilbenchError, match=match):
        check_executor(*args)


def test_cohort_spec_paths_are_absolute(synth_dir, monkeypatch):
    monkeypatch.chdir(synth_dir)
    spec = CohortSpec.of("cohort.csv", "splits", "features", "default")
    assert spec.source == str(synth_dir / "cohort.csv") and spec.features == str(synth_dir / "features")
    assert spec.backbone is None and CohortSpec.of("synthetic_coarse").source == "synthetic_coarse"


def test_node_cache_writes_each_slide_once_and_gives_the_same_result(synth_dir, tmp_path):
    (job,) = _jobs(synth_dir, [0])
    node = tmp_path / "node"
    assert run_fold(job, RunOptions(str(tmp_path / "shared"))).status == "trained"
    assert run_fold(job, RunOptions(str(tmp_path / "cached"), node_cache=str(node))).status == "trained"
    cache = runner.node_cache_of(RunOptions("", node_cache=str(node)))
    slides = sorted((synth_dir / "features" / "x20" / "h5_files").glob("*.h5"))  # amil reads 20x only
    assert cache.writes == len(slides) and len(cache.entries()) == len(slides)
    slides_held = [value for value, _ in runner._WORKER["cache"]._items.values() if isinstance(value, tuple)]
    assert slides_held and all(mapped for _, mapped in slides_held)  # this worker holds the node's mappings only
    rel = f"{job.rel}/fold_0/predictions.csv"
    assert (tmp_path / "shared" / rel).read_bytes() == (tmp_path / "cached" / rel).read_bytes()
    runner._WORKER.clear()  # a fresh worker of the same node: reads every slide from the node's cache
    assert run_fold(job, RunOptions(str(tmp_path / "again"), node_cache=str(node))).status == "trained"
    assert cache.writes == len(slides) and cache.hits == len(slides)
    assert (tmp_path / "shared" / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes()


def test_the_compile_option_reaches_the_fold(synth_dir, tmp_path, monkeypatch):
    """`milbench run/grid/benchmark --compile` -> RunOptions.compile -> fit_fold(compile=True); off by default."""
    import milbench.runs.executors as runner

    seen = []
    real = runner.fit_fold

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "fit_fold", spy)
    (job,) = _jobs(synth_dir, [0])
    assert run_fold(job, RunOptions(str(tmp_path / "a"))).status == "trained"
    assert run_fold(job, RunOptions(str(tmp_path / "b"), compile=True)).status == "trained"
    assert seen == [False, True]
