"""Stored folds and the fold table: every figure recomputed from a fold's ``predictions.csv``.

- ``uno_c``, ``ibs`` and ``td_auc`` need the training fold's survival labels. They come from the record's
  ``train_labels`` when it has them; else from the out-of-fold predictions of the other folds of the same run when
  those are exactly the training patients (k-fold CV in which every patient is held out once: their count equals the
  record's ``n_train`` and none of them is in this fold); otherwise the fold's value is NaN and a note says why.
- IBS and td-AUC are scored on one time grid per cohort (``metrics.cohort_times``: quantiles of the whole cohort's
  event times, kept inside every fold's follow-up), fixed before any fold is scored, so folds are comparable.
- The oracle C (synthetic cohorts) is the cohort's known risk scored on the held-out patients, read from the record:
  it is a property of the cohort, not a model output.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.files import stable_hash
from milbench.runs.store import iter_folds
from milbench.survival.metrics import cohort_times, fold_metrics, harrell_c

KEYS = ["protocol", "cohort", "backbone", "model"]
CELL = [*KEYS, "variant"]
FAMILY = ["protocol", "cohort", "backbone"]


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool


METRICS = {
    "c_index": MetricInfo("C-index (Harrell)", True),
    "uno_c": MetricInfo("C-index (Uno, IPCW)", True),
    "ibs": MetricInfo("Integrated Brier score", False),
    "td_auc": MetricInfo("Time-dependent AUC (mean)", True),
}
GRID_METRICS = ("ibs", "td_auc")


@dataclass
class LoadedFold:
    """A stored fold with its predictions read once."""

    record: dict[str, Any]
    predictions: pd.DataFrame
    path: Path
    dropped: int = 0  # patients left out for a NaN or infinite risk


def load_folds(runs_dir: Path, notes: list[str] | None = None) -> list[LoadedFold]:
    """Every completed fold of the store, predictions included; an empty store is an error.

    Patients whose stored risk is NaN or infinite (a diverged model) are left out of every figure, the fold's and
    the pooled ones, and ``notes`` says how many, where: one bad fold never stops a leaderboard.
    """
    folds = []
    for stored in iter_folds(runs_dir):
        pred = stored.predictions
        finite = np.isfinite(pd.to_numeric(pred["risk"], errors="coerce").to_numpy(float))
        fold = LoadedFold(stored.record, pred[finite].reset_index(drop=True), stored.path, int((~finite).sum()))
        if fold.dropped and notes is not None:
            notes.append(f"{stored.path}: {fold.dropped} of {len(pred)} patients have a NaN or infinite risk and are "
                         f"left out of its fold's figures and of the pooled statistics")
        folds.append(fold)
    if not folds:
        raise MilbenchError(f"no completed folds under {runs_dir}: run `milbench run` first or pass --runs-dir")
    return folds


def variant_of(config: dict[str, Any]) -> str:
    """Hash of a run config without its seed: runs with the same variant differ only in the seed."""
    return stable_hash({k: v for k, v in config.items() if k != "seed"})


def _flat_config(config: dict[str, Any]) -> dict[str, str]:
    flat = {k: v for k, v in config.items() if k not in ("seed", "model_options")}
    flat |= dict(config.get("model_options") or {})
    return {k: json.dumps(v, default=str) if not isinstance(v, str) else v for k, v in flat.items()}


def _variant_labels(loaded: list[LoadedFold]) -> dict[str, str]:
    """Per variant, the settings that tell it apart from the other variants of its model in the same family."""
    groups: dict[tuple, dict[str, dict[str, str]]] = defaultdict(dict)
    for f in loaded:
        groups[tuple(f.record[k] for k in KEYS)][variant_of(f.record["config"])] = _flat_config(f.record["config"])
    labels = {}
    for variants in groups.values():
        keys = sorted({k for c in variants.values() for k in c if len({v.get(k) for v in variants.values()}) > 1})
        for variant, cfg in variants.items():
            labels[variant] = ", ".join(f"{k}={cfg.get(k, '-')}" for k in keys)
    return labels


def runs_by_hash(loaded: list[LoadedFold]) -> dict[str, list[LoadedFold]]:
    """The stored folds of each run (config hash), in fold order."""
    runs: dict[str, list[LoadedFold]] = defaultdict(list)
    for f in loaded:
        runs[f.record["config_hash"]].append(f)
    return {h: sorted(fs, key=lambda f: f.record["fold"]) for h, fs in runs.items()}


def train_labels(fold: LoadedFold, run: list[LoadedFold]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The training fold's (time, event, source): from the record, else from the run's other folds when they are
    exactly the training patients, else None."""
    stored = fold.record.get("train_labels")
    if stored:
        return np.asarray(stored["time"], dtype=float), np.asarray(stored["event"], dtype=int), "record"
    others = [o.predictions for o in run if o.record["fold"] != fold.record["fold"]]
    if not others:
        return None
    pool = pd.concat(others, ignore_index=True)
    exact = (fold.record.get("n_train") == len(pool) and pool.case_id.is_unique
             and not set(pool.case_id) & set(fold.predictions.case_id))
    return (pool.time.to_numpy(float), pool.event.to_numpy(int), "other folds") if exact else None


def survival_columns(pred: pd.DataFrame) -> list[str]:
    """The head's per-bin survival columns ``surv_0 .. surv_{K-1}`` in bin order (none for a head without a curve)."""
    cols = [c for c in pred.columns if c.startswith("surv_")]
    return sorted(cols, key=lambda c: int(c.split("_")[1]))


