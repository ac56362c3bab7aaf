"""Ranks across cohorts (Demsar 2006): average ranks, the Friedman test with the Iman-Davenport F, and post-hoc
tests: Nemenyi's critical difference, or pairwise Wilcoxon signed-rank tests with Holm's adjustment (Benavoli et al.
2016 recommend the latter: its verdict on a pair does not depend on which other models are in the table).

Input everywhere: ``scores`` maps each model to one score per cohort, aligned across models (cohort c is position c).
A cohort where any model has no score is left out of every test (the tests need complete blocks); the result says
which. Rank 1 is the best model (``higher_is_better`` picks the direction); ties get the average of their ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import numpy as np
from scipy import stats as sps

from milbench import MilbenchError
from milbench.survival.comparisons import adjust

PostHocMethod = Literal["nemenyi", "wilcoxon-holm"]
SMALL_SAMPLE_NOTE = ("the chi-square approximation of the Friedman statistic is rough below about 10 cohorts and 5 "
                     "models (Demsar 2006); read the p-value as indicative")


@dataclass(frozen=True)
class RankTable:
    """Per-cohort ranks [n_cohorts, n_models] (1 = best) of the complete cohorts, and which cohorts were left out."""

    models: tuple[str, ...]
    ranks: np.ndarray
    scores: np.ndarray  # the complete cohorts' scores [n_cohorts, n_models]
    kept: tuple[int, ...]  # positions of the cohorts used
    dropped: tuple[int, ...]  # positions of cohorts left out (a model had no score)


def rank_table(scores: Mapping[str, Sequence[float]], higher_is_better: bool = True) -> RankTable:
    """Rank the models within each cohort (ties averaged, scipy.stats.rankdata), on cohorts where all have a score."""
    models = tuple(scores)
    if len(models) == 0:
        raise MilbenchError("rank_table: no models given")
    lengths = {m: len(scores[m]) for m in models}
    if len(set(lengths.values())) != 1:
        raise MilbenchError(f"rank_table: every model needs one score per cohort, aligned; got lengths {lengths}")
    s = np.array([np.asarray(scores[m], dtype=float) for m in models], dtype=float).T.reshape(-1, len(models))
    complete = np.isfinite(s).all(axis=1)
    kept, dropped = np.flatnonzero(complete), np.flatnonzero(~complete)
    ranks = sps.rankdata(-s[kept] if higher_is_better else s[kept], axis=1, method="average")
    return RankTable(models, ranks.reshape(len(kept), len(models)), s[kept], tuple(int(i) for i in kept),
                     tuple(int(i) for i in dropped))


def average_ranks(scores: Mapping[str, Sequence[float]], higher_is_better: bool = True) -> dict[str, float]:
    """Each model's rank averaged over the complete cohorts (1 = best); NaN for all when no cohort is complete."""
    table = rank_table(scores, higher_is_better)
    if table.ranks.shape[0] == 0:
        return {m: float("nan") for m in table.models}
    return {m: float(r) for m, r in zip(table.models, table.ranks.mean(axis=0), strict=True)}


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman's chi-square (tie-corrected, as scipy) and the Iman-Davenport F; ``reason`` says why NaN."""

    statistic: float
    p: float
    iman_davenport: float
    p_iman_davenport: float
    df: int  # chi-square df = k - 1; the F has (k - 1, (k - 1)(N - 1))
    n_cohorts: int
    n_models: int
    avg_ranks: dict[str, float]
    dropped: tuple[int, ...] = ()
    reason: str = ""
    note: str = ""


def _friedman_from_ranks(ranks: np.ndarray) -> tuple[float, str]:
    """Tie-corrected Friedman chi-square from a rank table [N, k] (scipy.stats.friedmanchisquare's formula)."""
    n, k = ranks.shape
    ties = 0.0
    for row in ranks:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts * (counts ** 2 - 1)).sum())
    correction = 1.0 - ties / (k * (k * k - 1) * n)
    if correction <= 0:
        return float("nan"), "every cohort ties all models: ranks carry no information"
    ssbn = float((ranks.sum(axis=0) ** 2).sum())
    return (12.0 / (k * n * (k + 1)) * ssbn - 3 * n * (k + 1)) / correction, ""


