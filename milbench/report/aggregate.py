"""Leaderboards recomputed from stored per-patient predictions (never from metrics cached in records).

Conventions, printed with every rendered leaderboard:

- A *cell* is protocol x cohort x backbone x model x variant; a variant is the run config without its seed, so
  the runs of one cell differ only in their seed. Variants of one model that differ in anything else are
  separate rows, labelled by what differs.
- A fold's figure is recomputed from its ``predictions.csv`` (``folds``). With several seeds a fold's value is the
  mean over seeds; a cell is the mean over folds ± the sd over folds of those per-fold means (fold sd). The seed sd
  (sd over seeds of each seed's mean over folds) is reported apart.
- A cell is complete when each of its seeds has as many scored folds as the most complete run of that cohort in
  the store, and it has as many seeds as the cell with the most seeds of its protocol and cohort. Incomplete
  cells are marked † and never marked best or second.
- Runs of different protocols are never ranked together: one set of tables per protocol.
- Pooled figures count pairs of patients held out in the same fold (``pooled``); paired comparisons are on the
  same patients against a declared reference (``paired``); ranks over cohorts in ``ranking``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.models.registry import list_cards
from milbench.report.folds import (  # noqa: F401  (re-exported: the leaderboard's public names)
    CELL,
    FAMILY,
    KEYS,
    METRICS,
    LoadedFold,
    MetricInfo,
    cohort_grids,
    fold_rows,
    fold_table,
    load_folds,
    runs_by_hash,
    variant_of,
)
from milbench.report.paired import (
    ADJUST_BY,
    TESTS,
    PairTest,
    comparison_table,
    marks,
    needed_pairs,
    pair_tests,
    references,
)
from milbench.report.pooled import POOLED_KINDS, CellData, cell_data, pooled_table
from milbench.report.ranking import POSTHOCS, RankResult, rank_results
from milbench.survival.comparisons import seed_fold_variance

SIGNIFICANCE = 0.05
FORMATS = ("md", "tex", "html", "csv")
INCOMPLETE, SIGNIFICANT, TIED = "†", "*", "≈"
GROUP_TITLES = {"single_scale": "Single-scale", "multi_scale": "Multi-scale", "ablation": "Ablations",
                "custom": "Other models"}
PROTOCOL_NOTES = {
    "fixed": "a fixed number of epochs; the final model is scored on the held-out fold",
    "inner-val": "the epoch is picked on an inner validation split of the training fold; scored on the held-out fold",
    "best-val": "the epoch is picked on the held-out fold itself (the CrossFusion paper's protocol): optimistic, "
                "kept only to reproduce published tables",
}


def _card(model: str) -> tuple[str, str, int]:
    """(display name, group, registry order) of a model; models not registered here go last, as 'custom'."""
    cards = list_cards()
    names = [c.name for c in cards]
    if model not in names:
        return model, "custom", 10_000
    order = names.index(model)
    card = cards[order]
    return card.display_name, card.group if card.group in GROUP_TITLES else "custom", order


def row_label(display: str, variant_label: str) -> str:
    return f"{display} ({variant_label})" if variant_label else display


def _rank(values: pd.Series, higher_is_better: bool) -> pd.Series:
    return values.rank(ascending=not higher_is_better, method="min")


def _spread(folds: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per cell: seed sd (of each seed's mean over folds), seed sd within a fold, and the two-way variance components
    of scores[seed, fold] (``comparisons.seed_fold_variance``)."""
    rows = []
    for key, part in folds.groupby(CELL, sort=False):
        table = part.pivot_table(index="seed", columns="fold", values=metric, aggfunc="mean", dropna=False)
        v = seed_fold_variance(table.to_numpy(float))
        rows.append(dict(zip(CELL, key)) | {"seed_sd": v.seed_sd, "seed_sd_within_fold": v.seed_sd_within_fold,
                                            "var_fold": v.var_fold, "var_seed": v.var_seed,
                                            "var_residual": v.var_residual})
    return pd.DataFrame(rows, columns=[*CELL, "seed_sd", "seed_sd_within_fold", "var_fold", "var_seed",
                                       "var_residual"])


