"""A benchmark file's runs: its synthetic cohorts written once (reused while their parameters match) and the whole
grid expanded into fold jobs through :func:`milbench.runs.jobs.build_jobs`, so `milbench benchmark FILE` is
resumable exactly like `milbench grid`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from milbench import MilbenchError
from milbench.config.benchmark import BenchmarkSpec, CohortParams
from milbench.runs.jobs import FoldJob, build_jobs, cohort_spec
from milbench.tasks.synthetic import GENERATOR_VERSION, generate_cohort

def _matches(folder: Path, scenario: str, table: str, params: CohortParams) -> bool:
    """Whether ``folder`` holds a complete cohort generated with exactly these parameters."""
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
                   seeds: list[int] | None = None) -> list[FoldJob]:
    """Every fold of the benchmark (models x scenarios x seeds x folds), in the file's model order.

    ``models`` and ``seeds`` restrict the run to some of the file's (the file's order is kept), e.g. to share the
    work between machines.
    """
    names = _subset(models, spec.models, "model", spec.path)
    specs = [cohort_spec(str(tables[s]), "default", None) for s in spec.scenarios]
    jobs: list[FoldJob] = []
    for model in names:
        for seed in _subset(seeds, spec.seeds, "seed", spec.path):
            overrides = {"protocol": spec.protocol, "epochs": spec.epochs, "seed": seed, **spec.options.get(model, {})}
            jobs += build_jobs([model], specs, None, spec.recipe, overrides)
    return jobs
