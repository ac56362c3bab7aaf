"""Pooled and paired statistics over held-out predictions: within-fold pooled Harrell's C with a stratified bootstrap,
paired bootstrap of a difference in C, the corrected resampled t-test over seeds, seed and fold variance apart,
family-wise adjustment, and best / second-best marks that only mark what the paired test can tell apart.

Harrell's C follows scikit-survival's definition exactly: a pair (i, j) is comparable when i died and j was followed
longer, or was censored at the same time; risks tied within ``TIED_TOL`` count one half. The statistics are written
as pair matrices per group (a block-diagonal pair matrix), so a bootstrap replicate is a weighted quadratic form per
block, computed for ``BOOT_CHUNK`` replicates at once, instead of a Python loop over patients.

Pairs. A *within-fold* pooled C counts only pairs of patients held out in the same group (fold, or fold x seed), so
every pair is ranked by one fitted model; the *cross-fold* pooled C counts every pair of the pooled out-of-fold
predictions, comparing risks from different fold models (about 80% of pairs at 5 folds): kept as a labelled option.

Longer than 400 lines because the pooled C, its bootstrap, the paired bootstrap and the marks share one set of
pair-matrix and replicate-weight helpers; split, each module would import the others' private helpers.

Seeds. ``risks`` may be one risk vector or one per seed of the same patients (same folds). Comparable pairs do not
depend on the risk, so the pair-weighted pool over seeds equals the mean over seeds of each seed's C; a bootstrap
replicate resamples patients jointly (the same weights for every seed, and for both models of a paired comparison).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.survival.metrics import TIED_TOL

BOOT_CHUNK = 256  # bootstrap replicates per matrix product: bounds memory at BOOT_CHUNK x n floats per block
PairsKind = Literal["within-fold", "cross-fold"]
Mark = Literal["best", "second", "tied-best", "tied-second"]
PAIRS_KINDS = ("within-fold", "cross-fold")
Risks = ArrayLike | Sequence[ArrayLike]  # one risk per patient, or one such vector per seed (same patients)
Groups = Sequence[Hashable] | np.ndarray  # one label per patient: fold, or (fold, seed)


# ----------------------------------------------------------------------------------------------- inputs and blocks


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's 'mean of empty slice' warnings: a fold where every seed failed becomes NaN, as intended."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _survival_inputs(name: str, time: ArrayLike, event: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated times and boolean event flags (1 = death observed), one per patient; bad input raises."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float)
    if time.ndim != 1 or event.shape != time.shape:
        raise MilbenchError(f"{name}: need one time and one event flag per patient, got shapes {time.shape} and "
                            f"{event.shape}")
    if time.size == 0:
        raise MilbenchError(f"{name}: no patients given")
    if not (np.isfinite(time).all() and np.isfinite(event).all()):
        raise MilbenchError(f"{name}: NaN or infinite times or event flags; check the cohort table")
    if not np.isin(event, (0.0, 1.0)).all():
        raise MilbenchError(f"{name}: event flags must be 0 or 1 (1 = death observed), got {np.unique(event)}")
    return time, event.astype(bool)


def _risk_matrix(name: str, risks: Risks, n: int) -> np.ndarray:
    """Risks as [n_seeds, n]: one vector, a list of per-seed vectors, or a 2-D array; NaN or wrong length raises."""
    if isinstance(risks, (list, tuple)) and len(risks) > 0 and np.ndim(risks[0]) >= 1:
        seeds = list(risks)
    else:
        arr = np.asarray(risks, dtype=float)
        seeds = [arr] if arr.ndim == 1 else list(arr)
    try:
        r = np.asarray([np.asarray(x, dtype=float).reshape(-1) for x in seeds], dtype=float)
    except ValueError:
        raise MilbenchError(f"{name}: per-seed risks have different lengths "
                            f"{[np.size(x) for x in seeds]}; every seed must score the same {n} patients") from None
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] != n:
        raise MilbenchError(f"{name}: need one risk per patient ({n}) for each seed, got risks of shape {r.shape}")
    if not np.isfinite(r).all():
        raise MilbenchError(f"{name}: NaN or infinite risks; check the model output")
    return r


def _plain(label: Any) -> Any:
    """A numpy scalar label as the Python value it holds (so labels print and compare as given)."""
    return label.item() if isinstance(label, np.generic) else label


def _group_codes(name: str, group: Groups | None, n: int) -> tuple[np.ndarray, list[Hashable]]:
    """Integer code per patient and the labels they stand for; labels may be scalars or tuples such as (fold, seed)."""
    if group is None:
        return np.zeros(n, dtype=np.int64), [None]
    labels = [tuple(_plain(x) for x in g) if isinstance(g, (tuple, list, np.ndarray)) else _plain(g) for g in group]
    if len(labels) != n:
        raise MilbenchError(f"{name}: need one group label (fold, or fold and seed) per patient ({n}), "
                            f"got {len(labels)}")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in labels), dtype=np.int64, count=n)
    try:
        order = sorted(index, key=lambda g: (str(type(g)), g))
    except TypeError:
        order = list(index)
    remap = np.empty(len(index), dtype=np.int64)
    for new, label in enumerate(order):
        remap[index[label]] = new
    return remap[codes], order


def _pair_matrices(time: np.ndarray, event: np.ndarray, risks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Comparable-pair matrix P [n, n] and the seed-mean concordance score matrix S (1, or 1/2 for tied risks)."""
    t_i, t_j = time[:, None], time[None, :]
    comparable = event[:, None] & ((t_j > t_i) | ((t_j == t_i) & ~event[None, :]))
    score = np.zeros(comparable.shape)
    for r in risks:
        diff = r[:, None] - r[None, :]
        score += np.where(np.abs(diff) <= TIED_TOL, 0.5, (diff > 0).astype(float))
    return comparable.astype(float), score * comparable / len(risks)


