"""Run fold jobs on an executor (this process, N local worker processes, or Ray), with claims, retries and resume.

The plan is derived from the run store: a fold is done when its record exists, so a rerun trains only the
missing folds and a killed driver or worker loses at most the folds in flight. Every fold is trained by
:func:`run_fold`, in whichever process or node the executor picks: it claims the fold, resolves the cohort
itself, trains, writes its own record into the shared store atomically and releases the claim. The driver
writes nothing into the store but the plan (see :mod:`milbench.grid`).

Claims: ``<run dir>/fold_<k>.claim`` is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds
the host, process and time of the process training the fold; a heartbeat thread refreshes its mtime every
``HEARTBEAT_S``. Two drivers on one store therefore never train the same fold. A claim is stale, and the next
process taking the fold removes it, when its mtime is older than ``stale_after`` (any host; default
``CLAIM_STALE_S``), when its process is dead on this very node (same hostname, boot and PID namespace), when it
is still empty ``WRITE_GRACE_S`` after its creation, or when it belongs to an earlier attempt of the same driver
(which saw that attempt's worker crash). Should two processes still train one fold (clock skew beyond the
timeout), the one that finishes second finds the record and keeps it: records are moved into place in one step.

Threads: CPU results depend on the torch thread count (the order of float reductions), so every executor
sets it to ``cpus_per_fold`` (default 1) for each fold: the same seeds give the same results everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
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
from milbench.config import RunConfig
from milbench.data.cache import FeatureCache
from milbench.data.readers import locate_feature_file
from milbench.engine import ProgressFn, fit_fold
from milbench.registry import get_card
from milbench.store import is_complete, run_dir, write_fold
from milbench.tasks.cohort import Cohort, resolve_cohort

CLAIM_STALE_S = 600.0  # a claim whose heartbeat stopped this long ago is taken over
HEARTBEAT_S = 30.0
WRITE_GRACE_S = 60.0  # a claim file still empty after this long was left by a process killed while creating it
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class CohortSpec:
    """How to build a cohort, with absolute paths, so that any process on any node can rebuild it."""

    source: str  # a built-in name or the path of a cohort table
    splits: str | None = None
    features: str | None = None
    backbone: str | None = None
    exclude_missing: bool = False

    @classmethod
    def of(cls, source: str | Path, splits: str | Path | None = None, features: str | Path | None = None,
           backbone: str | None = None, exclude_missing: bool = False) -> CohortSpec:
        """A spec whose paths are absolute (workers may start in another directory)."""
        text = str(source)
        if is_table(text):
            text = str(Path(text).expanduser().resolve())
        return cls(text, _absolute(splits), _absolute(features), None if backbone in (None, "default") else backbone,
                   exclude_missing)

    def resolve(self) -> Cohort:
        return resolve_cohort(self.source, splits=self.splits, features=self.features, backbone=self.backbone,
                              exclude_missing=self.exclude_missing)


def is_table(source: str | Path) -> bool:
    """Whether a cohort argument names a table file rather than a built-in cohort (the rule resolve_cohort uses)."""
    text = str(source).strip()
    return isinstance(source, Path) or text.lower().endswith(".csv") or "/" in text


def _absolute(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class FoldJob:
    """One fold of one configuration on one cohort: the unit a worker trains."""

    cohort: CohortSpec
    cfg: RunConfig
    fold: int

    @property
    def rel(self) -> str:
        """The run folder relative to the store (``cohort/backbone/model/protocol-hash``)."""
        return run_dir(Path(""), self.cfg).as_posix()

    @property
    def label(self) -> str:
        return f"{self.cfg.model} · {self.cfg.cohort} · {self.cfg.backbone} · fold {self.fold}"


@dataclass(frozen=True)
class RunOptions:
    """What a fold task needs besides its job: where to write, device, threads, and who submitted it."""

    runs_dir: str
    device: str = "auto"
    threads: int = 1
    save_checkpoints: bool = False
    stale_after: float = CLAIM_STALE_S
    driver: str = ""
    node_cache: str | None = None  # copy the fold's feature files here (node-local disk) and read them there
    cache_bytes: int | None = None  # memory budget of each worker's slide cache (None: unlimited)
    compile: bool = False  # CUDA: torch.compile each model's hot blocks (docs/performance.md)


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


def expand(spec: CohortSpec, cohort: Cohort, configs: list[RunConfig], folds: list[int] | None) -> list[FoldJob]:
    """Every wanted fold of every config on one cohort, after checking that the cohort has those folds."""
    wanted = sorted(cohort.folds) if folds is None else folds
    missing = [f for f in wanted if f not in cohort.folds]
    if missing:
        raise MilbenchError(f"cohort '{cohort.name}' has folds {sorted(cohort.folds)}; --folds asked for {missing}")
    return [FoldJob(spec, cfg, f) for cfg in configs for f in wanted]


def plan(jobs: list[FoldJob], runs_dir: Path) -> tuple[list[FoldJob], int]:
    """Jobs still to run (no record yet), and how many were skipped because their record already exists."""
    todo = [job for job in jobs if not is_complete(runs_dir, job.cfg, job.fold)]
    return todo, len(jobs) - len(todo)


# ---- claims ---------------------------------------------------------------------------------------------------

def claim_path(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}.claim"


def failure_path(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}.failed"


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process, from /proc; None where /proc is not there."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    rest = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return rest[0], rest[19]


@functools.cache
def node_id() -> str:
    """Hostname, boot and PID namespace: PIDs are comparable only between processes with the same node id."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id') or ''}/{pidns}"


