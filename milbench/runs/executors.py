"""Run fold jobs on an executor (this process, N local worker processes, or Ray), with claims and retries.

Every fold is trained by :func:`run_fold`, in whichever process or node the executor picks: it claims the fold,
resolves the cohort itself, trains, writes its own record into the shared store atomically and releases the claim.
The driver writes nothing into the store but the plan (:mod:`milbench.runs.plan`).

Threads: CPU results depend on the torch thread count (the order of float reductions), so every executor sets it to
``cpus_per_fold`` (default 1) for each fold: the same seeds give the same results everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from milbench import MilbenchError
from milbench.files import atomic_copy, write_json
from milbench.data.cache import FeatureCache
from milbench.data.readers import locate_feature_file
from milbench.models.registry import get_card
from milbench.runs.claims import Claim, ClaimInfo, claim_path, failure_path, process_id
from milbench.runs.jobs import CohortSpec, FoldJob, RunOptions
from milbench.runs.store import is_complete, run_dir, write_fold
from milbench.tasks.cohort import Cohort
from milbench.training.fold import fit_fold
from milbench.training.steps import ProgressFn

EXECUTORS = ("local", "ray")


@dataclass
class Outcome:
    """What became of one fold job: trained, complete (its record existed), claimed (held elsewhere), failed."""

    job: FoldJob
    status: str
    attempt: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    holder: str = ""
    error: str = ""
    retryable: bool = False
    will_retry: bool = False


_WORKER: dict[str, Any] = {}  # the cohort this process trained last, with its feature cache


def _worker_cohort(spec: CohortSpec, cache_bytes: int | None) -> tuple[Cohort, FeatureCache]:
    """The cohort of ``spec`` and its feature cache, kept per process: a worker that trains several folds of one
    cohort and backbone reads each slide once; moving to another cohort drops the previous one's cache."""
    if _WORKER.get("spec") != spec:
        _WORKER.clear()
        _WORKER.update(spec=spec, cohort=spec.resolve(), cache=FeatureCache(max_bytes=cache_bytes))
    return _WORKER["cohort"], _WORKER["cache"]


def stage_features(cohort: Cohort, job: FoldJob, node_cache: Path) -> Cohort:
    """The cohort reading its features from ``node_cache``, into which the feature files of the fold's slides (at
    the model's scales) are copied first, each once per node (atomically: concurrent workers may both copy)."""
    root = cohort.require_features_root()
    staged = Path(node_cache) / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    train, held_out = cohort.folds[job.fold]
    scales = get_card(job.cfg.model).scales
    for case in [*train, *held_out]:
        for slide in cohort.slides_of(case):
            for scale in scales:
                source = locate_feature_file(root, scale, slide, cohort.backbone)
                if source is None:
                    continue  # reading it reports the missing file as usual
                target = staged / source.relative_to(root)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_copy(source, target)
    return replace(cohort, features_root=staged)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_failure(path: Path, attempt: int, err: BaseException) -> None:
    """Leave the error beside the fold (atomically), so that `milbench status` shows it from any machine."""
    body = {"error": f"{type(err).__name__}: {err}", "attempt": attempt, "host": process_id(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "traceback": traceback.format_exc(limit=20)}
    write_json(path, body)


def run_fold(job: FoldJob, opts: RunOptions, attempt: int = 0, progress: ProgressFn | None = None) -> Outcome:
    """Claim, train, store and release one fold; any error becomes a failed outcome (retryable unless bad input)."""
    runs = Path(opts.runs_dir)
    if is_complete(runs, job.cfg, job.fold):
        return Outcome(job, "complete", attempt)
    claim = Claim.acquire(claim_path(runs, job.cfg, job.fold), opts.stale_after, opts.driver, attempt)
    if isinstance(claim, ClaimInfo):
        return Outcome(job, "claimed", attempt, holder=claim.holder)
    t0 = time.perf_counter()
    with claim.heartbeat():
        if is_complete(runs, job.cfg, job.fold):  # the previous holder finished just before we claimed
            return Outcome(job, "complete", attempt)
        for leftover in run_dir(runs, job.cfg).glob(f".tmp-fold_{job.fold}-*"):  # a killed holder's
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            with _torch_threads(opts.threads):
                cohort, cache = _worker_cohort(job.cohort, opts.cache_bytes)
                if opts.node_cache:
                    cohort = stage_features(cohort, job, Path(opts.node_cache))
                result = fit_fold(cohort, job.cfg, job.fold, device=opts.device, cache=cache, progress=progress,
                                  keep_weights=opts.save_checkpoints, compile=opts.compile)
            if is_complete(runs, job.cfg, job.fold):  # trained twice after all (see the module notes): keep the first
                return Outcome(job, "complete", attempt)
            write_fold(runs, job.cfg, job.fold, result.record, result.predictions, result.state_dict)
            failure_path(runs, job.cfg, job.fold).unlink(missing_ok=True)
        except Exception as err:  # reported to the driver, which retries or lists it; the grid goes on
            _write_failure(failure_path(runs, job.cfg, job.fold), attempt, err)
            return Outcome(job, "failed", attempt, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}",
                           retryable=not isinstance(err, MilbenchError))
    metrics = {k: float(v) for k, v in result.record["metrics"].items() if k in ("c_index", "oracle_c_index")}
    return Outcome(job, "trained", attempt, result.record["timings"]["total_s"], metrics)