@dataclass(frozen=True)
class _Blocks:
    """Pair matrices per block: one block per group (within-fold) or one block of all patients (cross-fold)."""

    index: list[np.ndarray]  # patient indices of each block
    comparable: list[np.ndarray]  # P per block
    scores: list[list[np.ndarray]]  # per model, S per block (mean over that model's seeds)


def _blocks(time: np.ndarray, event: np.ndarray, risk_sets: list[np.ndarray], codes: np.ndarray,
            pairs: PairsKind) -> _Blocks:
    """Split patients into pair blocks and build P and each model's S on each block."""
    if pairs not in PAIRS_KINDS:
        raise MilbenchError(f"pairs must be one of {PAIRS_KINDS}, got {pairs!r}")
    if pairs == "cross-fold":
        index = [np.arange(len(time))]
    else:
        index = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    comparable, scores = [], [[] for _ in risk_sets]
    for idx in index:
        for m, risks in enumerate(risk_sets):
            p, s = _pair_matrices(time[idx], event[idx], risks[:, idx])
            scores[m].append(s)
        comparable.append(p)
    return _Blocks(index, comparable, scores)


def _quadratic(blocks: _Blocks, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted comparable-pair counts [B] and concordance sums [n_models, B] for patient weights ``w`` [B, n]."""
    den = np.zeros(len(w))
    num = np.zeros((len(blocks.scores), len(w)))
    for b, idx in enumerate(blocks.index):
        wb = w[:, idx]
        den += np.einsum("bi,bi->b", wb @ blocks.comparable[b], wb)
        for m, per_block in enumerate(blocks.scores):
            num[m] += np.einsum("bi,bi->b", wb @ per_block[b], wb)
    return den, num


def _stratified_weights(rng: np.random.Generator, strata: list[np.ndarray], n: int, size: int) -> np.ndarray:
    """Bootstrap multiplicities [size, n]: each stratum resampled with replacement to its own size."""
    w = np.zeros((size, n))
    for idx in strata:
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=size)
    return w


def _replicates(blocks: _Blocks, strata: list[np.ndarray], n: int, n_boot: int, seed: int) -> np.ndarray:
    """Each model's C over ``n_boot`` stratified bootstrap replicates [n_models, n_boot]; NaN where no pair."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, BOOT_CHUNK):
        den, num = _quadratic(blocks, _stratified_weights(rng, strata, n, min(BOOT_CHUNK, n_boot - start)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    return np.concatenate(out, axis=1) if out else np.empty((len(blocks.scores), 0))


def _undefined_reason(event: np.ndarray, n_pairs: float, pairs: PairsKind) -> str:
    """Why a pooled C is undefined on these patients, or "" when it is defined."""
    if len(event) < 2:
        return f"{len(event)} patient(s): Harrell's C needs at least two"
    if not event.any():
        return f"no observed event among {len(event)} patients"
    if n_pairs == 0:
        where = "inside any group" if pairs == "within-fold" else "among the patients"
        return f"no comparable pair {where} (no death followed by a longer follow-up)"
    return ""


def _prepare(name: str, time: ArrayLike, event: ArrayLike, risks_by_model: Sequence[Risks], group: Groups | None,
             pairs: PairsKind) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Hashable], list[np.ndarray], _Blocks]:
    """Validated arrays, group codes and labels, per-model risk matrices, and the pair blocks."""
    time, event = _survival_inputs(name, time, event)
    risk_sets = [_risk_matrix(name, r, len(time)) for r in risks_by_model]
    codes, labels = _group_codes(name, group, len(time))
    return time, event, codes, labels, risk_sets, _blocks(time, event, risk_sets, codes, pairs)


# -------------------------------------------------------------------------------------------------------- pooled C


@dataclass(frozen=True)
class PooledC:
    """A pooled Harrell's C and what it counts; ``reason`` says why ``estimate`` is NaN (empty when defined)."""

    estimate: float
    n_pairs: int  # comparable pairs counted (per seed: pairs do not depend on the risk)
    n_patients: int
    n_events: int
    n_groups: int
    pairs: str  # "within-fold" or "cross-fold"
    per_group: dict[Any, tuple[float, int]] = field(default_factory=dict)  # label -> (C, comparable pairs)
    reason: str = ""


def _pooled(name: str, time: ArrayLike, event: ArrayLike, risks: Risks, group: Groups | None,
            pairs: PairsKind) -> PooledC:
    """Point estimate of the pooled C (mean over seeds) with per-group Cs, on the given pair kind."""
    time, event, codes, labels, risk_sets, blocks = _prepare(name, time, event, [risks], group, pairs)
    per_group: dict[Any, tuple[float, int]] = {}
    den_total = num_total = 0.0
    for b in range(len(blocks.index)):
        den = float(blocks.comparable[b].sum())
        num = float(blocks.scores[0][b].sum())
        den_total, num_total = den_total + den, num_total + num
        if pairs == "within-fold":
            per_group[labels[b]] = (num / den if den > 0 else float("nan"), int(round(den)))
    reason = _undefined_reason(event, den_total, pairs)
    return PooledC(num_total / den_total if not reason else float("nan"), int(round(den_total)), len(time),
                   int(event.sum()), len(labels), pairs, per_group, reason)


def within_fold_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike, group: Groups) -> PooledC:
    """Pooled Harrell's C counting only pairs held out in the same group (fold, or (fold, seed)): each pair is ranked
    by one fitted model. Equals the comparable-pair-weighted mean of the per-group Cs."""
    return _pooled("within_fold_c", time, event, risk, group, "within-fold")


