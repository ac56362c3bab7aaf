"""Typed run configuration: the recipe, the protocol, the model's options and what the run was trained on, with a
stable hash.

Unknown keys are rejected (as kaiko-ai/eva and STAMP do), so a typo in ``--set`` never silently does nothing; every
value is checked against its field's type and bounds here, before anything runs (``--set epochs=many`` and
``--set lr=fast`` are one-line errors). The run's identity (:attr:`RunConfig.hash`) includes ``inputs``: the
fingerprints of the cohort rows, the fold assignment and the feature files it read (:mod:`milbench.tasks.cohort`),
so other data never reuses a record, while the same data under another path or file name does.

pydantic would give the same checks; it is not used because the GPU benchmark machine's stack does not carry it,
and the run configuration has one flat set of scalar fields that a dataclass checks in a few lines.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from milbench import MilbenchError, did_you_mean
from milbench.files import stable_hash

PROTOCOLS = ("fixed", "inner-val", "best-val")
# Fields added after runs were stored: at these values they are left out of the hash, so old runs keep theirs.
_HASH_NEUTRAL: dict[str, Any] = {"pack": 1, "inputs": {}}

# Type and lower bound (inclusive unless marked open) of every scalar run field a user may set.
_FIELD_TYPES: dict[str, tuple[type, float | None, bool]] = {
    "epochs": (int, 1, False), "lr": (float, 0, True), "weight_decay": (float, 0, False),
    "grad_accum": (int, 1, False), "warmup_epochs": (int, 0, False), "alpha": (float, 0, False),
    "n_bins": (int, 2, False), "inner_val_fraction": (float, 0, True), "seed": (int, None, False),
    "pack": (int, 1, False), "loss": (str, None, False), "bins_on": (str, None, False), "protocol": (str, None, False),
    "sampler": (str, None, False), "recipe": (str, None, False), "backbone": (str, None, False),
}

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
    inputs: dict[str, str] = field(default_factory=dict)  # fingerprints: rows, folds, features (what it trained on)

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            if name in _FIELD_TYPES:
                check_value(name, value)
        if self.inner_val_fraction >= 1:
            raise MilbenchError(f"inner_val_fraction={self.inner_val_fraction}: use a fraction in (0, 1), e.g. 0.2")
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
        """Short stable hash of the whole config: two runs with the same hash are the same experiment.

        With input fingerprints the cohort's name is left out: the same rows, folds and features under another table
        name are the same experiment (and a record made under the old name is reused); without them (records made
        before fingerprints) the name stands for the data, as it did then.
        """
        config = {k: v for k, v in self.to_dict().items() if _HASH_NEUTRAL.get(k, object()) != v}
        if self.inputs:
            config.pop("cohort")
        return stable_hash(config)


def check_value(name: str, value: Any) -> Any:
    """``value`` if it has the run field's type and lies within its bounds, else a one-line error naming both."""
    kind, low, open_low = _FIELD_TYPES[name]
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value).is_integer()))
    what = {int: "an integer", float: "a number", str: "a word"}[kind]
    if not ok:
        raise MilbenchError(f"--set {name}={value!r}: {name} must be {what}, e.g. {_example(name)}")
    if kind is not str:
        if not math.isfinite(float(value)) or (low is not None and (value <= low if open_low else value < low)):
            bound = f"above {low:g}" if open_low else f"at least {low:g}"
            raise MilbenchError(f"--set {name}={value!r}: {name} must be {bound}, e.g. {_example(name)}")
    return int(value) if kind is int else value


def _example(name: str) -> str:
    value = RECIPES["paper"].get(name, getattr(RunConfig, name, None) if name in RunConfig.__dataclass_fields__
                                 else None)
    if value is None or isinstance(value, (dict, list)):
        value = RunConfig.__dataclass_fields__[name].default
    return f"{name}={value}"


def unknown_key(key: str, valid: list[str]) -> MilbenchError:
    """The error for a key that is neither a run field nor an option of the model, with the closest names."""
    return MilbenchError(f"--set {key}: {did_you_mean(key, valid)}valid keys are {', '.join(valid)}")


def make_config(model: str, cohort: str, recipe: str = "paper", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Start from a named recipe, apply overrides; keys that are neither run fields nor model options fail.

    ``MODEL.key`` applies ``key`` to that model only (and is dropped for the others of a grid).

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
        if "." in key:  # MODEL.option: an option for one model of a grid
            target, key = key.split(".", 1)
            if target != model:
                continue
        if key in names and key not in ("model_options", "model", "cohort"):
            values[key] = check_value(key, value) if key in _FIELD_TYPES else value
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
