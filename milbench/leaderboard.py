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

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench import reference
from milbench.stats import bootstrap_c_index, corrected_resampled_ttest, holm, pooled_logrank_p
from milbench.store import iter_folds
from milbench.survival.metrics import fold_metrics, harrell_c

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
    blob = json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


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
    from milbench.registry import get_card, list_models

    try:
        card = get_card(model)
    except MilbenchError:
        return model, "custom", 10_000
    order = [c.name for c in list_models()].index(model)
    return card.display_name, card.group if card.group in GROUP_TITLES else "custom", order


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
                "best_display": _row_label(ref.display, ref.variant_label), "best_variant": ref.variant,
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


# -------------------------------------------------------------------------------------------------- layout


@dataclass
class Cell:
    """One table cell: the figure, the folds x seeds behind it, its marks, and a numeric sort key."""

    text: str = ""
    value: float | None = None
    sub: str = ""
    marks: str = ""
    bold: bool = False
    underline: bool = False


@dataclass
class Block:
    """One table: ``groups[i]`` is the group heading of row i ("" for none)."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    groups: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    text: list[str]
    blocks: list[Block]


def cohort_title(cohort: str) -> str:
    """``tcga_blca`` -> ``BLCA`` (the paper's column names); other cohorts as stored."""
    return cohort.removeprefix("tcga_").upper() if cohort.startswith("tcga_") else cohort


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    """p-values: three significant digits, scientific below 0.001."""
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3g}"


