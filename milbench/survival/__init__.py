"""Survival core: discrete-time losses (nll, ce) and the Cox loss, time binning, and held-out metrics."""

from milbench.survival.binning import assign_bins, fit_bins
from milbench.survival.losses import (
    SurvivalLoss,
    ce_loss,
    cox_loss,
    get_loss,
    hazards_to_survival,
    nll_loss,
    risk_from_logits,
)
from milbench.survival.metrics import (
    evaluation_times,
    fold_metrics,
    harrell_c,
    integrated_brier,
    logrank_p,
    survival_at,
    td_auc,
    uno_c,
)

__all__ = [
    "SurvivalLoss", "assign_bins", "ce_loss", "cox_loss", "evaluation_times", "fit_bins", "fold_metrics",
    "get_loss", "harrell_c", "hazards_to_survival", "integrated_brier", "logrank_p", "nll_loss",
    "risk_from_logits", "survival_at", "td_auc", "uno_c",
]
