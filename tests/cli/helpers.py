"""Helpers of the acceptance suite: the `milbench` command run as a user runs it, on tiny generated cohorts.

Nothing here imports milbench: the suite drives the installed console script (the one next to the test's Python,
else the one on PATH) in a subprocess, and writes its inputs with h5py, numpy, pandas and torch only, in the
layouts the README documents:

- CLAM: ``FEATURES/x20/h5_files/<slide>.h5`` (``features`` [N, D], ``coords`` [N, 2]) or ``pt_files/<slide>.pt``
- TRIDENT: ``FEATURES/20x_256px_0px_overlap/features_<encoder>/<slide>.h5`` (``features`` [1, N, D])
- a cohort table (``case_id, slide_id, survival_months, censorship``; 1 = censored) and a folder of CLAM/MCAT
  ``splits_{k}.csv`` (``train`` and ``val`` columns of case IDs).

The generated cohort is valid: 16 patients (CASE-00 has two slides), 4 folds, feature width 8, 6-8 patches per
slide, every held-out fold with events. Each case of the suite breaks one thing in a fresh copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

N_PATIENTS = 16
N_FOLDS = 4
WIDTH = 8
MODEL = "amil"
ENCODER = "uni_v1"
TRIDENT_DIR = "20x_256px_0px_overlap"


# ---- the command -------------------------------------------------------------------------------------------------

def milbench_command() -> str:
    """The installed `milbench` console script: next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name("milbench")
    if beside.is_file():
        return str(beside)
    found = shutil.which("milbench")
    if found is None:
        pytest.fail("no `milbench` command next to sys.executable or on PATH: install milbench (make setup)")
    return found


