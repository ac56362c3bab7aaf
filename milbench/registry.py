"""Model registry in the style of timm: ``@register_model`` on a class, ``create_model(name, in_dim, n_bins)``.

Packages outside milbench register by exposing an entry point in the ``milbench.models`` group that points at a
module (importing it runs its ``@register_model`` decorators) or at a model class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

import torch.nn as nn

from milbench import MilbenchError

# Built-in model name -> module, so naming one model imports only its module (torch-geometric alone takes seconds).
BUILTIN_MODULES = {
    "amil": "milbench.models.amil",
    "dsmil": "milbench.models.dsmil",
    "transmil": "milbench.models.transmil",
    "deepgraphsurv": "milbench.models.graph_mil",
    "patchgcn": "milbench.models.graph_mil",
    "scmil": "milbench.models.scmil",
    "protosurv": "milbench.models.protosurv",
    "crossfusion": "milbench.models.crossfusion",
    "crossfusion_concat": "milbench.models.crossfusion",
    "crossfusion_single": "milbench.models.crossfusion",
    "zoommil": "milbench.models.zoommil",
    "mustmil": "milbench.models.mustmil",
    "csmil": "milbench.models.csmil",
}


@dataclass(frozen=True)
class ModelCard:
    """What a model is and what the data layer must build for it.

    ``needs`` names optional inputs: ``"coords"``, ``"graph"`` (with ``graph_kind`` / ``graph_k``),
    ``"hierarchy"`` (cross-scale index), ``"clusters"`` (clustering priors fitted on the training fold).
    ``reference_params`` maps input width to the parameter count of the reference at ``n_bins=4``.
    """

    name: str
    display_name: str
    paper: str = ""
    scales: tuple[str, ...] = ("20x",)
    needs: tuple[str, ...] = ()
    graph_kind: str | None = None
    graph_k: int | None = None
    group: str = "single_scale"  # single_scale | multi_scale | ablation | custom
    reference_params: dict[int, int] = field(default_factory=dict)
    description: str = ""


@dataclass
class _Entry:
    card: ModelCard
    cls: type[nn.Module]


_REGISTRY: dict[str, _Entry] = {}
_LOADED = False


def register_model(
    name: str | None = None, *, card: ModelCard | None = None, **card_fields: Any
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls`` under ``name`` with its card (or the card's fields as keywords)."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        key = (card.name if card else name) or cls.__name__.lower()
        the_card = card or ModelCard(name=key, display_name=card_fields.pop("display_name", cls.__name__), **card_fields)
        _REGISTRY[key] = _Entry(the_card, cls)
        cls.card = the_card  # type: ignore[attr-defined]
        return cls

    return decorate


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in dict.fromkeys(BUILTIN_MODULES.values()):
        import_module(mod)
    for ep in entry_points(group="milbench.models"):
        obj = ep.load()
        if inspect.isclass(obj) and ep.name not in _REGISTRY:
            register_model(ep.name)(obj)


def list_models() -> list[ModelCard]:
    """Cards of every registered model, built-ins first then plug-ins, in registration order."""
    _load_all()
    order = {name: i for i, name in enumerate(BUILTIN_MODULES)}
    return [e.card for _, e in sorted(_REGISTRY.items(), key=lambda kv: order.get(kv[0], len(order)))]


def get_card(name: str) -> ModelCard:
    if name in BUILTIN_MODULES:
        import_module(BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise MilbenchError(f"unknown model '{name}': choose one of {', '.join(sorted(_REGISTRY))} (see `milbench models`)")
    return _REGISTRY[name].card


def create_model(name: str, in_dim: int, n_bins: int = 4, **hparams: Any) -> nn.Module:
    """Build a registered model; unknown hyper-parameters are rejected with the list of valid ones."""
    get_card(name)
    cls = _REGISTRY[name].cls
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in hparams if k not in params]
    if unknown:
        valid = [p for p in params if p not in ("self", "in_dim", "n_bins")]
        raise MilbenchError(f"model '{name}' has no option {', '.join(unknown)}: valid options are {', '.join(valid)}")
    return cls(in_dim=in_dim, n_bins=n_bins, **hparams)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