def _num(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(float(x)) else None


def _metric_cell(r: pd.Series) -> Cell:
    if r.folds == 0:
        return Cell("–", None, f"0×{r.seeds}", INCOMPLETE)
    marks = ("" if r.complete else INCOMPLETE) + (SIGNIFICANT if r.get("significant", False) else "")
    return Cell(f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", _num(r["mean"]), f"{r.folds}×{r.seeds}", marks,
                bold=r["rank"] == 1, underline=r["rank"] == 2)


def _row_label(display: str, variant_label: str) -> str:
    return f"{display} ({variant_label})" if variant_label else display


def _ordered_rows(part: pd.DataFrame) -> list[tuple[str, int, str, str, str]]:
    """(group, order, model, variant label, display) of the table's rows, by group then registry order."""
    groups = list(GROUP_TITLES)
    keys = {(r.group, r.order, r.model, r.variant_label, r.display) for r in part.itertuples()}
    return sorted(keys, key=lambda k: (groups.index(k[0]), k[1], k[2], k[3]))


def _main_block(cells: pd.DataFrame, protocol: str, backbone: str, metric: str) -> Block:
    part = cells[(cells.protocol == protocol) & (cells.backbone == backbone)]
    cohorts = sorted(part.cohort.unique(), key=cohort_title)
    rows, groups = [], []
    for group, _, model, label, display in _ordered_rows(part):
        mine = part[(part.model == model) & (part.variant_label == label)].set_index("cohort")
        rows.append([Cell(_row_label(display, label))] + [_metric_cell(mine.loc[c]) if c in mine.index else Cell("–")
                                                          for c in cohorts])
        groups.append(GROUP_TITLES[group])
    arrow = "higher is better" if METRICS[metric].higher_is_better else "lower is better"
    return Block(f"main-{protocol}-{backbone}", f"{METRICS[metric].label} ({arrow}), mean ± std over folds — "
                 f"protocol {protocol}, backbone {backbone}", ["Model", *map(cohort_title, cohorts)], rows, groups)


def _backbone_block(cells: pd.DataFrame, protocol: str, metric: str) -> Block | None:
    part = cells[cells.protocol == protocol]
    several = part.groupby(["model", "variant_label"]).backbone.transform("nunique") > 1
    part = part[several]  # only models run on more than one backbone
    if part.empty:
        return None
    info = METRICS[metric]
    cohorts = sorted(part.cohort.unique(), key=cohort_title)
    rows, groups = [], []
    for _, _, model, label, display in _ordered_rows(part):
        mine = part[(part.model == model) & (part.variant_label == label)]
        block_rows = []
        for backbone in sorted(mine.backbone.unique()):
            by_cohort = mine[mine.backbone == backbone].set_index("cohort")
            row = [Cell(backbone)]
            row += [_metric_cell(by_cohort.loc[c]) if c in by_cohort.index else Cell("–") for c in cohorts]
            present = [by_cohort.loc[c] for c in cohorts if c in by_cohort.index]
            full = len(present) == len(cohorts) and all(r.folds > 0 for r in present)
            mean = float(np.mean([r["mean"] for r in present])) if full else np.nan
            complete = full and all(r.complete for r in present)
            row.append(Cell(_fmt(mean), _num(mean), "", "" if complete else INCOMPLETE))
            block_rows.append(row)
        _mark_best(block_rows, info.higher_is_better)
        for row in block_rows:
            rows.append(row)
            groups.append(_row_label(display, label))
    return Block(f"backbones-{protocol}", f"{info.label} per backbone, mean ± std over folds, and the mean over "
                 f"cohorts — protocol {protocol}, models run on several backbones (best and second per model and "
                 f"column among complete cells)",
                 ["Backbone", *map(cohort_title, cohorts), "Mean"], rows, groups)


def _mark_best(rows: list[list[Cell]], higher_is_better: bool, columns: Iterable[int] | None = None) -> None:
    """Bold the best and underline the second value of each column (default: all but the first) among the
    cells that have a value and are not marked incomplete."""
    for j in columns if columns is not None else range(1, len(rows[0]) if rows else 0):
        values = pd.Series([np.nan if r[j].value is None or INCOMPLETE in r[j].marks else r[j].value for r in rows])
        for r, rank in zip(rows, _rank(values, higher_is_better)):
            r[j].bold, r[j].underline = bool(rank == 1), bool(rank == 2)


def _pooled_block(lb: Leaderboard, protocol: str, backbone: str) -> Block:
    part = lb.pooled[(lb.pooled.protocol == protocol) & (lb.pooled.backbone == backbone)]
    oracle = "oracle" in lb.cells and lb.cells.oracle.notna().any()
    part = part.merge(lb.cells[[*CELL, "display", "group", "order", "variant_label"] + (["oracle"] if oracle else [])],
                      on=CELL)
    rows, groups = [], []
    for _, r in part.sort_values(["cohort", "order", "model", "variant_label"]).iterrows():
        rows.append([Cell(_row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)),
                     Cell(str(r.patients), r.patients), Cell(str(r.events), r.events), Cell(str(r.seeds), r.seeds),
                     Cell(_fmt(r.pooled_c), _num(r.pooled_c)),
                     Cell(f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", _num(r.ci_low)),
                     Cell(fmt_p(r.logrank_p), _num(r.logrank_p))]
                    + ([Cell(_fmt(r.oracle), _num(r.oracle))] if oracle else []))
        groups.append(cohort_title(r.cohort))
    boot = f"{lb.n_boot} resamples of patients, seed {lb.seed}" if lb.n_boot > 0 else "no bootstrap"
    return Block(f"pooled-{protocol}-{backbone}", f"Pooled out-of-fold predictions — protocol {protocol}, backbone "
                 f"{backbone}: Harrell's C with its percentile bootstrap 95% CI ({boot}); log-rank p of high vs low "
                 f"risk, cut at each training fold's median risk",
                 ["Model", "Cohort", "Patients", "Events", "Seeds", "Pooled C", "95% CI", "Log-rank p"]
                 + (["Oracle C"] if oracle else []), rows, groups,
                 ["With several seeds the pooled C is the mean over seeds (patients resampled jointly) and the "
                  "log-rank p the median over seeds."]
                 + (["Oracle C: the cohort's known risk scored on the same held-out patients (synthetic cohorts), "
                     "mean over folds, from the records: what the true risk achieves on these patients."] if oracle else []))


def _cost_block(lb: Leaderboard, protocol: str, backbone: str) -> Block:
    """Per cell: the gap to the oracle (synthetic cohorts) and what training cost, from the records."""
    part = lb.cells[(lb.cells.protocol == protocol) & (lb.cells.backbone == backbone)]
    oracle = "oracle" in part and part.oracle.notna().any()
    rows, groups = [], []
    for _, r in part.sort_values(["cohort", "order", "model", "variant_label"]).iterrows():
        row = [Cell(_row_label(r.display, r.variant_label)), _metric_cell(r)]
        if oracle:
            gap = r.oracle - r["mean"]
            row += [Cell(_fmt(r.oracle), _num(r.oracle)), Cell(_fmt(gap), _num(gap))]
        gib = r.peak_memory_bytes / 2**30
        row += [Cell(_fmt(r.train_s, 1), _num(r.train_s)), Cell(_fmt(r.s_per_epoch, 2), _num(r.s_per_epoch)),
                Cell(_fmt(gib, 2), _num(gib)), Cell(r.device or "–")]
        rows.append(row)
        groups.append(cohort_title(r.cohort))
    for row in rows:
        row[1].bold = row[1].underline = False
    return Block(f"cost-{protocol}-{backbone}", ("Gap to the oracle, training time and peak memory" if oracle else
                 "Training time and peak memory") + f" — protocol {protocol}, backbone {backbone}",
                 ["Model", METRICS[lb.metric].label] + (["Oracle C", "Gap"] if oracle else [])
                 + ["Train s per fold", "s per epoch", "Peak memory GiB", "Device"], rows, groups,
                 (["Gap = oracle C minus the model's mean C over the same folds (the oracle is the mean of the "
                   "folds' oracle C)."] if oracle else [])
                 + ["Time and memory are means (memory: the maximum) over the cell's folds, from the records: GPU "
                    "memory allocated by torch on CUDA, the process's peak resident memory on the CPU (data and "
                    "interpreter included). Timings depend on the machine and on how many folds shared it."])


def _comparison_block(lb: Leaderboard, protocol: str) -> Block:
    part = lb.comparisons[lb.comparisons.protocol == protocol]
    rows, groups = [], []
    for _, r in part.iterrows():
        rows.append([Cell(_row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)), Cell(r.backbone),
                     Cell(r.best_display), Cell(str(r.folds), r.folds),
                     Cell(f"{r.mean_diff:+.3f}" if np.isfinite(r.mean_diff) else "–", _num(r.mean_diff)),
                     Cell(_fmt(r.t, 2), _num(r.t)), Cell(fmt_p(r.p), _num(r.p)),
                     Cell(fmt_p(r.p_holm), _num(r.p_holm)), Cell(SIGNIFICANT if r.significant else "")])
        groups.append(f"{cohort_title(r.cohort)}, {r.backbone}")
    return Block(f"comparisons-{protocol}", f"Paired comparisons with the cohort's best — protocol {protocol}: "
                 f"corrected resampled t-test across folds (Nadeau & Bengio), Holm-adjusted per cohort and backbone",
                 ["Model", "Cohort", "Backbone", "Best", "Folds", "Δ vs best", "t", "p", "p (Holm)", "Sig."],
                 rows, groups, ["Δ is the model's mean over the common folds minus the best's; per-fold values are "
                                "seed means; the variance is inflated by 1/J + n_test/n_train."])


