"""Typed run configuration: the recipe, the protocol and the model's options, with a stable hash.

Unknown keys are rejected (as kaiko-ai/eva and STAMP do), so a typo in ``--set`` never silently does nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from milbench import MilbenchError
from milbench.files import stable_hash

PROTOCOLS = ("fixed", "inner-val", "best-val")
# Fields added after runs were stored: at these values they are left out of the hash, so old runs keep theirs.
_HASH_NEUTRAL: dict[str, Any] = {"pack": 1}

# Named training recipes. "paper" is the CrossFusion authors' recipe (DESIGN.md); "small" is the stated recipe
# for small synthetic cohorts and demos, where the paper's recipe barely leaves the random initialisation.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(epochs=100, lr=1e-4, weight_decay=4e-6, grad_accum=32, warmup_epochs=5, alpha=0.2,
                  sampler="weighted"),
    "small": dict(epochs=12, lr=1e-3, weight_decay=1e-2, grad_accum=4, warmup_epochs=2, alpha=0.2,
                  sampler="uniform"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a fold's result (device and paths do not; they are not hashed)."""

    model: str
    cohort: str
    backbone: str = "default"
    recipe: str = "paper"
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 4e-6
    grad_accum: int = 32
    warmup_epochs: int = 5
    alpha: float = 0.2
    loss: str = "nll"
    n_bins: int = 4
    bins_on: str = "train"
    protocol: str = "fixed"
    sampler: str = "weighted"
    inner_val_fraction: float = 0.2
    seed: int = 7
    pack: int = 1  # bags per forward pass (models with forward_packed); 1 = one bag per step, as the reference
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MilbenchError(f"unknown protocol '{self.protocol}': use one of {', '.join(PROTOCOLS)}")
        if self.bins_on not in ("train", "cohort"):
            raise MilbenchError(f"--bins-on must be 'train' or 'cohort', not '{self.bins_on}'")
        if self.sampler not in ("uniform", "weighted"):
            raise MilbenchError(f"sampler must be 'uniform' or 'weighted', not '{self.sampler}'")
        if self.epochs < 1 or self.grad_accum < 1:
            raise MilbenchError("epochs and grad_accum must be at least 1")
        if self.pack < 1 or self.grad_accum % self.pack:
            raise MilbenchError(f"pack={self.pack}: the bags packed into one forward pass must divide grad_accum "
                                f"({self.grad_accum}), so a packed step sums the same bags as accumulation does")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hash(self) -> str:
        """Short stable hash of the whole config: two runs with the same hash are the same experiment."""
        return stable_hash({k: v for k, v in self.to_dict().items() if _HASH_NEUTRAL.get(k, object()) != v})


def make_config(model: str, cohort: str, recipe: str = "paper", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Start from a named recipe, apply overrides; keys that are neither run fields nor model options fail.

    A model with several head kinds takes the option ``head=<kind>`` (``hazard``, ``cox``, ``mdn``): the loss then
    defaults to that head's (``cox``, ``mdn``), and a ``loss`` that cannot train it is refused here, before any run.
    """
    from milbench.survival.losses import HEAD_KINDS, loss_for_head  # torch: only a command that builds configs

    if recipe not in RECIPES:
        raise MilbenchError(f"unknown recipe '{recipe}': use one of {', '.join(RECIPES)}")
    names = {f.name for f in fields(RunConfig)}
    values: dict[str, Any] = {**RECIPES[recipe], "recipe": recipe}
    options: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        key = key.replace("-", "_")
        if key in names and key != "model_options":
            values[key] = value
        else:
            options[key] = value
    head = options.get("head")
    values["loss"] = loss_for_head(head if head in HEAD_KINDS else "hazard", values.get("loss"))
    return replace(RunConfig(model=model, cohort=cohort), **values, model_options=options)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` pairs; values are read as JSON when they parse (numbers, true/false), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise MilbenchError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
