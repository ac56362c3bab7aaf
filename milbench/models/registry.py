"""Model registry in the style of timm: ``@register_model`` on a class, ``create_model(name, in_dim, n_bins)``.

Built-in models and plug-ins register the same way: importing a module runs its ``@register_model`` decorators.
Built-in cards are data (:mod:`milbench.models.cards`), each naming its module, so a card is read without importing
any model; plug-ins expose an entry point in the ``milbench.models`` group that points at a module or a model class,
and declare their card in the decorator. A plug-in that fails to import is left out with one warning line that names
its entry point; every other model keeps working.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

from milbench import MilbenchError, did_you_mean
from milbench.models.cards import BUILTIN, BUILTIN_CARDS, ModelCard

if TYPE_CHECKING:
    import torch.nn as nn

ENTRY_POINT_GROUP = "milbench.models"


@dataclass
class _Entry:
    card: ModelCard
    cls: type


_REGISTRY: dict[str, _Entry] = {}
_PLUGINS_LOADED = False


def register_model(
    name: str | None = None, *, card: ModelCard | None = None, **card_fields: Any
) -> Callable[[type], type]:
    """Class decorator: register ``cls`` under ``name``, with the built-in card of that name, the given ``card``, or
    a card made of ``card_fields`` (``display_name``, ``scales``, ``needs``, ``traits``, ...)."""

    def decorate(cls: type) -> type:
        key = (card.name if card else name) or cls.__name__.lower()
        the_card = card or (BUILTIN[key] if key in BUILTIN and not card_fields else None)
        if the_card is None:
            the_card = ModelCard(name=key, display_name=card_fields.pop("display_name", cls.__name__), **card_fields)
        _REGISTRY[key] = _Entry(the_card, cls)
        cls.card = the_card  # type: ignore[attr-defined]
        return cls

    return decorate


def _load_plugins() -> None:
    """Import every plug-in entry point once; one that fails is named in a warning and left out."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plug-in must not break the other models or the command line
            first = (str(err).splitlines() or [""])[0]
            print(f"warning: plug-in model '{ep.name}' ({ep.value}) failed to import and is left out: "
                  f"{type(err).__name__}: {first}", file=sys.stderr)
            continue
        if inspect.isclass(obj) and ep.name not in _REGISTRY:
            register_model(ep.name)(obj)


def list_cards(plugins: bool = True) -> list[ModelCard]:
    """Cards of the built-in models (no model module imported), then those of the plug-ins."""
    cards = list(BUILTIN_CARDS)
    if plugins:
        _load_plugins()
        cards += [e.card for name, e in _REGISTRY.items() if name not in BUILTIN]
    return cards


def model_names() -> list[str]:
    """Every model name, built-ins first."""
    return [card.name for card in list_cards()]


def unknown_model(name: str) -> MilbenchError:
    """The error for a model name that is not registered, with the closest names."""
    names = model_names()
    return MilbenchError(f"unknown model '{name}': {did_you_mean(name, names)}choose one of {', '.join(names)} (see `milbench models`)")


def get_card(name: str) -> ModelCard:
    """The card of model ``name``; a built-in card is read without importing the model."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise unknown_model(name)
    return _REGISTRY[name].card


def model_class(name: str) -> type:
    """The registered class of model ``name`` (its module imported on first use)."""
    card = get_card(name)
    if name not in _REGISTRY and card.module:
        import_module(card.module)
    if name not in _REGISTRY:
        raise MilbenchError(f"model '{name}': module {card.module} registers no class under that name")
    return _REGISTRY[name].cls


def card_of(model: Any) -> ModelCard | None:
    """The card of a model instance (None for a module that was not registered)."""
    return getattr(type(model), "card", None)


def create_model(name: str, in_dim: int, n_bins: int = 4, **hparams: Any) -> nn.Module:
    """Build a registered model; unknown hyper-parameters are rejected with the list of valid ones."""
    cls = model_class(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in hparams if k not in params]
    if unknown:
        valid = [p for p in params if p not in ("self", "in_dim", "n_bins")]
        raise MilbenchError(f"model '{name}' has no option {', '.join(unknown)}: valid options are {', '.join(valid)}")
    return cls(in_dim=in_dim, n_bins=n_bins, **hparams)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
