"""D-calibration (Haider, Hoehn, Davis & Greiner 2020, "Effective ways to build and evaluate individual survival
distributions", JMLR 21(85), section 4.4 and appendix B.3).

If the predicted survival curves are right, S_i(T_i) at the true death time is uniform on [0, 1], so the n values
fall evenly into B equal-width bins. An uncensored patient adds 1 to the bin holding S_i(t_i). A censored patient
(alive at c_i, so S_i(T_i) is uniform on [0, S_i(c_i)] under the model) spreads its unit over that interval: the bin
[l, u) holding s = S_i(c_i) gets (s - l) / s, every bin wholly below s gets (1/B) / s. Pearson's chi-square of the
bin masses against n / B each, B - 1 degrees of freedom, tests calibration (a large p is consistent with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

from milbench import MilbenchError

Interpolation = Literal["linear", "step"]


def head_curve(surv_bins: ArrayLike, edges: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The discrete-time head's curve as points: S = 1 at edges[0], S_k at edges[k + 1] ([n, K + 1], [K + 1])."""
    surv_bins = np.asarray(surv_bins, dtype=float)
    edges = np.asarray(edges, dtype=float).reshape(-1)
    if surv_bins.ndim != 2 or edges.size != surv_bins.shape[1] + 1:
        raise MilbenchError(f"head_curve: need surv_bins [n, n_bins] and n_bins + 1 edges, got {surv_bins.shape} "
                            f"and {edges.size} edges")
    return np.concatenate([np.ones((len(surv_bins), 1)), surv_bins], axis=1), edges


def survival_at_own_time(surv: ArrayLike, times: ArrayLike, t: ArrayLike,
                         interpolation: Interpolation = "linear") -> np.ndarray:
    """S_i(t_i): each patient's curve (values ``surv`` [n, m] at increasing ``times`` [m]) read at its own time.

    ``step``: the value at the last time <= t, 1 before the first. ``linear``: piecewise linear through the points,
    from (0, 1) to the first point when it lies after 0. Past the last time both hold the last value.
    """
    surv = np.asarray(surv, dtype=float)
    times = np.asarray(times, dtype=float).reshape(-1)
    t = np.asarray(t, dtype=float).reshape(-1)
    if surv.ndim != 2 or surv.shape != (len(t), len(times)) or len(times) == 0:
        raise MilbenchError(f"survival_at_own_time: need surv [n, len(times)] with one row per time given, got "
                            f"surv {surv.shape}, {len(times)} curve times and {len(t)} patient times")
    if np.any(np.diff(times) <= 0) or not np.isfinite(times).all():
        raise MilbenchError(f"survival_at_own_time: curve times must be finite and strictly increasing, got "
                            f"{times[:10].tolist()}")
    if not (np.isfinite(surv).all() and np.isfinite(t).all()):
        raise MilbenchError("survival_at_own_time: NaN or infinite survival values or times; check the model output")
    if interpolation not in ("linear", "step"):
        raise MilbenchError(f"survival_at_own_time: interpolation must be 'linear' or 'step', got {interpolation!r}")
    if times[0] > 0:
        times = np.concatenate([[0.0], times])
        surv = np.concatenate([np.ones((len(surv), 1)), surv], axis=1)
        start = 0.0
    else:
        start = times[0]
    rows = np.arange(len(t))
    k = np.searchsorted(times, t, side="right") - 1  # last point at or before t; -1 before the first point
    if interpolation == "step":
        return np.where(k < 0, 1.0, surv[rows, np.clip(k, 0, None)])
    k = np.clip(k, 0, len(times) - 1)
    nxt = np.minimum(k + 1, len(times) - 1)
    span = times[nxt] - times[k]
    frac = np.where(span > 0, (t - times[k]) / np.where(span > 0, span, 1.0), 0.0)
    value = surv[rows, k] + np.clip(frac, 0.0, 1.0) * (surv[rows, nxt] - surv[rows, k])
    return np.where(t < start, 1.0, value)


