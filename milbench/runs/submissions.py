"""Predictions made outside milbench, entered as runs: checked against a cohort's fixed folds, then written as one
record per fold (:func:`milbench.runs.store.write_fold`) marked ``"source": "submitted"`` with the file's sha256 and
its provenance, so the leaderboard recomputes and ranks them like milbench's own runs.

The file is milbench's own predictions format, all folds in one CSV: one row per held-out patient of every fold,

- ``case_id`` (the patient, as in milbench/splits/tcga_*.csv), ``fold`` (the fold that held it out), ``risk``
  (higher = shorter survival; finite);
- optional ``time`` and ``event`` (1 = event observed): checked against the shipped table when given;
- optional ``surv_0`` .. ``surv_{K-1}``: the survival probability at the end of each of K time bins, the fold's
  quantile bins fitted on its training patients (the MCAT recipe, milbench's default); in [0, 1], non-increasing;
- optional ``train_median_risk``: the median risk of the fold's training patients, one value per fold (the cut of
  the log-rank test's risk groups); without it the held-out fold's own median is the cut, and the record says so.

Anything else is refused, with one line per problem (the first ten shown) and nothing written.
"""

from __future__ import annotations

import getpass
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milbench import MilbenchError, __version__
from milbench.config.run import PROTOCOLS, RunConfig
from milbench.runs.store import RECORD, read_record, write_fold
from milbench.survival.binning import assign_bins, fit_bins
from milbench.survival.metrics import fold_metrics, logrank_p
from milbench.tasks.cohort import Cohort, resolve_cohort

