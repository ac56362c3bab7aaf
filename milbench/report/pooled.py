"""Pooled out-of-fold statistics of each cell: the leaderboard's metric pooled within folds (each pair of patients
ranked by one fitted model; the cross-fold pool as a labelled option) with its stratified bootstrap interval about the
same statistic, one log-rank test and one D-calibration test over all seeds.

A cell's seeds are aligned on the patients every seed scored; a patient's fold is the fold that held it out. With
several seeds, the statistic is the mean over seeds (seeds share each bootstrap replicate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.report.folds import CELL, LoadedFold, survival_columns, train_labels
from milbench.survival.calibration import head_curve, survival_at_own_time
from milbench.survival.comparisons import BootstrapC, bootstrap_c
from milbench.survival.metrics import survival_at
from milbench.survival.statistics import (
    bootstrap_metric,
    d_calibration_over_seeds,
    logrank_over_seeds,
    metric_parts,
)

POOLED_KINDS = ("within-fold", "cross-fold")


@dataclass
class CellData:
    """A cell's held-out patients (sorted by case id) and each seed's predictions for them."""

    key: tuple
    case_id: np.ndarray
    time: np.ndarray
    event: np.ndarray
    fold: np.ndarray
    risks: np.ndarray  # [n_seeds, n]
    cutoffs: np.ndarray | None = None  # [n_seeds, n]: the training fold's median risk (log-rank groups)
    surv_grid: np.ndarray | None = None  # [n_seeds, n, K]: the head's curve at the cohort grid (IBS)
    s_own: np.ndarray | None = None  # [n_seeds, n]: the head's curve at the patient's own time (D-calibration)
    training: dict | None = None  # fold -> (time, event) of its training patients (IPCW metrics)
    notes: list[str] = field(default_factory=list)

    def subset(self, case_ids: Sequence[str]) -> CellData:
        """The same cell on a subset of its patients (given in case-id order)."""
        pos = np.searchsorted(self.case_id, np.asarray(case_ids))

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            """The seeds' values of the subset (None stays None)."""
            return None if a is None else a[:, pos]

        return CellData(self.key, self.case_id[pos], self.time[pos], self.event[pos], self.fold[pos], self.risks[:, pos],
                        pick(self.cutoffs), pick(self.surv_grid), pick(self.s_own), self.training, self.notes)


def cell_data(key: tuple, runs: list[list[LoadedFold]], grid: np.ndarray | None) -> CellData:
    """Align a cell's seeds (one list of stored folds per seed) on their common patients."""
    label = " / ".join(map(str, key[:4]))
    notes: list[str] = []
    per_seed = []
    for folds in runs:
        pred = pd.concat([f.predictions.assign(_fold=f.record["fold"]) for f in folds], ignore_index=True)
        if not pred.case_id.is_unique:
            notes.append(f"{label}: some patients are held out in several folds of one run; the first is pooled")
            pred = pred.drop_duplicates("case_id")
        per_seed.append(pred.set_index("case_id"))
    common = sorted(set.intersection(*(set(p.index) for p in per_seed)))
    if any(len(p) != len(common) for p in per_seed):
        notes.append(f"{label}: seeds scored different patients; the {len(common)} common to every seed are pooled")
    base = per_seed[0].loc[common]
    if any((p.loc[common, "_fold"].to_numpy() != base._fold.to_numpy()).any() for p in per_seed[1:]):
        raise MilbenchError(f"{label}: the seeds of one cell held patients out in different folds; a cell's runs must "
                            "share their splits")
    data = CellData(key, np.asarray(common), base.time.to_numpy(float), base.event.to_numpy(int),
                    base._fold.to_numpy(), np.array([p.loc[common, "risk"].to_numpy(float) for p in per_seed]),
                    notes=notes)
    if all("train_median_risk" in p for p in per_seed):
        data.cutoffs = np.array([p.loc[common, "train_median_risk"].to_numpy(float) for p in per_seed])
    _curves(data, runs, common, grid)
    training = {}
    for f in runs[0]:
        labels = train_labels(f, runs[0])
        if labels is not None:
            training[f.record["fold"]] = (labels[0], labels[1])
    data.training = training if set(training) >= set(np.unique(data.fold).tolist()) else None
    return data


