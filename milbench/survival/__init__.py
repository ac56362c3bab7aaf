"""Survival core: losses and read-outs of the hazard, cox and mdn heads, time binning, and held-out metrics."""

from milbench.survival.binning import assign_bins, fit_bins
from milbench.survival.losses import (
    HEAD_KINDS,
    SurvivalLoss,
    ce_loss,
    cox_loss,
    get_loss,
    hazards_to_survival,
    loss_for_head,
    mdn_nll,
    mdn_survival,
    nll_loss,
    risk_and_survival,
    risk_from_logits,
)

# The metrics need scikit-survival and lifelines, which take seconds to import and are not needed to train (or on a
# GPU machine that only runs `milbench bench`): they load on first use (PEP 562).
_METRICS = ("evaluation_times", "fold_metrics", "harrell_c", "integrated_brier", "logrank_p", "survival_at", "td_auc",
            "uno_c")


def __getattr__(name: str):
    if name in _METRICS:
        from milbench.survival import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'milbench.survival' has no attribute {name!r}")


__all__ = [
    "HEAD_KINDS", "SurvivalLoss", "assign_bins", "ce_loss", "cox_loss", "evaluation_times", "fit_bins",
    "fold_metrics", "get_loss", "harrell_c", "hazards_to_survival", "integrated_brier", "logrank_p", "loss_for_head",
    "mdn_nll", "mdn_survival", "nll_loss", "risk_and_survival", "risk_from_logits", "survival_at", "td_auc", "uno_c",
]
