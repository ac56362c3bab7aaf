"""The statistics tables of a leaderboard document: pooled figures, seed and fold spread, cost, paired comparisons,
ranks across cohorts (with the critical-difference figure) and the runs."""

from __future__ import annotations

import pandas as pd

from milbench.report.aggregate import CELL, INCOMPLETE, METRICS, SIGNIFICANT, TIED, Leaderboard, row_label
from milbench.report.cells import Block, Cell, Figure, cohort_title, fmt_num, fmt_p, num
from milbench.report.ranking import RankResult

REFERENCE = "°"
SHORT = {"c_index": "C", "uno_c": "Uno C", "ibs": "IBS", "td_auc": "td-AUC"}


def metric_cell(r: pd.Series) -> Cell:
    """A cell's "mean ± fold sd (folds×seeds)" with its marks: † incomplete, * differs from the reference, ° the
    reference, ≈ tied; bold best and underlined second only where the paired test separates them."""
    if r.folds == 0:
        return Cell("–", None, f"0×{r.seeds}", INCOMPLETE)
    mark = r.get("mark")
    marks = ("" if r.complete else INCOMPLETE) + (SIGNIFICANT if r.get("significant", False) else "")
    marks += (REFERENCE if r.get("is_reference", False) else "") + (TIED if mark in ("tied-best", "tied-second")
                                                                    else "")
    return Cell(f"{fmt_num(r['mean'])} ± {fmt_num(r['std'])}", num(r["mean"]), f"{r.folds}×{r.seeds}", marks,
                bold=mark == "best", underline=mark == "second")


def _pairs_phrase(lb: Leaderboard) -> str:
    if lb.metric == "ibs":
        return "over the held-out patients (the patient-weighted mean of the fold IBSs: the Brier score has no pairs)"
    if lb.options.pooled == "within-fold":
        return ("within folds: only pairs of patients held out in the same fold (and seed), so each pair is ranked by "
                "one fitted model")
    return ("across folds (labelled option): every pair of the pooled predictions, comparing risks from different fold "
            "models")


def pooled_block(lb: Leaderboard, protocol: str, backbone: str) -> Block:
    """Per cell: the metric pooled over the held-out patients with its bootstrap interval, log-rank p, D-calibration."""
    part = lb.pooled[(lb.pooled.protocol == protocol) & (lb.pooled.backbone == backbone)]
    oracle = "oracle" in lb.cells and lb.cells.oracle.notna().any()
    part = part.merge(lb.cells[[*CELL, "display", "order", "variant_label"] + (["oracle"] if oracle else [])], on=CELL)
    rows, groups = [], []
    for _, r in part.sort_values(["cohort", "order", "model", "variant_label"]).iterrows():
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(str(r.patients), r.patients),
                     Cell(str(r.events), r.events), Cell(str(r.seeds), r.seeds),
                     Cell(fmt_num(r.pooled), num(r.pooled)),
                     Cell(f"[{fmt_num(r.ci_low)}, {fmt_num(r.ci_high)}]", num(r.ci_low)),
                     Cell(fmt_p(r.logrank_p), num(r.logrank_p)), Cell(fmt_p(r.dcal_p), num(r.dcal_p))]
                    + ([Cell(fmt_num(r.oracle), num(r.oracle))] if oracle else []))
        groups.append(cohort_title(r.cohort))
    boot = (f"{lb.n_boot} resamples of patients within folds, seed {lb.seed}" if lb.n_boot > 0 else "no bootstrap")
    short = SHORT[lb.metric]
    return Block(f"pooled-{protocol}-{backbone}", f"Pooled out-of-fold {METRICS[lb.metric].label} — protocol "
                 f"{protocol}, backbone {backbone}: pooled {_pairs_phrase(lb)}; percentile bootstrap 95% CI of the "
                 f"same statistic ({boot})",
                 ["Model", "Patients", "Events", "Seeds", f"Pooled {short}", "95% CI", "Log-rank p", "D-cal p"]
                 + (["Oracle C"] if oracle else []), rows, groups,
                 ["With several seeds the pooled figure is the mean over seeds, and a bootstrap replicate resamples "
                  "the same patients for every seed. Log-rank p: one test over all seeds, high risk where the "
                  "patient's risk minus its training fold's median risk, averaged over seeds, is positive.",
                  "D-cal p: D-calibration (Haider et al. 2020) of the head's survival curves, read at each patient's "
                  "own time (linear between bin ends), bin masses averaged over seeds, chi-square on 9 df; a small "
                  "p says the curves are miscalibrated; – for a head without a curve."]
                 + (["Oracle C: the cohort's known risk scored on the same held-out patients (synthetic cohorts), "
                     "mean over folds, from the records."] if oracle else []))