def _curves(data: CellData, runs: list[list[LoadedFold]], common: list[str], grid: np.ndarray | None) -> None:
    """Each seed's survival curve at the grid and at each patient's own time, from the head's bins and each fold's
    bin edges; left None when a fold has no curve (a head without one) or no bin edges."""
    if not all(survival_columns(f.predictions) and f.record.get("bin_edges") is not None for fs in runs for f in fs):
        return
    pos = {c: i for i, c in enumerate(common)}
    n_grid = 0 if grid is None else len(grid)
    surv_grid = np.full((len(runs), len(common), n_grid), np.nan)
    s_own = np.full((len(runs), len(common)), np.nan)
    for s, folds in enumerate(runs):
        for f in folds:
            pred = f.predictions[f.predictions.case_id.isin(pos)]
            rows = pred.case_id.map(pos).to_numpy()
            bins, edges = pred[survival_columns(pred)].to_numpy(float), np.asarray(f.record["bin_edges"], float)
            if n_grid:
                surv_grid[s, rows] = survival_at(bins, edges, grid)
            s_own[s, rows] = survival_at_own_time(*head_curve(bins, edges), pred.time.to_numpy(float))
    if np.isfinite(s_own).all():
        data.s_own = s_own
        data.surv_grid = surv_grid if n_grid and np.isfinite(surv_grid).all() else None


def pooled_statistic(data: CellData, metric: str, pairs: str, grid: np.ndarray | None, n_boot: int,
                     seed: int) -> BootstrapC:
    """The cell's ``metric`` pooled over its held-out patients (pairs within folds or across them) with its stratified
    percentile bootstrap interval; a metric the cell cannot support raises with the reason."""
    if pairs not in POOLED_KINDS:
        raise MilbenchError(f"--pooled must be one of {', '.join(POOLED_KINDS)}, got '{pairs}'")
    if metric == "c_index":
        return bootstrap_c(data.time, data.event, data.risks, data.fold, n_boot=n_boot, seed=seed, pairs=pairs)
    if data.training is None:
        raise MilbenchError("the training folds' labels are unavailable: no censoring weights")
    predictions = data.risks if metric != "ibs" else data.surv_grid
    if predictions is None:
        raise MilbenchError("no survival curves at the cohort's grid (a head without a curve, or no bin edges)")
    parts = metric_parts(metric, data.time, data.event, data.fold, {"model": predictions}, data.training, grid, pairs)
    return bootstrap_metric(parts, "model", n_boot=n_boot, seed=seed)


def pooled_table(data: dict[tuple, CellData], metric: str, pairs: str, grids: dict[str, np.ndarray], n_boot: int,
                 seed: int, notes: list[str]) -> pd.DataFrame:
    """Per cell: the pooled metric and its interval, the log-rank p over all seeds, D-calibration."""
    rows = []
    for key, d in sorted(data.items()):
        label = " / ".join(map(str, key[:4]))
        notes.extend(d.notes)
        row = dict(zip(CELL, key)) | {"patients": len(d.case_id), "events": int(d.event.sum()),
                                      "seeds": d.risks.shape[0], "metric": metric, "pairs": pairs}
        try:
            res = pooled_statistic(d, metric, pairs, grids.get(key[1]), n_boot, seed)
            row |= {"pooled": res.estimate, "ci_low": res.low, "ci_high": res.high, "se": res.se,
                    "n_terms": res.n_pairs, "pairs": res.pairs}
            if res.reason:
                notes.append(f"{label}: no pooled {metric} ({res.reason})")
        except MilbenchError as err:
            notes.append(f"{label}: no pooled {metric} ({err})")
            row |= {"pooled": np.nan, "ci_low": np.nan, "ci_high": np.nan, "se": np.nan, "n_terms": 0}
        if d.cutoffs is not None:
            row["logrank_p"] = logrank_over_seeds(d.time, d.event, d.risks, d.cutoffs)
        else:
            notes.append(f"{label}: predictions lack train_median_risk: no log-rank p")
            row["logrank_p"] = np.nan
        if d.s_own is not None:
            cal = d_calibration_over_seeds(d.event, d.s_own)
            row |= {"dcal_chi2": cal.statistic, "dcal_p": cal.p}
        else:
            notes.append(f"{label}: no survival curve at each patient's own time (a head without a curve, or no bin "
                         "edges): no D-calibration")
            row |= {"dcal_chi2": np.nan, "dcal_p": np.nan}
        rows.append(row)
    return pd.DataFrame(rows)