def _runs_block(lb: Leaderboard) -> Block:
    rows = []
    for _, r in lb.runs.iterrows():
        rows.append([Cell(cohort_title(r.cohort)), Cell(r.backbone), Cell(_row_label(r.model, r.variant_label)),
                     Cell(r.protocol), Cell(str(r.recipe)), Cell(str(r.epochs), _num(r.epochs)),
                     Cell(f"{r.lr:g}" if r.lr is not None else "–", _num(r.lr)), Cell(str(r.bins_on)),
                     Cell(r.options or "–"), Cell(str(r.seed), _num(r.seed)), Cell(r.folds), Cell(r.config_hash)])
    return Block("runs", "Runs behind the tables", ["Cohort", "Backbone", "Model", "Protocol", "Recipe", "Epochs", "LR",
                 "Bins on", "Model options", "Seed", "Folds", "Config hash"], rows, [""] * len(rows))


def _legend(lb: Leaderboard) -> list[str]:
    info = METRICS[lb.metric]
    return [
        f"Recomputed from the per-patient predictions of {len(lb.folds)} stored folds in `{lb.source}` "
        f"(never from metrics cached in the records). Metric: {info.label}.",
        f"Cells: mean ± std over folds, with folds×seeds behind them; bold = best, underlined = second among the "
        f"complete cells of a column; {INCOMPLETE} = incomplete (fewer folds than the cohort's most complete run, or "
        f"fewer seeds than the cohort's other models), never ranked; {SIGNIFICANT} = differs from the column's best "
        f"(corrected resampled t-test, Holm-adjusted p < {SIGNIFICANCE}).",
        "Runs of different protocols are never ranked together. A cell's runs differ only in their seed; "
        "variants of a model that differ in anything else are separate rows, labelled by what differs.",
    ]


