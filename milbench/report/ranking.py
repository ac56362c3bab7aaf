"""Ranks across cohorts (Demsar 2006): per protocol and backbone, the models' average ranks over cohorts (complete
cells only), the Friedman test and a post-hoc test (Nemenyi's critical difference, or Wilcoxon signed-rank tests with
Holm's adjustment), drawn as a critical-difference diagram beside the leaderboard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from milbench import MilbenchError
from milbench.report.cd_diagram import plot_cd_diagram
from milbench.report.cells import cohort_title
from milbench.report.folds import METRICS
from milbench.survival.ranks import RankAnalysis, rank_analysis

POSTHOCS = ("nemenyi", "wilcoxon-holm")


@dataclass
class RankResult:
    """One rank analysis: the rows ranked (labels), the cohorts, their scores and what was left out."""

    protocol: str
    backbone: str
    labels: list[str]
    cohorts: list[str]
    scores: pd.DataFrame  # label x cohort: the cell means ranked
    analysis: RankAnalysis
    excluded: list[str]  # rows without a complete cell in every cohort

    @property
    def stem(self) -> str:
        """File name (without suffix) of its critical-difference diagram."""
        return f"cd-{self.protocol}-{self.backbone}"


def rank_results(cells: pd.DataFrame, metric: str, posthoc: str, alpha: float, notes: list[str]) -> list[RankResult]:
    """Average ranks over the cohorts of each protocol x backbone with at least two cohorts and two complete rows."""
    if posthoc not in POSTHOCS:
        raise MilbenchError(f"--posthoc must be one of {', '.join(POSTHOCS)}, got '{posthoc}'")
    out = []
    for (protocol, backbone), part in cells.groupby(["protocol", "backbone"], sort=True):
        cohorts = sorted(part.cohort.unique(), key=cohort_title)
        if len(cohorts) < 2:
            continue
        part = part.assign(label=[f"{d} ({v})" if v else d for d, v in zip(part.display, part.variant_label)])
        table = part[part.complete].pivot_table(index="label", columns="cohort", values="mean", aggfunc="first")
        table = table.reindex(columns=cohorts)
        full = table.dropna()
        excluded = sorted(set(part.label) - set(full.index))
        if excluded:
            notes.append(f"ranks over cohorts ({protocol}, {backbone}): left out for lack of a complete "
                         f"cell in every cohort: {', '.join(excluded)}")
        if len(full) < 2:
            continue
        order = part.drop_duplicates("label").set_index("label").loc[full.index].sort_values(["order", "label"]).index
        full = full.loc[order]
        scores = {label: full.loc[label].tolist() for label in full.index}
        analysis = rank_analysis(scores, alpha=alpha, posthoc=posthoc,  # type: ignore[arg-type]
                                 higher_is_better=METRICS[metric].higher_is_better)
        out.append(RankResult(protocol, backbone, list(full.index), cohorts, full, analysis, excluded))
    return out


def write_cd_diagrams(results: list[RankResult], out: Path, metric: str) -> list[Path]:
    """Each analysis's critical-difference diagram as PNG and PDF in ``out``."""
    paths: list[Path] = []
    for r in results:
        post = r.analysis.posthoc
        cd = post.cd if post.method == "nemenyi" and post.cd > 0 else None
        title = (f"{METRICS[metric].label}: average rank over {len(r.cohorts)} cohorts — protocol {r.protocol}, "
                 f"backbone {r.backbone}")
        paths += plot_cd_diagram(r.analysis.avg_ranks, cd, post.cliques, out / r.stem, title)
    return paths