def process_id(pid: int | None = None) -> str:
    """``host:pid`` of a process (this one by default), as shown to users."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when known) still runs here; zombies count as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)


@dataclass
class ClaimInfo:
    """A claim file as read back: who holds the fold, and how long ago it last showed a heartbeat."""

    path: Path
    inode: int
    age: float
    host: str = "?"
    node: str = ""
    pid: int = 0
    pid_start: str | None = None
    driver: str = ""
    attempt: int = 0
    token: str = ""

    @property
    def holder(self) -> str:
        return f"{self.host}:{self.pid}" if self.pid else "a process still writing its claim"

    def stale(self, stale_after: float) -> bool:
        """No heartbeat for ``stale_after`` seconds, or its process is dead on this node."""
        if self.age > stale_after or (not self.pid and self.age > WRITE_GRACE_S):
            return True
        return bool(self.pid) and self.node == node_id() and not _alive(self.pid, self.pid_start)


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``, or None when there is none; a claim still being written has no holder yet."""
    try:
        st = os.stat(path)
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    info = ClaimInfo(Path(path), st.st_ino, max(0.0, time.time() - st.st_mtime))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return info
    for key in ("host", "node", "pid", "pid_start", "driver", "attempt", "token"):
        if key in data:
            setattr(info, key, data[key])
    return info


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove the claim at ``path`` only if it is still the file judged stale (inode ``inode``)."""
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if os.stat(grave).st_ino != inode:  # a fresh claim replaced the stale one meanwhile: put it back
        try:
            os.link(grave, path)
        except FileExistsError:
            pass
    os.unlink(grave)


class Claim:
    """This process's claim on one fold: refreshed by a heartbeat thread, removed on release."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token

    @classmethod
    def acquire(cls, path: Path, stale_after: float = CLAIM_STALE_S, driver: str = "",
                attempt: int = 0) -> Claim | ClaimInfo:
        """The claim, or the live holder's :class:`ClaimInfo` when another process holds the fold."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_claim(path)
                if info is None:
                    continue
                earlier_attempt = bool(driver) and info.driver == driver and info.attempt < attempt
                if not (info.stale(stale_after) or earlier_attempt):
                    return info
                _remove_if_same(path, info.inode)
                continue
            token = uuid.uuid4().hex
            pid = os.getpid()
            content = {"host": socket.gethostname(), "node": node_id(), "pid": pid,
                       "pid_start": (_proc_stat(pid) or (None, None))[1], "driver": driver, "attempt": attempt,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
            with os.fdopen(fd, "w") as fh:
                json.dump(content, fh)
                fh.flush()
                os.fsync(fh.fileno())
            return cls(path, token)
        return read_claim(path) or ClaimInfo(path, 0, 0.0)

    def owned(self) -> bool:
        info = read_claim(self.path)
        return info is not None and info.token == self.token

    def release(self) -> None:
        if self.owned():
            self.path.unlink(missing_ok=True)

    @contextmanager
    def heartbeat(self, every: float = HEARTBEAT_S) -> Iterator[None]:
        """Refresh the claim's mtime every ``every`` seconds while the block runs, then release it."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                if self.owned():
                    os.utime(self.path)

        thread = threading.Thread(target=beat, name=f"claim {self.path.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release()


# ---- the fold task --------------------------------------------------------------------------------------------

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
                    tmp = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}")
                    shutil.copyfile(source, tmp)
                    os.replace(tmp, target)
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
    tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)


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


# ---- executors ------------------------------------------------------------------------------------------------

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