def reported_section(lb: Leaderboard | None = None) -> Section:
    """The published figures, labelled as reported, with the paper's protocol; ours beside them where matching."""
    t1, t2, pv = reference.load("table1"), reference.load("table2"), reference.load("pvalues")
    rows, groups = [], []
    titles = {"single_scale": "Single-scale", "multi_scale": "Multi-scale", "ours": "CrossFusion and ablations"}
    for _, r in t1.frame.iterrows():
        rows.append([Cell(r.model)] + [Cell(f"{r[f'{c}_mean']:.3f} ± {r[f'{c}_std']:.3f}", r[f"{c}_mean"])
                                       for c in t1.cohorts])
        groups.append(titles.get(r.group, r.group))
    _mark_best(rows, True)
    table1 = Block("reported-table1", "Reported: Table 1 (C-index, mean ± std over 5 folds, ResNet50 features)",
                   ["Model", *t1.cohorts], rows, groups, [t1.comment])
    rows = [[Cell(r.backbone), Cell(str(r.backbone_dim), r.backbone_dim)]
            + [Cell(f"{r[f'{c}_mean']:.3f} ± {r[f'{c}_std']:.3f}", r[f"{c}_mean"]) for c in t2.cohorts]
            + [Cell(f"{r['mean']:.3f}", r["mean"])] for _, r in t2.frame.iterrows()]
    _mark_best(rows, True, columns=range(2, len(t2.cohorts) + 3))  # column 1 is the feature width, not a score
    table2 = Block("reported-table2", "Reported: Table 2 (CrossFusion C-index per feature backbone)",
                   ["Backbone", "Dim", *t2.cohorts, "Mean"], rows, [""] * len(rows), [t2.comment])
    pvalues = Block("reported-pvalues", "Reported: log-rank p of CrossFusion's high/low risk groups (ResNet50)",
                    ["Cohort", "p"],
                    [[Cell(r.cohort), Cell(fmt_p(r.p_value), r.p_value)] for _, r in pv.frame.iterrows()],
                    [""] * len(pv.frame), [pv.comment])
    blocks = [table1, table2, pvalues]
    if lb is not None:
        beside = _beside_block(lb, t1, t2)
        if beside is not None:
            blocks.append(beside)
    return Section(f"Reported (not recomputed): {reference.SOURCE}",
                   [f"Published figures, copied from the paper. Protocol of the paper: `{reference.PROTOCOL}` — "
                    f"{reference.PROTOCOL_NOTE}. They are not comparable with runs under another protocol."], blocks)


