"""Survival losses and read-outs for the three head kinds a model can have.

Head kinds (``model.head_kind``, "hazard" unless a model declares another):

* ``"hazard"``, the shared discrete-time head. Conventions (spec section 0): ``logits`` [B, n_bins], hazards
  ``h = sigmoid(logits)``, survival ``S_k = prod_{j<=k} (1 - h_j)``, bin label ``y`` in 0..n_bins-1, censorship
  ``c`` (1 = censored, CLAM/MCAT convention). Logs are taken from the logits with ``logsigmoid`` so no ``log(0)``
  is ever formed; they are then clamped below at ``log(eps)``, which equals the reference's ``log(clamp(x, eps))``
  exactly. Loss nll (default), ce, or cox (on the risk); risk ``-sum_k S_k``.
* ``"cox"`` (ProtoSurv's original head): ``logits`` [B, 1] is the log-risk. Loss: the Cox partial likelihood over
  several patients. Risk: the log-risk itself. No survival curve (that would need a Breslow baseline).
* ``"mdn"`` (SCMIL's original head): ``logits`` [B, 3, K] are the (mixture logits, means, scales) of a Gaussian
  mixture over inverse-softplus(time in months). Loss: :func:`mdn_nll`. Survival curve: S at the right edges of the
  fold's time bins (where the hazard head's ``S_k`` sits), risk minus its sum, as for the hazard head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from milbench import MilbenchError

# The losses each head kind can be trained with, its default first.
HEAD_LOSSES: dict[str, tuple[str, ...]] = {"hazard": ("nll", "ce", "cox"), "cox": ("cox",), "mdn": ("mdn",)}
HEAD_KINDS = tuple(HEAD_LOSSES)
_HEAD_OUTPUT = {"hazard": "[1, n_bins] hazard logits", "cox": "a [1, 1] log-risk",
                "mdn": "[1, 3, K] mixture parameters"}
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


def _inverse_softplus(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp_min(1e-4)
    return t + torch.log(-torch.expm1(-t))


def mdn_log_survival(params: torch.Tensor, months: torch.Tensor) -> torch.Tensor:
    """log S(t) of the mixture ``params`` [B, 3, K] at ``months`` [B, T] (or [T], shared) -> [B, T]."""
    params = params.float()
    log_w, mu, sigma = params[:, 0].log_softmax(-1), params[:, 1], params[:, 2]
    y = _inverse_softplus(months.float()).expand(params.shape[0], -1).unsqueeze(-1)  # [B, T, 1]
    tail = torch.special.log_ndtr((mu.unsqueeze(1) - y) / sigma.unsqueeze(1))  # log(1 - Phi((y - mu) / sigma))
    return torch.logsumexp(log_w.unsqueeze(1) + tail, dim=-1)


def mdn_survival(params: torch.Tensor, months: torch.Tensor) -> torch.Tensor:
    """Survival S(t) [B, T] of the mixture at ``months``; at the fold's right bin edges it is the survival curve."""
    return mdn_log_survival(params, months).exp()


def mdn_nll(params: torch.Tensor, months: torch.Tensor, censored: torch.Tensor) -> torch.Tensor:
    """SCMIL's loss, mean over the batch: -(1 - c) log p(y) - c log S(y), y = inverse-softplus(months).

    The density is taken on y (the change of variables to months adds a term free of parameters).
    """
    params = params.float()
    log_w, mu, sigma = params[:, 0].log_softmax(-1), params[:, 1], params[:, 2]
    y = _inverse_softplus(months.float()).unsqueeze(-1)  # [B, 1]
    log_pdf = torch.logsumexp(log_w - 0.5 * ((y - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi), -1)
    log_s = mdn_log_survival(params, months.float().unsqueeze(-1)).squeeze(-1)
    c = censored.float()
    return (-(1 - c) * log_pdf - c * log_s).mean()


def risk_and_survival(head: str, outputs: torch.Tensor, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Risk [B] (higher = earlier death) and survival at the right edges of the time bins [B, n_bins] (None for
    the cox head, which has no curve) from a head's ``outputs``; ``edges`` [n_bins + 1] are the fold's bin edges."""
    outputs = outputs.float()
    if head == "cox":
        return outputs.reshape(-1).numpy(), None
    if head == "mdn":
        surv = mdn_survival(outputs, torch.as_tensor(np.asarray(edges, dtype=float)[1:], dtype=torch.float32))
    else:
        surv = hazards_to_survival(outputs)
    surv = surv.numpy()
    return -surv.sum(axis=1), surv


def loss_for_head(head: str, loss: str | None = None) -> str:
    """The loss that trains a ``head`` of that kind: ``loss`` when it fits, the head's default when None; a one-line
    error naming the fix when it does not."""
    if head not in HEAD_LOSSES:
        raise MilbenchError(f"unknown head kind {head!r}: a model's head_kind must be one of {', '.join(HEAD_KINDS)}")
    if loss is None:
        return HEAD_LOSSES[head][0]
    if loss not in HEAD_LOSSES[head]:
        raise MilbenchError(f"loss={loss} cannot train the model's {head} head ({_HEAD_OUTPUT[head]}): use "
                            f"--set loss={HEAD_LOSSES[head][0]}, or leave loss unset to get it")
    return loss


@dataclass(frozen=True)
class SurvivalLoss:
    """A named survival loss for one head kind, with one call signature for the engine:
    ``loss(logits, y, c, time=None) -> scalar`` (``y`` the time bins, ``c`` the censorship, ``time`` in months).

    ``needs_batch`` is True for the Cox loss, whose value depends on several patients at once (a single bag gives
    0): the engine applies it to a window of bags. ``needs_time`` is True for cox and mdn, which read the times.
    """

    name: str
    alpha: float
    fn: Callable[..., torch.Tensor]
    needs_batch: bool
    head: str = "hazard"

    @property
    def needs_time(self) -> bool:
        return self.name in ("cox", "mdn")

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                 time: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of a batch; the Cox loss ranks the log-risk of a cox head, ``risk_from_logits`` of a hazard head,
        with events ``1 - c``."""
        if not self.needs_time:
            return self.fn(logits, y, c, alpha=self.alpha)
        if time is None:
            raise MilbenchError(f"the {self.name} loss needs the survival times of the batch; pass time=")
        if self.name == "mdn":
            return self.fn(logits, time, c)
        return self.fn(logits.reshape(-1) if self.head == "cox" else risk_from_logits(logits), time, 1 - c)


def get_loss(name: str, alpha: float = 0.0, head: str = "hazard") -> SurvivalLoss:
    """The loss called ``name`` ("nll", "ce", "cox" or "mdn") for a ``head`` of that kind; ``alpha`` is used by nll
    and ce, ignored by cox and mdn."""
    table = {"nll": (nll_loss, False), "ce": (ce_loss, False), "cox": (cox_loss, True), "mdn": (mdn_nll, False)}
    if name not in table:
        raise MilbenchError(f"unknown survival loss {name!r}; choose one of {', '.join(table)}")
    if not 0.0 <= alpha <= 1.0:
        raise MilbenchError(f"survival loss alpha must lie in [0, 1], got {alpha}")
    loss_for_head(head, name)
    fn, needs_batch = table[name]
    return SurvivalLoss(name=name, alpha=alpha, fn=fn, needs_batch=needs_batch, head=head)