def spread_block(lb: Leaderboard, protocol: str, backbone: str) -> Block:
    """Per cell: fold sd and seed sd apart."""
    part = lb.cells[(lb.cells.protocol == protocol) & (lb.cells.backbone == backbone)]
    rows, groups = [], []
    for _, r in part.sort_values(["cohort", "order", "model", "variant_label"]).iterrows():
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(f"{r.folds}×{r.seeds}"),
                     Cell(fmt_num(r["mean"]), num(r["mean"])), Cell(fmt_num(r["std"]), num(r["std"])),
                     Cell(fmt_num(r.seed_sd), num(r.seed_sd)),
                     Cell(fmt_num(r.seed_sd_within_fold), num(r.seed_sd_within_fold))])
        groups.append(cohort_title(r.cohort))
    return Block(f"spread-{protocol}-{backbone}", f"Fold and seed variation apart — protocol {protocol}, backbone "
                 f"{backbone} ({METRICS[lb.metric].label})",
                 ["Model", "Folds×seeds", "Mean", "Fold sd", "Seed sd", "Seed sd within a fold"], rows, groups,
                 ["Fold sd: sd over folds of the per-fold means over seeds (the ± of the main table). Seed sd: sd over "
                  "seeds of each seed's mean over folds (how the headline moves with the seed). Seed sd within a "
                  "fold: pooled sd over seeds of one fold's score. – with one seed."])


def cost_block(lb: Leaderboard, protocol: str, backbone: str) -> Block:
    """Per cell: the gap to the oracle (synthetic cohorts) and what training cost, from the records."""
    part = lb.cells[(lb.cells.protocol == protocol) & (lb.cells.backbone == backbone)]
    oracle = "oracle" in part and part.oracle.notna().any()
    rows, groups = [], []
    for _, r in part.sort_values(["cohort", "order", "model", "variant_label"]).iterrows():
        main = metric_cell(r)
        main.bold = main.underline = False
        row = [Cell(row_label(r.display, r.variant_label)), main]
        if oracle:
            gap = r.oracle - r["mean"]
            row += [Cell(fmt_num(r.oracle), num(r.oracle)), Cell(fmt_num(gap), num(gap))]
        gib = r.peak_memory_bytes / 2**30
        row += [Cell(fmt_num(r.train_s, 1), num(r.train_s)), Cell(fmt_num(r.s_per_epoch, 2), num(r.s_per_epoch)),
                Cell(fmt_num(gib, 2), num(gib)), Cell(r.device or "–")]
        rows.append(row)
        groups.append(cohort_title(r.cohort))
    return Block(f"cost-{protocol}-{backbone}", ("Gap to the oracle, training time and peak memory" if oracle else
                 "Training time and peak memory") + f" — protocol {protocol}, backbone {backbone}",
                 ["Model", METRICS[lb.metric].label] + (["Oracle C", "Gap"] if oracle else [])
                 + ["Train s per fold", "s per epoch", "Peak memory GiB", "Device"], rows, groups,
                 (["Gap = oracle C minus the model's mean over the same folds (the oracle is the mean of the folds' "
                   "oracle C)."] if oracle else [])
                 + ["Time and memory are means (memory: the maximum) over the cell's folds, from the records: GPU "
                    "memory allocated by torch on CUDA, the process's peak resident memory on the CPU (data and "
                    "interpreter included). Timings depend on the machine and on how many folds shared it."])


def comparison_block(lb: Leaderboard, protocol: str) -> Block:
    """Every cell against its reference: the paired bootstrap beside the corrected resampled t-test."""
    part = lb.comparisons[lb.comparisons.protocol == protocol]
    o = lb.options
    rows, groups = [], []
    for _, r in part.iterrows():
        rows.append([Cell(row_label(r.display, r.variant_label)), Cell(str(r.patients), r.patients),
                     Cell(fmt_num(r["diff"], signed=True), num(r["diff"])),
                     Cell(f"[{fmt_num(r.ci_low, signed=True)}, {fmt_num(r.ci_high, signed=True)}]", num(r.ci_low)),
                     Cell(fmt_p(r.p_boot), num(r.p_boot)), Cell(fmt_p(r.p_boot_adj), num(r.p_boot_adj)),
                     Cell(str(r.folds), r.folds), Cell(fmt_num(r.mean_diff, signed=True), num(r.mean_diff)),
                     Cell(fmt_num(r.t, 2), num(r.t)), Cell(fmt_p(r.p_t), num(r.p_t)),
                     Cell(fmt_p(r.p_t_adj), num(r.p_t_adj)),
                     Cell(SIGNIFICANT if r.significant else "")])
        groups.append(f"{cohort_title(r.cohort)}, {r.backbone}: reference "
                      f"{row_label(r.reference_display, r.reference_label)} ({r.reference_rule})")
    family = (f"across all {len(part)} comparisons of this table" if o.adjust_by == "table"
              else "within each cohort and backbone (--adjust cohort)")
    test = "paired bootstrap" if o.test == "bootstrap" else "corrected resampled t-test"
    short = SHORT[lb.metric]
    return Block(f"comparisons-{protocol}", f"Paired comparisons with the reference — protocol {protocol}: paired "
                 f"bootstrap of the difference in pooled {short} on the same patients beside the corrected resampled "
                 f"t-test over seeds; Holm-adjusted {family}; Sig. (*) from the {test}",
                 ["Model", "Patients", f"Δ pooled {short}", "95% CI", "p (boot)", "Holm (boot)", "Folds",
                  "Δ fold mean", "t", "p (t)", "Holm (t)", "Sig."], rows, groups,
                 [f"Δ = model minus reference. Paired bootstrap: {o.paired_boot} resamples of the patients both models "
                  "held out, within folds, every seed of both models in each replicate; percentile CI; two-sided p = "
                  f"twice the smaller tail at 0 (smallest possible {fmt_p(2 / (o.paired_boot + 1))}).",
                  "Corrected resampled t-test (Nadeau & Bengio 2003): per-fold differences of the seed-mean scores, "
                  "variance inflated by 1/J + n_test/n_train, J - 1 df: one test over all seeds.",
                  f"The reference is --baseline when given, else the declared default (CrossFusion), else the first "
                  f"model in registry order; never the best-scoring cell. Significant: adjusted p < {o.alpha}."])


