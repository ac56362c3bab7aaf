"""Discrete time bins for the survival head, the MCAT / Patch-GCN recipe (spec section 0).

Edges are the quantiles of the *uncensored* survival times (``pd.qcut(q=n_bins)``: linear interpolation), with
the two outer edges replaced by the minimum - 1e-6 and maximum + 1e-6 over all patients given. Labels follow
``pd.cut(right=False, include_lowest=True)``: bin k is [edge_k, edge_{k+1}). Pass one value per patient.
"""

from __future__ import annotations

import numpy as np

from milbench import MilbenchError

OUTER_EPS = 1e-6


def fit_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Bin edges [n_bins + 1] from patients' times and event flags (1 = death observed), one entry per patient."""
    time = np.asarray(time, dtype=float).reshape(-1)
    event = np.asarray(event).reshape(-1)
    if time.shape != event.shape:
        raise MilbenchError(f"fit_bins: {time.size} times but {event.size} event flags; pass one of each per patient")
    if np.isnan(time).any() or np.isnan(event.astype(float)).any():
        raise MilbenchError("fit_bins: survival times or event flags contain NaN; fix the cohort table")
    if n_bins < 1:
        raise MilbenchError(f"fit_bins: n_bins must be at least 1, got {n_bins}")
    uncensored = time[event.astype(bool)]
    if uncensored.size == 0:
        raise MilbenchError("fit_bins: no uncensored patient, so no quantile bins can be fitted; check the censorship")
    edges = np.quantile(uncensored, np.linspace(0.0, 1.0, n_bins + 1))
    if np.any(np.diff(edges) <= 0):
        raise MilbenchError(f"fit_bins: the {uncensored.size} uncensored times give duplicate quantile edges "
                            f"{np.round(edges, 4).tolist()}; use fewer bins")
    edges[0] = time.min() - OUTER_EPS
    edges[-1] = time.max() + OUTER_EPS
    return edges


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin label of each time (bin k = [edge_k, edge_{k+1})); times outside the edges go to the first / last bin."""
    time = np.asarray(time, dtype=float).reshape(-1)
    edges = np.asarray(edges, dtype=float).reshape(-1)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise MilbenchError(f"assign_bins: edges must be at least 2 strictly increasing values, got {edges.tolist()}")
    if np.isnan(time).any():
        raise MilbenchError("assign_bins: survival times contain NaN; fix the cohort table")
    return np.searchsorted(edges[1:-1], time, side="right").astype(np.int64)