def summary(folds: pd.DataFrame, metric: str = "c_index") -> pd.DataFrame:
    """One row per cell: mean and fold sd over the per-fold seed means, seed sd apart, folds and seeds behind it,
    completeness, and its rank by value in its protocol x cohort x backbone (marks come from the paired tests)."""
    if metric not in folds:
        raise MilbenchError(f"metric '{metric}' was not computed: build the fold table with metrics=('{metric}',)")
    info = METRICS[metric]
    ok = folds[np.isfinite(folds[metric].astype(float))]
    per_fold = ok.groupby([*CELL, "fold"])[metric].mean()
    by_cell = per_fold.groupby(level=CELL)
    first = folds.groupby(CELL).agg(variant_label=("variant_label", "first"), seeds=("seed", "nunique"))
    cells = first.join(pd.DataFrame({"mean": by_cell.mean(), "std": by_cell.std(ddof=1), "folds": by_cell.size()}))
    cells["folds"] = cells["folds"].fillna(0).astype(int)
    seed_folds = ok.groupby([*CELL, "seed"])["fold"].nunique()
    all_seeds = folds.groupby([*CELL, "seed"]).size().index
    cells["min_folds_per_seed"] = seed_folds.reindex(all_seeds, fill_value=0).groupby(level=CELL).min()
    cells = cells.reset_index().merge(_spread(folds, metric), on=CELL, how="left")
    expected = folds.groupby(["cohort", "config_hash"])["fold"].nunique().groupby("cohort").max()
    cells["expected_folds"] = cells.cohort.map(expected)
    cells["expected_seeds"] = cells.groupby(["protocol", "cohort"])["seeds"].transform("max")
    cells["complete"] = ((cells.min_folds_per_seed >= cells.expected_folds)
                         & (cells.seeds >= cells.expected_seeds) & cells["mean"].notna())
    if "oracle_c_index" in folds:
        cells = cells.merge(folds.groupby(CELL)["oracle_c_index"].mean().rename("oracle").reset_index(), on=CELL)
    cost = folds.groupby(CELL).agg(train_s=("train_s", "mean"), s_per_epoch=("s_per_epoch", "mean"),
                                   peak_memory_bytes=("peak_memory_bytes", "max"),
                                   device=("device", lambda d: ", ".join(sorted({x for x in d if x}))))
    cells = cells.merge(cost.reset_index(), on=CELL)
    cards = cells.model.map(_card)
    cells["display"] = [c[0] for c in cards]
    cells["group"] = [c[1] for c in cards]
    cells["order"] = [c[2] for c in cards]
    cells["rank"] = np.nan
    complete = cells[cells.complete]
    cells.loc[complete.index, "rank"] = complete.groupby(FAMILY)["mean"].transform(
        lambda s: _rank(s, info.higher_is_better))
    return cells


def runs_table(loaded: list[LoadedFold], folds: pd.DataFrame) -> pd.DataFrame:
    """One row per run (config hash): what was run, with which recipe, on which folds."""
    rows = []
    for h, part in folds.groupby("config_hash", sort=False):
        cfg = next(f.record["config"] for f in loaded if f.record["config_hash"] == h)
        first = part.iloc[0]
        rows.append({k: first[k] for k in KEYS} | {
            "variant_label": first.variant_label, "seed": first.seed, "config_hash": h,
            "folds": ",".join(str(x) for x in sorted(part.fold)), "recipe": cfg.get("recipe"),
            "epochs": cfg.get("epochs"), "lr": cfg.get("lr"), "bins_on": cfg.get("bins_on"),
            "options": ", ".join(f"{k}={v}" for k, v in sorted((cfg.get("model_options") or {}).items())),
            "train_labels": ",".join(sorted(part.train_labels.unique())) if "train_labels" in part else ""})
    return pd.DataFrame(rows).sort_values([*KEYS, "seed"]).reset_index(drop=True)


@dataclass
class Options:
    """How a leaderboard's statistics are computed (every choice printed with the tables)."""

    metric: str = "c_index"
    n_boot: int = 1000  # replicates of each pooled interval
    paired_boot: int = 10_000  # replicates of the paired bootstraps (the smallest p is 2 / (B + 1))
    seed: int = 0
    pooled: str = "within-fold"
    baseline: str | None = None
    test: str = "bootstrap"  # which paired test gives the marks and the significance stars
    adjust_by: str = "table"
    posthoc: str = "nemenyi"
    alpha: float = SIGNIFICANCE