def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _beside_block(lb: Leaderboard, t1: reference.ReportedTable, t2: reference.ReportedTable) -> Block | None:
    """Our cells next to the reported ones for the same TCGA cohort, model and backbone (any protocol, labelled)."""
    reported: dict[tuple[str, str, str], tuple[float, float]] = {}
    for _, r in t1.frame.iterrows():
        for c in t1.cohorts:
            reported[(_norm(r.model), "resnet50", c)] = (r[f"{c}_mean"], r[f"{c}_std"])
    for _, r in t2.frame.iterrows():
        for c in t2.cohorts:
            reported[("crossfusion", _norm(r.backbone), c)] = (r[f"{c}_mean"], r[f"{c}_std"])
    rows = []
    for _, r in lb.cells.sort_values(["cohort", "order", "backbone", "protocol"]).iterrows():
        key = (_norm(r.display), _norm(r.backbone), cohort_title(r.cohort))
        if lb.metric != "c_index" or key not in reported or not r.cohort.startswith("tcga_"):
            continue
        mean, std = reported[key]
        ours = _metric_cell(r)
        ours.bold = ours.underline = False
        rows.append([Cell(_row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)), Cell(r.backbone),
                     Cell(r.protocol), ours, Cell(f"{mean:.3f} ± {std:.3f}", mean),
                     Cell(f"{r['mean'] - mean:+.3f}" if r.folds else "–", _num(r["mean"] - mean))])
    if not rows:
        return None
    return Block("reported-beside", "Ours beside reported (same TCGA cohort, model and backbone)",
                 ["Model", "Cohort", "Backbone", "Our protocol", "Ours", "Reported (best-val)", "Δ"],
                 rows, [""] * len(rows),
                 ["Δ compares figures from different protocols whenever ours is not best-val."])


def document(lb: Leaderboard | None) -> tuple[str, list[Section]]:
    """The leaderboard as sections of tables; ``None`` gives the reported block alone."""
    if lb is None:
        return "Reported results (CrossFusion paper)", [reported_section(None)]
    sections = [Section("How to read these tables", _legend(lb) + [f"Note: {n}" for n in lb.notes], [])]
    for protocol in sorted(lb.cells.protocol.unique()):
        part = lb.cells[lb.cells.protocol == protocol]
        blocks = [_main_block(lb.cells, protocol, b, lb.metric) for b in sorted(part.backbone.unique())]
        backbone = _backbone_block(lb.cells, protocol, lb.metric)
        blocks += [backbone] if backbone else []
        blocks += [_pooled_block(lb, protocol, b) for b in sorted(part.backbone.unique())]
        blocks += [_cost_block(lb, protocol, b) for b in sorted(part.backbone.unique())]
        if (lb.comparisons.protocol == protocol).any():
            blocks.append(_comparison_block(lb, protocol))
        sections.append(Section(f"Protocol: {protocol}", [PROTOCOL_NOTES.get(protocol, "")], blocks))
    sections.append(reported_section(lb))
    sections.append(Section("Runs", [], [_runs_block(lb)]))
    return f"milbench leaderboard — {METRICS[lb.metric].label}", sections


# ----------------------------------------------------------------------------------------- markdown and TeX


def _md_cell(c: Cell) -> str:
    s = c.text.replace("|", "\\|")
    s = f"**{s}**" if c.bold else s
    s = f"<ins>{s}</ins>" if c.underline else s
    return s + (f" ({c.sub})" if c.sub else "") + c.marks


