"""The plan file: every fold of a grid, when and by whom it was started (``RUNS/.plans/<id>.json``), the only file a
driver writes into the store."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milbench import MilbenchError
from milbench.files import stable_hash, write_json
from milbench.runs.claims import process_id

if TYPE_CHECKING:
    from milbench.runs.jobs import FoldJob

PLANS = ".plans"

def plan_id(jobs: Sequence[FoldJob]) -> str:
    """The same grid always gets the same id (a rerun overwrites its plan)."""
    keys = sorted(f"{job.rel}/fold_{job.fold}" for job in jobs)
    return stable_hash("\n".join(keys).encode())


def write_plan(runs_dir: Path, jobs: Sequence[FoldJob], executor: str, max_parallel: int | None) -> Path:
    """Write the plan atomically: the only file a driver writes into the store."""
    pid = plan_id(jobs)
    folder = Path(runs_dir) / PLANS
    folder.mkdir(parents=True, exist_ok=True)
    body = {"id": pid, "created": time.time(), "driver": process_id(), "executor": executor,
            "max_parallel": max_parallel, "argv": sys.argv,
            "jobs": [{"cohort": j.cfg.cohort, "backbone": j.cfg.backbone, "model": j.cfg.model, "rel": j.rel,
                      "fold": j.fold} for j in jobs]}
    return write_json(folder / f"{pid}.json", body, indent=1)


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
