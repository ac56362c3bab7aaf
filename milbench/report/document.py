"""The leaderboard as a document: sections of tables (blocks) of cells with their marks, and figures, independent of
the output format; :mod:`~milbench.report.markdown`, :mod:`~milbench.report.latex` and :mod:`~milbench.report.html`
render it."""

from __future__ import annotations

import pandas as pd

from milbench.report import published
from milbench.report.aggregate import (
    GROUP_TITLES,
    INCOMPLETE,
    METRICS,
    PROTOCOL_NOTES,
    SIGNIFICANT,
    TIED,
    Leaderboard,
    row_label,
)
from milbench.report.cells import (  # re-exported: the renderers' and plots' names
    Block,
    Cell,
    Figure,
    Section,
    cohort_title,
    fmt_num,
    fmt_p,
    num,
)
from milbench.report.paired import marks
from milbench.report.tables import (
    REFERENCE,
    comparison_block,
    cost_block,
    metric_cell,
    pooled_block,
    rank_blocks,
    reference_note,
    runs_block,
    spread_block,
)

_metric_cell = metric_cell  # the name the tests have always used


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
        rows.append([Cell(row_label(display, label))] + [metric_cell(mine.loc[c]) if c in mine.index else Cell("–")
                                                          for c in cohorts])
        groups.append(GROUP_TITLES[group])
    arrow = "higher is better" if METRICS[metric].higher_is_better else "lower is better"
    return Block(f"main-{protocol}-{backbone}", f"{METRICS[metric].label} ({arrow}), mean ± fold sd — "
                 f"protocol {protocol}, backbone {backbone}", ["Model", *map(cohort_title, cohorts)], rows, groups)


def _backbone_block(lb: Leaderboard, protocol: str) -> Block | None:
    cells, metric = lb.cells, lb.metric
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
        for backbone in sorted(mine.backbone.unique()):
            by_cohort = mine[mine.backbone == backbone].set_index("cohort")
            row = [Cell(backbone)]
            for c in cohorts:
                cell = metric_cell(by_cohort.loc[c]) if c in by_cohort.index else Cell("–")
                cell.bold = cell.underline = False
                cell.marks = cell.marks.replace(TIED, "").replace(SIGNIFICANT, "").replace(REFERENCE, "")
                row.append(cell)
            present = [by_cohort.loc[c] for c in cohorts if c in by_cohort.index]
            full = len(present) == len(cohorts) and all(r.folds > 0 for r in present)
            mean = float(pd.Series([r["mean"] for r in present]).mean()) if full else float("nan")
            complete = full and all(r.complete for r in present)
            row.append(Cell(fmt_num(mean), num(mean), "", "" if complete else INCOMPLETE))
            rows.append(row)
            groups.append(row_label(display, label))
        _mark_backbones(lb, rows[len(rows) - mine.backbone.nunique():], mine, cohorts, info.higher_is_better)
    return Block(f"backbones-{protocol}", f"{info.label} per backbone, mean ± fold sd, and the mean over cohorts — "
                 f"protocol {protocol}, models run on several backbones (best and second per model and cohort only "
                 f"where the paired test separates the backbones; the mean column is not marked)",
                 ["Backbone", *map(cohort_title, cohorts), "Mean"], rows, groups)


def _mark_backbones(lb: Leaderboard, rows: list[list[Cell]], mine: pd.DataFrame, cohorts: list[str],
                    higher_is_better: bool) -> None:
    """Marks of one model's backbone rows, per cohort, from the paired tests between its complete backbone cells."""
    backbones = sorted(mine.backbone.unique())
    for j, cohort in enumerate(cohorts, start=1):
        here = mine[(mine.cohort == cohort) & mine.complete]
        got = marks(dict(zip(here.variant, here["mean"])), lb.tests, lb.options.test, lb.options.alpha,
                    higher_is_better)
        for _, r in here.iterrows():
            cell = rows[backbones.index(r.backbone)][j]
            cell.bold, cell.underline = got[r.variant] == "best", got[r.variant] == "second"
            cell.marks += TIED if got[r.variant] in ("tied-best", "tied-second") else ""