def render_markdown(title: str, sections: list[Section]) -> str:
    """Markdown: one heading per section, one pipe table per block, group headings as bold rows."""
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""] + [f"{t}\n" for t in sec.text if t]
        for b in sec.blocks:
            out += [f"### {b.title}", "", "| " + " | ".join(b.columns) + " |", "|" + "---|" * len(b.columns)]
            previous = None
            for row, group in zip(b.rows, b.groups):
                if group and group != previous:
                    out.append(f"| **{group}** |" + " |" * (len(b.columns) - 1))
                previous = group
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            out += [""] + [f"{n}\n" for n in b.notes]
    return "\n".join(out).rstrip() + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$", "×": r"$\times$", "†": r"$^\dagger$", "–": "--", "Δ": r"$\Delta$", "—": "---"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_cell(c: Cell) -> str:
    s = tex_escape(c.text)
    s = rf"\textbf{{{s}}}" if c.bold else s
    s = rf"\underline{{{s}}}" if c.underline else s
    math = "_{" + c.sub.replace("×", r"\times") + "}" if c.sub else ""
    math += "^{" + "".join(r"\dagger" if m == INCOMPLETE else "*" for m in c.marks) + "}" if c.marks else ""
    return s + (f"${math}$" if math else "")


def render_latex(title: str, sections: list[Section]) -> str:
    """LaTeX tables (booktabs), one ``table`` environment per block, group headings as italic rows."""
    out = [f"% {tex_escape(title)}", r"% needs \usepackage{booktabs}; generated by `milbench leaderboard`", ""]
    for sec in sections:
        out += [f"% ---- {tex_escape(sec.title)}"] + [f"% {tex_escape(t)}" for t in sec.text if t]
        for b in sec.blocks:
            n = len(b.columns)
            out += [r"\begin{table}[ht]", r"\centering", r"\scriptsize", rf"\caption{{{tex_escape(b.title)}}}",
                    rf"\label{{tab:{b.key}}}", rf"\begin{{tabular}}{{l{'c' * (n - 1)}}}", r"\toprule",
                    " & ".join(tex_escape(c) for c in b.columns) + r" \\", r"\midrule"]
            previous = None
            for row, group in zip(b.rows, b.groups):
                if group and group != previous:
                    out.append(rf"\multicolumn{{{n}}}{{l}}{{\textit{{{tex_escape(group)}}}}} \\")
                previous = group
                out.append(" & ".join(_tex_cell(c) for c in row) + r" \\")
            out += [r"\bottomrule", r"\end{tabular}"]
            out += [rf"\par\smallskip{{\tiny {tex_escape(note)}}}" for note in b.notes]
            out += [r"\end{table}", ""]
    return "\n".join(out)


def to_markdown(lb: Leaderboard) -> str:
    return render_markdown(*document(lb))


def to_latex(lb: Leaderboard) -> str:
    return render_latex(*document(lb))


# ------------------------------------------------------------------------------------------------ writing


def parse_formats(text: str) -> list[str]:
    """``md,tex,html,csv`` -> a checked list of formats."""
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise MilbenchError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got '{text}'")
    return formats


def write(lb: Leaderboard | None, out: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the leaderboard (``None``: the reported block alone) in the asked formats; returns the files."""
    from milbench.render_html import render_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title, sections = document(lb)
    stem = "leaderboard" if lb is not None else "reported"
    paths = []
    for fmt in formats:
        if fmt == "csv":
            paths += _write_csv(lb, out)
            continue
        text = {"md": render_markdown, "tex": render_latex, "html": render_html}[fmt](title, sections)
        path = out / f"{stem}.{fmt}"
        path.write_text(text)
        paths.append(path)
    return paths


def _write_csv(lb: Leaderboard | None, out: Path) -> list[Path]:
    frames: dict[str, pd.DataFrame] = {}
    if lb is not None:
        frames |= {"leaderboard": lb.cells, "folds": lb.folds, "pooled": lb.pooled, "comparisons": lb.comparisons,
                   "runs": lb.runs}
    for name in reference.TABLES:
        frames[f"reported_{name}"] = reference.load(name).frame
    paths = []
    for name, frame in frames.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6g")
        paths.append(path)
    return paths