def cross_fold_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> PooledC:
    """Harrell's C over every pair of pooled out-of-fold predictions, mixing fold models' risk scales (labelled
    option, kept to compare with published pooled figures)."""
    return _pooled("cross_fold_c", time, event, risk, None, "cross-fold")


@dataclass(frozen=True)
class BootstrapC:
    """A pooled C and its percentile bootstrap interval: both about the same statistic (same pairs, same seeds)."""

    estimate: float
    low: float
    high: float
    se: float  # sd of the bootstrap replicates
    n_pairs: int
    n_patients: int
    n_events: int
    n_groups: int
    n_seeds: int
    n_boot: int
    n_valid: int  # replicates with at least one comparable pair
    seed: int
    level: float
    pairs: str
    reason: str = ""

    @property
    def inside(self) -> bool:
        """Whether the estimate lies inside its own interval."""
        return bool(self.low <= self.estimate <= self.high)


def _interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """Percentile interval and sd of finite replicate values; NaN when there are none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    alpha = (1.0 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def _check_boot(name: str, n_boot: int, level: float) -> None:
    """Reject a negative replicate count or a level outside (0, 1)."""
    if n_boot < 0 or not 0 < level < 1:
        raise MilbenchError(f"{name}: need n_boot >= 0 and 0 < level < 1, got n_boot={n_boot}, level={level}")


def bootstrap_c(time: ArrayLike, event: ArrayLike, risks: Risks, group: Groups | None = None, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95, pairs: PairsKind = "within-fold") -> BootstrapC:
    """Pooled Harrell's C (mean over seeds) with a seeded percentile bootstrap interval, patients resampled within
    groups (stratified), jointly across seeds; ``pairs`` picks within-fold or cross-fold pairs."""
    _check_boot("bootstrap_c", n_boot, level)
    time, event, codes, labels, risk_sets, blocks = _prepare("bootstrap_c", time, event, [risks], group, pairs)
    n = len(time)
    den, num = _quadratic(blocks, np.ones((1, n)))
    reason = _undefined_reason(event, den[0], pairs)
    estimate = float(num[0, 0] / den[0]) if not reason else float("nan")
    low = high = se = float("nan")
    n_valid = 0
    if not reason and n_boot > 0:
        strata = [np.flatnonzero(codes == g) for g in range(len(labels))]
        values = _replicates(blocks, strata, n, n_boot, seed)[0]
        n_valid = int(np.isfinite(values).sum())
        low, high, se = _interval(values, level)
    return BootstrapC(estimate, low, high, se, int(round(den[0])), n, int(event.sum()), len(labels),
                      len(risk_sets[0]), n_boot, n_valid, seed, level, pairs, reason)


def bootstrap_within_fold_c(time: ArrayLike, event: ArrayLike, risks: Risks, group: Groups, n_boot: int = 1000,
                            seed: int = 0, level: float = 0.95) -> BootstrapC:
    """Within-fold pooled C with its stratified bootstrap interval (see ``bootstrap_c``)."""
    return bootstrap_c(time, event, risks, group, n_boot=n_boot, seed=seed, level=level, pairs="within-fold")


def bootstrap_cross_fold_c(time: ArrayLike, event: ArrayLike, risks: Risks, group: Groups | None = None,
                           n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95) -> BootstrapC:
    """Cross-fold pooled C (every pair, labelled option) with its bootstrap interval, stratified by ``group``."""
    return bootstrap_c(time, event, risks, group, n_boot=n_boot, seed=seed, level=level, pairs="cross-fold")


# ------------------------------------------------------------------------------------------- paired comparisons

PAIRED_BOOTSTRAP_METHOD = ("paired bootstrap of the difference in C (patients resampled within folds, the same "
                           "replicate for both models); percentile CI; two-sided p = min(1, 2 min((1 + #{d* <= 0}) / "
                           "(B + 1), (1 + #{d* >= 0}) / (B + 1)))")


@dataclass(frozen=True)
class PairedBootstrap:
    """C(a) - C(b) on the same held-out patients with a paired bootstrap CI and two-sided p (``method`` says how)."""

    model_a: str
    model_b: str
    diff: float  # C(a) - C(b), each the pooled C (mean over that model's seeds) on the original patients
    low: float
    high: float
    p: float
    c_a: float
    c_b: float
    se: float
    n_pairs: int
    n_boot: int
    n_valid: int
    seed: int
    level: float
    pairs: str
    method: str = PAIRED_BOOTSTRAP_METHOD
    reason: str = ""


def _bootstrap_p(d: np.ndarray) -> float:
    """Two-sided bootstrap p of a difference: twice the smaller tail mass at zero, with the +1 correction."""
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    below = (1 + np.count_nonzero(d <= 0)) / (d.size + 1)
    above = (1 + np.count_nonzero(d >= 0)) / (d.size + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_bootstrap_table(time: ArrayLike, event: ArrayLike, risks: Mapping[str, Risks], group: Groups | None,
                           comparisons: Sequence[tuple[str, str]]
                           | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                           pairs: PairsKind = "within-fold") -> list[PairedBootstrap]:
    """Paired bootstrap of C(a) - C(b) for each (a, b) in ``comparisons`` (default: every pair in order), all from
    one set of replicates: risks per model (one vector or one per seed) on the same patients and folds."""
    _check_boot("paired_bootstrap", n_boot, level)
    names = list(risks)
    comparisons = list(comparisons) if comparisons is not None else [
        (a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    unknown = sorted({m for c in comparisons for m in c} - set(names))
    if unknown:
        raise MilbenchError(f"paired_bootstrap: no risks given for {unknown}; models given: {names}")
    time, event, codes, labels, _, blocks = _prepare("paired_bootstrap", time, event, [risks[m] for m in names],
                                                     group, pairs)
    n = len(time)
    den, num = _quadratic(blocks, np.ones((1, n)))
    reason = _undefined_reason(event, den[0], pairs)
    c = num[:, 0] / den[0] if not reason else np.full(len(names), np.nan)
    reps = np.full((len(names), 0), np.nan)
    if not reason and n_boot > 0:
        strata = [np.flatnonzero(codes == g) for g in range(len(labels))]
        reps = _replicates(blocks, strata, n, n_boot, seed)
    out = []
    for a, b in comparisons:
        ia, ib = names.index(a), names.index(b)
        low, high, se, p, n_valid = paired_replicates(reps, ia, ib, level)
        out.append(PairedBootstrap(a, b, float(c[ia] - c[ib]), low, high, p, float(c[ia]), float(c[ib]), se,
                                   int(round(den[0])), n_boot, n_valid, seed, level, pairs, reason=reason))
    return out


def paired_replicates(reps: np.ndarray, ia: int, ib: int, level: float) -> tuple[float, float, float, float, int]:
    """(low, high, se, p, valid replicates) of the difference of rows ``ia`` and ``ib`` of bootstrap replicates drawn
    with the same weights for both models; NaN (0 valid) without replicates."""
    if not reps.shape[1]:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    d = reps[ia] - reps[ib]  # same replicate weights and same pairs: the denominators cancel exactly
    low, high, se = _interval(d, level)
    return low, high, se, _bootstrap_p(d), int(np.isfinite(d).sum())


def paired_bootstrap_c(time: ArrayLike, event: ArrayLike, risk_a: Risks, risk_b: Risks, group: Groups | None,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                       pairs: PairsKind = "within-fold") -> PairedBootstrap:
    """Paired bootstrap of C(a) - C(b) on the same held-out patients, resampled within folds (one vector or one
    per seed for each model); a model against itself gives a difference of 0 and p = 1."""
    return paired_bootstrap_table(time, event, {"a": risk_a, "b": risk_b}, group, [("a", "b")], n_boot=n_boot,
                                  seed=seed, level=level, pairs=pairs)[0]


CORRECTED_TTEST_METHOD = ("corrected resampled t-test (Nadeau & Bengio 2003): t = mean(d) / sqrt((1/J + n_test/n_train)"
                          " var(d)) on J per-fold differences (per-fold means over seeds), J - 1 df, two-sided")


@dataclass(frozen=True)
class CorrectedTTest:
    """Nadeau-Bengio corrected resampled t-test of paired per-fold scores; ``reason`` explains NaN or a degenerate
    case."""

    mean_diff: float
    t: float
    p: float
    df: int
    n_folds: int
    n_seeds: int
    test_train_ratio: float
    method: str = CORRECTED_TTEST_METHOD
    reason: str = ""


def corrected_resampled_ttest(a: ArrayLike, b: ArrayLike, test_train_ratio: float) -> CorrectedTTest:
    """Corrected resampled t-test of per-fold scores ``a`` vs ``b``: the n_test/n_train term accounts for training
    sets shared between folds (a plain paired t-test is too liberal on cross-validation)."""
    a, b = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise MilbenchError(f"corrected_resampled_ttest: need paired per-fold scores, got {a.size} and {b.size}")
    if not np.isfinite(test_train_ratio) or test_train_ratio < 0:
        raise MilbenchError(f"corrected_resampled_ttest: test/train ratio must be finite and >= 0, "
                            f"got {test_train_ratio}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    j = int(d.size)
    dropped = f"; {int((~ok).sum())} fold(s) without both scores left out" if (~ok).any() else ""
    if j < 2:
        return CorrectedTTest(float(d.mean()) if j else float("nan"), float("nan"), float("nan"), max(j - 1, 0), j,
                              1, test_train_ratio, reason=f"{j} paired fold(s): the test needs at least two{dropped}")
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if var == 0:
        if mean == 0:
            return CorrectedTTest(0.0, float("nan"), 1.0, j - 1, j, 1, test_train_ratio,
                                  reason=f"identical scores in every fold: no difference (p = 1){dropped}")
        return CorrectedTTest(mean, float(np.sign(mean) * np.inf), 0.0, j - 1, j, 1, test_train_ratio,
                              reason=f"the same nonzero difference in every fold (p = 0){dropped}")
    t = mean / np.sqrt((1.0 / j + test_train_ratio) * var)
    return CorrectedTTest(mean, float(t), float(2 * sps.t.sf(abs(t), df=j - 1)), j - 1, j, 1, test_train_ratio,
                          reason=dropped.lstrip("; "))


def _seed_fold(name: str, scores: ArrayLike) -> np.ndarray:
    """Scores as a [seed, fold] float matrix; a 1-D input is one seed."""
    s = np.asarray(scores, dtype=float)
    s = s[None, :] if s.ndim == 1 else s
    if s.ndim != 2 or s.size == 0:
        raise MilbenchError(f"{name}: need scores[seed, fold], got shape {np.shape(scores)}")
    return s


def corrected_ttest_over_seeds(scores_a: ArrayLike, scores_b: ArrayLike, test_train_ratio: float) -> CorrectedTTest:
    """One corrected resampled t-test over all seeds: average each fold over seeds (same folds, different
    initialisations), then test the J per-fold differences; replaces a median of per-seed p-values."""
    a, b = _seed_fold("corrected_ttest_over_seeds", scores_a), _seed_fold("corrected_ttest_over_seeds", scores_b)
    if a.shape[1] != b.shape[1]:
        raise MilbenchError(f"corrected_ttest_over_seeds: models scored on {a.shape[1]} and {b.shape[1]} folds; "
                            "pair them on the same folds")
    with np.errstate(invalid="ignore"), _quiet():
        fa, fb = np.nanmean(a, axis=0), np.nanmean(b, axis=0)
    res = corrected_resampled_ttest(fa, fb, test_train_ratio)
    return CorrectedTTest(res.mean_diff, res.t, res.p, res.df, res.n_folds, max(a.shape[0], b.shape[0]),
                          test_train_ratio, reason=res.reason)


@dataclass(frozen=True)
class SeedFoldVariance:
    """Fold and seed variability of scores[seed, fold], kept apart (see ``seed_fold_variance``)."""

    mean: float  # grand mean
    fold_sd: float  # sd over folds of the per-fold means over seeds
    seed_sd: float  # sd over seeds of the per-seed means over folds (how the headline moves with the seed)
    seed_sd_within_fold: float  # pooled sd over seeds within a fold (how one fold's score moves with the seed)
    var_fold: float  # random-effects variance components of the two-way layout without replication
    var_seed: float
    var_residual: float  # seed x fold interaction and noise
    n_seeds: int
    n_folds: int
    reason: str = ""


def seed_fold_variance(scores: ArrayLike) -> SeedFoldVariance:
    """Split the spread of scores[seed, fold] into fold and seed parts: simple sds of marginal means and a two-way
    random-effects decomposition (ANOVA estimators, negative components clipped at 0)."""
    s = _seed_fold("seed_fold_variance", scores)
    n_seeds, n_folds = s.shape
    notes = []
    with np.errstate(invalid="ignore"), _quiet():
        fold_means, seed_means = np.nanmean(s, axis=0), np.nanmean(s, axis=1)
        mean = float(np.nanmean(s))
        fm, sm = fold_means[np.isfinite(fold_means)], seed_means[np.isfinite(seed_means)]
        fold_sd = float(fm.std(ddof=1)) if fm.size > 1 else float("nan")
        seed_sd = float(sm.std(ddof=1)) if sm.size > 1 else float("nan")
        counts = np.isfinite(s).sum(axis=0)
        within = np.nanvar(s, axis=0, ddof=1)
        keep = counts > 1
        seed_within = (float(np.sqrt(np.sum(within[keep] * (counts[keep] - 1)) / np.sum(counts[keep] - 1)))
                       if keep.any() else float("nan"))
    if fm.size < 2:
        notes.append(f"{fm.size} fold(s) with a score: fold sd needs two")
    if sm.size < 2:
        notes.append(f"{sm.size} seed(s) with a score: seed sd needs two")
    var_fold = var_seed = var_res = float("nan")
    if not np.isfinite(s).all():
        notes.append("missing seed x fold scores: no variance components (they need the complete table)")
    elif n_seeds > 1 and n_folds > 1:
        resid = s - seed_means[:, None] - fold_means[None, :] + mean
        ms_res = float((resid ** 2).sum() / ((n_seeds - 1) * (n_folds - 1)))
        ms_fold = float(n_seeds * ((fold_means - mean) ** 2).sum() / (n_folds - 1))
        ms_seed = float(n_folds * ((seed_means - mean) ** 2).sum() / (n_seeds - 1))
        var_fold = max(0.0, (ms_fold - ms_res) / n_seeds)
        var_seed = max(0.0, (ms_seed - ms_res) / n_folds)
        var_res = ms_res
    return SeedFoldVariance(mean, fold_sd, seed_sd, seed_within, var_fold, var_seed, var_res, n_seeds, n_folds,
                            "; ".join(notes))


# ------------------------------------------------------------------------------------------ family-wise adjustment

ADJUST_METHODS = ("holm", "bonferroni", "hommel", "holm-sidak", "sidak", "simes-hochberg", "fdr_bh", "fdr_by")


def adjust(pvalues: ArrayLike, method: str = "holm", family: Sequence[Hashable] | None = None) -> np.ndarray:
    """Family-wise (or FDR) adjusted p-values over every finite p (statsmodels' methods; Holm computed directly,
    same values); NaN stays NaN and out of the family. ``family`` (one label per p) adjusts within each label."""
    if method not in ADJUST_METHODS:
        raise MilbenchError(f"adjust: unknown method {method!r}; use one of {ADJUST_METHODS}")
    p = np.asarray(pvalues, dtype=float)
    flat = p.reshape(-1)
    if ((flat < 0) | (flat > 1)).any():
        raise MilbenchError(f"adjust: p-values must lie in [0, 1], got {flat[(flat < 0) | (flat > 1)][:5]}")
    if family is None:
        codes = np.zeros(flat.size, dtype=np.int64)
    else:
        labels = list(family) if p.ndim <= 1 else list(np.asarray(family, dtype=object).reshape(-1))
        codes = _group_codes("adjust", labels, flat.size)[0]
    out = np.full(flat.shape, np.nan)
    for g in np.unique(codes):
        ok = (codes == g) & np.isfinite(flat)
        if ok.any():
            out[ok] = _holm(flat[ok]) if method == "holm" else multipletests(flat[ok], method=method)[1]
    return out.reshape(p.shape)


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment: sorted p_(i) times (m - i + 1), running maximum, capped at 1. Equal to
    statsmodels' ``multipletests(method="holm")`` (tested), which calls ``gc.collect()`` on every use (0.2 s or more
    in a process holding torch): a table adjusted per cohort would pay that once per family."""
    order = np.argsort(p, kind="mergesort")
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


