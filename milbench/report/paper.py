"""The comparison the CrossFusion paper invites: per TCGA cohort, backbone and model, ours beside the published figure.

Per cell (protocol x cohort x backbone x model variant): our C-index recomputed from each stored fold's predictions
(never from the records' cached metrics), mean ± sample std over folds (a fold's value is the mean over its seeds)
and a 95% interval of that mean (t distribution, folds - 1 degrees of freedom); the published mean ± std (Table 1 at
ResNet-50, Table 2 for CrossFusion at the other backbones); the difference; whether ours lies within the published
± std; our rank among the complete cells of the same protocol, cohort and backbone; the log-rank p of high vs low
risk (each patient cut at its training fold's median risk, folds pooled) beside the paper's (CrossFusion,
ResNet-50). Each protocol is its own table, never ranked with another; the paper's figures are ``best-val``.
Kaplan-Meier plots per cohort for CrossFusion (:func:`milbench.report.plots.km_figure`).

Runs whose records say ``"source": "submitted"`` (`milbench submit`: predictions made outside milbench, checked
against the fixed folds) are ranked like the others and labelled "(submitted)".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from milbench import MilbenchError
from milbench.files import stable_hash
from milbench.report import published
from milbench.report.document import Block, Cell, Section, cohort_title, fmt_p
from milbench.runs.store import StoredFold, iter_folds
from milbench.survival.metrics import harrell_c
from milbench.survival.statistics import pooled_logrank_p

SUBMITTED = "(submitted)"
INCOMPLETE = "†"
KM_MODEL = "crossfusion"
GROUPS = {"single_scale": 0, "multi_scale": 1, "ablation": 2}


def _display(model: str) -> tuple[str, int]:
    from milbench.models.registry import list_cards

    cards = list_cards()
    for i, card in enumerate(cards):
        if card.name == model:
            return card.display_name, GROUPS.get(card.group, 3) * 100 + i
    return model, 10_000


def _c(pred: pd.DataFrame) -> float:
    try:
        return harrell_c(pred.time.to_numpy(float), pred.event.to_numpy(int), pred.risk.to_numpy(float))
    except MilbenchError:  # no event, or no comparable pair: undefined, never 0
        return float("nan")


def _folds(runs_dir: Path) -> list[StoredFold]:
    return [f for f in iter_folds(runs_dir) if str(f.record.get("cohort", "")).startswith("tcga_")]


def _variant(config: dict) -> str:
    return stable_hash({k: v for k, v in config.items() if k != "seed"})


def _labels(folds: list[StoredFold]) -> dict[str, str]:
    """Per variant, the settings that tell it apart from the other variants of its model in the same cell."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for f in folds:
        r = f.record
        groups[(r["protocol"], r["cohort"], r["backbone"], r["model"])][_variant(r["config"])] = r["config"]
    labels = {}
    for variants in groups.values():
        flat = {v: {**{k: x for k, x in c.items() if k not in ("seed", "model_options", "inputs")},
                    **(c.get("model_options") or {})} for v, c in variants.items()}
        keys = sorted({k for c in flat.values() for k in c if len({str(x.get(k)) for x in flat.values()}) > 1})
        for v, c in flat.items():
            labels[v] = ", ".join(f"{k}={c.get(k, '-')}" for k in keys) or ("another input" if len(flat) > 1 else "")
    return labels


def _folds_of(cohort: str) -> int:
    from milbench.tasks.tcga import shipped_table

    try:
        return int(shipped_table(cohort).fold.max()) + 1
    except MilbenchError:
        return 5