def d_calibration_counts(s: ArrayLike, event: ArrayLike, n_bins: int = 10) -> np.ndarray:
    """Bin masses [n_bins] of D-calibration from S_i(t_i) and event flags; bins [k/B, (k+1)/B), S = 1 in the top
    bin; a censored patient is spread below its S (S = 0 puts its unit in the first bin, the limit)."""
    s = np.clip(np.asarray(s, dtype=float).reshape(-1), 0.0, 1.0)
    event = np.asarray(event, dtype=bool).reshape(-1)
    if s.shape != event.shape:
        raise MilbenchError(f"d_calibration_counts: {s.size} survival values but {event.size} event flags")
    if n_bins < 2:
        raise MilbenchError(f"d_calibration_counts: need at least 2 bins, got {n_bins}")
    which = np.searchsorted(np.arange(1, n_bins) / n_bins, s, side="right")  # bin k holds [k/B, (k+1)/B), exactly
    counts = np.bincount(which[event], minlength=n_bins).astype(float)
    sc, bc = s[~event], which[~event]
    if sc.size:
        above_first = bc > 0  # then S(c) >= 1/B: no division by (nearly) zero; in the first bin the whole unit stays
        safe = np.where(above_first, sc, 1.0)
        own = np.where(above_first, (sc - bc / n_bins) / safe, 1.0)
        below = np.where(above_first, (1.0 / n_bins) / safe, 0.0)
        counts += np.where(np.arange(n_bins)[None, :] < bc[:, None], below[:, None], 0.0).sum(axis=0)
        counts += np.bincount(bc, weights=own, minlength=n_bins)
    return counts


@dataclass(frozen=True)
class DCalibration:
    """D-calibration chi-square, its p (large = consistent with calibration) and the bin masses; ``reason`` says why
    NaN."""

    statistic: float
    p: float
    counts: np.ndarray
    n_patients: int
    n_events: int
    n_bins: int
    interpolation: str
    reason: str = ""
    note: str = ""


def d_calibration(time: ArrayLike, event: ArrayLike, surv: ArrayLike | None, times: ArrayLike | None, n_bins: int = 10,
                  interpolation: Interpolation = "linear") -> DCalibration:
    """D-calibration of survival curves ``surv`` [n, m] given at ``times`` [m]: bin masses of S_i(t_i) (censored
    patients spread below) and Pearson's chi-square against uniform, B - 1 df. NaN when there is no curve."""
    time = np.asarray(time, dtype=float).reshape(-1)
    event_f = np.asarray(event, dtype=float).reshape(-1)
    if surv is None:
        return DCalibration(float("nan"), float("nan"), np.full(n_bins, np.nan), len(time), int(np.nansum(event_f)),
                            n_bins, interpolation, "the model's head gives a risk but no survival curve")
    if event_f.shape != time.shape or not np.isin(event_f, (0.0, 1.0)).all():
        raise MilbenchError(f"d_calibration: need one 0/1 event flag per patient ({len(time)}), got "
                            f"{event_f.shape[0]} values {np.unique(event_f)[:5]}")
    event_b = event_f.astype(bool)
    if len(time) == 0:
        return DCalibration(float("nan"), float("nan"), np.zeros(n_bins), 0, 0, n_bins, interpolation,
                            "no patients")
    s = survival_at_own_time(surv, times, time, interpolation)
    counts = d_calibration_counts(s, event_b, n_bins)
    stat, p = sps.chisquare(counts)
    note = (f"{len(time)} patients in {n_bins} bins: expected {len(time) / n_bins:.1f} a bin, below 5 the "
            "chi-square approximation is rough") if len(time) / n_bins < 5 else ""
    return DCalibration(float(stat), float(p), counts, len(time), int(event_b.sum()), n_bins, interpolation,
                        note=note)
