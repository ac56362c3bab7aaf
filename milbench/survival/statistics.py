"""Statistics behind the leaderboards: pooled C-index with a seeded bootstrap CI, pooled log-rank with per-fold
median cutoffs, the corrected resampled t-test across folds (Nadeau & Bengio 2003) and Holm's adjustment.

Harrell's C here follows scikit-survival's definition exactly (a pair (i, j) is comparable when i died and j was
followed longer, or censored at the same time; risk ties within 1e-8 count one half), written as pair matrices so
that a bootstrap replicate is two weighted quadratic forms instead of a Python loop over patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lifelines.statistics import logrank_test
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.survival.metrics import TIED_TOL

BOOT_CHUNK = 256  # bootstrap replicates per matrix product (bounds memory at BOOT_CHUNK x n floats)


def concordance_matrices(time, event, risk) -> tuple[np.ndarray, np.ndarray]:
    """Comparable-pair matrix P and concordance-score matrix S (1, or 1/2 for tied risks) of Harrell's C."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    risk = np.asarray(risk, dtype=float)
    t_i, t_j = time[:, None], time[None, :]
    comparable = event[:, None] & ((t_j > t_i) | ((t_j == t_i) & ~event[None, :]))
    diff = risk[:, None] - risk[None, :]
    tied = np.abs(diff) <= TIED_TOL
    score = np.where(tied, 0.5, (diff > 0).astype(float)) * comparable
    return comparable.astype(float), score


def weighted_c_index(comparable: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Harrell's C of each row of ``weights`` [B, n] (patient multiplicities); NaN where no pair is comparable."""
    num = np.einsum("bi,bi->b", weights @ score, weights)
    den = np.einsum("bi,bi->b", weights @ comparable, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float
    low: float
    high: float
    n_boot: int
    seed: int


def bootstrap_c_index(time, event, risks: list[np.ndarray] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> BootstrapCI:
    """Pooled Harrell's C with a percentile bootstrap CI over patients (seeded).

    ``risks`` is one risk vector, or one per seed of the same patients: the statistic is then the mean over seeds
    of the pooled C, and a replicate resamples patients jointly across seeds.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    risks = [np.asarray(r, dtype=float) for r in (risks if isinstance(risks, list) else [risks])]
    n = len(time)
    if n == 0 or any(len(r) != n for r in risks) or event.shape != (n,):
        raise MilbenchError(f"bootstrap_c_index: need one time, event and risk per patient (got {n} times, "
                            f"{event.shape[0]} events, risks of length {[len(r) for r in risks]})")
    if not event.any():
        raise MilbenchError(f"bootstrap_c_index: no observed event among {n} patients; the C-index is undefined")
    mats = [concordance_matrices(time, event, r) for r in risks]
    ones = np.ones((1, n))
    estimate = float(np.mean([weighted_c_index(p, s, ones)[0] for p, s in mats]))
    if n_boot <= 0:
        return BootstrapCI(estimate, float("nan"), float("nan"), 0, seed)
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, BOOT_CHUNK):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(BOOT_CHUNK, n_boot - start)).astype(float)
        reps.append(np.mean([weighted_c_index(p, s, w) for p, s in mats], axis=0))
    values = np.concatenate(reps)
    alpha = (1.0 - level) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha]) if np.isfinite(values).any() else (np.nan, np.nan)
    return BootstrapCI(estimate, float(low), float(high), n_boot, seed)


def pooled_logrank_p(time, event, risk, cutoff) -> float:
    """Log-rank p between high risk (risk > the patient's own fold cutoff) and the rest, all folds pooled.

    ``cutoff`` is per patient: the median training-fold risk of the fold that scored the patient, so every fold's
    groups are cut as they would be at deployment. NaN when a group is empty.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    high = np.asarray(risk, dtype=float) > np.asarray(cutoff, dtype=float)
    if high.all() or not high.any():
        return float("nan")
    return float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)


@dataclass(frozen=True)
class PairedTest:
    mean_diff: float
    t: float
    p: float
    n_folds: int


def corrected_resampled_ttest(a, b, test_train_ratio: float) -> PairedTest:
    """Nadeau & Bengio's corrected resampled t-test of paired per-fold scores ``a`` vs ``b``.

    t = mean(d) / sqrt((1/J + n_test/n_train) * var(d)), J - 1 degrees of freedom, two-sided: the n_test/n_train
    term corrects the variance for the overlap of training sets between folds (plain paired t-tests are too
    liberal on cross-validation). NaN with fewer than two folds.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    j = len(d)
    if j < 2:
        return PairedTest(float(d.mean()) if j else float("nan"), float("nan"), float("nan"), j)
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var == 0:
        return PairedTest(mean, float("nan") if mean == 0 else float(np.sign(mean) * np.inf),
                          1.0 if mean == 0 else 0.0, j)
    t = mean / np.sqrt((1.0 / j + test_train_ratio) * var)
    return PairedTest(mean, float(t), float(2 * sps.t.sf(abs(t), df=j - 1)), j)


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels); NaN entries stay NaN and are not counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out