# --------------------------------------------------------------------------------------------------------- marks


def _differ_fn(differ: Callable[[str, str], bool] | Mapping[Any, float], alpha: float) -> Callable[[str, str], bool]:
    """A predicate 'a and b differ beyond noise' from a callable or a mapping of (a, b) -> adjusted p."""
    if callable(differ):
        return differ

    def from_p(a: str, b: str) -> bool:
        """Adjusted p of the pair (either order) below alpha; NaN counts as not different."""
        found = {float(differ[key]) for key in ((a, b), (b, a), frozenset((a, b))) if key in differ}
        if not found:
            raise MilbenchError(f"rank_marks: no paired test result for {a} vs {b}")
        if len(found) > 1:
            raise MilbenchError(f"rank_marks: conflicting p-values {sorted(found)} for {a} vs {b}")
        p = found.pop()
        return bool(np.isfinite(p) and p < alpha)

    return from_p


def rank_marks(scores: Mapping[str, float], differ: Callable[[str, str], bool] | Mapping[Any, float],
               alpha: float = 0.05, higher_is_better: bool = True) -> dict[str, Mark | None]:
    """Best / second-best marks that only claim what the paired tests show: the leader is "best" only if it differs
    from every other model, else it and every model it cannot be told from are "tied-best"; likewise for second.

    ``differ`` is a predicate (a, b) -> bool (e.g. the paired CI excludes 0) or a mapping (a, b) -> adjusted p
    (different when p < ``alpha``). No second mark is given when the top is tied; NaN scores get no mark.
    """
    marks: dict[str, Mark | None] = {m: None for m in scores}
    valid = [m for m, s in scores.items() if np.isfinite(s)]
    if len(valid) < 2:
        return marks
    differs = _differ_fn(differ, alpha)
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(valid, key=lambda m: (sign * float(scores[m]), str(m)))
    top, rest = order[0], order[1:]
    tied = [m for m in rest if not differs(top, m)]
    if tied:
        for m in (top, *tied):
            marks[m] = "tied-best"
        return marks
    marks[top] = "best"
    second, below = rest[0], rest[1:]
    tied = [m for m in below if not differs(second, m)]
    for m in (second, *tied):
        marks[m] = "tied-second" if tied else "second"
    return marks
