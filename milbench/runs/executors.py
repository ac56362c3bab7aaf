"""Run fold jobs on an executor (this process, N local worker processes, or Ray), with claims and retries.

Every fold is trained by :func:`run_fold`, in whichever process or node the executor picks: it claims the fold,
resolves the cohort itself, trains (checkpointing every epoch beside the fold, so that a fold interrupted by a node
loss, a driver death or Ctrl-C resumes at its last epoch), notes its epoch beside its claim, and releases the claim.
Under :func:`execute` the trained fold (record, predictions, weights when asked) comes back to the driver, which
writes it into the store (:func:`deliver`): a node that could not write there loses nothing, and the driver knows
what it wrote. Jobs go out longest first (:mod:`milbench.runs.schedule`).

Local worker processes die with the driver (``PR_SET_PDEATHSIG`` on Linux, and a watch on their parent's PID
everywhere), so a killed driver leaves no worker training on, holding memory and claims. Ray tasks are tied to their
driver by Ray itself; the Ray session is :mod:`milbench.runs.ray_session`.

GPU shares: a Ray fold asks for ``--gpus-per-fold`` or, by default, its model card's ``traits.gpu_fraction`` of a
GPU, and keeps its allocations within that share (:func:`milbench.training.device.memory_share`); a fold out of
memory is retried at twice its share (up to one GPU), never at the same share.

Threads: CPU results depend on the torch thread count (the order of float reductions), so every executor sets it to
``cpus_per_fold`` (default 1) for each fold: the same seeds give the same results everywhere.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from milbench import MilbenchError
from milbench.files import write_json
from milbench.data.cache import FeatureCache
from milbench.data.node_cache import NodeCache
from milbench.runs.claims import Claim, ClaimInfo, claim_path, failure_path, process_id, resume_path
from milbench.runs.jobs import CohortSpec, FoldJob, RunOptions
from milbench.runs.schedule import longest_first
from milbench.runs.store import is_complete, run_dir, write_fold
from milbench.tasks.cohort import Cohort
from milbench.training.device import memory_share, resolve_device
from milbench.training.fold import FoldResult, fit_fold
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
    oom: bool = False  # out of GPU memory: retried at a larger share only
    gpu_fraction: float | None = None  # the share of a GPU the attempt ran with (Ray)
    result: FoldResult | None = None  # the trained fold, on its way to the driver (which writes it and drops it)


_WORKER: dict[str, Any] = {}  # the cohort this process trained last, with its feature cache


def _worker_cohort(spec: CohortSpec, cache_bytes: int | None,
                   node_cache: NodeCache | None = None) -> tuple[Cohort, FeatureCache]:
    """The cohort of ``spec`` and its feature cache, kept per process: a worker that trains several folds of one
    cohort and backbone reads each slide once; moving to another cohort drops the previous one's cache. With a
    ``node_cache`` the slides are read through it (each written to the node's disk once, memory-mapped by every
    worker of the node), and this process keeps only the mappings."""
    if _WORKER.get("spec") != spec or _WORKER.get("node_cache") != node_cache:
        _WORKER.clear()
        _WORKER.update(spec=spec, cohort=spec.resolve(), node_cache=node_cache,
                       cache=FeatureCache(max_bytes=cache_bytes, node_cache=node_cache))
    return _WORKER["cohort"], _WORKER["cache"]


def node_cache_of(opts: RunOptions) -> NodeCache | None:
    """The node's shared slide cache that ``opts`` names (one per process and folder), or None."""
    if not opts.node_cache:
        return None
    key = (opts.node_cache, opts.node_cache_bytes)
    if _NODE_CACHES.get("key") != key:
        _NODE_CACHES.update(key=key, cache=NodeCache(opts.node_cache, opts.node_cache_bytes))
    return _NODE_CACHES["cache"]


_NODE_CACHES: dict[str, Any] = {}


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


