"""Leaderboard statistics beyond Harrell's C (which lives in ``comparisons``): Uno's C, the integrated Brier score and
the time-dependent AUC pooled within folds, with the same stratified bootstrap interval and paired bootstrap as the
pooled C; and one log-rank test and one D-calibration test over all seeds of a cell.

Each IPCW metric is a ratio of sums over the held-out patients, with censoring weights from the patient's own training
fold (G, the Kaplan-Meier estimate of the censoring distribution there, as scikit-survival fits it):

- Uno's C: sum_ij w_i S_ij / sum_ij w_i P_ij, w_i = [T_i < tau] / G(T_i)^2 for a death (0 when censored), P and S
  Harrell's comparable and concordant pair matrices, tau the fold's last training time.
- td-AUC at t: sum_ij u_i case_i(t) ctrl_j(t) s_ij / sum_ij u_i case_i(t) ctrl_j(t), u_i = 1 / G(T_i) for a death,
  case_i(t) = T_i <= t and a death, ctrl_j(t) = T_j > t, s_ij = 1, 1/2 or 0 as risk_i >, =, < risk_j; the mean over
  the grid t_1..t_K weights AUC(t_k) by the drop of the Kaplan-Meier curve of the patients scored over (t_{k-1}, t_k],
  divided by 1 - S(t_K) (scikit-survival's mean; the weights are fixed, not resampled).
- IBS: the mean over patients of c_i = trapz_k BS_i(t_k) / (t_K - t_1), BS_i(t) = S_i(t)^2 case_i(t) / G(T_i) +
  (1 - S_i(t))^2 ctrl_i(t) / G(t): scikit-survival's integrated Brier score is exactly this mean.

Held-out follow-up is censored at the fold's last training time for td-AUC and IBS, as ``metrics.fold_metrics`` does.
On one fold each statistic equals scikit-survival's value (tested). *Within-fold* pooling sums the pair terms only
inside a fold (IBS has no pairs: its pooled value is the patient-weighted mean of the fold IBSs); *cross-fold* sums
every pair. A bootstrap replicate reweights patients by multiplicities v drawn within folds (``comparisons``' stratified
multinomial, the same draws for the same seed): pair sums become quadratic forms v' D v, patient sums v' c.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from lifelines.statistics import logrank_test
from numpy.typing import ArrayLike
from scipy import stats as sps
from sksurv.nonparametric import CensoringDistributionEstimator, SurvivalFunctionEstimator
from sksurv.util import Surv

from milbench import MilbenchError
from milbench.survival.calibration import DCalibration, d_calibration_counts
from milbench.survival.comparisons import (
    BOOT_CHUNK,
    PAIRS_KINDS,
    BootstrapC,
    PairedBootstrap,
    _check_boot,
    _group_codes,
    _interval,
    _stratified_weights,
    _survival_inputs,
    paired_replicates,
)
from milbench.survival.metrics import TIED_TOL

IPCW_METRICS = ("uno_c", "td_auc", "ibs")


# ------------------------------------------------------------------------------------------------- log-rank, D-cal


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


def logrank_over_seeds(time, event, risks: ArrayLike, cutoffs: ArrayLike) -> float:
    """One log-rank p over all seeds: a patient is high risk when its margin over its fold's cutoff, averaged over
    seeds, is positive (one grouping, one test; not a median of per-seed p-values). One seed: ``pooled_logrank_p``."""
    risks, cutoffs = np.atleast_2d(np.asarray(risks, dtype=float)), np.atleast_2d(np.asarray(cutoffs, dtype=float))
    if risks.shape != cutoffs.shape:
        raise MilbenchError(f"logrank_over_seeds: risks {risks.shape} and cutoffs {cutoffs.shape} differ in shape")
    margin = (risks - cutoffs).mean(axis=0)
    return pooled_logrank_p(time, event, margin, np.zeros_like(margin))


def d_calibration_over_seeds(event, s_own: ArrayLike, n_bins: int = 10) -> DCalibration:
    """D-calibration of S_i(t_i) [n_seeds, n] (each seed's curve read at the patient's own time): the bin masses are
    averaged over seeds (each seed's sum to n), and Pearson's chi-square of the mean masses against n / B tests them,
    B - 1 df. Averaging correlated seeds can only shrink the dispersion, so with several seeds the test is conservative.
    """
    s = np.atleast_2d(np.asarray(s_own, dtype=float))
    event = np.asarray(event, dtype=bool).reshape(-1)
    if s.shape[1] != event.size or not np.isfinite(s).all():
        raise MilbenchError(f"d_calibration_over_seeds: need finite S_i(t_i) [n_seeds, {event.size}], got {s.shape}")
    counts = np.mean([d_calibration_counts(row, event, n_bins) for row in s], axis=0)
    stat, p = sps.chisquare(counts)
    n = event.size
    note = (f"{n} patients in {n_bins} bins: expected {n / n_bins:.1f} a bin, below 5 the chi-square approximation is "
            "rough") if n / n_bins < 5 else ""
    return DCalibration(float(stat), float(p), counts, n, int(event.sum()), n_bins, "linear", note=note)


# ------------------------------------------------------------------------------------------------ pooled IPCW parts


@dataclass(frozen=True)
class Parts:
    """A pooled statistic as block sums: value(v) = sum_k omega_k sum_b num_bk(v) / sum_b den_bk(v); pair metrics
    hold [n_b, K, n_b] arrays (i, component, j: quadratic forms in the multiplicities v, one matrix product per
    block), IBS [K, n_b] vectors (linear forms)."""

    metric: str
    pairs: str
    omega: np.ndarray  # [K] weights of the components (td-AUC: one per grid time)
    index: list[np.ndarray]  # patient indices of each block
    den: list[np.ndarray]
    num: dict[str, list[np.ndarray]]  # per model, per block
    strata: list[np.ndarray]  # patients of each fold: the bootstrap resamples within them
    n_events: int
    n_seeds: dict[str, int]
    reason: str = ""

    @property
    def quadratic(self) -> bool:
        """Pair metrics (Uno's C, td-AUC) are quadratic in the multiplicities; IBS is linear."""
        return self.den[0].ndim == 3 if self.den else True


def _scores(risks: np.ndarray) -> np.ndarray:
    """Seed-mean concordance score matrix s_ij (1, 1/2 for risks tied within TIED_TOL, 0) of risks [S, n_b]."""
    out = np.zeros((risks.shape[1], risks.shape[1]))
    for r in risks:
        diff = r[:, None] - r[None, :]
        out += np.where(np.abs(diff) <= TIED_TOL, 0.5, (diff > 0).astype(float))
    return out / len(risks)


def _model_array(name: str, model: str, values: ArrayLike, n: int, curves: bool) -> np.ndarray:
    """Risks as [S, n] or curves as [S, n, K]; NaN or a wrong shape raises."""
    arr = np.asarray(values, dtype=float)
    arr = arr[None] if arr.ndim == (2 if curves else 1) else arr
    if arr.ndim != (3 if curves else 2) or arr.shape[1] != n or arr.shape[0] == 0:
        what = "survival curves [n_seeds, n, n_times]" if curves else "risks [n_seeds, n]"
        raise MilbenchError(f"{name}: {model}: need {what} for {n} patients, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MilbenchError(f"{name}: {model}: NaN or infinite predictions; check the model output")
    return arr


def _fold_weights(metric: str, time: np.ndarray, event: np.ndarray, codes: np.ndarray, labels: list[Hashable],
                  training: Mapping[Hashable, tuple[ArrayLike, ArrayLike]], grid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per patient, from its own training fold: the IPCW weight (Uno: [T < tau] / G(T)^2; td-AUC and IBS: 1 / G(T)
    for deaths, G(T) itself for IBS), the follow-up cut at the last training time, its event flag, and per patient
    G(t_k) at the grid times [n, K] (IBS)."""
    n = len(time)
    weight, time_cut, event_cut = np.zeros(n), time.copy(), event.copy()
    g_grid = np.ones((n, max(len(grid), 1)))
    for code, label in enumerate(labels):
        if label not in training:
            raise MilbenchError(f"{metric}: no training labels for fold {label!r}: the censoring weights need them")
        train_time, train_event = (np.asarray(x, dtype=float) for x in training[label])
        mine = codes == code
        cens = CensoringDistributionEstimator().fit(Surv.from_arrays(train_event.astype(bool), train_time))
        cut = float(train_time.max())
        if metric == "uno_c":
            ok = mine & event & (time < cut)
            weight[ok] = 1.0 / np.square(cens.predict_proba(time[ok]))
            continue
        time_cut[mine], event_cut[mine] = np.minimum(time[mine], cut), event[mine] & (time[mine] < cut)
        if metric == "td_auc":
            ok = mine & event_cut
            weight[ok] = 1.0 / cens.predict_proba(time_cut[ok])
        else:
            g = cens.predict_proba(time_cut[mine])
            weight[mine] = np.where(g == 0, np.inf, g)
            gt = cens.predict_proba(grid)
            g_grid[mine] = np.where(gt == 0, np.inf, gt)[None, :]
    if not np.isfinite(weight[event_cut]).all() and metric == "td_auc":
        raise MilbenchError("td_auc: the censoring survival function is zero at a death time")
    return weight, time_cut, event_cut, g_grid


def _km_weights(time_cut: np.ndarray, event_cut: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """scikit-survival's weights of the mean td-AUC: drops of the Kaplan-Meier curve over the grid / (1 - S(t_K))."""
    if len(grid) == 1:
        return np.ones(1)
    km = SurvivalFunctionEstimator().fit(Surv.from_arrays(event_cut, time_cut)).predict_proba(grid)
    d = -np.diff(np.r_[1.0, km])
    return d / (1.0 - km[-1]) if km[-1] < 1 else np.full(len(grid), np.nan)


def metric_parts(metric: str, time: ArrayLike, event: ArrayLike, group: Sequence[Hashable] | np.ndarray,
                 models: Mapping[str, ArrayLike], training: Mapping[Hashable, tuple[ArrayLike, ArrayLike]],
                 grid: ArrayLike | None = None, pairs: str = "within-fold") -> Parts:
    """The block sums of ``metric`` (uno_c, td_auc or ibs) for each model on the same held-out patients.

    ``group`` labels each patient's fold; ``training[label]`` is that fold's (time, event) of the training patients;
    ``models`` maps a name to risks [n_seeds, n] (uno_c, td_auc) or survival at the grid [n_seeds, n, K] (ibs);
    ``grid`` is the cohort's fixed time grid (td_auc, ibs). Seeds are averaged inside each term.
    """
    name = f"pooled {metric}"
    if metric not in IPCW_METRICS:
        raise MilbenchError(f"{name}: metric must be one of {IPCW_METRICS}")
    if pairs not in PAIRS_KINDS:
        raise MilbenchError(f"{name}: pairs must be one of {PAIRS_KINDS}, got {pairs!r}")
    time, event = _survival_inputs(name, time, event)
    n = len(time)
    codes, labels = _group_codes(name, group, n)
    grid = np.asarray(grid if grid is not None else [], dtype=float).reshape(-1)
    if metric != "uno_c" and len(grid) < (2 if metric == "ibs" else 1):
        raise MilbenchError(f"{name}: needs {'two' if metric == 'ibs' else 'one'} or more grid times, got {len(grid)}")
    arrays = {m: _model_array(name, m, v, n, metric == "ibs") for m, v in models.items()}
    if metric == "ibs" and any(a.shape[2] != len(grid) for a in arrays.values()):
        raise MilbenchError(f"{name}: survival curves must have one column per grid time ({len(grid)})")
    weight, time_cut, event_cut, g_grid = _fold_weights(metric, time, event, codes, labels, training, grid)
    strata = [np.flatnonzero(codes == g) for g in range(len(labels))]
    index = strata if pairs == "within-fold" or metric == "ibs" else [np.arange(n)]
    den: list[np.ndarray] = []
    num: dict[str, list[np.ndarray]] = {m: [] for m in arrays}
    for idx in index:
        if metric == "ibs":
            den.append(np.ones((1, len(idx))))
            for m, curves in arrays.items():
                s = curves[:, idx, :]  # [S, n_b, K]
                t_b, e_b = time_cut[idx][None, :, None], event_cut[idx][None, :, None]
                case = (t_b <= grid[None, None, :]) & e_b
                ctrl = t_b > grid[None, None, :]
                bs = np.square(s) * case / weight[idx][None, :, None] + np.square(1 - s) * ctrl / g_grid[idx][None]
                c = np.trapezoid(bs, grid, axis=2) / (grid[-1] - grid[0])
                num[m].append(c.mean(axis=0)[None, :])
            continue
        t_b, e_b = time[idx], event[idx]
        if metric == "uno_c":
            t_i, t_j = t_b[:, None], t_b[None, :]
            comparable = e_b[:, None] & ((t_j > t_i) | ((t_j == t_i) & ~e_b[None, :]))
            d = (weight[idx][:, None] * comparable)[:, None, :]
        else:
            tc, ec = time_cut[idx], event_cut[idx]
            case = (tc[None, :] <= grid[:, None]) & ec[None, :]  # [K, n_b]
            ctrl = tc[None, :] > grid[:, None]
            d = (weight[idx] * case).T[:, :, None] * ctrl[None, :, :]
        den.append(d)
        for m, risks in arrays.items():
            num[m].append(d * _scores(risks[:, idx])[:, None, :])
    omega = _km_weights(time_cut, event_cut, grid) if metric == "td_auc" else np.ones(1)
    return Parts(metric, pairs, omega, index, den, num, strata, int(event.sum()),
                 {m: a.shape[0] for m, a in arrays.items()})


def _ratios(parts: Parts, w: np.ndarray) -> np.ndarray:
    """Each model's component ratios num_k / den_k [n_models, B, K] for multiplicities ``w`` [B, n]; NaN where a
    component has no weight."""
    k = len(parts.omega)
    den = np.zeros((len(w), k))
    num = np.zeros((len(parts.num), len(w), k))
    for b, idx in enumerate(parts.index):
        wb = w[:, idx]
        if parts.quadratic:
            n_b = len(idx)
            den += np.einsum("bkj,bj->bk", (wb @ parts.den[b].reshape(n_b, -1)).reshape(len(w), k, n_b), wb)
            for i, m in enumerate(parts.num):
                num[i] += np.einsum("bkj,bj->bk", (wb @ parts.num[m][b].reshape(n_b, -1)).reshape(len(w), k, n_b), wb)
        else:
            den += wb @ parts.den[b].T
            for i, m in enumerate(parts.num):
                num[i] += wb @ parts.num[m][b].T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _values(parts: Parts, w: np.ndarray) -> np.ndarray:
    """Each model's statistic [n_models, B]: sum_k omega_k ratio_k; NaN when a weighted component is undefined."""
    used = parts.omega != 0
    ratio = _ratios(parts, w)[:, :, used]
    with np.errstate(invalid="ignore"):
        return (ratio * parts.omega[used]).sum(axis=2) + np.where(np.isfinite(ratio).all(axis=2), 0.0, np.nan)


def _replicates(parts: Parts, n_boot: int, seed: int) -> np.ndarray:
    """Each model's statistic over ``n_boot`` replicates [n_models, n_boot], patients resampled within folds with the
    same multiplicities as ``comparisons`` draws for the same seed."""
    n = sum(len(s) for s in parts.strata)
    rng = np.random.default_rng(seed)
    chunks = [_values(parts, _stratified_weights(rng, parts.strata, n, min(BOOT_CHUNK, n_boot - start)))
              for start in range(0, n_boot, BOOT_CHUNK)]
    return np.concatenate(chunks, axis=1) if chunks else np.empty((len(parts.num), 0))


def component_values(parts: Parts) -> dict[str, np.ndarray]:
    """Each model's components on the original patients [K] (td-AUC: the pooled AUC at each grid time)."""
    n = sum(len(s) for s in parts.strata)
    ratio = _ratios(parts, np.ones((1, n)))[:, 0, :]
    return {m: ratio[i] for i, m in enumerate(parts.num)}


def _n_terms(parts: Parts) -> int:
    """Pairs (or patients, IBS) with a nonzero weight in some component: what the statistic counts."""
    if parts.quadratic:
        return int(sum(np.count_nonzero(d.any(axis=1)) for d in parts.den))
    return int(sum(d.shape[1] for d in parts.den))


def bootstrap_metric(parts: Parts, model: str, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> BootstrapC:
    """One model's pooled statistic and its percentile interval from ``n_boot`` stratified replicates."""
    _check_boot(f"pooled {parts.metric}", n_boot, level)
    n = sum(len(s) for s in parts.strata)
    names = list(parts.num)
    estimate = float(_values(parts, np.ones((1, n)))[names.index(model), 0])
    low = high = se = float("nan")
    n_valid = 0
    if np.isfinite(estimate) and n_boot > 0:
        values = _replicates(parts, n_boot, seed)[names.index(model)]
        n_valid = int(np.isfinite(values).sum())
        low, high, se = _interval(values, level)
    reason = "" if np.isfinite(estimate) else f"{parts.metric} undefined on these patients (no comparable weight)"
    n_terms = _n_terms(parts)
    return BootstrapC(estimate, low, high, se, n_terms, n, parts.n_events, len(parts.strata), parts.n_seeds[model],
                      n_boot, n_valid, seed, level, parts.pairs if parts.quadratic else "patients", reason)


def paired_metric_table(parts: Parts, comparisons: Sequence[tuple[str, str]], n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> list[PairedBootstrap]:
    """Paired bootstrap of metric(a) - metric(b) for each (a, b), all from one set of within-fold replicates."""
    _check_boot(f"paired {parts.metric}", n_boot, level)
    names = list(parts.num)
    unknown = sorted({m for c in comparisons for m in c} - set(names))
    if unknown:
        raise MilbenchError(f"paired {parts.metric}: no predictions given for {unknown}; models given: {names}")
    n = sum(len(s) for s in parts.strata)
    point = _values(parts, np.ones((1, n)))[:, 0]
    reps = _replicates(parts, n_boot, seed) if n_boot > 0 and np.isfinite(point).all() else np.empty((len(names), 0))
    method = (f"paired bootstrap of the difference in {parts.metric} (patients resampled within folds, the same "
              "replicate for both models); percentile CI; two-sided p = min(1, 2 min((1 + #{d* <= 0}) / (B + 1), "
              "(1 + #{d* >= 0}) / (B + 1)))")
    out = []
    for a, b in comparisons:
        ia, ib = names.index(a), names.index(b)
        low, high, se, p, n_valid = paired_replicates(reps, ia, ib, level)
        diff = float(point[ia] - point[ib])
        reason = "" if np.isfinite(diff) else f"{parts.metric} undefined on these patients"
        out.append(PairedBootstrap(a, b, diff, low, high, p, float(point[ia]), float(point[ib]), se,
                                   _n_terms(parts), n_boot, n_valid,
                                   seed, level, parts.pairs, method, reason))
    return out
