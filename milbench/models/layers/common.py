"""What every model is made of at its ends: the output type, the discrete-time hazard head, MLP stacks, the
transformer feed-forward and the transformer-style initialisation."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class ModelOutput(NamedTuple):
    """What every model's ``forward(bag)`` returns.

    ``logits``: [1, n_bins] discrete-time hazard logits (hazards = sigmoid(logits)), or the output of another head
    kind the model declares as ``head_kind`` (``"cox"``: [1, 1] log-risk; ``"mdn"``: [1, 3, K] mixture parameters;
    see :mod:`milbench.survival.losses`).
    ``aux_loss``: an optional label-free scalar added to the survival loss (e.g. ProtoSurv's prototype losses).
    ``attention``: named attention maps for heatmaps, e.g. ``{"20x": [N]}``; filled only when asked.
    ``tasks``: named extra outputs of the same shape and kind as ``logits`` (DSMIL's max-instance logits, MuSTMIL's
    per-scale heads). The engine trains each with the same survival loss on the same target and adds it with weight
    1 to the loss of ``logits`` (there is no per-task weight); prediction reads ``logits`` only.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    attention: dict[str, torch.Tensor] = {}
    tasks: dict[str, torch.Tensor] = {}


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Transformer-style init: Linear weights trunc-normal(std), zero bias; LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: half precision to float32, float32 and float64 unchanged. For softmaxes and sums
    that must not run in bf16; a float64 model stays float64 end to end (the golden-output tests compare it with
    the authors' code in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mlp(dims: list[int], dropout: float = 0.0, act: type[nn.Module] = nn.ReLU, last_act: bool = True) -> nn.Sequential:
    """Linear -> act -> dropout stacks; ``mlp([2048, 512])`` is AMIL's Linear+ReLU feature layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)

class HazardHead(nn.Linear):
    """The shared discrete-time survival head: one logit per time bin (hazard = sigmoid(logit))."""

    def __init__(self, dim: int, n_bins: int = 4) -> None:
        super().__init__(dim, n_bins)


class FeedForward(nn.Sequential):
    """Transformer feed-forward: Linear(d->hidden) -> GELU -> Dropout -> Linear(hidden->d) -> Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