def friedman_test(scores: Mapping[str, Sequence[float]], higher_is_better: bool = True) -> FriedmanResult:
    """Friedman test that all models rank alike over cohorts, chi2 = 12N/(k(k+1)) [sum_j R_j^2 - k(k+1)^2/4] (tie
    corrected), and the less conservative Iman-Davenport F = (N-1) chi2 / (N(k-1) - chi2)."""
    table = rank_table(scores, higher_is_better)
    n, k = table.ranks.shape
    avg = average_ranks(scores, higher_is_better)
    nan = float("nan")
    if k < 2:
        return FriedmanResult(nan, nan, nan, nan, 0, n, k, avg, table.dropped, "one model: nothing to rank")
    if n < 2:
        return FriedmanResult(nan, nan, nan, nan, k - 1, n, k, avg, table.dropped,
                              f"{n} complete cohort(s): ranks over cohorts need at least two")
    chi2, reason = _friedman_from_ranks(table.ranks)
    if reason:
        return FriedmanResult(nan, nan, nan, nan, k - 1, n, k, avg, table.dropped, reason)
    p = float(sps.chi2.sf(chi2, k - 1))
    f, p_f = iman_davenport(chi2, n, k)
    note = SMALL_SAMPLE_NOTE if n < 10 or k < 5 else ""
    return FriedmanResult(float(chi2), p, float(f), p_f, k - 1, n, k, avg, table.dropped, note=note)


def iman_davenport(chi2: float, n_cohorts: int, n_models: int) -> tuple[float, float]:
    """Iman-Davenport F = (N-1) chi2 / (N(k-1) - chi2) on (k-1, (k-1)(N-1)) df and its p; F is infinite (p = 0)
    when every cohort ranks the models the same way."""
    n, k = n_cohorts, n_models
    denom = n * (k - 1) - chi2
    if denom <= 0:
        return float("inf"), 0.0
    f = (n - 1) * chi2 / denom
    return float(f), float(sps.f.sf(f, k - 1, (k - 1) * (n - 1)))


def nemenyi_q(n_models: int, alpha: float = 0.05) -> float:
    """Nemenyi's q_alpha: the studentized range quantile (k groups, infinite df) over sqrt(2) (Demsar's table 5a)."""
    if n_models < 2 or not 0 < alpha < 1:
        raise MilbenchError(f"nemenyi_q: need at least 2 models and 0 < alpha < 1, got {n_models}, {alpha}")
    return float(sps.studentized_range.ppf(1 - alpha, n_models, np.inf) / np.sqrt(2))


