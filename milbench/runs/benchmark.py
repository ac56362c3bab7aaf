"""A benchmark file's runs: its cohorts (synthetic ones written once and reused while their parameters match; TCGA
ones from the shipped tables with features under the file's or the user's template) and the whole grid expanded into
fold jobs through :func:`milbench.runs.jobs.build_jobs` (cohort specs through :func:`milbench.runs.jobs.grid_specs`),
so `milbench benchmark FILE` is resumable exactly like `milbench grid`.

One :func:`build_jobs` call per protocol and seed holds every model: each model's ``[options.NAME]`` go in as
``NAME.key`` overrides, so the feature headers of a cohort are read once per call, not once per model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from milbench import MilbenchError
from milbench.config.benchmark import (
    BenchmarkSpec,
    CohortParams,
    check_template,
    fill_template,
)
from milbench.files import write_json
from milbench.runs.estimate import Estimate, estimate
from milbench.runs.inventory import Inventory, inventory
from milbench.runs.jobs import CohortSpec, FoldJob, build_jobs, cohort_spec, grid_specs
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

    ``on_cohort(name, generated)`` is called per cohort (for progress output). A TCGA benchmark has nothing to
    write: its tables ship with milbench ({}).
    """
    if spec.kind != "synthetic":
        return {}
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


def _subset(wanted: Sequence | None, available: tuple, what: str, path: Path) -> list:
    """``wanted`` (in the file's order) after checking each is in ``available``; all of them when None."""
    if not wanted:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise MilbenchError(f"{what} '{unknown[0]}' is not in {path}: use some of {', '.join(map(str, available))}")
    return [a for a in available if a in wanted]


def tcga_names(spec: BenchmarkSpec, cohorts: Sequence[str] | None) -> list[str]:
    """The file's TCGA cohorts, or the asked subset of them (``blca`` or ``tcga_blca``), in the file's order."""
    from milbench.tasks.tcga import cohort_name

    return _subset([cohort_name(c) for c in cohorts] if cohorts else None, spec.tcga, "cohort", spec.path)


def features_template(spec: BenchmarkSpec, features: str | None) -> str:
    """The features template: ``--features`` when given, else the file's; neither is an error saying what to pass."""
    template = features if features is not None else spec.features
    if template is None:
        raise MilbenchError(f"{spec.path} names TCGA cohorts, whose features are not shipped: pass --features ROOT, "
                            f"e.g. --features '/data/tcga/{{cohort}}/{{backbone}}' ({{cohort}} -> tcga_blca, "
                            f"{{short}} -> blca, {{backbone}} -> {spec.backbones[0]})")
    return check_template(str(template), "--features")