def comparison(runs_dir: Path) -> pd.DataFrame:
    """One row per cell of the store's TCGA runs, with the published figure beside ours (see the module notes)."""
    folds = _folds(runs_dir)
    if not folds:
        return pd.DataFrame()
    labels = _labels(folds)
    rows = []
    for f in folds:
        r = f.record
        pred = f.predictions
        rows.append({"protocol": r["protocol"], "cohort": r["cohort"], "backbone": r["backbone"], "model": r["model"],
                     "variant": _variant(r["config"]), "seed": r["config"].get("seed"), "fold": int(r["fold"]),
                     "source": r.get("source", "milbench"), "c": _c(pred), "pred": pred})
    frame = pd.DataFrame(rows)
    cells = []
    for key, part in frame.groupby(["protocol", "cohort", "backbone", "model", "variant"], sort=False):
        protocol, cohort, backbone, model, variant = key
        per_fold = part.groupby("fold").c.mean()
        k = int(per_fold.notna().sum())
        mean = float(per_fold.mean()) if k else np.nan
        std = float(per_fold.std(ddof=1)) if k > 1 else np.nan
        half = stats.t.ppf(0.975, k - 1) * std / np.sqrt(k) if k > 1 else np.nan
        ps = []
        for _, seed_part in part.groupby("seed"):
            pred = pd.concat(list(seed_part.pred), ignore_index=True)
            ps.append(pooled_logrank_p(pred.time, pred.event, pred.risk, pred.train_median_risk)
                      if "train_median_risk" in pred else np.nan)
        reported = published.reported_c(model, cohort, backbone)
        display, order = _display(model)
        submitted = (part.source == "submitted").all()
        label = labels.get(variant, "")
        cells.append({
            "protocol": protocol, "cohort": cohort, "cohort_title": cohort_title(cohort), "backbone": backbone,
            "model": model, "variant": variant, "order": order, "submitted": bool(submitted),
            "model_label": display + (f" ({label})" if label else "") + (f" {SUBMITTED}" if submitted else ""),
            "folds": k, "seeds": int(part.seed.nunique()), "complete": k >= _folds_of(cohort),
            "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
            "paper_mean": reported[0] if reported else np.nan, "paper_std": reported[1] if reported else np.nan,
            "paper_table": reported[2] if reported else "",
            "logrank_p": float(np.nanmedian(ps)) if np.isfinite(ps).any() else np.nan,
            "paper_logrank_p": published.reported_logrank(model, cohort, backbone) or np.nan})
    out = pd.DataFrame(cells + _not_run(runs_dir, {(c["protocol"], c["cohort"], c["backbone"], c["model"])
                                                   for c in cells}))
    out["diff"] = out["mean"] - out.paper_mean
    out["within"] = (out["diff"].abs() <= out.paper_std).where(out.paper_mean.notna() & out["mean"].notna())
    out["rank"] = np.nan
    for _, part in out[out.complete & out["mean"].notna()].groupby(["protocol", "cohort", "backbone"]):
        out.loc[part.index, "rank"] = part["mean"].rank(ascending=False, method="min")
    out = out.sort_values(["protocol", "backbone", "cohort", "order", "model_label"], kind="stable")
    return _texts(out.reset_index(drop=True))


def _not_run(runs_dir: Path, present: set[tuple[str, str, str, str]]) -> list[dict]:
    """Placeholder cells for what the store's benchmark files ask for and nothing has scored yet: the published
    figure is shown beside an empty "ours"."""
    from milbench.runs.benchmark import read_sidecars

    cells = []
    for side in read_sidecars(runs_dir):
        if side.get("kind") != "tcga":
            continue
        for protocol in (p["name"] for p in side.get("protocols", [])):
            for cohort in side.get("cohorts", []):
                for backbone in side.get("backbones", []):
                    for model in side.get("models", []):
                        key = (protocol, cohort, backbone, model)
                        if key in present:
                            continue
                        present.add(key)
                        reported = published.reported_c(model, cohort, backbone)
                        display, order = _display(model)
                        cells.append({
                            "protocol": protocol, "cohort": cohort, "cohort_title": cohort_title(cohort),
                            "backbone": backbone, "model": model, "variant": "", "order": order, "submitted": False,
                            "model_label": display, "folds": 0, "seeds": 0, "complete": False,
                            "mean": np.nan, "std": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                            "paper_mean": reported[0] if reported else np.nan,
                            "paper_std": reported[1] if reported else np.nan,
                            "paper_table": reported[2] if reported else "", "logrank_p": np.nan,
                            "paper_logrank_p": published.reported_logrank(model, cohort, backbone) or np.nan})
    return cells