def nemenyi_cd(n_models: int, n_cohorts: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference CD = q_alpha sqrt(k(k+1) / (6N)): two average ranks at least CD apart differ."""
    if n_cohorts < 1:
        raise MilbenchError(f"nemenyi_cd: need at least one cohort, got {n_cohorts}")
    return nemenyi_q(n_models, alpha) * float(np.sqrt(n_models * (n_models + 1) / (6.0 * n_cohorts)))


def cliques(avg_ranks: Mapping[str, float], differ: Callable[[str, str], bool]) -> tuple[tuple[str, ...], ...]:
    """Maximal runs of models, in average-rank order, with no pair inside that differs (the bars of a CD diagram);
    runs of one model are not drawn."""
    order = sorted((m for m in avg_ranks if np.isfinite(avg_ranks[m])), key=lambda m: (avg_ranks[m], str(m)))
    runs: list[tuple[int, int]] = []
    for i in range(len(order)):
        j = i
        while j + 1 < len(order) and not any(differ(order[x], order[j + 1]) for x in range(i, j + 1)):
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in runs):
            runs.append((i, j))
    return tuple(tuple(order[i:j + 1]) for i, j in runs)


@dataclass(frozen=True)
class PostHoc:
    """Pairwise post-hoc results: raw and adjusted p per pair, the CD (Nemenyi only) and the cliques to draw."""

    method: str
    alpha: float
    avg_ranks: dict[str, float]
    cd: float  # Nemenyi critical difference; NaN for Wilcoxon-Holm
    pvalues: dict[tuple[str, str], float]
    adjusted: dict[tuple[str, str], float]
    cliques: tuple[tuple[str, ...], ...]
    n_cohorts: int
    dropped: tuple[int, ...] = ()
    reason: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def differ(self, a: str, b: str) -> bool:
        """Whether the post-hoc test separates ``a`` and ``b`` at ``alpha`` (after adjustment)."""
        p = self.adjusted.get((a, b), self.adjusted.get((b, a), float("nan")))
        return bool(np.isfinite(p) and p < self.alpha)


def nemenyi(scores: Mapping[str, Sequence[float]], alpha: float = 0.05, higher_is_better: bool = True) -> PostHoc:
    """Nemenyi post-hoc test: a pair differs when its average ranks are at least CD apart; the pairwise p is the
    studentized-range tail of |R_a - R_b| sqrt(2) / sqrt(k(k+1)/(6N)) (already family-wise)."""
    table = rank_table(scores, higher_is_better)
    n, k = table.ranks.shape
    avg = average_ranks(scores, higher_is_better)
    pairs = list(combinations(table.models, 2))
    if k < 2 or n < 1:
        nan = {pair: float("nan") for pair in pairs}
        return PostHoc("nemenyi", alpha, avg, float("nan"), nan, dict(nan), (), n, table.dropped,
                       "fewer than two models or no complete cohort")
    cd = nemenyi_cd(k, n, alpha)
    se = np.sqrt(k * (k + 1) / (6.0 * n))
    p = {(a, b): float(sps.studentized_range.sf(abs(avg[a] - avg[b]) * np.sqrt(2) / se, k, np.inf))
         for a, b in pairs}
    # The rank gap rule |R_a - R_b| >= CD is the test; the p-values are its continuous form (p < alpha <=> gap > CD).
    groups = cliques(avg, lambda a, b: abs(avg[a] - avg[b]) >= cd)
    return PostHoc("nemenyi", alpha, avg, cd, p, dict(p), groups, n, table.dropped)


def wilcoxon_holm(scores: Mapping[str, Sequence[float]], alpha: float = 0.05, higher_is_better: bool = True,
                  method: str = "holm") -> PostHoc:
    """Pairwise Wilcoxon signed-rank tests over cohorts (scipy.stats.wilcoxon, exact for small N), adjusted by Holm
    across all k(k-1)/2 pairs; pairs with identical scores on every cohort get p = 1."""
    table = rank_table(scores, higher_is_better)
    n, k = table.ranks.shape
    avg = average_ranks(scores, higher_is_better)
    pairs = list(combinations(table.models, 2))
    raw: dict[tuple[str, str], float] = {}
    notes = []
    for a, b in pairs:
        x, y = table.scores[:, table.models.index(a)], table.scores[:, table.models.index(b)]
        if n == 0:
            raw[(a, b)] = float("nan")
        elif np.all(x == y):
            raw[(a, b)] = 1.0
            notes.append(f"{a} and {b} score the same on every cohort (p = 1)")
        else:
            raw[(a, b)] = float(sps.wilcoxon(x, y).pvalue)
    if n and 2 / 2 ** n >= alpha:
        notes.append(f"{n} cohorts: the smallest two-sided exact Wilcoxon p is {2 / 2 ** n:.3g} >= alpha = {alpha}, "
                     "so no pair can be told apart")
    adj_values = adjust([raw[pair] for pair in pairs], method=method) if pairs else []
    adjusted = {pair: float(v) for pair, v in zip(pairs, adj_values, strict=True)}
    post = PostHoc(f"wilcoxon-{method}", alpha, avg, float("nan"), raw, adjusted, (), n, table.dropped,
                   "" if n else "no complete cohort", tuple(notes))
    return PostHoc(post.method, alpha, avg, float("nan"), raw, adjusted, cliques(avg, post.differ), n,
                   table.dropped, post.reason, post.notes)


@dataclass(frozen=True)
class RankAnalysis:
    """Average ranks, the Friedman test and one post-hoc test: everything a critical-difference diagram shows."""

    friedman: FriedmanResult
    posthoc: PostHoc

    @property
    def avg_ranks(self) -> dict[str, float]:
        """Average rank per model (1 = best)."""
        return self.friedman.avg_ranks


def rank_analysis(scores: Mapping[str, Sequence[float]], alpha: float = 0.05, posthoc: PostHocMethod = "nemenyi",
                  higher_is_better: bool = True) -> RankAnalysis:
    """Friedman test plus the chosen post-hoc (Nemenyi CD or Wilcoxon-Holm) on per-cohort scores."""
    if posthoc not in ("nemenyi", "wilcoxon-holm"):
        raise MilbenchError(f"rank_analysis: post-hoc must be 'nemenyi' or 'wilcoxon-holm', got {posthoc!r}")
    test = nemenyi if posthoc == "nemenyi" else wilcoxon_holm
    return RankAnalysis(friedman_test(scores, higher_is_better), test(scores, alpha, higher_is_better))