def _legend(lb: Leaderboard) -> list[str]:
    info, o = METRICS[lb.metric], lb.options
    test = "paired bootstrap" if o.test == "bootstrap" else "corrected resampled t-test"
    return [
        f"Recomputed from the per-patient predictions of {len(lb.folds)} stored folds in `{lb.source}` "
        f"(never from metrics cached in the records). Metric: {info.label}."
        + (" IBS and td-AUC use one time grid per cohort: the 10th-90th percentiles of the whole cohort's event "
           "times, kept inside every fold's follow-up, fixed before any fold is scored." if lb.metric in ("ibs",
                                                                                                     "td_auc") else ""),
        f"Cells: mean ± fold sd, with folds×seeds behind them; a fold's value is its mean over seeds and the fold sd "
        f"is the sd over folds of those means (the seed sd is in the spread table). Bold = best and underlined = "
        f"second only where the {test} separates them (raw p < {o.alpha}) from every cell below; {TIED} = tied: "
        f"with no bold cell in the column, the leader and the cells the test cannot tell from it (tied for best); "
        f"beside a bold cell, the runner-up and the cells tied with it (tied for second). {INCOMPLETE} = incomplete "
        f"(fewer folds than the cohort's most complete run, or fewer seeds than the cohort's other models), never "
        f"marked; {REFERENCE} = the reference of the paired comparisons; {SIGNIFICANT} = differs from the reference "
        f"({test}, Holm-adjusted p < {o.alpha}).",
        f"Reference of the paired comparisons: {reference_note(lb)}.",
        "Runs of different protocols are never ranked together. A cell's runs differ only in their seed; "
        "variants of a model that differ in anything else are separate rows, labelled by what differs.",
    ]


def reported_section(lb: Leaderboard | None = None) -> Section:
    """The published figures, labelled as reported, with the paper's protocol; ours beside them where matching."""
    t1, t2, pv = published.load("table1"), published.load("table2"), published.load("pvalues")
    rows, groups = [], []
    titles = {"single_scale": "Single-scale", "multi_scale": "Multi-scale", "ours": "CrossFusion and ablations"}
    for _, r in t1.frame.iterrows():
        rows.append([Cell(r.model)] + [Cell(f"{fmt_num(r[f'{c}_mean'])} ± {fmt_num(r[f'{c}_std'])}", r[f"{c}_mean"])
                                       for c in t1.cohorts])
        groups.append(titles.get(r.group, r.group))
    unmarked = ("No best / second marks: the paper's per-patient predictions are not available, so no paired test "
                "can tell its figures apart.")
    table1 = Block("reported-table1", "Reported: Table 1 (C-index, mean ± std over 5 folds, ResNet50 features)",
                   ["Model", *t1.cohorts], rows, groups, [t1.comment, unmarked])
    rows = [[Cell(r.backbone), Cell(str(r.backbone_dim), r.backbone_dim)]
            + [Cell(f"{fmt_num(r[f'{c}_mean'])} ± {fmt_num(r[f'{c}_std'])}", r[f"{c}_mean"]) for c in t2.cohorts]
            + [Cell(fmt_num(r["mean"]), r["mean"])] for _, r in t2.frame.iterrows()]
    table2 = Block("reported-table2", "Reported: Table 2 (CrossFusion C-index per feature backbone)",
                   ["Backbone", "Dim", *t2.cohorts, "Mean"], rows, [""] * len(rows), [t2.comment, unmarked])
    pvalues = Block("reported-pvalues", "Reported: log-rank p of CrossFusion's high/low risk groups (ResNet50)",
                    ["Cohort", "p"],
                    [[Cell(r.cohort), Cell(fmt_p(r.p_value), r.p_value)] for _, r in pv.frame.iterrows()],
                    [""] * len(pv.frame), [pv.comment])
    blocks: list[Block | Figure] = [table1, table2, pvalues]
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
        ours = metric_cell(r)
        ours.bold = ours.underline = False
        ours.marks = ours.marks.replace(TIED, "").replace(SIGNIFICANT, "").replace(REFERENCE, "")
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(cohort_title(r.cohort)), Cell(r.backbone),
                     Cell(r.protocol), ours, Cell(f"{fmt_num(mean)} ± {fmt_num(std)}", mean),
                     Cell(fmt_num(r["mean"] - mean, signed=True) if r.folds else "–", num(r["mean"] - mean))])
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
        backbones = sorted(part.backbone.unique())
        blocks: list[Block | Figure] = [_main_block(lb.cells, protocol, b, lb.metric) for b in backbones]
        backbone = _backbone_block(lb, protocol)
        blocks += [backbone] if backbone else []
        blocks += [pooled_block(lb, protocol, b) for b in backbones]
        if (lb.comparisons.protocol == protocol).any():
            blocks.append(comparison_block(lb, protocol))
        for r in lb.ranks:
            if r.protocol == protocol:
                blocks += rank_blocks(lb, r)
        blocks += [spread_block(lb, protocol, b) for b in backbones]
        blocks += [cost_block(lb, protocol, b) for b in backbones]
        sections.append(Section(f"Protocol: {protocol}", [PROTOCOL_NOTES.get(protocol, "")], blocks))
    sections.append(reported_section(lb))
    sections.append(Section("Runs", [], [runs_block(lb)]))
    return f"milbench leaderboard — {METRICS[lb.metric].label}", sections


__all__ = ["Block", "Cell", "Figure", "Section", "cohort_title", "document", "fmt_num", "fmt_p", "num",
           "reported_section"]
