"""Leaderboards recomputed from stored per-patient predictions (never from metrics cached in records).

Conventions, printed with every rendered leaderboard:

- A *cell* is protocol x cohort x backbone x model x variant; a variant is the run config without its seed, so
  the runs of one cell differ only in their seed. Variants of one model that differ in anything else are
  separate rows, labelled by what differs.
- A fold's figure is recomputed from its ``predictions.csv``. With several seeds a fold's value is the mean over
  seeds; a cell is mean ± std (ddof 1) over folds, shown with its folds x seeds.
- A cell is complete when each of its seeds has as many scored folds as the most complete run of that cohort in
  the store, and it has as many seeds as the cell with the most seeds of its protocol and cohort. Incomplete
  cells are marked † and never ranked best (bold) or second (underlined).
- Runs of different protocols are never ranked together: one set of tables per protocol.
- ``uno_c``, ``ibs`` and ``td_auc`` need the training fold's survival labels. They come from the record's
  ``train_labels`` when it has them; else from the out-of-fold predictions of the other folds of the same run
  when those are exactly the training patients (k-fold CV in which every patient is held out once: their count
  equals the record's ``n_train`` and none of them is in this fold); otherwise the fold's value is NaN and a
  note says why.
- The oracle C (synthetic cohorts) is the cohort's known risk scored on the held-out patients, read from the
  record: it is a property of the cohort, not a model output.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.files import stable_hash
from milbench.models.registry import list_cards
from milbench.runs.store import iter_folds
from milbench.survival.metrics import fold_metrics, harrell_c
from milbench.survival.statistics import bootstrap_c_index, corrected_resampled_ttest, holm, pooled_logrank_p

KEYS = ["protocol", "cohort", "backbone", "model"]
CELL = [*KEYS, "variant"]
FAMILY = ["protocol", "cohort", "backbone"]
SIGNIFICANCE = 0.05
FORMATS = ("md", "tex", "html", "csv")
INCOMPLETE, SIGNIFICANT = "†", "*"


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
GROUP_TITLES = {"single_scale": "Single-scale", "multi_scale": "Multi-scale", "ablation": "Ablations",
                "custom": "Other models"}
PROTOCOL_NOTES = {
    "fixed": "a fixed number of epochs; the final model is scored on the held-out fold",
    "inner-val": "the epoch is picked on an inner validation split of the training fold; scored on the held-out fold",
    "best-val": "the epoch is picked on the held-out fold itself (the CrossFusion paper's protocol): optimistic, "
                "kept only to reproduce published tables",
}


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedFold:
    """A stored fold with its predictions read once."""

    record: dict[str, Any]
    predictions: pd.DataFrame
    path: Path


def load_folds(runs_dir: Path) -> list[LoadedFold]:
    """Every completed fold of the store, predictions included; an empty store is an error."""
    folds = [LoadedFold(s.record, s.predictions, s.path) for s in iter_folds(runs_dir)]
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


def _train_labels(fold: LoadedFold, run: list[LoadedFold]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The training fold's (time, event): from the record, else from the run's other folds when they are exactly
    the training patients, else None."""
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


def _survival_columns(pred: pd.DataFrame) -> list[str]:
    cols = [c for c in pred.columns if c.startswith("surv_")]
    return sorted(cols, key=lambda c: int(c.split("_")[1]))


def _ipcw_metrics(fold: LoadedFold, run: list[LoadedFold], wanted: list[str], notes: list[str]
                  ) -> tuple[dict[str, float], str]:
    """uno_c / ibs / td_auc of one fold, recomputed with the engine's own ``fold_metrics``."""
    nan = {m: float("nan") for m in wanted}
    labels = _train_labels(fold, run)
    if labels is None:
        notes.append(f"{fold.path}: {', '.join(wanted)} need the training fold's labels; the record has no "
                     f"train_labels and the run's other folds are not exactly its training patients, so they are NaN")
        return nan, "unavailable"
    pred, edges, surv = fold.predictions, fold.record.get("bin_edges"), _survival_columns(fold.predictions)
    if edges is None:
        notes.append(f"{fold.path}: the record has no bin_edges: {', '.join(wanted)} are NaN")
        return nan, labels[2]
    if not surv and "ibs" in wanted:  # a head without a survival curve (cox): Uno's C and td-AUC need the risk only
        notes.append(f"{fold.path}: the predictions have no surv_* columns (a head without a survival curve): "
                     f"ibs is NaN")
    values = fold_metrics(labels[0], labels[1], pred.time.to_numpy(float), pred.event.to_numpy(int),
                          pred.risk.to_numpy(float), pred[surv].to_numpy(float) if surv else None,
                          np.asarray(edges, dtype=float))
    return {m: values[m] for m in wanted}, labels[2]