REQUIRED = ("case_id", "fold", "risk")
OPTIONAL = ("time", "event", "train_median_risk")
SURV = re.compile(r"surv_(\d+)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHOWN = 10


class SubmissionRefused(MilbenchError):
    """A predictions file that does not fit the fixed folds: ``problems`` holds one line per problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = Path(path), problems
        shown = "; ".join(problems[:SHOWN]) + (f"; ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN
                                               else "")
        super().__init__(f"{path} refused ({len(problems)} problem(s), nothing written): {shown}")


@dataclass
class Checked:
    """A predictions file that passed every check."""

    path: Path
    frame: pd.DataFrame
    cohort: Cohort
    surv: list[str]
    sha256: str


def _line(i: int) -> int:
    return int(i) + 2  # the header is line 1


def _surv_columns(columns: list[str], problems: list[str]) -> list[str]:
    found = sorted((int(m.group(1)), c) for c in columns if (m := SURV.fullmatch(c)))
    ks = [k for k, _ in found]
    if ks and ks != list(range(len(ks))):
        problems.append(f"survival columns {', '.join(c for _, c in found)}: number them surv_0, surv_1, ... "
                        f"without gaps")
    if len(ks) == 1:
        problems.append("one survival column: give surv_0 .. surv_{K-1} for K >= 2 time bins, or none")
    return [c for _, c in found]


def _numeric(frame: pd.DataFrame, col: str, problems: list[str], what: str) -> pd.Series:
    values = pd.to_numeric(frame[col], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(float))
    for i in np.flatnonzero(bad)[:SHOWN]:
        raw = frame[col].iloc[i]
        shown = "empty" if pd.isna(raw) else f"'{raw}'"
        problems.append(f"line {_line(i)} (case {frame.case_id.iloc[i]}): {col} is {shown}: {what}")
    if bad.sum() > SHOWN:
        problems.append(f"{bad.sum() - SHOWN} more rows have a {col} that is not a finite number")
    return values


def check_submission(path: str | Path, cohort: str) -> Checked:
    """Read ``path`` and check it against ``cohort``'s fixed folds; every problem found is listed in the error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        frame = pd.read_csv(path, dtype={"case_id": str})
    except FileNotFoundError:
        raise MilbenchError(f"predictions file {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise SubmissionRefused(path, [f"not a readable CSV ({type(err).__name__}: {first})"]) from None
    the_cohort = resolve_cohort(cohort)
    problems: list[str] = []
    frame.columns = [str(c).strip() for c in frame.columns]
    columns = list(frame.columns)
    surv = _surv_columns(columns, problems)
    unknown = [c for c in columns if c not in (*REQUIRED, *OPTIONAL) and c not in surv]
    if unknown:
        problems.append(f"unknown column(s) {', '.join(unknown)}: a predictions file has case_id, fold, risk, and "
                        f"optionally time, event, train_median_risk, surv_0 .. surv_K")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}: every row needs case_id, fold and risk")
    if frame.empty:
        problems.append("no rows: one row per held-out patient of every fold")
    if missing or frame.empty:
        raise SubmissionRefused(path, problems)
    frame["case_id"] = frame.case_id.astype(str).str.strip()
    folds = _numeric(frame, "fold", problems, "give the fold that held the patient out")
    known = sorted(the_cohort.folds)
    wrong = folds.notna() & (~folds.isin(known))
    for i in np.flatnonzero(wrong.to_numpy())[:SHOWN]:
        problems.append(f"line {_line(i)} (case {frame.case_id.iloc[i]}): fold {frame.fold.iloc[i]} is not a fold of "
                        f"{the_cohort.name} (folds {', '.join(map(str, known))})")
    _numeric(frame, "risk", problems, "every risk must be a finite number")
    ok = folds.isin(known)
    frame = frame.assign(fold=folds.where(ok, -1).astype(int))
    _check_patients(frame[ok.to_numpy()], the_cohort, problems)
    if "time" in columns or "event" in columns:
        _check_labels(frame, the_cohort, problems)
    if surv:
        _check_curves(frame, surv, problems)
    if "train_median_risk" in columns:
        cut = _numeric(frame, "train_median_risk", problems, "the training fold's median risk, a finite number")
        varies = frame.assign(cut=cut).groupby("fold").cut.nunique() > 1
        for k in varies.index[varies]:
            problems.append(f"fold {k}: train_median_risk takes several values; it is one number per fold")
    if problems:
        raise SubmissionRefused(path, problems)
    frame["risk"] = frame.risk.astype(float)
    return Checked(path, frame, the_cohort, surv, hashlib.sha256(raw).hexdigest())


def _check_patients(frame: pd.DataFrame, cohort: Cohort, problems: list[str]) -> None:
    patients = set(cohort.patients.index)
    dup = frame.duplicated(["case_id", "fold"], keep=False)
    for (case, k), part in frame[dup].groupby(["case_id", "fold"]):
        problems.append(f"case {case} appears {len(part)} times in fold {k} (lines "
                        f"{', '.join(str(_line(i)) for i in part.index)}): keep one row per patient and fold")
    for k, part in frame.groupby("fold"):
        train, held = cohort.folds[k]
        train_set, held_set = set(train), set(held)
        for i, case in zip(part.index, part.case_id):
            if case not in patients:
                problems.append(f"line {_line(i)}: case {case} is not a patient of {cohort.name}")
            elif case in train_set:
                problems.append(f"line {_line(i)}: case {case} is a training patient of fold {k}: only its "
                                f"{len(held)} held-out patients are scored")
            elif case not in held_set:
                problems.append(f"line {_line(i)}: case {case} is not held out in fold {k}")
        absent = [c for c in held if c not in set(part.case_id)]
        if absent:
            problems.append(f"fold {k}: {len(absent)} held-out patient(s) missing, e.g. {', '.join(absent[:3])}: "
                            f"give every held-out patient of every fold")
    for k in sorted(set(cohort.folds) - set(frame.fold)):
        problems.append(f"fold {k}: no rows; its {len(cohort.folds[k][1])} held-out patients are missing")


def _check_labels(frame: pd.DataFrame, cohort: Cohort, problems: list[str]) -> None:
    rows = frame[frame.case_id.isin(cohort.patients.index)]
    truth = cohort.patients.loc[rows.case_id]
    for col, given in (("time", "time"), ("event", "event")):
        if given not in frame.columns:
            continue
        values = pd.to_numeric(rows[given], errors="coerce").to_numpy(float)
        want = truth[col].to_numpy(float)
        bad = ~np.isclose(values, want, rtol=1e-6, atol=1e-6)
        for i, v, w in list(zip(rows.index[bad], values[bad], want[bad]))[:SHOWN]:
            problems.append(f"line {_line(i)} (case {frame.case_id[i]}): {col} {v:g} differs from the shipped "
                            f"table's {w:g} (milbench/splits/{cohort.name}.csv; event 1 = observed)")


def _check_curves(frame: pd.DataFrame, surv: list[str], problems: list[str]) -> None:
    values = frame[surv].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1) | (values > 1).any(axis=1)
    rises = (np.diff(values, axis=1) > 1e-9).any(axis=1) & ~bad
    for i in np.flatnonzero(bad)[:SHOWN]:
        problems.append(f"line {_line(i)} (case {frame.case_id.iloc[i]}): survival values must be numbers in [0, 1]")
    for i in np.flatnonzero(rises)[:SHOWN]:
        j = int(np.flatnonzero(np.diff(values[i]) > 1e-9)[0])
        problems.append(f"line {_line(i)} (case {frame.case_id.iloc[i]}): the survival curve rises from "
                        f"{surv[j]} = {values[i, j]:g} to {surv[j + 1]} = {values[i, j + 1]:g}: it must not increase")


def _config(checked: Checked, model: str, backbone: str, protocol: str, seed: int) -> RunConfig:
    from milbench.tasks.inputs import Inputs

    prints = Inputs(checked.cohort, None).fingerprints(())
    inputs = {"rows": prints["rows"], "folds": prints["folds"], "submission": checked.sha256[:16]}
    return RunConfig(model=model, cohort=checked.cohort.name, backbone=backbone, recipe="submitted",
                     protocol=protocol, seed=seed, n_bins=len(checked.surv) or 4, inputs=inputs)


