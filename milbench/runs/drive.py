"""The driver: writes the plan, runs the folds on an executor under a live status table, and reports each outcome."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from milbench import MilbenchError
from milbench.runs.executors import Outcome, Report, check_executor, execute
from milbench.runs.jobs import FoldJob, RunOptions, missing_records
from milbench.runs.plan import write_plan
from milbench.runs.status import StoreView, grid_status, status_table

REFRESH_S = 2.0
POLL_S = 10.0  # how often a fold held by another driver is looked at again
EXIT_HELD = 3  # exit code when --no-wait left folds that another process holds


class _InputError(Exception):
    """Raised out of the executor loop when a fold met bad input: the run stops."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def verdict(jobs: list[FoldJob], runs_dir: Path, report: Report) -> tuple[int, str | None]:
    """The exit code of a run and its last line: 0 only when every requested fold has a record in the store; 3 when
    the only folds left are held by another process (--no-wait); 1 otherwise (failed, or records that never reached
    the store, e.g. a runs dir a worker does not share)."""
    missing = missing_records(jobs, runs_dir)
    if not missing:
        return 0, None
    def key(job: FoldJob) -> tuple[str, int]:
        return job.rel, job.fold

    held = {key(o.job) for o in report.outcomes if o.status == "claimed"}
    if held and all(key(job) in held for job in missing):
        return EXIT_HELD, (f"{len(missing)} fold(s) are held by another process and were left (--no-wait): rerun "
                           f"without --no-wait to wait for them")
    failed = {key(o.job) for o in report.failed}
    lost = [job for job in missing if key(job) not in failed and key(job) not in held]
    if lost:
        return 1, (f"{len(lost)} fold(s) reported done have no record in {runs_dir} (e.g. {lost[0].label}): is the "
                   f"runs dir shared with every worker?")
    return 1, f"{len(missing)} fold(s) have no record: see the failures above; rerun to retry them"

# ---- the driver -----------------------------------------------------------------------------------------------

def _outcome_line(o: Outcome) -> str:
    label = o.job.label
    if o.status == "trained":
        m = o.metrics
        oracle = f"  oracle C {m['oracle_c_index']:.3f}" if "oracle_c_index" in m else ""
        return f"[bold]{label}[/]: C-index {m.get('c_index', float('nan')):.3f}{oracle}  ({o.seconds:.1f} s)"
    if o.status == "complete":
        return f"{label}: completed meanwhile by another process"
    if o.status == "claimed":
        return f"[yellow]{label}[/]: being trained by {o.holder}: skipped"
    if o.will_retry:
        return f"[yellow]{label}[/]: attempt {o.attempt + 1} failed ({o.error}): retrying"
    return f"[red]{label}[/]: failed ({o.error})"


def drive(jobs: list[FoldJob], todo: list[FoldJob], runs_dir: Path, console: Console, *, device: str = "auto",
          cpus_per_fold: int = 1, save_checkpoints: bool = False, executor: str = "local",
          max_parallel: int | None = None, ray_address: str | None = None, gpus_per_fold: float | None = None,
          retries: int = 2, node_cache: Path | None = None, node_cache_gb: float = 64.0,
          cache_gb: float | None = None, compile: bool = False, wait: bool = True, poll_s: float = POLL_S) -> Report:
    """Write the plan, run ``todo`` on ``executor`` under a live grid table, then print what happened.

    A fold held by another live driver is waited for (polled every ``poll_s``) and taken over when that driver's
    claim goes stale; ``wait=False`` leaves it. An input error found while a fold reads its data stops the run: no
    further fold starts, and it is raised (exit 2)."""
    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    if cache_gb is not None and cache_gb <= 0:
        raise MilbenchError(f"--cache-gb must be positive, not {cache_gb}")
    if node_cache is not None and node_cache_gb <= 0:
        raise MilbenchError(f"--node-cache-gb must be positive, not {node_cache_gb}")
    opts = RunOptions(str(Path(runs_dir).resolve()), device, cpus_per_fold, save_checkpoints, driver=driver_id(),
                      node_cache=str(Path(node_cache).expanduser().resolve()) if node_cache else None,
                      node_cache_bytes=int(node_cache_gb * 2**30),
                      cache_bytes=int(cache_gb * 2**30) if cache_gb else None, compile=compile)
    runs = Path(opts.runs_dir)
    plan = json.loads(write_plan(runs, jobs, executor, max_parallel).read_text())
    view = StoreView(runs, opts.stale_after)
    sequential = executor == "local" and (max_parallel or 1) == 1
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console)
    epoch_bar, bag_bar = bars.add_task("epochs", total=1), bars.add_task("bags", total=1)
    last = [0.0]

    def render(final: bool = False) -> Any:
        table = status_table(grid_status(runs, plan, view))
        return Group(table, bars) if sequential and not final else table

    try:
        with Live(render(), console=console, refresh_per_second=4, transient=False) as live:
            def refresh(force: bool = False, final: bool = False) -> None:
                if force or time.monotonic() - last[0] > REFRESH_S:
                    last[0] = time.monotonic()
                    live.update(render(final))

            def on_progress(stage: str, done: int, total: int) -> None:
                bars.update(epoch_bar if stage == "epoch" else bag_bar, completed=done, total=total)
                refresh()

            def on_outcome(o: Outcome) -> None:
                console.print(_outcome_line(o), highlight=False)
                refresh(force=True)
                if o.status == "failed" and not o.retryable:
                    raise _InputError(o)

            report = Report()
            pending = list(todo)
            try:
                while pending:
                    part = execute(pending, opts, executor, max_parallel, ray_address, gpus_per_fold, retries,
                                   on_outcome=on_outcome, on_tick=refresh, progress=on_progress if sequential else None)
                    held = [o for o in part.outcomes if o.status == "claimed"]
                    report.outcomes += [o for o in part.outcomes if o.status != "claimed" or not wait]
                    pending = [o.job for o in held] if wait else []
                    if pending:
                        console.print(f"waiting for {len(pending)} fold(s) held by another process (taken over if it "
                                      f"stops; --no-wait to leave them)", highlight=False)
                        time.sleep(poll_s)
            except _InputError as stop:
                refresh(force=True, final=True)
                raise MilbenchError(f"{stop.outcome.job.label}: {stop.outcome.error.removeprefix('MilbenchError: ')}") \
                    from None
            refresh(force=True, final=True)
    finally:
        if not console.is_terminal:  # rich ends a live display without a newline when it is not a terminal
            console.line()
    counts = {s: report.count(s) for s in ("trained", "complete", "claimed", "failed")}
    console.print(f"{counts['trained']} fold(s) trained, {counts['complete']} completed by another process, "
                  f"{counts['claimed']} held by another process, {counts['failed']} failed", highlight=False)
    for o in report.failed:
        console.print(f"[red]failed after {o.attempt + 1} attempt(s):[/] {o.job.label}: {o.error}", highlight=False)
    return report


def driver_id() -> str:
    """Identifies this driver in the claims of its tasks (so a retry may take over its crashed attempt's claim)."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
