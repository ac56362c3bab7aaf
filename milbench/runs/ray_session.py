"""The Ray executor: one Ray task per fold, a Ray session that leaves nothing behind, and a store every node sees.

- **A session of its own.** Without ``--ray-address`` milbench starts a local Ray instance in a fresh temporary
  directory (``ray.init(_temp_dir=...)``, removed at the end) with token authentication whose token lives only in the
  environment of that instance's processes (``RAY_AUTH_TOKEN``). Ray 2.60's ``ray.init()`` otherwise writes
  ``~/.ray/auth_token`` (``ray._private.authentication.authentication_token_setup.ensure_token_if_auth_enabled``), and
  once that file exists every later ``ray start --head`` on a shared home turns token authentication on, so that a
  worker node's ``ray start --address`` fails with InvalidAuthToken. A user who set ``RAY_AUTH_MODE``,
  ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` keeps their choice. Joining a cluster (``--ray-address``) changes
  nothing of it.
- **The store every node sees.** Before any fold is submitted, the driver writes a probe file into the run store and
  a task on every node with CPUs reads it and writes its answer beside it; a node that cannot is named in a one-line
  error (exit 2), instead of folds whose records vanish. Nodes that join later are not probed.
- **Records come back.** Each task returns its fold's record, predictions (and weights when asked) to the driver,
  which writes them (:func:`milbench.runs.executors.deliver`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

from milbench import MilbenchError
from milbench.files import write_json
from milbench.models.registry import get_card
from milbench.runs.jobs import FoldJob, RunOptions

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
PROBE_TIMEOUT_S = 300.0


def start_local(ray: Any, **kwargs: Any) -> tuple[Path, dict[str, str | None]]:
    """``ray.init`` a local instance in a fresh temporary directory, its token in the environment only; returns the
    directory and the environment variables to restore after ``ray.shutdown`` (:func:`end_local`)."""
    temp = Path(tempfile.mkdtemp(prefix="milbench-ray-", dir="/tmp"))  # short: Ray's socket paths must stay short
    saved = {var: os.environ.get(var) for var in AUTH_VARS}
    if not any(saved.values()):  # token authentication, Ray's default, with the token in no file. RAY_AUTH_MODE stays
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # unset: ray.init sets it and refreshes its config
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)  # "token authentication is enabled": it is, and needs nothing from the user
    try:
        ray.init(_temp_dir=str(temp), **kwargs)
    except BaseException:
        end_local(temp, saved)
        raise
    finally:
        notice.setLevel(level)
    return temp, saved


def end_local(temp: Path, saved: dict[str, str | None]) -> None:
    """Remove the session's directory and put the authentication variables back as they were."""
    shutil.rmtree(temp, ignore_errors=True)
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def _answer_probe(probe: str, token: str) -> tuple[str, str]:
    """On one node: read the driver's probe file and write an answer beside it; (hostname, what went wrong)."""
    host = socket.gethostname()
    try:
        seen = Path(probe).read_text().strip()
    except OSError as err:
        return host, f"the driver's probe file is not there ({type(err).__name__})"
    if token not in seen:
        return host, "another folder is at that path there"
    try:
        Path(f"{probe}.{uuid.uuid4().hex[:8]}").write_text(token)
    except OSError as err:
        return host, f"it cannot be written there ({type(err).__name__})"
    return host, ""


def check_store_visible(ray: Any, runs_dir: str | Path, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse a run store that a node with CPUs cannot read and write at the same path (one-line MilbenchError)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = runs / f".probe-{token[:12]}"
    write_json(probe, {"token": token, "driver": socket.gethostname()})
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    task = ray.remote(_answer_probe)
    try:
        refs = [task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe), token) for n in nodes]
        answers = ray.get(refs, timeout=timeout)
        written = len(list(runs.glob(f"{probe.name}.*")))
    finally:
        for path in runs.glob(f"{probe.name}*"):
            path.unlink(missing_ok=True)
    for node, (host, problem) in zip(nodes, answers):
        if problem:
            where = f"{host} ({node.get('NodeManagerAddress', '?')}, node {str(node.get('NodeID', '?'))[:8]})"
            raise MilbenchError(f"the run store {runs} is not shared with Ray node {where}: {problem}; put --runs-dir "
                                f"on a filesystem that every node mounts at the same path")
    if written < len(nodes):
        raise MilbenchError(f"{len(nodes) - written} Ray node(s) wrote into the run store {runs} where this driver "
                            f"does not see it: put --runs-dir on a filesystem every node mounts at the same path")


class RayPool:
    """One Ray task per fold (``run_fold``, :func:`milbench.runs.executors.run_fold`) with its resource request; joins
    ``address`` or starts a session of its own."""

    def __init__(self, run_fold: Any, opts: RunOptions, address: str | None, gpus: float | None, cpus: int) -> None:
        try:
            import ray
        except ImportError:
            raise MilbenchError("--executor ray needs ray: pip install -c constraints.txt -e \".[ray]\"") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        self.local: tuple[Path, dict[str, str | None]] | None = None
        if self.started:
            quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
            if address:
                ray.init(address=address, **quiet)
            else:
                self.local = start_local(ray, num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, **quiet)
        try:
            check_store_visible(ray, opts.runs_dir)
        except BaseException:
            self.close()
            raise
        self.has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        if gpus and not self.has_gpus:
            self.close()
            raise MilbenchError(f"--gpus-per-fold {gpus} asks for GPUs, but the Ray cluster has none: leave it out "
                                f"or pass 0 (its tasks would wait forever)")
        self.gpus, self.cpus, self.opts = gpus, cpus, opts
        self.task = ray.remote(run_fold)

    def fraction(self, job: FoldJob) -> float:
        """The GPU share a fold asks for: ``--gpus-per-fold``, else its card's ``gpu_fraction`` (0 without GPUs)."""
        if self.gpus is not None:
            return self.gpus
        return get_card(job.cfg.model).traits.gpu_fraction if self.has_gpus else 0.0

    def submit(self, job: FoldJob, attempt: int, fraction: float | None = None) -> Any:
        fraction = self.fraction(job) if fraction is None else fraction
        share = fraction if 0 < fraction < 1 else None
        return self.task.options(num_cpus=self.cpus, num_gpus=fraction, max_retries=0).remote(
            job, self.opts, attempt, None, True, share)

    def wait(self, handles: list[Any], timeout: float) -> list[tuple[Any, Any]]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        out: list[tuple[Any, Any]] = []
        for ref in done:
            try:
                out.append((ref, self.ray.get(ref)))
            except self.ray.exceptions.RayError as err:  # the worker or its node died
                out.append((ref, err))
        return out

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
        if self.local is not None:
            end_local(*self.local)
            self.local = None
