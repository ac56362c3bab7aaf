"""The leaderboard as a document: sections of tables (blocks) of cells with their marks, independent of the output
format; :mod:`~milbench.report.markdown`, :mod:`~milbench.report.latex` and :mod:`~milbench.report.html` render it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from milbench.report import published
from milbench.report.aggregate import (
    CELL,
    GROUP_TITLES,
    INCOMPLETE,
    METRICS,
    PROTOCOL_NOTES,
    SIGNIFICANCE,
    SIGNIFICANT,
    Leaderboard,
    _rank,
    row_label,
)


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
        rows.append([Cell(row_label(display, label))] + [_metric_cell(mine.loc[c]) if c in mine.index else Cell("–")
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
            groups.append(row_label(display, label))
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
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)),
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
        row = [Cell(row_label(r.display, r.variant_label)), _metric_cell(r)]
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
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)), Cell(r.backbone),
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
        rows.append([Cell(cohort_title(r.cohort)), Cell(r.backbone), Cell(row_label(r.model, r.variant_label)),
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
    t1, t2, pv = published.load("table1"), published.load("table2"), published.load("pvalues")
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
    return Section(f"Reported (not recomputed): {published.SOURCE}",
                   [f"Published figures, copied from the paper. Protocol of the paper: `{published.PROTOCOL}` — "
                    f"{published.PROTOCOL_NOTE}. They are not comparable with runs under another protocol."], blocks)


def _norm(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def _beside_block(lb: Leaderboard, t1: published.ReportedTable, t2: published.ReportedTable) -> Block | None:
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
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)), Cell(r.backbone),
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