def _f(x: float, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    text = f"{x:+.3f}" if signed else f"{x:.3f}"
    return text.replace("-0.000", "0.000").replace("+0.000", "0.000")


def _texts(out: pd.DataFrame) -> pd.DataFrame:
    """Printable columns: ours (mean ± std [CI], folds), the paper's, Δ, within, rank."""
    out["ours_text"] = [
        "not run" if r.folds == 0 else
        f"{_f(r['mean'])} ± {_f(r['std'])} [{_f(r.ci_low)}, {_f(r.ci_high)}] ({r.folds}×{r.seeds})"
        + ("" if r.complete else f" {INCOMPLETE}") for _, r in out.iterrows()]
    out["paper_text"] = [f"{_f(r.paper_mean)} ± {_f(r.paper_std)}" if np.isfinite(r.paper_mean) else "–"
                         for _, r in out.iterrows()]
    out["diff_text"] = [_f(d, signed=True) for d in out["diff"]]
    out["within_text"] = ["–" if pd.isna(w) else ("yes" if w else "no") for w in out.within]
    out["rank_text"] = ["–" if pd.isna(k) else str(int(k)) for k in out["rank"]]
    return out


def _block(part: pd.DataFrame, protocol: str, backbone: str) -> Block:
    rows, groups = [], []
    for _, r in part.iterrows():
        rows.append([Cell(r.model_label), Cell(r.ours_text, None if pd.isna(r["mean"]) else float(r["mean"])),
                     Cell(r.paper_text, None if pd.isna(r.paper_mean) else float(r.paper_mean)),
                     Cell(r.diff_text, None if pd.isna(r["diff"]) else float(r["diff"])), Cell(r.within_text),
                     Cell(r.rank_text, None if pd.isna(r["rank"]) else float(r["rank"])),
                     Cell(fmt_p(r.logrank_p), None if pd.isna(r.logrank_p) else float(r.logrank_p)),
                     Cell(fmt_p(r.paper_logrank_p), None if pd.isna(r.paper_logrank_p) else float(r.paper_logrank_p))])
        rows[-1][1].bold = r["rank"] == 1
        groups.append(r.cohort_title)
    tables = " and ".join(sorted({t for t in part.paper_table if t})) or "no published figure"
    return Block(f"paper-{protocol}-{backbone}", f"C-index beside the paper ({tables}) — protocol {protocol}, "
                 f"backbone {backbone}",
                 ["Model", "Ours: mean ± std [95% CI] (folds×seeds)", f"Paper ({published.PROTOCOL})", "Δ",
                  "Within paper ± std", "Rank", "Log-rank p", "Paper log-rank p"], rows, groups,
                 [f"Ranks among the complete cells ({INCOMPLETE}: fewer folds than the cohort has, never ranked) of "
                  f"protocol {protocol}, cohort and backbone; bold = first.",
                  "Δ = our mean minus the paper's; within = |Δ| ≤ the paper's std."
                  + ("" if protocol == published.PROTOCOL else f" The paper's figures are {published.PROTOCOL}: "
                     f"under {protocol} Δ also measures the protocol, not only the reproduction.")])


def _means_block(cmp: pd.DataFrame) -> Block | None:
    """CrossFusion's mean over the six cohorts per protocol and backbone, beside Table 2's last column (only from
    complete cells of all six cohorts)."""
    part = cmp[(cmp.model == KM_MODEL) & (cmp.folds > 0)]
    rows, groups = [], []
    for (protocol, backbone), cells in part.groupby(["protocol", "backbone"], sort=False):
        paper = published.reported_backbone_mean(backbone)
        if paper is None:
            continue
        done = cells[cells.complete & cells.cohort.map(published.paper_cohort).isin(published.load("table2").cohorts)]
        full = done.cohort.nunique() == len(published.load("table2").cohorts)
        mean = float(done.groupby("cohort")["mean"].mean().mean()) if full else np.nan
        rows.append([Cell(backbone), Cell(f"{done.cohort.nunique()} of 6"), Cell(_f(mean), None if not full else mean),
                     Cell(_f(paper), paper), Cell(_f(mean - paper, signed=True) if full else "–")])
        groups.append(f"protocol {protocol}")
    if not rows:
        return None
    return Block("paper-table2-means", "CrossFusion's mean C-index over the six cohorts, beside Table 2's last column",
                 ["Backbone", "Complete cohorts", "Ours", "Paper (best-val)", "Δ"], rows, groups,
                 ["Ours only when all six cohorts are complete."])


def _choices(runs_dir: Path) -> tuple[list[str], Block | None]:
    """The benchmark files recorded in the store (one line each) and the choices they make where the paper is
    silent (a table)."""
    from milbench.runs.benchmark import read_sidecars

    lines, rows, groups = [], [], []
    for side in read_sidecars(runs_dir):
        if side.get("kind") != "tcga":
            continue
        labels = "; ".join(f"{p['name']}: {p['label']}" for p in side.get("protocols", []) if p.get("label"))
        lines.append(f"Benchmark file `{side['file']}` (sha256 {side['sha256'][:12]}): protocols — {labels}.")
        for key, text in side.get("unstated", {}).items():
            rows.append([Cell(key.replace("_", " ")), Cell(text)])
            groups.append(side["file"])
    block = Block("paper-choices", "What the paper leaves unstated, and what these runs chose", ["Choice", "Here"],
                  rows, groups, ["From the benchmark files' [unstated] tables (recorded in RUNS/benchmarks/)."])
    return lines, block if rows else None


def km_runs(runs_dir: Path) -> dict[str, list[StoredFold]]:
    """The stored folds of each CrossFusion run on a TCGA cohort, by config hash."""
    runs: dict[str, list[StoredFold]] = defaultdict(list)
    for f in _folds(runs_dir):
        if f.record["model"] == KM_MODEL:
            runs[f.record["config_hash"]].append(f)
    return {h: sorted(fs, key=lambda f: f.record["fold"]) for h, fs in sorted(runs.items())}


def _km_stem(folds: list[StoredFold]) -> str:
    r = folds[0].record
    return f"km_{KM_MODEL}_{r['protocol']}_{r['backbone']}_{r['cohort']}_{r['config_hash']}"


def write_km(runs_dir: Path, out: Path) -> list[Path]:
    """Kaplan-Meier plots (PNG and PDF) of every CrossFusion run on a TCGA cohort, into ``out``."""
    from milbench.report.plots import StoredRun, km_figure, save_figure

    paths = []
    for config_hash, folds in km_runs(runs_dir).items():
        paths += save_figure(km_figure(StoredRun(config_hash, folds), "CrossFusion"), Path(out) / _km_stem(folds))
    return paths


def paper_sections(runs_dir: Path) -> list[Section]:
    """The comparison as document sections (one block per protocol and backbone, then the Kaplan-Meier figures);
    empty when the store has no TCGA run. The figures' files are written by :func:`write_km`."""
    cmp = comparison(runs_dir)
    if cmp.empty:
        return []
    text = [f"Ours recomputed from the stored per-patient predictions; the paper's figures copied from "
            f"{published.SOURCE}, protocol `{published.PROTOCOL}` ({published.PROTOCOL_NOTE}). Each protocol is its "
            f"own table and is never ranked with another.",
            f"{SUBMITTED}: predictions made outside milbench (`milbench submit`), checked against the fixed folds; "
            f"their protocol is the one their submitter declared."]
    files, choices = _choices(runs_dir)
    blocks = [_block(part, protocol, backbone)
              for (protocol, backbone), part in cmp.groupby(["protocol", "backbone"], sort=False)]
    text += files
    means = _means_block(cmp)
    blocks += [b for b in (means, choices) if b is not None]
    sections = [Section(f"Beside the paper: {published.SOURCE}", text, blocks)]
    try:
        from milbench.report.document import Figure
    except ImportError:  # a document model without figures: the plots are still written beside the tables
        return sections
    figures = []
    for folds in km_runs(runs_dir).values():
        r = folds[0].record
        figures.append(Figure(f"km-{r['config_hash']}", f"Kaplan-Meier, CrossFusion on {cohort_title(r['cohort'])} "
                              f"— protocol {r['protocol']}, backbone {r['backbone']}", _km_stem(folds),
                              [f"{len(folds)} fold(s) pooled; high risk = above its training fold's median risk."]))
    if figures:
        sections.append(Section("Kaplan-Meier curves of CrossFusion (pooled out-of-fold risk groups)", [], figures))
    return sections


def write_report(runs_dir: Path, out: Path) -> list[Path]:
    """``out/paper.md`` (the comparison) and the Kaplan-Meier plots beside it; the written paths."""
    from milbench.report.markdown import render_markdown

    sections = paper_sections(runs_dir)
    if not sections:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_km(runs_dir, out)
    path = out / "paper.md"
    path.write_text(render_markdown("milbench beside the CrossFusion paper", sections))
    return [path, *paths]


def label_submitted(sections: list[Section], runs_dir: Path) -> None:
    """Label the rows of submitted runs in another document's tables (the leaderboard's): a cell or row group
    whose text is a submitted model's name, alone or with its variant label, gets " (submitted)"."""
    names = {f.record["model"] for f in iter_folds(runs_dir) if f.record.get("source") == "submitted"}

    def label(text: str) -> str:
        hit = text in names or text.split(" (")[0] in names
        return f"{text} {SUBMITTED}" if hit and SUBMITTED not in text else text

    for section in sections if names else []:
        for block in section.blocks:
            if isinstance(block, Block):
                block.groups = [label(g) for g in block.groups]
                for row in block.rows:
                    for cell in row:
                        cell.text = label(cell.text)


def extend_leaderboard(sections: list[Section], runs_dir: Path, out: Path) -> list[Path]:
    """The leaderboard's hook: label submitted runs in its tables, put the paper comparison before its last
    section (the runs), and write CrossFusion's Kaplan-Meier plots into ``out``; the files written."""
    label_submitted(sections, runs_dir)
    extra = paper_sections(runs_dir)
    at = len(sections) - 1 if sections and sections[-1].title == "Runs" else len(sections)
    sections[at:at] = extra
    return write_km(runs_dir, out) if extra else []