def _c_index(fold: LoadedFold, notes: list[str]) -> float:
    pred = fold.predictions
    try:
        return harrell_c(pred.time.to_numpy(float), pred.event.to_numpy(int), pred.risk.to_numpy(float))
    except MilbenchError as err:
        notes.append(f"{fold.path}: C-index is NaN ({err})")
        return float("nan")


def _fold_rows(loaded: list[LoadedFold], metrics: Iterable[str], notes: list[str]) -> pd.DataFrame:
    extra = [m for m in metrics if m != "c_index"]
    unknown = [m for m in extra if m not in METRICS]
    if unknown:
        raise MilbenchError(f"unknown metric '{unknown[0]}': use one of {', '.join(METRICS)}")
    runs: dict[str, list[LoadedFold]] = defaultdict(list)
    for f in loaded:
        runs[f.record["config_hash"]].append(f)
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
            values, source = _ipcw_metrics(f, runs[rec["config_hash"]], extra, notes)
            row |= values | {"train_labels": source}
        if "oracle_c_index" in rec.get("metrics", {}):
            row["oracle_c_index"] = rec["metrics"]["oracle_c_index"]
        row |= _cost(rec)
        rows.append(row)
    return pd.DataFrame(rows)


def _cost(record: dict[str, Any]) -> dict[str, Any]:
    """What a fold cost, from its record: training seconds, seconds per epoch, peak memory and where it ran."""
    timings = record.get("timings") or {}
    env = record.get("environment") or {}
    return {"train_s": timings.get("train_s", np.nan), "s_per_epoch": timings.get("s_per_epoch", np.nan),
            "peak_memory_bytes": record.get("peak_memory_bytes", np.nan),
            "device": env.get("device_name") or env.get("device") or ""}


def fold_table(runs_dir: Path, metrics: Iterable[str] = ("c_index",)) -> pd.DataFrame:
    """One row per stored fold with ``metrics`` recomputed from its ``predictions.csv``."""
    return _fold_rows(load_folds(runs_dir), metrics, [])


# ---------------------------------------------------------------------------------------------- aggregation


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


def summary(folds: pd.DataFrame, metric: str = "c_index") -> pd.DataFrame:
    """One row per cell: mean and std over folds, folds and seeds behind it, completeness, rank in its cohort."""
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
    cells = cells.reset_index()
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