def _resumed_epoch(path: Path) -> int | None:
    """The last epoch of the checkpoint at ``path`` (read lazily: its tensors stay on disk), or None."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def _noting(claim: Claim, ckpt: Path, progress: ProgressFn | None) -> ProgressFn:
    """``progress``, plus the epoch reached written beside ``claim`` (what `milbench status` shows)."""
    started, resumed = time.time(), _resumed_epoch(ckpt) if ckpt.is_file() else None

    def note(stage: str, done: int, total: int) -> None:
        if stage == "epoch":
            claim.note_progress(done, total, started, resumed)
        if progress:
            progress(stage, done, total)

    return note


def run_fold(job: FoldJob, opts: RunOptions, attempt: int = 0, progress: ProgressFn | None = None,
             deliver: bool = False, gpu_fraction: float | None = None) -> Outcome:
    """Claim, train, store and release one fold; any error becomes a failed outcome (retryable unless bad input, or
    out of memory at a whole GPU). With ``deliver`` the trained fold is not written but returned in the outcome
    (:func:`deliver` writes it where the driver runs). ``gpu_fraction``: the share of the GPU the fold was given."""
    runs = Path(opts.runs_dir)
    ckpt = resume_path(runs, job.cfg, job.fold)
    if is_complete(runs, job.cfg, job.fold):
        ckpt.unlink(missing_ok=True)
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
            with _torch_threads(opts.threads), memory_share(resolve_device(opts.device), gpu_fraction):
                cohort, cache = _worker_cohort(job.cohort, opts.cache_bytes, node_cache_of(opts))
                result = fit_fold(cohort, job.cfg, job.fold, device=opts.device, cache=cache,
                                  progress=_noting(claim, ckpt, progress), keep_weights=opts.save_checkpoints,
                                  compile=opts.compile, resume_path=ckpt, gpu_fraction=gpu_fraction)
            if not deliver:
                if is_complete(runs, job.cfg, job.fold):  # trained twice after all (module notes): keep the first
                    return Outcome(job, "complete", attempt)
                write_fold(runs, job.cfg, job.fold, result.record, result.predictions, result.state_dict)
                failure_path(runs, job.cfg, job.fold).unlink(missing_ok=True)
                ckpt.unlink(missing_ok=True)
        except Exception as err:  # reported to the driver, which retries or lists it; the grid goes on
            _write_failure(failure_path(runs, job.cfg, job.fold), attempt, err)
            oom = isinstance(err, torch.cuda.OutOfMemoryError)
            return Outcome(job, "failed", attempt, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}",
                           retryable=not isinstance(err, MilbenchError) and not (oom and (gpu_fraction or 1.0) >= 1.0),
                           oom=oom, gpu_fraction=gpu_fraction)
    metrics = {k: float(v) for k, v in result.record["metrics"].items() if k in ("c_index", "oracle_c_index")}
    return Outcome(job, "trained", attempt, result.record["timings"]["total_s"], metrics, gpu_fraction=gpu_fraction,
                   result=result if deliver else None)


def deliver(outcome: Outcome, runs_dir: str | Path) -> Outcome:
    """Write the trained fold an outcome carries into the store (here, in the driver), then drop it from the outcome;
    a fold whose record appeared meanwhile keeps that first record. The fold's resume checkpoint and any earlier
    failure are removed once its record exists."""
    result, outcome.result = outcome.result, None
    if result is None:
        return outcome
    runs, job = Path(runs_dir), outcome.job
    try:
        if is_complete(runs, job.cfg, job.fold):
            outcome.status = "complete"
        else:
            write_fold(runs, job.cfg, job.fold, result.record, result.predictions, result.state_dict)
        failure_path(runs, job.cfg, job.fold).unlink(missing_ok=True)
        resume_path(runs, job.cfg, job.fold).unlink(missing_ok=True)
    except OSError as err:  # the driver cannot write its own store: another attempt will not help
        outcome.status, outcome.error = "failed", f"writing the record failed: {type(err).__name__}: {err}"
    return outcome


class _InProcess:
    """Runs each job in this process when waited on (sequential), with per-epoch progress."""

    def __init__(self, opts: RunOptions, progress: ProgressFn | None) -> None:
        self.opts, self.progress = opts, progress
        self.jobs: dict[int, tuple[FoldJob, int]] = {}

    def submit(self, job: FoldJob, attempt: int, fraction: float | None = None) -> int:
        handle = len(self.jobs)
        self.jobs[handle] = (job, attempt)
        return handle

    def fraction(self, job: FoldJob) -> float | None:
        return None

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Outcome | Exception]]:
        job, attempt = self.jobs.pop(handles[0])
        return [(handles[0], run_fold(job, self.opts, attempt, self.progress, deliver=True))]

    def close(self) -> None:
        pass


PR_SET_PDEATHSIG = 1
PARENT_WATCH_S = 1.0


def _die_with(parent: int) -> None:
    """Worker initializer: this process is killed when ``parent`` (the driver) dies.

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``; the workers are started by
    the driver's main thread, which lives as long as the pool); everywhere, a daemon thread also exits the process
    once its parent PID changes (re-parented to init or a subreaper), which covers the kernel's rule that the signal
    follows the thread that started the worker. The check after ``prctl`` closes the race of a parent that died first.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="milbench parent watch", daemon=True).start()


class _Processes:
    """N local worker processes (spawned, so no torch state is forked) that die with the driver; a crashed worker
    fails its jobs."""

    def __init__(self, opts: RunOptions, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.opts = opts
        self._new = lambda: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_die_with, initargs=(os.getpid(),))
        self.pool = self._new()
        self.owner: dict[Any, Any] = {}  # future -> the pool it was submitted to

    def fraction(self, job: FoldJob) -> float | None:
        return None

    def submit(self, job: FoldJob, attempt: int, fraction: float | None = None) -> Any:
        fut = self.pool.submit(run_fold, job, self.opts, attempt, None, True)
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
        from milbench.runs.ray_session import RayPool

        pool: Any = RayPool(run_fold, opts, ray_address, gpus_per_fold, opts.threads)
    elif limit == 1:
        pool = _InProcess(opts, progress)
    else:
        pool = _Processes(opts, limit)
    report = Report()
    queue = deque((job, 0, pool.fraction(job)) for job in longest_first(jobs))
    inflight: dict[Any, tuple[FoldJob, int, float | None]] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < limit:
                job, attempt, fraction = queue.popleft()
                inflight[pool.submit(job, attempt, fraction)] = (job, attempt, fraction)
            for handle, result in pool.wait(list(inflight), tick):
                job, attempt, fraction = inflight.pop(handle)
                outcome = result if isinstance(result, Outcome) else _crashed(job, attempt, result)
                outcome = deliver(outcome, opts.runs_dir)
                outcome.will_retry = outcome.status == "failed" and outcome.retryable and attempt < retries
                if outcome.will_retry:  # out of memory: at twice the share, never the same again
                    queue.append((job, attempt + 1, min(1.0, 2 * fraction) if outcome.oom and fraction else fraction))
                else:
                    report.outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
            if on_tick:
                on_tick()
    finally:
        pool.close()
    return report