def tcga_roots(spec: BenchmarkSpec, features: str | None, cohorts: Sequence[str] | None = None,
               backbones: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(cohort, backbone, features root) for every asked cohort and backbone of a TCGA benchmark."""
    template = features_template(spec, features)
    chosen = _subset(backbones, spec.backbones, "backbone", spec.path)
    return [(c, b, fill_template(template, c, b)) for c in tcga_names(spec, cohorts) for b in chosen]


def cohort_specs(spec: BenchmarkSpec, tables: dict[str, Path] | None = None, features: str | None = None,
                 cohorts: Sequence[str] | None = None, backbones: Sequence[str] | None = None,
                 exclude_missing: bool = False) -> list[CohortSpec]:
    """How each cohort of the file is built: a synthetic scenario's table (from :func:`prepare_cohorts`), or a TCGA
    cohort at each backbone with its features root filled in from the template."""
    if spec.kind == "synthetic":
        if features is not None:
            raise MilbenchError(f"{spec.path} is a synthetic benchmark: its cohorts carry their own features; leave "
                                f"out --features")
        wanted = _subset(cohorts, spec.scenarios, "scenario", spec.path) if cohorts else spec.scenarios
        return [cohort_spec(str(tables[s]), "default", None) for s in wanted]
    specs = []
    for cohort, backbone, root in tcga_roots(spec, features, cohorts, backbones):
        made, _ = grid_specs([cohort], [backbone], root)
        specs += [replace(s, exclude_missing=exclude_missing) for s in made]
    return specs


def benchmark_jobs(spec: BenchmarkSpec, tables: dict[str, Path] | None = None, models: list[str] | None = None,
                   seeds: list[int] | None = None, *, specs: list[CohortSpec] | None = None,
                   folds: list[int] | None = None, protocols: list[str] | None = None,
                   overrides: dict[str, Any] | None = None) -> list[FoldJob]:
    """Every fold of the benchmark (models x cohorts x backbones x protocols x seeds x folds), in the file's model
    order.

    ``models``, ``seeds``, ``protocols`` and ``folds`` restrict the run to part of the file's (the file's order is
    kept), e.g. to share the work between machines; ``specs`` are the cohorts (:func:`cohort_specs`; by default
    the synthetic tables); ``overrides`` are ``--set`` values applied to every job (they change the runs' identity).
    """
    names = _subset(models, spec.models, "model", spec.path)
    specs = specs if specs is not None else cohort_specs(spec, tables)
    jobs: list[FoldJob] = []
    for values in _variants(spec, names, seeds, protocols, overrides):
        jobs += build_jobs(names, specs, folds, spec.recipe, values)
    order = {m: i for i, m in enumerate(names)}
    return sorted(jobs, key=lambda j: order[j.cfg.model])  # stable: cohort, protocol, seed and fold order kept


def _variants(spec: BenchmarkSpec, names: list[str], seeds: Sequence[int] | None, protocols: Sequence[str] | None,
              overrides: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run fields of each protocol x seed: the file's, the protocol's own, each model's options (as
    ``MODEL.key``), then ``--set`` (last, so it wins)."""
    chosen = _subset(protocols, tuple(p.name for p in spec.protocols), "protocol", spec.path)
    options = {f"{m}.{k}": v for m in names for k, v in spec.options.get(m, {}).items()}
    return [{"protocol": protocol.name, "epochs": spec.epochs, "seed": seed, **protocol.overrides, **options,
             **(overrides or {})}
            for protocol in spec.protocols if protocol.name in chosen
            for seed in _subset(seeds, spec.seeds, "seed", spec.path)]


def planned_folds(spec: BenchmarkSpec, folds_of: dict[str, list[int]], pairs: Sequence[tuple[str, str]],
                  models: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  protocols: Sequence[str] | None = None, folds: Sequence[int] | None = None,
                  overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What the benchmark would train, without reading a feature file: one dict per fold job (model, its scales,
    cohort, backbone, protocol, seed, fold, epochs, warmup_epochs, inner_val_fraction), the effective run fields
    taken from :func:`milbench.config.run.make_config` as the job builder takes them. ``folds_of``: each cohort's
    folds; ``pairs``: the (cohort, backbone) pairs."""
    from milbench.config.run import make_config
    from milbench.models.registry import get_card

    names = _subset(models, spec.models, "model", spec.path)
    out = []
    for values in _variants(spec, names, seeds, protocols, overrides):
        for model in names:
            cfg = make_config(model, "planned", spec.recipe, values)
            for cohort, backbone in pairs:
                wanted = folds_of[cohort] if folds is None else [f for f in folds_of[cohort] if f in folds]
                out += [{"model": model, "scales": get_card(model).scales, "cohort": cohort, "backbone": backbone,
                         "protocol": cfg.protocol, "seed": cfg.seed, "fold": k, "epochs": cfg.epochs,
                         "warmup_epochs": cfg.warmup_epochs, "inner_val_fraction": cfg.inner_val_fraction}
                        for k in wanted]
    return out


def write_sidecar(spec: BenchmarkSpec, runs_dir: Path) -> Path:
    """Record the benchmark file beside its runs (``RUNS/benchmarks/<name>.json``): its hash, paper table,
    protocols with their labels, and the [unstated] choices the leaderboard prints."""
    text = spec.path.read_text()
    data = {"name": spec.name, "file": spec.path.name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "kind": spec.kind, "paper": spec.paper, "cohorts": list(spec.cohorts), "backbones": list(spec.backbones),
            "models": list(spec.models), "recipe": spec.recipe, "epochs": spec.epochs, "seeds": list(spec.seeds),
            "protocols": [{"name": p.name, "label": p.label, "overrides": p.overrides} for p in spec.protocols],
            "unstated": spec.unstated}
    path = Path(runs_dir) / "benchmarks" / f"{spec.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return path


def read_sidecars(runs_dir: Path) -> list[dict[str, Any]]:
    """The benchmark files recorded in a run store (see :func:`write_sidecar`), by name."""
    folder = Path(runs_dir) / "benchmarks"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return found


@dataclass
class DryRun:
    """A TCGA benchmark's dry run: what each features root holds, the estimate, and the plan (or why a run would
    stop before training)."""

    inventories: dict[tuple[str, str], Inventory]
    estimate: Estimate
    planned: int  # fold jobs the benchmark asks for
    todo: int | None = None  # of them, not yet in the store (None when the jobs could not be built)
    skipped: int | None = None
    stop: str | None = None  # the one-line error a real run would stop with


def dry_run(spec: BenchmarkSpec, features: str | None, runs_dir: Path, gpus: int = 1,
            cohorts: Sequence[str] | None = None, backbones: Sequence[str] | None = None,
            models: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
            protocols: Sequence[str] | None = None, folds: Sequence[int] | None = None,
            overrides: dict[str, Any] | None = None, exclude_missing: bool = False,
            progress: Callable[[str, int, int], None] | None = None) -> DryRun:
    """Inventory every asked cohort and backbone from file headers, estimate the compute, and build the jobs as a
    run would (reporting, not raising, the error that would stop it). Trains nothing, writes nothing."""
    from milbench.models.registry import get_card
    from milbench.runs.jobs import plan

    names = _subset(models, spec.models, "model", spec.path)
    scales = tuple(s for s in ("5x", "10x", "20x") if any(s in get_card(m).scales for m in names))
    roots = tcga_roots(spec, features, cohorts, backbones)
    inventories = {}
    for cohort, backbone, root in roots:
        tick = None if progress is None else (lambda i, n, c=cohort, b=backbone: progress(f"{c} · {b}", i, n))
        inventories[(cohort, backbone)] = inventory(cohort, root, backbone, scales, tick)
    folds_of = {c: sorted(inv.folds) for (c, _), inv in inventories.items()}
    jobs = planned_folds(spec, folds_of, list(inventories), names, seeds, protocols, folds, overrides)
    result = DryRun(inventories, estimate(jobs, inventories, gpus), len(jobs))
    try:
        specs = cohort_specs(spec, None, features, cohorts, backbones, exclude_missing)
        built = benchmark_jobs(spec, None, names, list(seeds) if seeds else None, specs=specs,
                               folds=list(folds) if folds else None, protocols=protocols, overrides=overrides)
    except MilbenchError as err:
        result.stop = str(err)
        return result
    todo, skipped = plan(built, runs_dir)
    result.planned, result.todo, result.skipped = len(built), len(todo), skipped
    return result
