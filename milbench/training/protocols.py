"""Model-selection protocols and the fold's label sets: the inner validation split (``inner-val``), the training
sampler, and the selection score.

``fixed`` scores the final model; ``inner-val`` selects the epoch on a patient-level inner split of the training
fold; ``best-val`` selects it on the held-out fold itself (the CrossFusion paper's protocol: optimistic, kept to
reproduce published tables).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from milbench import MilbenchError
from milbench.survival.binning import assign_bins
from milbench.tasks.cohort import Cohort


def inner_split(case_ids: list[str], events: np.ndarray, bins: np.ndarray, fraction: float, seed: int
                ) -> tuple[list[str], list[str]]:
    """Patient-level split of a training fold, stratified by (event, time bin), for the inner-val protocol."""
    rng = np.random.default_rng(seed)
    strata = pd.Series(list(zip(events, bins)), index=case_ids)
    val: list[str] = []
    for _, group in strata.groupby(strata):
        ids = list(group.index)
        rng.shuffle(ids)
        val += ids[: int(round(fraction * len(ids)))]
    val_set = set(val)
    return [c for c in case_ids if c not in val_set], [c for c in case_ids if c in val_set]


class Labels:
    """Survival labels of a set of patients, with their bins under the fold's edges."""

    def __init__(self, cohort: Cohort, case_ids: list[str], edges: np.ndarray) -> None:
        self.case_ids = list(case_ids)
        self.time, self.event = cohort.labels(self.case_ids)
        self.bins = assign_bins(self.time, edges)


def sample_order(labels: Labels, sampler: str, gen: torch.Generator) -> list[int]:
    """One epoch's bag order: a permutation (``uniform``) or, as the reference recipe, a draw with replacement
    weighted by the inverse frequency of (time bin, censorship) (``weighted``)."""
    n = len(labels.case_ids)
    if sampler == "uniform":
        return torch.randperm(n, generator=gen).tolist()
    strata = pd.Series(list(zip(labels.bins, labels.event)))
    weights = 1.0 / strata.map(strata.value_counts()).to_numpy(dtype=float)
    return torch.multinomial(torch.tensor(weights), n, replacement=True, generator=gen).tolist()


def c_or_nan(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C, NaN when no pair is comparable (a tiny fold or inner split can have no event)."""
    from milbench.survival.metrics import harrell_c  # scikit-survival: imported when a fold is scored

    try:
        return harrell_c(time, event, risk)
    except MilbenchError:
        return float("nan")