def cli_env(**extra: str) -> dict[str, str]:
    """The user's environment, with one torch thread (2 shared cores) and an 80-column terminal (no wrapping)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "80"}
    env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def describe(self) -> str:
        tail = "\n".join(self.stdout.strip().splitlines()[-8:])
        return (f"milbench {' '.join(self.args)}\n  exit {self.returncode} after {self.seconds:.1f} s\n"
                f"  stderr ({len(self.stderr_lines)} line(s)):\n    " + "\n    ".join(self.stderr_lines[-12:]) +
                f"\n  stdout tail:\n    " + tail.replace("\n", "\n    "))


def run_milbench(*args: object, env: dict[str, str] | None = None, timeout: float = 300,
                 cwd: Path | None = None) -> Result:
    """Run ``milbench ARGS`` to completion and capture its output."""
    argv = [str(a) for a in args]
    t0 = time.monotonic()
    proc = subprocess.run([milbench_command(), *argv], capture_output=True, text=True, env=env or cli_env(),
                          timeout=timeout, cwd=cwd)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def start_milbench(*args: object, out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``milbench ARGS`` in its own process group (so a test can signal it as a terminal would), its output
    going to ``out``.stdout / ``out``.stderr."""
    argv = [str(a) for a in args]
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:  # the child keeps its copies
        return subprocess.Popen([milbench_command(), *argv], stdout=stdout, stderr=stderr, env=env or cli_env(),
                                start_new_session=True)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a process started by :func:`start_milbench` (only that group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` on timeout or if ``proc`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()
            if value:
                return value
            pytest.fail(f"the milbench process ended (exit {proc.returncode}) before {what}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- the run store -----------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(folder: Path) -> list[Path]:
    """Completed folds (their ``record.json``) under a run store, temporary folders left out."""
    return sorted(p for p in Path(folder).rglob("record.json") if not any(s.startswith(".tmp") for s in p.parts))


def store_changes(before: dict[str, bytes], runs: Path) -> list[str]:
    """What happened to the stored files of ``before``: changed or removed ones, and new records.

    The driver's plan files (``RUNS/.plans/``, rewritten by every run of the same grid) are not records: left out.
    """
    after = snapshot(runs)
    kept = [name for name in before if not name.startswith(".plans/")]
    problems = [f"{name} changed" for name in kept if name in after and after[name] != before[name]]
    problems += [f"{name} removed" for name in kept if name not in after]
    problems += [f"new record {name}" for name in after if name not in before and name.endswith("record.json")]
    return problems


# ---- cohorts on disk ---------------------------------------------------------------------------------------------

def case_id(i: int) -> str:
    return f"CASE-{i:02d}"


def grid_coords(n: int) -> np.ndarray:
    """Level-0 top-left corners of n 256-px patches, 4 to a row."""
    return np.stack([(np.arange(n) % 4) * 256, (np.arange(n) // 4) * 256], axis=1).astype(np.int64)


@dataclass
class CohortFiles:
    """A tiny valid cohort on disk and the ``milbench run`` options that train it; cases break one piece."""

    root: Path
    layout: str = "clam"  # clam (h5) | pt | trident
    width: int = WIDTH
    n_patients: int = N_PATIENTS
    n_folds: int = N_FOLDS
    patches: int = 6  # slide j has patches + j % 3 patches
    seed: int = 0
    rows: list[dict] = field(default_factory=list)
    folds: list[tuple[list[str], list[str]]] = field(default_factory=list)
    opts: dict[str, object] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    # -- paths
    @property
    def table(self) -> Path:
        return self.root / "cohort.csv"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def slides(self) -> list[str]:
        return [r["slide_id"] for r in self.rows]

    def feature_path(self, slide: str, layout: str | None = None) -> Path:
        layout = layout or self.layout
        if layout == "clam":
            return self.features / "x20" / "h5_files" / f"{slide}.h5"
        if layout == "pt":
            return self.features / "x20" / "pt_files" / f"{slide}.pt"
        return self.features / TRIDENT_DIR / f"features_{ENCODER}" / f"{slide}.h5"

    def split_file(self, k: int) -> Path:
        return self.splits / f"splits_{k}.csv"

    # -- writing
    def build(self) -> "CohortFiles":
        rng = np.random.default_rng(self.seed)
        self.rows = []
        for i in range(self.n_patients):
            event = (i // self.n_folds) % 2 == 0  # every held-out fold (i % n_folds) has two events out of four
            slides = [f"{case_id(i)}-S1", f"{case_id(i)}-S2"] if i == 0 else [f"{case_id(i)}-S1"]
            for slide in slides:
                self.rows.append({"case_id": case_id(i), "slide_id": slide, "survival_months": 5.0 + 3.0 * i + 0.5,
                                  "censorship": 0 if event else 1})
        self.folds = []
        for k in range(self.n_folds):
            held = [case_id(i) for i in range(self.n_patients) if i % self.n_folds == k]
            train = [case_id(i) for i in range(self.n_patients) if i % self.n_folds != k]
            self.folds.append((train, held))
        self.write_table()
        self.write_splits()
        for j, slide in enumerate(self.slides):
            n = self.patches + j % 3
            self.write_features(slide, rng.normal(size=(n, self.width)).astype(np.float32), grid_coords(n))
        self.opts = {"--cohort": self.table, "--splits": self.splits, "--features": self.features,
                     "--epochs": 1, "--device": "cpu"}
        return self

    def write_table(self, rows: list[dict] | None = None) -> Path:
        pd.DataFrame(self.rows if rows is None else rows).to_csv(self.table, index=False)
        return self.table

    def write_splits(self, folds: list[tuple[list[str], list[str]]] | None = None) -> Path:
        self.splits.mkdir(parents=True, exist_ok=True)
        for old in self.splits.glob("splits_*.csv"):
            old.unlink()
        for k, (train, val) in enumerate(self.folds if folds is None else folds):
            frame = pd.DataFrame({"train": pd.Series(train, dtype=object), "val": pd.Series(val, dtype=object)})
            frame.to_csv(self.split_file(k))
        return self.splits

    def write_features(self, slide: str, features, coords=None, layout: str | None = None) -> Path:
        """Write one slide's features in ``layout`` (the cohort's by default), replacing any file it had."""
        layout = layout or self.layout
        for other in ("clam", "pt", "trident"):
            self.feature_path(slide, other).unlink(missing_ok=True)
        path = self.feature_path(slide, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        if layout == "pt":
            torch.save(torch.as_tensor(features) if isinstance(features, np.ndarray) else features, path)
            return path
        with h5py.File(path, "w") as f:
            if features is not None:
                data = features[None] if layout == "trident" and np.ndim(features) == 2 else features
                f.create_dataset("features", data=data)
            if coords is not None:
                c = f.create_dataset("coords", data=coords)
                c.attrs["patch_level"], c.attrs["patch_size"] = 0, 256
        return path

    # -- the command
    def run_args(self, runs: Path) -> list[object]:
        args: list[object] = ["run", "--model", MODEL]
        for key, value in {**self.opts, "--runs-dir": runs}.items():
            if key == "--model":
                args[2] = value
            elif value is not None:
                args += [key, value]
        return args + self.extra


def write_cohort(root: Path, layout: str = "clam", **kwargs) -> CohortFiles:
    root.mkdir(parents=True, exist_ok=True)
    return CohortFiles(root, layout, **kwargs).build()


def log_result(case: str, res: Result, problems: list[str]) -> None:
    """Append one case's outcome to $MILBENCH_ACCEPTANCE_LOG (JSON lines), when set: for triage notes."""
    path = os.environ.get("MILBENCH_ACCEPTANCE_LOG")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps({"case": case, "returncode": res.returncode, "seconds": round(res.seconds, 1),
                             "stderr": res.stderr_lines[-6:], "stdout_tail": res.stdout.strip().splitlines()[-6:],
                             "stdout_failures": _failure_lines(res.stdout),
                             "problems": problems}) + "\n")


def _failure_lines(stdout: str) -> list[str]:
    """The driver's 'failed after N attempt(s): ...' report, unwrapped (rich wraps it at the terminal width)."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("failed after")]
    return [" ".join(part.strip() for part in lines[i:i + 4]) for i in starts[:2]]