def cohort_grids(loaded: list[LoadedFold], notes: list[str]) -> dict[str, np.ndarray]:
    """One IBS / td-AUC time grid per cohort from the whole cohort's event times (every stored patient of the cohort),
    kept inside every stored fold's follow-up: fixed before any fold is scored."""
    by_cohort: dict[str, list[LoadedFold]] = defaultdict(list)
    for f in loaded:
        by_cohort[f.record["cohort"]].append(f)
    grids = {}
    for cohort, folds in sorted(by_cohort.items()):
        patients = pd.concat([f.predictions[["case_id", "time", "event"]] for f in folds]).drop_duplicates("case_id")
        patients = patients.set_index("case_id")
        held_out, seen = [], set()
        for f in folds:
            ids = frozenset(f.predictions.case_id)
            if ids in seen:
                continue
            seen.add(ids)
            rest = patients.index.difference(list(ids))
            held_out.append((f.predictions.time.to_numpy(float), patients.loc[rest, "time"].to_numpy(float)))
        grid, note = cohort_times(patients.time.to_numpy(float), patients.event.to_numpy(int), held_out)
        if note:
            notes.append(f"{cohort}: evaluation grid: {note}")
        grids[cohort] = grid
    return grids


def _ipcw_metrics(fold: LoadedFold, run: list[LoadedFold], wanted: list[str], grid: np.ndarray | None,
                  notes: list[str]) -> tuple[dict[str, float], str]:
    """uno_c / ibs / td_auc of one fold, recomputed with the engine's own ``fold_metrics`` on the cohort's grid."""
    nan = {m: float("nan") for m in wanted}
    labels = train_labels(fold, run)
    if labels is None:
        notes.append(f"{fold.path}: {', '.join(wanted)} need the training fold's labels; the record has no "
                     f"train_labels and the run's other folds are not exactly its training patients, so they are NaN")
        return nan, "unavailable"
    pred, edges, surv = fold.predictions, fold.record.get("bin_edges"), survival_columns(fold.predictions)
    if edges is None:
        notes.append(f"{fold.path}: the record has no bin_edges: {', '.join(wanted)} are NaN")
        return nan, labels[2]
    if not surv and "ibs" in wanted:  # a head without a survival curve (cox): Uno's C and td-AUC need the risk only
        notes.append(f"{fold.path}: the predictions have no surv_* columns (a head without a survival curve): "
                     f"ibs is NaN")
    values = fold_metrics(labels[0], labels[1], pred.time.to_numpy(float), pred.event.to_numpy(int),
                          pred.risk.to_numpy(float), pred[surv].to_numpy(float) if surv else None,
                          np.asarray(edges, dtype=float), times=grid)
    return {m: values[m] for m in wanted}, labels[2]


def _c_index(fold: LoadedFold, notes: list[str]) -> float:
    pred = fold.predictions
    try:
        return harrell_c(pred.time.to_numpy(float), pred.event.to_numpy(int), pred.risk.to_numpy(float))
    except MilbenchError as err:
        notes.append(f"{fold.path}: C-index is NaN ({err})")
        return float("nan")


def _cost(record: dict[str, Any]) -> dict[str, Any]:
    """What a fold cost, from its record: training seconds, seconds per epoch, peak memory and where it ran."""
    timings = record.get("timings") or {}
    env = record.get("environment") or {}
    return {"train_s": timings.get("train_s", np.nan), "s_per_epoch": timings.get("s_per_epoch", np.nan),
            "peak_memory_bytes": record.get("peak_memory_bytes", np.nan),
            "device": env.get("device_name") or env.get("device") or ""}


def fold_rows(loaded: list[LoadedFold], metrics: Iterable[str], notes: list[str],
              grids: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per stored fold: its cell, seed, sizes, ``metrics`` recomputed from its predictions, cost."""
    extra = [m for m in dict.fromkeys(metrics) if m != "c_index"]
    unknown = [m for m in extra if m not in METRICS]
    if unknown:
        raise MilbenchError(f"unknown metric '{unknown[0]}': use one of {', '.join(METRICS)}")
    if grids is None and any(m in GRID_METRICS for m in extra):
        grids = cohort_grids(loaded, notes)
    runs = runs_by_hash(loaded)
    labels = _variant_labels(loaded)
    rows = []
    for f in loaded:
        rec, pred = f.record, f.predictions
        variant = variant_of(rec["config"])
        row = {k: rec[k] for k in KEYS} | {
            "variant": variant, "variant_label": labels[variant], "config_hash": rec["config_hash"],
            "seed": rec["config"]["seed"], "fold": rec["fold"], "n_test": len(pred),
            "n_train": rec.get("n_train", np.nan), "n_events": int(pred.event.sum()), "c_index": _c_index(f, notes)}
        if extra:
            grid = (grids or {}).get(rec["cohort"])
            values, source = _ipcw_metrics(f, runs[rec["config_hash"]], extra, grid, notes)
            row |= values | {"train_labels": source}
        if "oracle_c_index" in rec.get("metrics", {}):
            row["oracle_c_index"] = rec["metrics"]["oracle_c_index"]
        row |= _cost(rec)
        rows.append(row)
    return pd.DataFrame(rows)


def fold_table(runs_dir: Path, metrics: Iterable[str] = ("c_index",)) -> pd.DataFrame:
    """One row per stored fold with ``metrics`` recomputed from its ``predictions.csv``."""
    return fold_rows(load_folds(runs_dir), metrics, [])
