"""Expand model x fold into fold jobs, skip the completed ones, run the rest with live progress.

The plan is derived from the run store, so a rerun trains only the folds that have no record yet and a killed
run loses at most the fold in progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from milbench import MilbenchError
from milbench.config import RunConfig
from milbench.data.cache import FeatureCache
from milbench.engine import fit_fold
from milbench.store import clean_stale, is_complete, write_fold
from milbench.tasks.cohort import Cohort


@dataclass
class FoldJob:
    cfg: RunConfig
    fold: int


def plan(cohort: Cohort, configs: list[RunConfig], folds: list[int] | None, runs_dir: Path) -> tuple[list[FoldJob], int]:
    """Jobs still to run, and how many were skipped because their record already exists."""
    wanted = sorted(cohort.folds) if folds is None else folds
    missing = [f for f in wanted if f not in cohort.folds]
    if missing:
        raise MilbenchError(f"cohort '{cohort.name}' has folds {sorted(cohort.folds)}; --folds asked for {missing}")
    jobs, skipped = [], 0
    for cfg in configs:
        clean_stale(runs_dir, cfg)
        for f in wanted:
            if is_complete(runs_dir, cfg, f):
                skipped += 1
            else:
                jobs.append(FoldJob(cfg, f))
    return jobs, skipped


def run_local(cohort: Cohort, jobs: list[FoldJob], runs_dir: Path, device: str = "auto",
              console: Console | None = None, save_checkpoints: bool = False) -> list[dict[str, Any]]:
    """Run fold jobs one after another in this process, writing each record as soon as its fold is done."""
    console = console or Console()
    cache = FeatureCache()
    records = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bars:
        folds_bar = bars.add_task("folds", total=len(jobs))
        epoch_bar = bars.add_task("epochs", total=1)
        bag_bar = bars.add_task("bags", total=1)

        def on_progress(stage: str, done: int, total: int) -> None:
            bars.update(epoch_bar if stage == "epoch" else bag_bar, completed=done, total=total)

        for job in jobs:
            bars.update(folds_bar, description=f"{job.cfg.model} fold {job.fold}")
            result = fit_fold(cohort, job.cfg, job.fold, device=device, cache=cache, progress=on_progress,
                              keep_weights=save_checkpoints)
            write_fold(runs_dir, job.cfg, job.fold, result.record, result.predictions, result.state_dict)
            m = result.record["metrics"]
            oracle = f"  oracle C {m['oracle_c_index']:.3f}" if "oracle_c_index" in m else ""
            console.print(f"[bold]{job.cfg.model}[/] fold {job.fold}: C-index {m['c_index']:.3f}{oracle}"
                          f"  ({result.record['timings']['total_s']:.1f} s)")
            records.append(result.record)
            bars.advance(folds_bar)
    return records
