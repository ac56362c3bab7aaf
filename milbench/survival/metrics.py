"""Survival metrics on held-out predictions: thin, validated wrappers over scikit-survival and lifelines.

Conventions: ``time`` in the cohort's unit (months), ``event`` 1 where death was observed (i.e. ``1 - censorship``),
``risk`` higher = earlier death (the head's ``-sum(S)``). Metrics that reweight by the censoring distribution
(Uno's C, IBS, td-AUC) estimate it on the training fold, so they need held-out times inside the training
follow-up. Bad input raises ``MilbenchError``; ``fold_metrics`` turns a metric that cannot be computed into NaN and
logs why.
"""

from __future__ import annotations

import logging

import numpy as np
from lifelines.statistics import logrank_test
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from milbench import MilbenchError

log = logging.getLogger(__name__)

TIED_TOL = 1e-8
EVAL_QUANTILES = np.linspace(0.1, 0.9, 9)


def _check(name: str, time, event, *scores, need_event: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """Validate times, event flags (0/1) and per-patient scores: same length, no NaN, at least one event if asked."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float)
    arrays = [np.asarray(s, dtype=float) for s in scores]
    n = len(time) if time.ndim == 1 else -1
    if n < 0 or event.shape != (n,) or any(a.ndim == 0 or len(a) != n for a in arrays):
        shapes = ", ".join(str(a.shape) for a in (time, event, *arrays))
        raise MilbenchError(f"{name}: inputs must have one entry per patient, got shapes {shapes}")
    if n == 0:
        raise MilbenchError(f"{name}: no patients given")
    if not all(np.isfinite(a).all() for a in (time, event, *arrays)):
        raise MilbenchError(f"{name}: NaN or infinite times, events or predictions; check the model output and "
                            "cohort table")
    if not np.isin(event, (0.0, 1.0)).all():
        raise MilbenchError(f"{name}: event flags must be 0 or 1 (1 = death observed), got {np.unique(event)}")
    if need_event and not event.any():
        raise MilbenchError(f"{name}: no observed event among {n} patients; the metric is undefined")
    return time, event.astype(bool), arrays


def _sksurv(name: str, fn, *args, **kwargs):
    """Call a scikit-survival metric, turning its ValueError into a one-line MilbenchError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise MilbenchError(f"{name}: {str(err).splitlines()[0]}") from None


def harrell_c(time, event, risk) -> float:
    """Harrell's concordance index (scikit-survival, ties in risk within 1e-8 count one half)."""
    time, event, (risk,) = _check("harrell_c", time, event, risk)
    return float(_sksurv("harrell_c", concordance_index_censored, event, time, risk, tied_tol=TIED_TOL)[0])


def uno_c(train_time, train_event, time, event, risk, tau: float | None = None) -> float:
    """Uno's IPCW concordance index truncated at ``tau``; censoring estimated on the training fold."""
    train_time, train_event, _ = _check("uno_c (training fold)", train_time, train_event)
    time, event, (risk,) = _check("uno_c", time, event, risk)
    return float(_sksurv("uno_c", concordance_index_ipcw, Surv.from_arrays(train_event, train_time),
                         Surv.from_arrays(event, time), risk, tau=tau, tied_tol=TIED_TOL)[0])


def survival_at(surv_bins, edges, times) -> np.ndarray:
    """Step survival function [n, len(times)] from the head's per-bin survival ``S_k`` [n, n_bins].

    ``S_k`` is the probability of surviving to the end of bin k, i.e. to ``edges[k + 1]``. S(t) is the value at the
    last bin end at or before t: S(t) = 1 for t < edges[1], S(t) = S_{k-1} on [edges[k], edges[k + 1]) and
    S(t) = S_{n_bins-1} from the last edge on (a right-continuous step function).
    """
    surv_bins = np.asarray(surv_bins, dtype=float)
    edges = np.asarray(edges, dtype=float).reshape(-1)
    if surv_bins.ndim != 2 or edges.size != surv_bins.shape[1] + 1:
        raise MilbenchError(f"survival_at: need surv_bins [n, n_bins] and n_bins + 1 edges, got "
                            f"{surv_bins.shape} and {edges.size} edges")
    padded = np.concatenate([np.ones((len(surv_bins), 1)), surv_bins], axis=1)
    return padded[:, np.searchsorted(edges[1:], np.asarray(times, dtype=float).reshape(-1), side="right")]


def integrated_brier(train_time, train_event, time, event, surv, times) -> float:
    """Integrated Brier score of survival curves ``surv`` [n, len(times)] over ``times`` (IPCW, scikit-survival)."""
    train_time, train_event, _ = _check("integrated_brier (training fold)", train_time, train_event)
    time, event, _ = _check("integrated_brier", time, event, surv)
    surv = np.asarray(surv, dtype=float)
    if surv.ndim != 2 or surv.shape[1] != np.size(times):
        raise MilbenchError(f"integrated_brier: surv must be [n, {np.size(times)}] (one column per time), "
                            f"got {surv.shape}")
    return float(_sksurv("integrated_brier", integrated_brier_score, Surv.from_arrays(train_event, train_time),
                         Surv.from_arrays(event, time), surv, np.asarray(times, dtype=float)))


def td_auc(train_time, train_event, time, event, risk, times) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic time-dependent AUC at ``times`` and its survival-weighted mean (scikit-survival)."""
    train_time, train_event, _ = _check("td_auc (training fold)", train_time, train_event)
    time, event, (risk,) = _check("td_auc", time, event, risk)
    aucs, mean_auc = _sksurv("td_auc", cumulative_dynamic_auc, Surv.from_arrays(train_event, train_time),
                             Surv.from_arrays(event, time), risk, np.asarray(times, dtype=float), tied_tol=TIED_TOL)
    return np.asarray(aucs, dtype=float), float(mean_auc)


def logrank_p(time, event, risk, cutoff: float) -> float:
    """Log-rank p-value between the high-risk group (risk > cutoff) and the rest; NaN (never 1) when a group is empty:
    with one risk group there is nothing to test (see :data:`ONE_GROUP`)."""
    time, event, (risk,) = _check("logrank_p", time, event, risk)
    high = risk > cutoff
    if high.all() or not high.any():
        return float("nan")
    return float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)


ONE_GROUP = "every held-out risk lies on one side of the training fold's median risk: one risk group, no test"


def evaluation_times(train_time, time, event) -> np.ndarray:
    """Times for IBS and td-AUC: the 10th..90th percentiles of held-out event times, kept inside both follow-ups.

    A time t is kept when min(held-out) <= t < min(max held-out, max training) and t >= min(training): each has
    a held-out case before it and a control after it, and the censoring estimate from training covers it.
    """
    time = np.asarray(time, dtype=float)
    train_time = np.asarray(train_time, dtype=float)
    events = time[np.asarray(event, dtype=bool)]
    if events.size == 0:
        return np.empty(0)
    times = np.unique(np.quantile(events, EVAL_QUANTILES))
    lo = max(time.min(), train_time.min())
    hi = min(time.max(), train_time.max())
    return times[(times >= lo) & (times < hi)]


def cohort_times(time, event, held_out: list[tuple[np.ndarray, np.ndarray]] | None = None,
                 quantiles=EVAL_QUANTILES) -> tuple[np.ndarray, str]:
    """One time grid for IBS and td-AUC for every fold of a cohort, fixed before any fold is scored.

    The grid is the ``quantiles`` of the whole cohort's event times. ``held_out`` lists each fold's (held-out,
    training) times; a grid time is kept only where every fold can be scored on it (the ``evaluation_times`` window
    of each fold: min(held-out), min(training) <= t < max(held-out), max(training)), so all folds share the grid.
    Returns the grid and a note naming the times dropped ("" when none).
    """
    time = np.asarray(time, dtype=float)
    events = time[np.asarray(event, dtype=bool)]
    if events.size == 0:
        return np.empty(0), "no event in the cohort: no evaluation times"
    grid = np.unique(np.quantile(events, quantiles))
    keep = np.ones(grid.size, dtype=bool)
    for test, train in held_out or []:
        test, train = np.asarray(test, dtype=float), np.asarray(train, dtype=float)
        if test.size == 0 or train.size == 0:
            continue
        lo, hi = max(test.min(), train.min()), min(test.max(), train.max())
        keep &= (grid >= lo) & (grid < hi)
    note = "" if keep.all() else (f"{int((~keep).sum())} of the cohort's {grid.size} quantile times lie outside some "
                                  f"fold's follow-up and were dropped: {np.round(grid[~keep], 4).tolist()}")
    return grid[keep], note


def fold_metrics(train_time, train_event, time, event, risk, surv_bins, edges, times=None,
                 reasons: dict[str, str] | None = None) -> dict[str, float]:
    """c_index, uno_c, ibs and td_auc (mean) of one held-out fold; a metric that cannot be computed is NaN, logged.

    ``risk`` [n] and ``surv_bins`` [n, n_bins] are the head's outputs, ``edges`` the fold's bin edges; ``surv_bins``
    is None for a head without a survival curve (cox), and IBS is then NaN. Uno's C is truncated at the last training
    time. IBS and td-AUC use ``times`` when given (the cohort's fixed grid, ``cohort_times``: every fold scored on the
    same times, so folds are comparable), else the fold's own ``evaluation_times``. ``reasons`` (when given)
    receives, for every metric that is NaN, why.
    """
    reasons = {} if reasons is None else reasons
    train_time, train_event, _ = _check("fold_metrics (training fold)", train_time, train_event, need_event=False)
    scores = (risk,) if surv_bins is None else (risk, surv_bins)
    time, event, (risk, *curves) = _check("fold_metrics", time, event, *scores, need_event=False)
    surv_bins = curves[0] if curves else None
    if surv_bins is not None:
        survival_at(surv_bins, edges, [])  # checks surv_bins [n, n_bins] against the edges before any metric runs
    times = evaluation_times(train_time, time, event) if times is None else np.asarray(times, dtype=float).reshape(-1)
    # Censor held-out follow-up at the last training time: IBS and td-AUC at times below it are unchanged (such
    # patients are controls there), and the training censoring estimate is never asked to extrapolate.
    cut = train_time.max()
    time_cut, event_cut = np.minimum(time, cut), event & (time < cut)

    def curve() -> np.ndarray:
        """The survival curves, or an error saying the head has none."""
        if surv_bins is None:
            raise MilbenchError("the model's head gives a risk but no survival curve (a Cox head)")
        return surv_bins

    def needs_times(k: int) -> np.ndarray:
        """The evaluation times, or an error saying why there are fewer than ``k``."""
        if times.size < k:
            raise MilbenchError(f"fewer than {k} evaluation times inside both follow-ups (got {times.size})")
        return times

    metrics = {
        "c_index": lambda: harrell_c(time, event, risk),
        "uno_c": lambda: uno_c(train_time, train_event, time, event, risk, tau=float(cut)),
        "ibs": lambda: integrated_brier(train_time, train_event, time_cut, event_cut,
                                        survival_at(curve(), edges, needs_times(2)), times),
        "td_auc": lambda: td_auc(train_time, train_event, time_cut, event_cut, risk, needs_times(1))[1],
    }
    out: dict[str, float] = {}
    for name, compute in metrics.items():
        try:
            out[name] = float(compute())
            if not np.isfinite(out[name]):
                reasons[name] = "undefined on these patients (no comparable pair)"
        except MilbenchError as err:
            reasons[name] = str(err).removeprefix(f"{name}: ")
            out[name] = float("nan")
        if name in reasons:
            log.warning("%s is NaN for this fold: %s", name, reasons[name])
    return out
