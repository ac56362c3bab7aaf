"""What training expects of a model: the :class:`MILModel` protocol and the optional capabilities it may add.

Every model maps a bag to a :class:`~milbench.models.layers.common.ModelOutput`. Optional capabilities are named
here once, so the loop asks these functions instead of probing attributes in several places:
``forward_packed`` (several bags in one pass, the same gradient), ``fit_priors`` (priors fitted on the training
fold, e.g. k-means prototypes), ``policies`` (large-bag policies written to the record), ``head_kind`` (the kind of
output ``logits`` are; "hazard" by default).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from milbench.data.bag import Bag
from milbench.models.cards import Traits
from milbench.models.layers.common import ModelOutput
from milbench.models.registry import card_of


@runtime_checkable
class MILModel(Protocol):
    """A survival MIL model: ``forward(bag)`` -> :class:`ModelOutput` (logits [1, n_bins], aux loss, attention)."""

    def __call__(self, bag: Bag, return_attention: bool = False) -> ModelOutput: ...


@runtime_checkable
class PackedModel(Protocol):
    """A model that scores several bags in one pass: ``features`` [sum N_i, D], ``segment`` [sum N_i] -> logits
    [n_bags, n_bins]; the same function as calling it on each bag."""

    def forward_packed(self, features: torch.Tensor, segment: torch.Tensor, n_bags: int) -> ModelOutput: ...


@runtime_checkable
class PriorModel(Protocol):
    """A model with priors fitted on the training fold's bags before training (clustering prototypes)."""

    def fit_priors(self, bags: list[Bag]) -> None: ...


def head_kind(model: Any) -> str:
    """The kind of output a model's ``logits`` are (``"hazard"``, ``"cox"`` or ``"mdn"``)."""
    return getattr(model, "head_kind", "hazard")


def has_packed(model: Any) -> bool:
    """Whether the model can pack several bags into one forward pass."""
    return isinstance(model, PackedModel)


def has_priors(model: Any) -> bool:
    """Whether the model fits priors on the training fold."""
    return isinstance(model, PriorModel)


def policies(model: Any) -> dict[str, Any]:
    """The model's large-bag policies for the record ({}: every patch, no special policy)."""
    return model.policies() if callable(getattr(model, "policies", None)) else {}


def traits_of(model: Any) -> Traits:
    """The execution traits its card declares (none for an unregistered module)."""
    card = card_of(model)
    return card.traits if card is not None else Traits()


def card_scales(model: Any) -> tuple[str, ...]:
    """The magnifications the model reads (20x for an unregistered module)."""
    card = card_of(model)
    return card.scales if card is not None else ("20x",)
