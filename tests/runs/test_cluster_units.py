"""Issue 19, the fast part: running folds in the status (node, epoch, ETA), GPU shares (store budget, card defaults,
out-of-memory retried at a larger share only), longest-first ordering, records written by the driver."""

import json
import os
import time

import pandas as pd
import pytest
import torch

from milbench.config.run import make_config
from milbench.models.cards import BUILTIN_CARDS
from milbench.runs import executors as runner
from milbench.runs import ray_session
from milbench.runs.claims import Claim, claim_path, progress_path, read_progress
from milbench.runs.executors import Outcome, execute, run_fold
from milbench.runs.jobs import CohortSpec, RunOptions, expand
from milbench.runs.plan import read_plan, write_plan
from milbench.runs.schedule import estimated_cost, longest_first
from milbench.runs.status import fold_eta, grid_status, running_table
from milbench.runs.store import is_complete
from milbench.training.device import store_budget

GiB = 2**30


def _jobs(synth_dir, model="amil", folds=(0,), **overrides):
    spec = CohortSpec.of(synth_dir / "cohort.csv", synth_dir / "splits", synth_dir / "features")
    cfg = make_config(model, "cohort", "small", {"epochs": 1, **overrides})
    return expand(spec, spec.resolve(), [cfg], list(folds))


def test_store_budget_keeps_within_the_share():
    assert store_budget(130 * GiB, 140 * GiB) == int(130 * GiB - 14 * GiB)  # a whole GPU: as before
    quarter = store_budget(130 * GiB, 140 * GiB, 0.25)
    assert quarter == int(35 * GiB - 3.5 * GiB - 0.5 * GiB)
    assert 4 * (quarter + 3.5 * GiB + 0.5 * GiB) <= 140 * GiB  # four quarters fit side by side
    assert store_budget(10 * GiB, 140 * GiB, 0.25) == int(10 * GiB - 3.5 * GiB - 0.5 * GiB)  # what is free
    assert store_budget(GiB, 140 * GiB, 0.25) == 0


def test_card_gpu_fractions():
    frac = {c.name: c.traits.gpu_fraction for c in BUILTIN_CARDS}
    assert frac["amil"] == frac["dsmil"] == 0.25
    assert frac["transmil"] == frac["crossfusion"] == frac["crossfusion_single"] == 1.0
    assert all(0 < f <= 1 for f in frac.values())


def test_running_folds_show_node_epoch_and_eta(synth_dir, tmp_path):
    jobs = _jobs(synth_dir, folds=(0, 1), epochs=10)
    write_plan(tmp_path, jobs, "ray", None)
    claim = Claim.acquire(claim_path(tmp_path, jobs[0].cfg, 0))
    now = time.time()
    claim.note_progress(4, 10, started=now - 40)  # 4 epochs in 40 s: 60 s to go
    assert read_progress(claim.path)["epoch"] == 4
    status = grid_status(tmp_path, read_plan(tmp_path))
    (run,) = status.running
    assert run.holder.endswith(f":{os.getpid()}") and (run.epoch, run.epochs) == (4, 10)
    assert run.eta == pytest.approx(60, abs=2)
    table = running_table(status)
    assert table.row_count == 1
    claim.release()
    assert not progress_path(claim.path).exists()
    assert grid_status(tmp_path, read_plan(tmp_path)).running == []


def test_a_resumed_fold_eta_counts_only_its_own_epochs():
    now = time.time()
    fresh = {"epoch": 6, "epochs": 10, "started": now - 60, "time": now, "resumed_after": None}
    assert fold_eta(fresh, now) == pytest.approx(40)
    just_resumed = {"epoch": 6, "epochs": 10, "started": now, "time": now, "resumed_after": 5}
    assert fold_eta(just_resumed, now) is None
    resumed = {"epoch": 8, "epochs": 10, "started": now - 20, "time": now, "resumed_after": 5}
    assert fold_eta(resumed, now) == pytest.approx(20)


def test_longest_first(synth_dir):
    amil, = _jobs(synth_dir, "amil", epochs=5)
    transmil, = _jobs(synth_dir, "transmil", epochs=5)
    long_amil, = _jobs(synth_dir, "amil", epochs=500)
    assert estimated_cost(transmil) > estimated_cost(amil)
    assert longest_first([amil, transmil, long_amil]) == [long_amil, transmil, amil]
    folds = _jobs(synth_dir, "amil", folds=(0, 1, 2), epochs=5)
    assert longest_first(folds) == folds  # one configuration's folds stay together, in order


def test_the_driver_writes_the_records(synth_dir, tmp_path):
    (job,) = _jobs(synth_dir)
    out = run_fold(job, RunOptions(str(tmp_path)), deliver=True)
    assert out.status == "trained" and out.result is not None
    assert not is_complete(tmp_path, job.cfg, 0)  # the task wrote nothing
    assert runner.deliver(out, tmp_path).status == "trained" and out.result is None
    assert is_complete(tmp_path, job.cfg, 0)
    again = run_fold(job, RunOptions(str(tmp_path / "other")), deliver=True)
    again.result.record["fold"] = "second"
    assert runner.deliver(again, tmp_path).status == "complete"  # the first record stays
    assert json.loads((tmp_path / job.rel / "fold_0" / "record.json").read_text())["fold"] == 0


class _FakeRay:
    """Stands in for the Ray pool: records each submission's GPU share and runs the fold here."""

    submitted: list = []

    def __init__(self, run_fold, opts, address, gpus, cpus):
        self.run_fold, self.opts, self.gpus = run_fold, opts, gpus
        self.handles = {}

    def fraction(self, job):
        return self.gpus if self.gpus is not None else 0.25

    def submit(self, job, attempt, fraction=None):
        self.submitted.append(fraction)
        self.handles[len(self.handles)] = (job, attempt, fraction)
        return len(self.handles) - 1

    def wait(self, handles, timeout):
        job, attempt, fraction = self.handles[handles[0]]
        return [(handles[0], self.run_fold(job, self.opts, attempt, None, True, fraction))]

    def close(self):
        pass


def test_out_of_memory_is_retried_at_a_larger_share_only(synth_dir, tmp_path, monkeypatch):
    def oom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "fit_fold", oom)
    monkeypatch.setattr(ray_session, "RayPool", _FakeRay)
    _FakeRay.submitted = []
    jobs = _jobs(synth_dir)
    report = execute(jobs, RunOptions(str(tmp_path), device="cpu"), executor="ray", retries=5)
    assert _FakeRay.submitted == [0.25, 0.5, 1.0]  # doubled each time, never the same share twice; none past 1
    assert report.failed[0].oom and "out of memory" in report.failed[0].error
    local = execute(jobs, RunOptions(str(tmp_path / "local"), device="cpu"), retries=5)
    assert local.failed[0].attempt == 0  # a whole device: not retried
