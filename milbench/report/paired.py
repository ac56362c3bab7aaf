"""Paired comparisons on the same held-out patients: the paired bootstrap of the difference in the pooled metric
(patients resampled within folds, every seed of both models) beside the corrected resampled t-test over seeds
(per-fold means over seeds, J - 1 df), a declared reference model, family-wise adjustment across the table, and
best / second-best marks only where the paired test separates the cells.

The reference of each protocol x cohort x backbone is the model named by ``--baseline``, else the declared default
(``DEFAULT_BASELINE``, CrossFusion), else, where neither was run, the first model in registry order: never the
cell that scored best on these data (comparing with the observed winner inflates the evidence against the rest).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.report.folds import CELL, FAMILY
from milbench.report.pooled import CellData
from milbench.survival.comparisons import adjust, corrected_ttest_over_seeds, paired_bootstrap_table, rank_marks
from milbench.survival.statistics import metric_parts, paired_metric_table

DEFAULT_BASELINE = "crossfusion"
TESTS = {"bootstrap": "paired bootstrap", "ttest": "corrected resampled t-test"}
ADJUST_BY = ("table", "cohort")


@dataclass(frozen=True)
class PairTest:
    """Both paired tests of cell a against cell b (variants) on their common patients and folds."""

    a: str
    b: str
    patients: int
    diff: float  # pooled metric of a minus b (mean over each model's seeds)
    low: float
    high: float
    p_boot: float
    folds: int
    mean_diff: float  # mean over folds of the per-fold (seed-mean) difference
    t: float
    p_t: float
    ratio: float  # n_test / n_train of the t-test's correction
    reason: str = ""

    def p(self, test: str) -> float:
        """The raw p of the chosen test."""
        return self.p_boot if test == "bootstrap" else self.p_t


def _matches(cells: pd.DataFrame, name: str) -> pd.Series:
    """Cells whose registry name or display name is ``name`` (case-insensitive)."""
    key = name.strip().lower()
    return (cells.model.str.lower() == key) | (cells.display.str.lower() == key)


def references(cells: pd.DataFrame, baseline: str | None) -> dict[tuple, tuple[pd.Series, str]]:
    """Per protocol x cohort x backbone: the reference cell and the rule that chose it."""
    if baseline is not None and not _matches(cells, baseline).any():
        raise MilbenchError(f"--baseline {baseline}: no such model in the store; models: "
                            f"{', '.join(sorted(cells.model.unique()))}")
    out = {}
    for family, fam in cells.groupby(FAMILY, sort=True):
        fam = fam[fam.folds > 0].sort_values(["complete", "order", "model", "variant_label"],
                                             ascending=[False, True, True, True])
        if fam.empty:
            continue
        for name, rule in ((baseline, "--baseline"), (DEFAULT_BASELINE, "the declared default")):
            hit = fam[_matches(fam, name)] if name is not None else fam.iloc[0:0]
            if not hit.empty:
                out[family] = (hit.iloc[0], rule)
                break
        else:
            missing = baseline or DEFAULT_BASELINE
            out[family] = (fam.iloc[0], f"first in registry order ({missing} not run here)")
    return out


def needed_pairs(cells: pd.DataFrame, refs: dict[tuple, tuple[pd.Series, str]]) -> set[tuple[str, str]]:
    """(a, b) variants to test: every cell against its reference; every pair of complete cells of a family (marks);
    every pair of backbones of a complete model variant (the backbone table's marks)."""
    pairs = set()
    for family, (ref, _) in refs.items():
        fam = cells[(cells[FAMILY] == pd.Series(family, index=FAMILY)).all(axis=1) & (cells.folds > 0)]
        pairs |= {(v, ref.variant) for v in fam.variant if v != ref.variant}
        done = fam[fam.complete].variant.tolist()
        pairs |= {(a, b) for i, a in enumerate(done) for b in done[i + 1:]}
    complete = cells[cells.complete]
    for _, part in complete.groupby(["protocol", "cohort", "model", "variant_label"]):
        vs = part.variant.tolist()
        pairs |= {(a, b) for i, a in enumerate(vs) for b in vs[i + 1:]}
    return pairs


def _per_fold(folds: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per variant: its scores[seed, fold] (NaN where missing) and the mean test and train sizes per fold."""
    ok = folds[np.isfinite(folds[metric].astype(float))]
    return {v: part.pivot_table(index="seed", columns="fold", values=metric, aggfunc="mean")
            for v, part in ok.groupby("variant")}


def _ratio(folds: pd.DataFrame, variant: str, n_folds: int) -> float:
    """n_test / n_train of the t-test's variance correction, from the reference's records (else 1 / (k - 1))."""
    part = folds[folds.variant == variant]
    if part.n_train.notna().all() and len(part):
        return float(part.n_test.mean() / part.n_train.mean())
    return 1.0 / (n_folds - 1) if n_folds > 1 else float("nan")


def _boot_tests(metric: str, data: dict[str, CellData], pairs: list[tuple[str, str]], grid: np.ndarray | None,
                n_boot: int, seed: int) -> dict[tuple[str, str], tuple[float, float, float, float, str]]:
    """Paired bootstraps of ``pairs`` on one set of patients shared by every cell in ``data`` (one replicate set)."""
    first = next(iter(data.values()))
    try:
        if metric == "c_index":
            res = paired_bootstrap_table(first.time, first.event, {v: d.risks for v, d in data.items()}, first.fold,
                                         pairs, n_boot=n_boot, seed=seed)
        else:
            preds = {v: (d.surv_grid if metric == "ibs" else d.risks) for v, d in data.items()}
            if first.training is None or any(p is None for p in preds.values()):
                raise MilbenchError(f"{metric} needs the training folds' labels (and curves for ibs)")
            parts = metric_parts(metric, first.time, first.event, first.fold, preds, first.training, grid)
            res = paired_metric_table(parts, pairs, n_boot=n_boot, seed=seed)
    except MilbenchError as err:
        return {pair: (np.nan, np.nan, np.nan, np.nan, str(err)) for pair in pairs}
    return {(r.model_a, r.model_b): (r.diff, r.low, r.high, r.p, r.reason) for r in res}


def pair_tests(cells: pd.DataFrame, folds: pd.DataFrame, data: dict[tuple, CellData], metric: str,
               pairs: Iterable[tuple[str, str]], grids: dict[str, np.ndarray], n_boot: int,
               seed: int) -> dict[tuple[str, str], PairTest]:
    """Both paired tests for each (a, b): cells with the same held-out patients share one bootstrap replicate set;
    other pairs are tested on the patients they share."""
    by_variant = {k[-1]: d for k, d in data.items()}
    cohort_of = cells.set_index("variant").cohort.to_dict()
    scores = _per_fold(folds, metric)
    clusters: dict[tuple, list[str]] = defaultdict(list)
    for v, d in by_variant.items():
        clusters[(cohort_of[v], d.case_id.tobytes(), d.fold.tobytes())].append(v)
    cluster_of = {v: key for key, vs in clusters.items() for v in vs}
    wanted: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for a, b in sorted(pairs):
        same = cluster_of.get(a) == cluster_of.get(b)
        wanted[cluster_of[a] if same else (a, b)].append((a, b))
    boot = {}
    for key, todo in wanted.items():
        if key in clusters:
            members = sorted({v for pair in todo for v in pair})
            boot |= _boot_tests(metric, {v: by_variant[v] for v in members}, todo, grids.get(key[0]), n_boot, seed)
            continue
        a, b = todo[0]
        common = np.intersect1d(by_variant[a].case_id, by_variant[b].case_id)
        da, db = by_variant[a].subset(common), by_variant[b].subset(common)
        if len(common) == 0 or (da.fold != db.fold).any():
            boot[(a, b)] = (np.nan, np.nan, np.nan, np.nan, "no common patients held out in the same folds")
        else:
            boot |= _boot_tests(metric, {a: da, b: db}, todo, grids.get(cohort_of[a]), n_boot, seed)
    out = {}
    for a, b in pairs:
        diff, low, high, p_boot, reason = boot[(a, b)]
        sa, sb = scores.get(a, pd.DataFrame()), scores.get(b, pd.DataFrame())
        fold_ids = sorted(set(sa.columns) | set(sb.columns))
        n_common = len(np.intersect1d(by_variant[a].case_id, by_variant[b].case_id)) if a in by_variant and \
            b in by_variant else 0
        if sa.empty or sb.empty:
            out[(a, b)] = PairTest(a, b, n_common, diff, low, high, p_boot, 0, np.nan, np.nan, np.nan, np.nan,
                                   reason or "no per-fold scores")
            continue
        ratio = _ratio(folds, b, len(fold_ids))
        test = corrected_ttest_over_seeds(sa.reindex(columns=fold_ids).to_numpy(float),
                                          sb.reindex(columns=fold_ids).to_numpy(float), ratio)
        out[(a, b)] = PairTest(a, b, n_common, diff, low, high, p_boot, test.n_folds, test.mean_diff, test.t, test.p,
                               ratio, "; ".join(x for x in (reason, test.reason) if x))
    return out


def lookup(tests: dict[tuple[str, str], PairTest], a: str, b: str) -> PairTest | None:
    """The test of a against b in either order (None when it was not run)."""
    return tests.get((a, b)) or tests.get((b, a))


def comparison_table(cells: pd.DataFrame, refs: dict[tuple, tuple[pd.Series, str]],
                     tests: dict[tuple[str, str], PairTest], test: str, adjust_by: str,
                     alpha: float) -> pd.DataFrame:
    """Every cell against its family's reference: both tests, Holm-adjusted across every comparison of the protocol's
    table (``adjust_by`` "table") or within each protocol x cohort x backbone ("cohort")."""
    if test not in TESTS:
        raise MilbenchError(f"--test must be one of {', '.join(TESTS)}, got '{test}'")
    if adjust_by not in ADJUST_BY:
        raise MilbenchError(f"--adjust must be one of {', '.join(ADJUST_BY)}, got '{adjust_by}'")
    rows = []
    for family, (ref, rule) in refs.items():
        fam = cells[(cells[FAMILY] == pd.Series(family, index=FAMILY)).all(axis=1) & (cells.folds > 0)]
        for _, c in fam.sort_values(["order", "model", "variant_label"]).iterrows():
            if c.variant == ref.variant:
                continue
            r = tests[(c.variant, ref.variant)]
            rows.append(dict(zip(CELL, c[CELL])) | {
                "display": c.display, "variant_label": c.variant_label, "reference_model": ref.model,
                "reference_display": ref.display, "reference_label": ref.variant_label, "reference_variant": ref.variant,
                "reference_rule": rule, "complete": bool(c.complete), "patients": r.patients, "diff": r.diff,
                "ci_low": r.low, "ci_high": r.high, "p_boot": r.p_boot, "folds": r.folds, "mean_diff": r.mean_diff,
                "t": r.t, "p_t": r.p_t, "test_train_ratio": r.ratio, "reason": r.reason})
    columns = [*CELL, "display", "variant_label", "reference_model", "reference_display", "reference_label",
               "reference_variant", "reference_rule", "complete", "patients", "diff", "ci_low", "ci_high", "p_boot",
               "folds", "mean_diff", "t", "p_t", "test_train_ratio", "reason", "p_boot_adj", "p_t_adj", "test", "p",
               "p_adj", "significant"]
    table = pd.DataFrame(rows, columns=columns[:-6])
    table["p_boot_adj"] = np.nan
    table["p_t_adj"] = np.nan
    for _, part in table.groupby("protocol"):
        family = None if adjust_by == "table" else [tuple(x) for x in part[FAMILY].itertuples(index=False)]
        table.loc[part.index, "p_boot_adj"] = adjust(part.p_boot.to_numpy(float), "holm", family)
        table.loc[part.index, "p_t_adj"] = adjust(part.p_t.to_numpy(float), "holm", family)
    table["test"] = TESTS[test]
    table["p"] = table.p_boot if test == "bootstrap" else table.p_t
    table["p_adj"] = table.p_boot_adj if test == "bootstrap" else table.p_t_adj
    table["significant"] = (table.p_adj < alpha).fillna(False).astype(bool)
    return table[columns]


def marks(scores: dict[str, float], tests: dict[tuple[str, str], PairTest], test: str, alpha: float,
          higher_is_better: bool) -> dict[str, str | None]:
    """Best / second / tied marks of ``scores`` (variant -> shown value) where the chosen paired test's raw p
    separates the cells (an intersection-union claim: best differs from each other cell at level alpha)."""

    def differ(a: str, b: str) -> bool:
        r = lookup(tests, a, b)
        p = np.nan if r is None else r.p(test)
        return bool(np.isfinite(p) and p < alpha)

    return rank_marks(scores, differ, alpha=alpha, higher_is_better=higher_is_better)
