"""Benchmark files: a TOML file names the scenarios, cohort size, protocol, epochs, seeds and models; read and
checked here (unknown or missing keys are refused with the file's name). :mod:`milbench.runs.benchmark` runs it."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milbench import MilbenchError

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "benchmark": {"name": str, "runs_dir": str, "data_dir": str, "cohort_prefix": str},
    "cohorts": {"scenarios": list, "patients": int, "censoring": (int, float), "size": (int, float), "in_dim": int,
                "seed": int, "folds": int},
    "training": {"protocol": str, "recipe": str, "epochs": int, "seeds": list},
    "models": {"names": list},
    "options": {},  # options.NAME = {model option or run field: value}, checked when the jobs are built
}


@dataclass(frozen=True)
class CohortParams:
    """What the generator is given for each scenario (milbench.synthetic.generate_cohort)."""

    patients: int
    censoring: float
    size: float
    in_dim: int
    seed: int
    folds: int


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark file, read and checked; relative paths are resolved against the file's repository root."""

    path: Path
    name: str
    runs_dir: Path
    data_dir: Path
    cohort_prefix: str
    scenarios: tuple[str, ...]
    cohort: CohortParams
    protocol: str
    recipe: str
    epochs: int
    seeds: tuple[int, ...]
    models: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cohort_name(self, scenario: str) -> str:
        """The run store's name of a scenario's cohort (the stem of its table)."""
        return f"{self.cohort_prefix}_{scenario}"


def _root_of(path: Path) -> Path:
    """Paths in a benchmark file are relative to the repository holding it (the parent of ``benchmarks/``)."""
    return path.parent.parent if path.parent.name == "benchmarks" else path.parent


def load_spec(path: str | Path) -> BenchmarkSpec:
    """Read and check a benchmark file; any unknown or missing key is a one-line error naming the file."""
    from milbench.config.run import PROTOCOLS, RECIPES
    from milbench.models.registry import get_card
    from milbench.tasks.synthetic import SCENARIOS

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MilbenchError(f"benchmark file {path} does not exist: e.g. benchmarks/synthetic.toml") from None
    except tomllib.TOMLDecodeError as err:
        raise MilbenchError(f"{path}: not valid TOML ({err})") from None

    def bad(msg: str) -> MilbenchError:
        return MilbenchError(f"{path}: {msg}")

    for section in raw:
        if section not in _SECTIONS:
            raise bad(f"unknown section [{section}]: use {', '.join(f'[{s}]' for s in _SECTIONS)}")
    values: dict[str, Any] = {}
    for section, keys in _SECTIONS.items():
        if section == "options":
            continue
        body = raw.get(section)
        if not isinstance(body, dict):
            raise bad(f"missing section [{section}] (keys {', '.join(keys)})")
        for key in body:
            if key not in keys:
                raise bad(f"unknown key '{key}' in [{section}]: use {', '.join(keys)}")
        for key, kind in keys.items():
            if key not in body:
                raise bad(f"[{section}] needs '{key}'")
            if not isinstance(body[key], kind) or isinstance(body[key], bool):
                raise bad(f"[{section}] {key} = {body[key]!r} has the wrong type")
            values[key] = body[key]
    unknown = [s for s in values["scenarios"] if s not in SCENARIOS]
    if unknown or not values["scenarios"]:
        raise bad(f"unknown scenario {unknown[0] if unknown else '(none)'}: use {', '.join(SCENARIOS)}")
    if values["protocol"] not in PROTOCOLS:
        raise bad(f"unknown protocol '{values['protocol']}': use one of {', '.join(PROTOCOLS)}")
    if values["recipe"] not in RECIPES:
        raise bad(f"unknown recipe '{values['recipe']}': use one of {', '.join(RECIPES)}")
    if not values["seeds"] or not all(isinstance(s, int) for s in values["seeds"]):
        raise bad("[training] seeds must be a non-empty list of integers")
    if not values["names"]:
        raise bad("[models] names is empty")
    for name in values["names"]:
        get_card(name)  # an unknown model fails here, with the registry's list of names
    options = raw.get("options", {})
    for name, opts in options.items():
        if name not in values["names"] or not isinstance(opts, dict):
            raise bad(f"[options.{name}] is not a table of a model in [models] names")
    root = _root_of(path)
    return BenchmarkSpec(
        path=path, name=values["name"], runs_dir=root / values["runs_dir"], data_dir=root / values["data_dir"],
        cohort_prefix=values["cohort_prefix"], scenarios=tuple(values["scenarios"]),
        cohort=CohortParams(values["patients"], float(values["censoring"]), float(values["size"]), values["in_dim"],
                            values["seed"], values["folds"]),
        protocol=values["protocol"], recipe=values["recipe"], epochs=values["epochs"], seeds=tuple(values["seeds"]),
        models=tuple(values["names"]), options={k: dict(v) for k, v in options.items()})
