"""The synthetic benchmark: a TOML file names the scenarios, cohort size, protocol, epochs, seeds and models; this
module writes the cohorts it names (once, reused while their parameters match) and expands the whole grid into
fold jobs for the grid driver, so `milbench benchmark FILE` is resumable exactly like `milbench grid`.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milbench import MilbenchError
from milbench.runner import FoldJob

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
    from milbench.config import PROTOCOLS, RECIPES
    from milbench.registry import get_card
    from milbench.synthetic import SCENARIOS

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


def _matches(folder: Path, scenario: str, table: str, params: CohortParams) -> bool:
    """Whether ``folder`` holds a complete cohort generated with exactly these parameters."""
    from milbench.synthetic import GENERATOR_VERSION

    try:
        meta = json.loads((folder / "synthetic.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    wanted = {"scenario": scenario, "table": table, "generator_version": GENERATOR_VERSION,
              **{k: getattr(params, k) for k in ("patients", "censoring", "size", "in_dim", "seed", "folds")}}
    return all(meta.get(k) == v for k, v in wanted.items()) and (folder / table).is_file()


def prepare_cohorts(spec: BenchmarkSpec, on_cohort: Callable[[str, bool], None] | None = None) -> dict[str, Path]:
    """Write each scenario's cohort into ``data_dir`` unless an identical one is there; {scenario: table path}.

    ``on_cohort(name, generated)`` is called per cohort (for progress output).
    """
    from milbench.synthetic import generate_cohort

    tables = {}
    for scenario in spec.scenarios:
        name = spec.cohort_name(scenario)
        folder, table = spec.data_dir / name, f"{name}.csv"
        fresh = not _matches(folder, scenario, table, spec.cohort)
        if fresh:
            p = spec.cohort
            generate_cohort(folder, scenario, p.patients, p.seed, size=p.size, in_dim=p.in_dim, censoring=p.censoring,
                            folds=p.folds, table=table)
        if on_cohort is not None:
            on_cohort(name, fresh)
        tables[scenario] = folder / table
    return tables


def _subset(wanted: list | None, available: tuple, what: str, path: Path) -> list:
    """``wanted`` (in the file's order) after checking each is in ``available``; all of them when None."""
    if not wanted:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise MilbenchError(f"{what} '{unknown[0]}' is not in {path}: use some of {', '.join(map(str, available))}")
    return [a for a in available if a in wanted]


def benchmark_jobs(spec: BenchmarkSpec, tables: dict[str, Path], models: list[str] | None = None,
                   seeds: list[int] | None = None) -> tuple[list[FoldJob], list[str]]:
    """Every fold of the benchmark (models x scenarios x seeds x folds), slowest models first, and grid notes.

    ``models`` and ``seeds`` restrict the run to some of the file's (the file's order is kept), e.g. to share the
    work between machines.
    """
    from milbench.grid import build_jobs

    names = _subset(models, spec.models, "model", spec.path)
    sources = [str(tables[s]) for s in spec.scenarios]
    jobs: list[FoldJob] = []
    notes: list[str] = []
    for model in names:
        for seed in _subset(seeds, spec.seeds, "seed", spec.path):
            overrides = {"protocol": spec.protocol, "epochs": spec.epochs, "seed": seed, **spec.options.get(model, {})}
            more, why = build_jobs([model], sources, ["default"], None, None, spec.recipe, overrides)
            jobs += more
            notes += [n for n in why if n not in notes]
    return jobs, notes