def pooled_table(loaded: list[LoadedFold], folds: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                 notes: list[str] | None = None) -> pd.DataFrame:
    """Per cell, on the pooled out-of-fold predictions: Harrell's C with a seeded bootstrap 95% CI, and the
    log-rank p of high vs low risk cut at each training fold's median risk (median over seeds)."""
    notes = notes if notes is not None else []
    by_hash: dict[str, list[LoadedFold]] = defaultdict(list)
    for f in loaded:
        by_hash[f.record["config_hash"]].append(f)
    rows = []
    for key, part in folds.groupby(CELL, sort=True):
        per_seed = []
        for h in sorted(part.config_hash.unique()):
            pred = pd.concat([f.predictions for f in by_hash[h]], ignore_index=True)
            if not pred.case_id.is_unique:
                notes.append(f"run {h}: some patients are held out in several folds; the first prediction is pooled")
                pred = pred.drop_duplicates("case_id")
            per_seed.append(pred.set_index("case_id"))
        common = sorted(set.intersection(*(set(p.index) for p in per_seed)))
        base = per_seed[0].loc[common]
        row = dict(zip(CELL, key)) | {"patients": len(common), "events": int(base.event.sum()),
                                      "seeds": len(per_seed)}
        try:
            ci = bootstrap_c_index(base.time, base.event, [p.loc[common, "risk"].to_numpy() for p in per_seed],
                                   n_boot=n_boot, seed=seed)
            row |= {"pooled_c": ci.estimate, "ci_low": ci.low, "ci_high": ci.high}
        except MilbenchError as err:
            notes.append(f"{' / '.join(map(str, key[:4]))}: no pooled C-index ({err})")
            row |= {"pooled_c": np.nan, "ci_low": np.nan, "ci_high": np.nan}
        if all("train_median_risk" in p for p in per_seed):
            ps = [pooled_logrank_p(p.time, p.event, p.risk, p.train_median_risk) for p in per_seed]
            row["logrank_p"] = float(np.nanmedian(ps)) if np.isfinite(ps).any() else np.nan
        else:
            notes.append(f"{' / '.join(map(str, key[:4]))}: predictions lack train_median_risk: no log-rank p")
            row["logrank_p"] = np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(folds: pd.DataFrame, cells: pd.DataFrame, metric: str = "c_index") -> pd.DataFrame:
    """Every cell against the best complete cell of its protocol x cohort x backbone, on their common folds:
    corrected resampled t-test (seed-averaged per-fold values), Holm-adjusted within that family."""
    ok = folds[np.isfinite(folds[metric].astype(float))]
    per_fold = ok.groupby([*CELL, "fold"]).agg(value=(metric, "mean"), n_test=("n_test", "mean"),
                                               n_train=("n_train", "mean"))
    rows = []
    for family, fam in cells.groupby(FAMILY, sort=True):
        best = fam[fam["rank"] == 1]
        if best.empty:
            continue
        ref = best.iloc[0]
        ref_folds = per_fold.loc[tuple(ref[CELL])]
        out = []
        for _, c in fam.iterrows():
            if c.variant == ref.variant or c.folds == 0:
                continue
            mine = per_fold.loc[tuple(c[CELL])]
            common = ref_folds.index.intersection(mine.index)
            used = ref_folds.loc[common]
            ratio = float(used.n_test.mean() / used.n_train.mean()) if used.n_train.notna().all() else (
                1.0 / (c.expected_folds - 1) if c.expected_folds > 1 else np.nan)
            test = corrected_resampled_ttest(mine.value.loc[common], used.value, ratio)
            out.append(dict(zip(CELL, c[CELL])) | {
                "display": c.display, "variant_label": c.variant_label, "best_model": ref.model,
                "best_display": row_label(ref.display, ref.variant_label), "best_variant": ref.variant,
                "folds": test.n_folds,
                "test_train_ratio": ratio, "mean_diff": test.mean_diff, "t": test.t, "p": test.p})
        for row, p_adj in zip(out, holm([r["p"] for r in out])):
            rows.append(row | {"p_holm": p_adj, "significant": bool(p_adj < SIGNIFICANCE)})
    columns = [*CELL, "display", "variant_label", "best_model", "best_display", "best_variant", "folds",
               "test_train_ratio", "mean_diff", "t", "p", "p_holm", "significant"]
    return pd.DataFrame(rows, columns=columns)


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


def build(runs_dir: Path, metric: str = "c_index", n_boot: int = 1000, seed: int = 0) -> Leaderboard:
    """Load a run store and recompute the fold table, cells, pooled statistics and paired comparisons."""
    if metric not in METRICS:
        raise MilbenchError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
    notes: list[str] = []
    loaded = load_folds(runs_dir)
    folds = _fold_rows(loaded, ["c_index", metric], notes)
    cells = summary(folds, metric)
    comp = comparisons(folds, cells, metric)
    sig = comp.set_index(CELL)["significant"] if len(comp) else pd.Series(dtype=bool)
    cells["significant"] = [bool(sig.get(tuple(r), False)) for r in cells[CELL].itertuples(index=False)]
    pooled = pooled_table(loaded, folds, n_boot=n_boot, seed=seed, notes=notes)
    return Leaderboard(str(runs_dir), metric, folds, cells, pooled, comp, runs_table(loaded, folds), n_boot, seed,
                       notes)