@dataclass
class Leaderboard:
    """Everything a rendered leaderboard shows, recomputed from one run store."""

    source: str
    metric: str
    folds: pd.DataFrame
    cells: pd.DataFrame
    pooled: pd.DataFrame
    comparisons: pd.DataFrame
    runs: pd.DataFrame
    n_boot: int = 1000
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    tests: dict[tuple[str, str], PairTest] = field(default_factory=dict)
    ranks: list[RankResult] = field(default_factory=list)
    grids: dict[str, np.ndarray] = field(default_factory=dict)


def _check(options: Options) -> None:
    """Every option names a known choice; bad ones are one-line errors before anything is computed."""
    checks = [("metric", options.metric, tuple(METRICS)), ("--pooled", options.pooled, POOLED_KINDS),
              ("--test", options.test, tuple(TESTS)), ("--adjust", options.adjust_by, ADJUST_BY),
              ("--posthoc", options.posthoc, POSTHOCS)]
    for name, value, allowed in checks:
        if value not in allowed:
            what = f"unknown metric '{value}'" if name == "metric" else f"{name} '{value}'"
            raise MilbenchError(f"{what}: use one of {', '.join(allowed)}")
    if options.n_boot < 0 or options.paired_boot < 0 or not 0 < options.alpha < 1:
        raise MilbenchError("--bootstrap and --paired-bootstrap must be >= 0 and alpha in (0, 1)")


def _cell_data(loaded: list[LoadedFold], folds: pd.DataFrame, grids: dict[str, np.ndarray]) -> dict[tuple, CellData]:
    """Each cell's held-out patients with every seed's predictions aligned."""
    runs = runs_by_hash(loaded)
    by_cell: dict[tuple, list[str]] = defaultdict(list)
    for key, part in folds.groupby(CELL, sort=True):
        by_cell[key] = sorted(part.config_hash.unique(), key=lambda h: int(part[part.config_hash == h].seed.iloc[0]))
    return {key: cell_data(key, [runs[h] for h in hashes], grids.get(key[1])) for key, hashes in by_cell.items()}


def _mark_cells(cells: pd.DataFrame, tests: dict[tuple[str, str], PairTest], options: Options) -> pd.Series:
    """Per cell: best / second / tied-best / tied-second among the complete cells of its family, or None."""
    out = pd.Series([None] * len(cells), index=cells.index, dtype=object)
    for _, fam in cells[cells.complete].groupby(FAMILY):
        got = marks(dict(zip(fam.variant, fam["mean"])), tests, options.test, options.alpha,
                    METRICS[options.metric].higher_is_better)
        for idx, variant in zip(fam.index, fam.variant):
            out[idx] = got[variant]
    return out


def build(runs_dir: Path, metric: str = "c_index", n_boot: int = 1000, seed: int = 0,
          options: Options | None = None) -> Leaderboard:
    """Load a run store and recompute the fold table, cells, pooled statistics, paired comparisons and ranks."""
    options = options or Options(metric=metric, n_boot=n_boot, seed=seed)
    _check(options)
    notes: list[str] = []
    loaded = load_folds(runs_dir, notes)
    grids = cohort_grids(loaded, notes) if options.metric in ("ibs", "td_auc") else {}
    folds = fold_rows(loaded, ["c_index", options.metric], notes, grids)
    cells = summary(folds, options.metric)
    data = _cell_data(loaded, folds, grids)
    pooled = pooled_table(data, options.metric, options.pooled, grids, options.n_boot, options.seed, notes)
    refs = references(cells, options.baseline)
    tests = pair_tests(cells, folds, data, options.metric, needed_pairs(cells, refs), grids, options.paired_boot,
                       options.seed)
    comp = comparison_table(cells, refs, tests, options.test, options.adjust_by, options.alpha)
    sig = comp.set_index("variant")["significant"] if len(comp) else pd.Series(dtype=bool)
    cells["significant"] = [bool(sig.get(v, False)) for v in cells.variant]
    cells["is_reference"] = cells.variant.isin({ref.variant for ref, _ in refs.values()})
    cells["mark"] = _mark_cells(cells, tests, options)
    ranks = rank_results(cells, options.metric, options.posthoc, options.alpha, notes)
    return Leaderboard(str(runs_dir), options.metric, folds, cells, pooled, comp, runs_table(loaded, folds),
                       options.n_boot, options.seed, list(dict.fromkeys(notes)), options, tests, ranks, grids)