def _check_name(model: str, backbone: str, protocol: str) -> None:
    from milbench.models.registry import list_cards

    if not NAME.fullmatch(model):
        raise MilbenchError(f"--model '{model}': a submission's name is letters, digits, '_', '-' and '.', e.g. "
                            f"mymil_v2")
    if model in {c.name for c in list_cards()}:
        raise MilbenchError(f"--model '{model}' is a milbench model: name the submission apart from milbench's own "
                            f"runs, e.g. {model}_external")
    if not NAME.fullmatch(backbone):
        raise MilbenchError(f"--backbone '{backbone}': name the features' backbone, e.g. resnet50")
    if protocol not in PROTOCOLS:
        raise MilbenchError(f"--protocol '{protocol}': declare one of {', '.join(PROTOCOLS)}")


def _existing(runs_dir: Path, cfg: RunConfig) -> list[Path]:
    folder = Path(runs_dir) / cfg.cohort / cfg.backbone / cfg.model
    return sorted(folder.glob(f"*/fold_*/{RECORD}")) if folder.is_dir() else []


def submit(path: str | Path, cohort: str, model: str, runs_dir: str | Path, backbone: str = "default",
           protocol: str = "fixed", seed: int = 7, by: str | None = None, note: str = "") -> tuple[list[Path], bool]:
    """Check ``path`` and write it into ``runs_dir`` as one record per fold; (fold folders, newly written).

    Resubmitting the same file is a no-op (False). Another file under a name that already has runs with the same
    cohort, backbone, protocol and seed is refused: a run's predictions are never replaced silently."""
    _check_name(model, backbone, protocol)
    checked = check_submission(path, cohort)
    cfg = _config(checked, model, backbone, protocol, seed)
    existing = _existing(runs_dir, cfg)
    records = [(p, read_record(p)) for p in existing]
    same = [p.parent for p, r in records if r.config_hash == cfg.hash]
    if same:
        return same, False
    clash = [p for p, r in records if (r.protocol, r.config.get("seed")) == (protocol, seed)]
    if clash:
        raise MilbenchError(f"'{model}' already has {protocol} runs with seed {seed} on {cfg.cohort} ({backbone}) in "
                            f"{runs_dir} ({clash[0].parent.parent}): submit under another --model or --seed, or "
                            f"remove that folder first")
    provenance = {"file": checked.path.name, "path": str(checked.path.resolve()), "sha256": checked.sha256,
                  "submitted_by": by or _user(), "submitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "protocol_declared": protocol, "note": note, "milbench_version": __version__,
                  "columns": list(checked.frame.columns)}
    written = [write_fold(Path(runs_dir), cfg, k, *_fold(checked, cfg, k, provenance))
               for k in sorted(checked.cohort.folds)]
    return written, True


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _fold(checked: Checked, cfg: RunConfig, k: int, provenance: dict[str, Any]
          ) -> tuple[dict[str, Any], pd.DataFrame]:
    """One fold's record and predictions, shaped as :func:`milbench.training.fold.fit_fold` writes them."""
    cohort = checked.cohort
    part = checked.frame[checked.frame.fold == k]
    train_ids, test_ids = cohort.folds[k][0], part.case_id.tolist()
    train_time, train_event = cohort.labels(train_ids)
    time, event = cohort.labels(test_ids)
    edges = fit_bins(train_time, train_event, n_bins=cfg.n_bins)
    risk = part.risk.to_numpy(float)
    given = "train_median_risk" in part
    cutoff = float(part.train_median_risk.iloc[0]) if given else float(np.median(risk))
    surv = part[checked.surv].to_numpy(float) if checked.surv else None
    metrics = fold_metrics(train_time, train_event, time, event, risk, surv, edges)
    metrics["logrank_p"] = logrank_p(time, event, risk, cutoff)
    predictions = pd.DataFrame({"case_id": test_ids, "time": time, "event": event.astype(int), "risk": risk,
                                "fold": k, "bin": assign_bins(time, edges), "train_median_risk": cutoff})
    for j, col in enumerate(checked.surv):
        predictions[f"surv_{j}"] = part[col].to_numpy(float)
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": cfg.protocol, "fold": k, "cohort": cfg.cohort,
        "model": cfg.model, "backbone": cfg.backbone, "source": "submitted",
        "submission": {**provenance, "cutoff": "train_median_risk column" if given else
                       "the held-out fold's median risk (no train_median_risk column)"},
        "train_labels": {"case_id": list(train_ids), "time": train_time.tolist(),
                         "event": train_event.astype(int).tolist()},
        "n_train": len(train_ids), "n_test": len(test_ids), "bin_edges": edges.tolist(), "metrics": metrics,
        "head": "hazard" if checked.surv else "risk", "timings": {}, "history": [], "excluded_slides": [],
        "environment": {"source": "submitted", "milbench_version": __version__},
    }
    return record, predictions
