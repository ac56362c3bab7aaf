"""The grid's status table, live or read back from the store.

Everything the table shows is read from the store: a fold is done when its record exists, running while a live claim
holds it, failed when its ``.failed`` file is there, pending otherwise. So `milbench status` on any machine that
sees the store shows the same table as the driver. A running fold is shown with its node and process (from its
claim), the epoch it reached and the time it still needs at its pace so far (from the ``.progress`` file its holder
writes at every epoch; a resumed fold's pace counts only the epochs it trained since it resumed).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from milbench import MilbenchError
from milbench.runs.claims import CLAIM_STALE_S, ClaimInfo, read_claim, read_progress
from milbench.runs.plan import read_plan
from milbench.runs.store import RunRecord, read_record

STATES = ("done", "running", "failed", "pending")


@dataclass
class Row:
    """Fold counts of one model x cohort x backbone (x configuration) of the grid."""

    cohort: str
    backbone: str
    model: str
    run: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    seconds: list[float] = field(default_factory=list)


@dataclass
class Running:
    """A fold being trained: where, how far, and how long it still needs (None before its pace is known)."""

    label: str
    holder: str
    epoch: int | None = None
    epochs: int | None = None
    eta: float | None = None


def fold_eta(progress: dict[str, Any] | None, now: float) -> float | None:
    """Seconds a fold still needs at the pace of the epochs it trained in this attempt."""
    if not progress:
        return None
    done = progress["epoch"] - (progress.get("resumed_after") if progress.get("resumed_after") is not None else -1) - 1
    spent = progress["time"] - progress["started"]
    if done <= 0 or spent <= 0:
        return None
    return max(0.0, (progress["epochs"] - progress["epoch"]) * spent / done - (now - progress["time"]))


class StoreView:
    """Fold states read from the store: records (cached: they never change), claims and failure files."""

    def __init__(self, runs_dir: Path, stale_after: float) -> None:
        self.runs_dir = Path(runs_dir)
        self.stale_after = stale_after
        self._records: dict[Path, tuple[RunRecord, float]] = {}

    def record(self, path: Path) -> tuple[RunRecord, float] | None:
        """A completed fold's record and the time it was written, or None when it is not there (yet)."""
        if path not in self._records:
            try:
                self._records[path] = (read_record(path), path.stat().st_mtime)
            except (OSError, MilbenchError):
                return None
        return self._records[path]

    def state(self, folder: Path, names: set[str], fold: int
              ) -> tuple[str, tuple[RunRecord, float] | ClaimInfo | None]:
        """(state, (record, written) when done, the live claim when running) of ``fold`` in the run folder ``folder``
        whose entries are ``names``."""
        if f"fold_{fold}" in names:
            done = self.record(folder / f"fold_{fold}" / "record.json")
            if done is not None:
                return "done", done
        if f"fold_{fold}.claim" in names:
            claim = read_claim(folder / f"fold_{fold}.claim")
            if claim is not None and not claim.stale(self.stale_after):
                return "running", claim
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
    running: list[Running] = field(default_factory=list)

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
    in_training: list[Running] = []
    for job in plan["jobs"]:
        folder = Path(runs_dir) / job["rel"]
        if job["rel"] not in listing:
            listing[job["rel"]] = set(os.listdir(folder)) if folder.is_dir() else set()
        state, found = view.state(folder, listing[job["rel"]], job["fold"])
        key = (job["cohort"], job["backbone"], job["model"], Path(job["rel"]).name)
        row = rows.setdefault(key, Row(*key))
        row.counts[state] += 1
        label = f"{job['model']} · {job['cohort']} · {job['backbone']} · fold {job['fold']}"
        if isinstance(found, ClaimInfo):
            progress = read_progress(found.path)
            in_training.append(Running(label, found.holder, progress and progress["epoch"],
                                   progress and progress["epochs"], fold_eta(progress, now)))
        elif found is not None:
            record, when = found
            row.seconds.append(record.total_seconds)
            seconds.append(row.seconds[-1])
            if when >= plan["created"]:
                written.append(when)
        if state == "failed":
            failures.append((label, _failure_error(folder / f"fold_{job['fold']}.failed")))
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
    return GridStatus(plan, ordered, failures, elapsed, eta, in_training)


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


def running_table(status: GridStatus) -> Table:
    """The folds in training: node and process, epoch reached, time still needed at their pace."""
    table = Table(title="running folds")
    for col in ("fold", "node", "epoch", "ETA"):
        table.add_column(col, justify="right" if col in ("epoch", "ETA") else "left")
    for r in status.running:
        epoch = f"{r.epoch}/{r.epochs}" if r.epoch is not None else "-"
        table.add_row(r.label, r.holder, epoch, _clock(r.eta) if r.eta is not None else "?")
    return table


def print_status(console: Console, runs_dir: Path, plan: str | None = None,
                 stale_after: float = CLAIM_STALE_S) -> GridStatus:
    """Print the grid table of the latest (or the given) plan in ``runs_dir``, then its failures."""
    status = grid_status(runs_dir, read_plan(runs_dir, plan), StoreView(runs_dir, stale_after))
    console.print(status_table(status))
    if status.running:
        console.print(running_table(status))
    for label, error in status.failures[:20]:
        console.print(f"[red]failed[/] {label}: {error}", highlight=False)
    return status
