"""The grid: model x cohort x backbone x fold, its plan file, and its status table, live or read back from the store.

The driver writes one file, the plan (``RUNS/.plans/<id>.json``: every fold of the grid, when and where it
started). Everything else the status table shows is read from the store: a fold is done when its record exists,
running while a live claim holds it, failed when its ``.failed`` file is there, pending otherwise. So
`milbench status` on any machine that sees the store shows the same table as the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from milbench import MilbenchError
from milbench.config import make_config
from milbench.registry import create_model, get_card
from milbench.runner import (CLAIM_STALE_S, CohortSpec, FoldJob, Outcome, Report, RunOptions, check_executor,
                             execute, expand, is_table, process_id, read_claim)
from milbench.tasks.cohort import Cohort

PLANS = ".plans"
STATES = ("done", "running", "failed", "pending")
REFRESH_S = 2.0


def split_list(text: str | None, what: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``; an empty list is an error naming the option."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise MilbenchError(f"{what} expects a comma-separated list, e.g. {what} a,b")
    return items


def _is_builtin_synthetic(source: str) -> bool:
    return not is_table(source) and source.strip().lower().startswith("synthetic")


def cohort_spec(source: str, backbone: str, features: str | None) -> CohortSpec:
    """How one grid cohort is built at one backbone.

    ``features`` may hold ``{cohort}`` (replaced by the cohort's name) for one feature root per cohort. A cohort
    table in a folder that also holds ``splits/`` and ``features/`` (as `milbench synth` writes) uses them when
    the table has no ``fold`` column and no ``features`` root is given.
    """
    splits = root = None
    path = Path(source)
    if is_table(source) and path.is_file():
        if (path.parent / "splits").is_dir() and "fold" not in pd.read_csv(path, nrows=0).columns:
            splits = path.parent / "splits"
        if features is None and (path.parent / "features").is_dir():
            root = path.parent / "features"
    if features is not None:
        name = CohortSpec.of(source, splits).resolve().name if "{cohort}" in features else ""
        root = features.replace("{cohort}", name)
    return CohortSpec.of(source, splits, root, backbone)


def build_jobs(models: Sequence[str], cohorts: Sequence[str], backbones: Sequence[str], folds: list[int] | None,
               features: str | None, recipe: str | None, overrides: dict[str, Any]) -> tuple[list[FoldJob], list[str]]:
    """Every fold of the grid, grouped by cohort and backbone (so a worker's feature cache stays warm), and notes
    on what was left out (built-in synthetic cohorts have no backbone folders: only ``default`` runs)."""
    jobs: list[FoldJob] = []
    notes: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for source in cohorts:
        for backbone in backbones:
            if backbone != "default" and _is_builtin_synthetic(source):
                notes.append(f"{source} has no backbone folders: backbone {backbone} skipped")
                continue
            spec = cohort_spec(source, backbone, features)
            cohort = spec.resolve()
            if seen.setdefault((cohort.name, backbone), source) != source:
                raise MilbenchError(f"cohorts {seen[cohort.name, backbone]} and {source} are both named "
                                    f"'{cohort.name}': rename one of the tables (the run store keys runs by name)")
            rec = recipe or ("small" if cohort.name.startswith("synthetic") else "paper")
            configs = [make_config(m, cohort.name, rec, {**overrides, "backbone": backbone}) for m in models]
            cohort.check_features(sorted({s for cfg in configs for s in get_card(cfg.model).scales}))
            jobs += expand(spec, cohort, configs, folds)
    check_options(jobs)
    return jobs, notes


def check_options(jobs: list[FoldJob]) -> None:
    """Build each distinct model configuration once, here, so a bad option fails before anything is submitted."""
    from milbench.data.dataset import BagDataset

    built: set[str] = set()
    for job in jobs:
        key = json.dumps([job.cfg.model, job.cfg.n_bins, job.cfg.model_options], sort_keys=True, default=str)
        if key in built:
            continue
        built.add(key)
        cohort: Cohort = job.cohort.resolve()
        card = get_card(job.cfg.model)
        in_dim = BagDataset(cohort, cohort.patients.index[:1].tolist(), card.scales, card=card).in_dim
        create_model(job.cfg.model, in_dim=in_dim, n_bins=job.cfg.n_bins, **job.cfg.model_options)


# ---- the plan file --------------------------------------------------------------------------------------------

def plan_id(jobs: Sequence[FoldJob]) -> str:
    """The same grid always gets the same id (a rerun overwrites its plan)."""
    keys = sorted(f"{job.rel}/fold_{job.fold}" for job in jobs)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:10]


def write_plan(runs_dir: Path, jobs: Sequence[FoldJob], executor: str, max_parallel: int | None) -> Path:
    """Write the plan atomically: the only file a driver writes into the store."""
    pid = plan_id(jobs)
    folder = Path(runs_dir) / PLANS
    folder.mkdir(parents=True, exist_ok=True)
    body = {"id": pid, "created": time.time(), "driver": process_id(), "executor": executor,
            "max_parallel": max_parallel, "argv": sys.argv,
            "jobs": [{"cohort": j.cfg.cohort, "backbone": j.cfg.backbone, "model": j.cfg.model, "rel": j.rel,
                      "fold": j.fold} for j in jobs]}
    tmp = folder / f".{pid}-{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, folder / f"{pid}.json")
    return folder / f"{pid}.json"


def read_plan(runs_dir: Path, plan: str | None = None) -> dict[str, Any]:
    """The plan ``plan`` (an id), or the most recently started one."""
    folder = Path(runs_dir) / PLANS
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if plan is not None:
        paths = [p for p in paths if p.stem == plan]
    if not paths:
        what = f"plan {plan}" if plan else "grid plan"
        raise MilbenchError(f"no {what} in {folder}: start one with `milbench grid` or `milbench run` on this store")
    plans = [json.loads(p.read_text()) for p in paths]
    return max(plans, key=lambda p: p["created"])


# ---- status ---------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """Fold counts of one model x cohort x backbone (x configuration) of the grid."""

    cohort: str
    backbone: str
    model: str
    run: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    seconds: list[float] = field(default_factory=list)


class StoreView:
    """Fold states read from the store: records (cached: they never change), claims and failure files."""

    def __init__(self, runs_dir: Path, stale_after: float) -> None:
        self.runs_dir = Path(runs_dir)
        self.stale_after = stale_after
        self._records: dict[Path, tuple[dict[str, Any], float]] = {}

    def record(self, path: Path) -> tuple[dict[str, Any], float] | None:
        """A completed fold's record and the time it was written, or None when it is not there (yet)."""
        if path not in self._records:
            try:
                self._records[path] = (json.loads(path.read_text()), path.stat().st_mtime)
            except (OSError, json.JSONDecodeError):
                return None
        return self._records[path]

    def state(self, folder: Path, names: set[str], fold: int) -> tuple[str, tuple[dict[str, Any], float] | None]:
        """(state, (record, written) when done) of ``fold`` in the run folder ``folder`` whose entries are ``names``."""
        if f"fold_{fold}" in names:
            done = self.record(folder / f"fold_{fold}" / "record.json")
            if done is not None:
                return "done", done
        if f"fold_{fold}.claim" in names:
            claim = read_claim(folder / f"fold_{fold}.claim")
            if claim is not None and not claim.stale(self.stale_after):
                return "running", None
        if f"fold_{fold}.failed" in names:
            return "failed", None
        return "pending", None


@dataclass
class GridStatus:
    """The grid's rows, with elapsed time and an estimate of the time left."""

    plan: dict[str, Any]
    rows: list[Row]
    failures: list[tuple[str, str]]
    elapsed: float
    eta: float | None

    def total(self, state: str) -> int:
        return sum(r.counts[state] for r in self.rows)


def grid_status(runs_dir: Path, plan: dict[str, Any], view: StoreView | None = None,
                now: float | None = None) -> GridStatus:
    """Count every fold of ``plan`` by state, from the store alone."""
    view = view or StoreView(runs_dir, CLAIM_STALE_S)
    now = time.time() if now is None else now
    rows: dict[tuple[str, str, str, str], Row] = {}
    listing: dict[str, set[str]] = {}
    failures: list[tuple[str, str]] = []
    seconds: list[float] = []
    written: list[float] = []  # when the folds completed since the plan started were written
    for job in plan["jobs"]:
        folder = Path(runs_dir) / job["rel"]
        if job["rel"] not in listing:
            listing[job["rel"]] = set(os.listdir(folder)) if folder.is_dir() else set()
        state, done = view.state(folder, listing[job["rel"]], job["fold"])
        key = (job["cohort"], job["backbone"], job["model"], Path(job["rel"]).name)
        row = rows.setdefault(key, Row(*key))
        row.counts[state] += 1
        if done is not None:
            record, when = done
            row.seconds.append(float(record.get("timings", {}).get("total_s", 0.0)))
            seconds.append(row.seconds[-1])
            if when >= plan["created"]:
                written.append(when)
        if state == "failed":
            failures.append((f"{job['model']} · {job['cohort']} · {job['backbone']} · fold {job['fold']}",
                             _failure_error(folder / f"fold_{job['fold']}.failed")))
    ordered = list(rows.values())
    left = sum(r.counts["running"] + r.counts["pending"] for r in ordered)
    end = max(written, default=plan["created"]) if not left else now  # a finished grid stops at its last record
    elapsed = max(0.0, end - plan["created"])
    running = sum(r.counts["running"] for r in ordered)
    if written:
        eta: float | None = left * elapsed / len(written)
    elif seconds:
        eta = left * sum(seconds) / len(seconds) / max(1, running)
    else:
        eta = None
    return GridStatus(plan, ordered, failures, elapsed, eta)


def _failure_error(path: Path) -> str:
    try:
        return json.loads(path.read_text())["error"].splitlines()[0]
    except (OSError, json.JSONDecodeError, KeyError, IndexError):
        return "(no error recorded)"


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_table(status: GridStatus) -> Table:
    """The grid as a rich table: one row per model x cohort x backbone, with elapsed time and ETA."""
    totals = ", ".join(f"{status.total(s)} {s}" for s in STATES)
    n = sum(status.total(s) for s in STATES)
    table = Table(title=f"grid {status.plan['id']}: {n} folds ({totals})",
                  caption=f"elapsed {_clock(status.elapsed)} · ETA {_clock(status.eta)} · driver "
                          f"{status.plan['driver']} ({status.plan['executor']})")
    configs = Counter((r.cohort, r.backbone, r.model) for r in status.rows)
    for col in ("cohort", "backbone", "model", *STATES, "s/fold"):
        table.add_column(col, justify="right" if col in (*STATES, "s/fold") else "left")
    style = {"done": "green", "running": "cyan", "failed": "red", "pending": ""}
    for r in status.rows:
        model = f"{r.model} ({r.run})" if configs[r.cohort, r.backbone, r.model] > 1 else r.model
        counts = [f"[{style[s]}]{r.counts[s]}[/]" if r.counts[s] and style[s] else str(r.counts[s]) for s in STATES]
        mean = f"{sum(r.seconds) / len(r.seconds):.1f}" if r.seconds else "-"
        table.add_row(r.cohort, r.backbone, model, *counts, mean)
    return table


def print_status(console: Console, runs_dir: Path, plan: str | None = None,
                 stale_after: float = CLAIM_STALE_S) -> GridStatus:
    """Print the grid table of the latest (or the given) plan in ``runs_dir``, then its failures."""
    status = grid_status(runs_dir, read_plan(runs_dir, plan), StoreView(runs_dir, stale_after))
    console.print(status_table(status))
    for label, error in status.failures[:20]:
        console.print(f"[red]failed[/] {label}: {error}", highlight=False)
    return status


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
          retries: int = 2, node_cache: Path | None = None, cache_gb: float | None = None,
          compile: bool = False) -> Report:
    """Write the plan, run ``todo`` on ``executor`` under a live grid table, then print what happened."""
    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    if cache_gb is not None and cache_gb <= 0:
        raise MilbenchError(f"--cache-gb must be positive, not {cache_gb}")
    opts = RunOptions(str(Path(runs_dir).resolve()), device, cpus_per_fold, save_checkpoints, driver=driver_id(),
                      node_cache=str(Path(node_cache).expanduser().resolve()) if node_cache else None,
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

        report = execute(todo, opts, executor, max_parallel, ray_address, gpus_per_fold, retries,
                         on_outcome=on_outcome, on_tick=refresh, progress=on_progress if sequential else None)
        refresh(force=True, final=True)
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