class _InProcess:
    """Runs each job in this process when waited on (sequential), with per-epoch progress."""

    def __init__(self, opts: RunOptions, progress: ProgressFn | None) -> None:
        self.opts, self.progress = opts, progress
        self.jobs: dict[int, tuple[FoldJob, int]] = {}

    def submit(self, job: FoldJob, attempt: int) -> int:
        handle = len(self.jobs)
        self.jobs[handle] = (job, attempt)
        return handle

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Outcome | Exception]]:
        job, attempt = self.jobs[handles[0]]
        return [(handles[0], run_fold(job, self.opts, attempt, self.progress))]

    def close(self) -> None:
        pass


class _Processes:
    """N local worker processes (spawned, so no torch state is forked); a crashed worker fails its jobs."""

    def __init__(self, opts: RunOptions, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.opts = opts
        self._new = lambda: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.pool = self._new()
        self.owner: dict[Any, Any] = {}  # future -> the pool it was submitted to

    def submit(self, job: FoldJob, attempt: int) -> Any:
        fut = self.pool.submit(run_fold, job, self.opts, attempt)
        self.owner[fut] = self.pool
        return fut

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Outcome | Exception]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        out: list[tuple[Any, Outcome | Exception]] = []
        for fut in done:
            pool = self.owner.pop(fut)
            try:
                out.append((fut, fut.result()))
            except BrokenProcessPool as err:  # a worker died (killed, out of memory): start a fresh pool
                out.append((fut, err))
                if pool is self.pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._new()
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """One Ray task per fold, with its resource request; joins ``address`` or starts a local instance."""

    def __init__(self, opts: RunOptions, address: str | None, gpus: float | None, cpus: int) -> None:
        try:
            import ray
        except ImportError:
            raise MilbenchError("--executor ray needs ray: pip install -c constraints.txt -e \".[ray]\"") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, **quiet)
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.opts = opts
        self.task = ray.remote(run_fold).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)

    def submit(self, job: FoldJob, attempt: int) -> Any:
        return self.task.remote(job, self.opts, attempt)

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Outcome | Exception]]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out: list[tuple[Any, Outcome | Exception]] = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayError as err:  # the worker or its node died
                out.append((ref, err))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


@dataclass
class Report:
    """Every job's final outcome."""

    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _crashed(job: FoldJob, attempt: int, err: Exception) -> Outcome:
    """The outcome of a job whose worker process (or node) died under it: worth another attempt."""
    first = (str(err).strip().splitlines() or [""])[0]
    return Outcome(job, "failed", attempt, error=f"worker died: {type(err).__name__}: {first}", retryable=True)


def check_executor(executor: str, max_parallel: int | None, ray_address: str | None, gpus_per_fold: float | None,
                   cpus_per_fold: int) -> None:
    """Reject executor settings that cannot work, before anything is written or submitted."""
    if executor not in EXECUTORS:
        raise MilbenchError(f"unknown executor '{executor}': use one of {', '.join(EXECUTORS)}")
    if executor == "local" and (ray_address or gpus_per_fold is not None):
        raise MilbenchError("--ray-address and --gpus-per-fold apply to --executor ray; the local executor uses "
                            "--device and --max-parallel")
    if max_parallel is not None and max_parallel < 1:
        raise MilbenchError(f"--max-parallel must be at least 1, not {max_parallel}")
    if cpus_per_fold < 1 or (gpus_per_fold is not None and gpus_per_fold < 0):
        raise MilbenchError("--cpus-per-fold must be at least 1 and --gpus-per-fold at least 0")


def execute(jobs: list[FoldJob], opts: RunOptions, executor: str = "local", max_parallel: int | None = None,
            ray_address: str | None = None, gpus_per_fold: float | None = None, retries: int = 2,
            on_outcome: Callable[[Outcome], None] | None = None, on_tick: Callable[[], None] | None = None,
            progress: ProgressFn | None = None, tick: float = 1.0) -> Report:
    """Run ``jobs`` on ``executor``, at most ``max_parallel`` at a time; failed jobs are retried ``retries`` times
    (bad input never: it would fail again), then reported while the rest goes on."""
    check_executor(executor, max_parallel, ray_address, gpus_per_fold, opts.threads)
    limit = max_parallel or (1 if executor == "local" else len(jobs) or 1)
    if executor == "ray":
        pool: Any = _Ray(opts, ray_address, gpus_per_fold, opts.threads)
    elif limit == 1:
        pool = _InProcess(opts, progress)
    else:
        pool = _Processes(opts, limit)
    report = Report()
    queue = deque((job, 0) for job in jobs)
    inflight: dict[Any, tuple[FoldJob, int]] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < limit:
                job, attempt = queue.popleft()
                inflight[pool.submit(job, attempt)] = (job, attempt)
            for handle, result in pool.wait(list(inflight), tick):
                job, attempt = inflight.pop(handle)
                outcome = result if isinstance(result, Outcome) else _crashed(job, attempt, result)
                outcome.will_retry = outcome.status == "failed" and outcome.retryable and attempt < retries
                if outcome.will_retry:
                    queue.append((job, attempt + 1))
                else:
                    report.outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
            if on_tick:
                on_tick()
    finally:
        pool.close()
    return report