def rank_blocks(lb: Leaderboard, r: RankResult) -> list[Block | Figure]:
    """Average ranks over cohorts with the Friedman test and the post-hoc test, and the CD diagram."""
    a = r.analysis
    per_cohort = pd.DataFrame(r.scores).rank(axis=0, ascending=not METRICS[lb.metric].higher_is_better)
    rows = [[Cell(label), Cell(fmt_num(a.avg_ranks[label], 2), a.avg_ranks[label])]
            + [Cell(fmt_num(per_cohort.loc[label, c], 1), num(per_cohort.loc[label, c])) for c in r.cohorts]
            for label in sorted(r.labels, key=lambda m: (a.avg_ranks[m], m))]
    f, post = a.friedman, a.posthoc
    text = [f"Friedman chi-square = {fmt_num(f.statistic, 2)} on {f.df} df, p = {fmt_p(f.p)}; Iman-Davenport F = "
            f"{fmt_num(f.iman_davenport, 2)}, p = {fmt_p(f.p_iman_davenport)} ({f.n_models} models, {f.n_cohorts} "
            "cohorts)." + "".join(f" {x[0].upper()}{x[1:]}." for x in (f.note, f.reason) if x)]
    if post.method == "nemenyi":
        text.append(f"Nemenyi post-hoc: critical difference CD = {fmt_num(post.cd, 2)} at alpha = {post.alpha}; two "
                    "models differ when their average ranks are at least CD apart.")
    else:
        text.append(f"Wilcoxon signed-rank tests over cohorts, Holm-adjusted over all pairs, alpha = {post.alpha}.")
    text += [f"Groups the post-hoc test cannot tell apart: {'; '.join(', '.join(c) for c in post.cliques)}."
             if post.cliques else "The post-hoc test separates every pair."] + [f"{n}." for n in post.notes]
    if r.excluded:
        text.append(f"Left out (no complete cell in every cohort): {', '.join(r.excluded)}.")
    key = f"ranks-{r.protocol}-{r.backbone}"
    table = Block(key, f"Average rank over cohorts (1 = best) — protocol {r.protocol}, backbone {r.backbone}, "
                  f"{METRICS[lb.metric].label} of the complete cells", ["Model", "Average rank",
                  *(f"{cohort_title(c)} rank" for c in r.cohorts)], rows, [""] * len(rows), text)
    figure = Figure(f"{key}-figure", f"Critical-difference diagram (Demsar 2006) — protocol {r.protocol}, backbone "
                    f"{r.backbone}", r.stem, ["Models on the average-rank axis (1 = best, left); a thick bar joins "
                                              "models the post-hoc test cannot tell apart"
                                              + ("; the bar above the axis is the critical difference."
                                                 if post.method == "nemenyi" else ".")])
    return [table, figure]


def runs_block(lb: Leaderboard) -> Block:
    rows = []
    for _, r in lb.runs.iterrows():
        rows.append([Cell(cohort_title(r.cohort)), Cell(r.backbone), Cell(row_label(r.model, r.variant_label)),
                     Cell(r.protocol), Cell(str(r.recipe)), Cell(str(r.epochs), num(r.epochs)),
                     Cell(f"{r.lr:g}" if r.lr is not None else "–", num(r.lr)), Cell(str(r.bins_on)),
                     Cell(r.options or "–"), Cell(str(r.seed), num(r.seed)), Cell(r.folds), Cell(r.config_hash)])
    return Block("runs", "Runs behind the tables", ["Cohort", "Backbone", "Model", "Protocol", "Recipe", "Epochs", "LR",
                 "Bins on", "Model options", "Seed", "Folds", "Config hash"], rows, [""] * len(rows))


def reference_note(lb: Leaderboard) -> str:
    """Which reference each family was compared with, in one sentence."""
    part = lb.comparisons.drop_duplicates(["protocol", "cohort", "backbone"])
    refs = sorted({f"{row_label(r.reference_display, r.reference_label)} ({r.reference_rule})"
                   for _, r in part.iterrows()})
    return "; ".join(refs) if refs else "none (one cell per family)"
