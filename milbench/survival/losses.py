"""Survival losses for the shared discrete-time hazard head, plus the Cox partial likelihood.

Conventions (spec section 0): ``logits`` [B, n_bins], hazards ``h = sigmoid(logits)``, survival
``S_k = prod_{j<=k} (1 - h_j)``, bin label ``y`` in 0..n_bins-1, censorship ``c`` (1 = censored, CLAM/MCAT
convention). Logs are taken from the logits with ``logsigmoid`` so no ``log(0)`` is ever formed; they are
then clamped below at ``log(eps)``, which equals the reference's ``log(clamp(x, eps))`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from milbench import MilbenchError

REDUCTIONS = ("mean", "sum", "none")


def hazards_to_survival(logits: torch.Tensor) -> torch.Tensor:
    """Survival curve ``S [B, n_bins]`` of the discrete-time head: cumulative product of ``1 - sigmoid(logits)``."""
    return torch.cumprod(1 - torch.sigmoid(logits), dim=-1)


def risk_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Risk score [B] for ranking metrics: ``-sum_k S_k`` (higher = earlier death)."""
    return -hazards_to_survival(logits).sum(dim=-1)


def _log_terms(logits: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Clamped ``log h_y``, ``log S_{y-1}`` (``S_{-1} = 1``) and ``log S_y`` per sample, from the logits."""
    if logits.ndim != 2 or y.shape != logits.shape[:1]:
        raise MilbenchError(f"survival loss: logits must be [B, n_bins] and labels [B], got {tuple(logits.shape)} "
                            f"and {tuple(y.shape)}")
    y = y.long().unsqueeze(1)  # labels come from assign_bins, always in range; no check here (it would sync a GPU)
    log_eps = math.log(eps)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # log S_k = sum_{j<=k} log(1 - h_j)
    log_s_padded = F.pad(log_s, (1, 0))  # column 0 is log S_{-1} = 0
    log_h_y = F.logsigmoid(logits).gather(1, y).squeeze(1)
    log_s_prev = log_s_padded.gather(1, y).squeeze(1)
    log_s_y = log_s_padded.gather(1, y + 1).squeeze(1)
    return log_h_y.clamp(min=log_eps), log_s_prev.clamp(min=log_eps), log_s_y.clamp(min=log_eps)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") over the batch."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise MilbenchError(f"survival loss: unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")


def nll_loss(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7,
             reduction: str = "mean") -> torch.Tensor:
    """Discrete-time negative log-likelihood (MCAT / Patch-GCN / CrossFusion), ``alpha`` up-weights the uncensored term.

    uncensored = -(1-c) [log S_{y-1} + log h_y], censored = -c log S_y,
    loss = (1-alpha) (censored + uncensored) + alpha * uncensored.
    """
    log_h_y, log_s_prev, log_s_y = _log_terms(logits, y, eps)
    c = c.to(log_h_y.dtype)
    uncensored = -(1 - c) * (log_s_prev + log_h_y)
    censored = -c * log_s_y
    return _reduce((1 - alpha) * (censored + uncensored) + alpha * uncensored, reduction)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7,
            reduction: str = "mean") -> torch.Tensor:
    """The MCAT / Patch-GCN "CrossEntropySurvLoss": a per-bin binary cross-entropy on ``S_y``, regularised by the NLL.

    A censored patient is known to be alive at the end of its bin, an uncensored one dead by then, so
    ce = -c log S_y - (1-c) log(1 - S_y); the uncensored NLL term reg = -(1-c) [log S_{y-1} + log h_y] is mixed in:
    loss = (1-alpha) ce + alpha reg. Unlike the reference (which clamps S_y before ``1 - S_y``, so a certain survivor
    gives log 0), the clamp at eps is applied to ``1 - S_y`` itself.
    """
    log_h_y, log_s_prev, log_s_y = _log_terms(logits, y, eps)
    c = c.to(log_h_y.dtype)
    log_death_by_y = torch.log(-torch.expm1(log_s_y).clamp(max=-eps))  # log(max(1 - S_y, eps)), no 0 * inf grads
    ce = -c * log_s_y - (1 - c) * log_death_by_y
    reg = -(1 - c) * (log_s_prev + log_h_y)
    return _reduce((1 - alpha) * ce + alpha * reg, reduction)


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events (``event`` 1 = death observed).

    For each event i: -(r_i - log sum_{j: t_j >= t_i} exp r_j). A batch with fewer than 2 samples or no event
    carries no ranking information and gives 0, still attached to the graph; no host synchronisation.
    """
    risk = risk.reshape(-1)
    if time.shape != risk.shape or event.shape != risk.shape:
        raise MilbenchError(f"cox loss: risk, time and event must all be [B], got {tuple(risk.shape)}, "
                            f"{tuple(time.shape)}, {tuple(event.shape)}")
    event = event.to(risk.dtype)
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # [i, j]: j is in the risk set of i
    log_risk_set = torch.logsumexp(risk.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)
    return -(event * (risk - log_risk_set)).sum() / event.sum().clamp(min=1.0)


@dataclass(frozen=True)
class SurvivalLoss:
    """A named survival loss with one call signature for the engine: ``loss(logits, y, c, time=None) -> scalar``.

    ``needs_batch`` is True for the Cox loss, whose value depends on several patients at once (a single bag
    gives 0) and which needs ``time``; the discrete-time losses are per-patient and can be accumulated one bag
    at a time.
    """

    name: str
    alpha: float
    fn: Callable[..., torch.Tensor]
    needs_batch: bool

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                 time: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of a batch; the Cox loss ranks ``risk_from_logits(logits)`` with events ``1 - c``."""
        if not self.needs_batch:
            return self.fn(logits, y, c, alpha=self.alpha)
        if time is None:
            raise MilbenchError(f"the {self.name} loss needs the survival times of the batch; pass time=")
        return self.fn(risk_from_logits(logits), time, 1 - c)


def get_loss(name: str, alpha: float = 0.0) -> SurvivalLoss:
    """The loss called ``name`` ("nll", "cox" or "ce"); ``alpha`` is used by nll and ce, ignored by cox."""
    table = {"nll": (nll_loss, False), "ce": (ce_loss, False), "cox": (cox_loss, True)}
    if name not in table:
        raise MilbenchError(f"unknown survival loss {name!r}; choose one of {', '.join(table)}")
    if not 0.0 <= alpha <= 1.0:
        raise MilbenchError(f"survival loss alpha must lie in [0, 1], got {alpha}")
    fn, needs_batch = table[name]
    return SurvivalLoss(name=name, alpha=alpha, fn=fn, needs_batch=needs_batch)
