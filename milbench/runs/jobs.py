"""Fold jobs: what one worker trains (a cohort spec, a configuration, a fold), and the one place they are built.

``run``, ``grid`` and ``benchmark`` all build their jobs through :func:`build_jobs`, so the recipe default, the
feature checks and the model-option checks are the same whichever command started a run.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from milbench import MilbenchError
from milbench.config.run import RunConfig, make_config
from milbench.models.registry import create_model, get_card
from milbench.runs.claims import CLAIM_STALE_S
from milbench.runs.store import find_record, run_dir
from milbench.tasks.cohort import Cohort, resolve_cohort
from milbench.training.datasets import coords_reason, no_coords


@dataclass(frozen=True)
class CohortSpec:
    """How to build a cohort, with absolute paths, so that any process on any node can rebuild it."""

    source: str  # a built-in name or the path of a cohort table
    splits: str | None = None
    features: str | None = None
    backbone: str | None = None
    exclude_missing: bool = False

    @classmethod
    def of(cls, source: str | Path, splits: str | Path | None = None, features: str | Path | None = None,
           backbone: str | None = None, exclude_missing: bool = False) -> CohortSpec:
        """A spec whose paths are absolute (workers may start in another directory)."""
        text = str(source)
        if is_table(text):
            text = str(Path(text).expanduser().resolve())
        return cls(text, _absolute(splits), _absolute(features), None if backbone in (None, "default") else backbone,
                   exclude_missing)

    def resolve(self) -> Cohort:
        """The cohort itself (tables read, splits checked, feature files located)."""
        return resolve_cohort(self.source, splits=self.splits, features=self.features, backbone=self.backbone,
                              exclude_missing=self.exclude_missing)


def is_table(source: str | Path) -> bool:
    """Whether a cohort argument names a table file rather than a built-in cohort (the rule resolve_cohort uses)."""
    text = str(source).strip()
    return isinstance(source, Path) or text.lower().endswith(".csv") or "/" in text


def _absolute(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class FoldJob:
    """One fold of one configuration on one cohort: the unit a worker trains."""

    cohort: CohortSpec
    cfg: RunConfig
    fold: int

    @property
    def rel(self) -> str:
        """The run folder relative to the store (``cohort/backbone/model/protocol-hash``)."""
        return run_dir(Path(""), self.cfg).as_posix()

    @property
    def label(self) -> str:
        return f"{self.cfg.model} · {self.cfg.cohort} · {self.cfg.backbone} · fold {self.fold}"


@dataclass(frozen=True)
class RunOptions:
    """What a fold task needs besides its job: where to write, device, threads, and who submitted it."""

    runs_dir: str
    device: str = "auto"
    threads: int = 1
    save_checkpoints: bool = False
    stale_after: float = CLAIM_STALE_S
    driver: str = ""
    node_cache: str | None = None  # node-local folder of the node's shared slide cache (milbench.data.node_cache)
    node_cache_bytes: int = 64 * 2**30  # its size limit on disk (least recently used slides removed first)
    cache_bytes: int | None = None  # memory budget of each worker's slide cache (None: unlimited)
    compile: bool = False  # CUDA: torch.compile each model's hot blocks (docs/performance.md)


def expand(spec: CohortSpec, cohort: Cohort, configs: list[RunConfig], folds: list[int] | None) -> list[FoldJob]:
    """Every wanted fold of every config on one cohort, after checking those folds
    (:func:`milbench.tasks.inputs.check_folds`: present, each held-out fold with an event)."""
    from milbench.tasks.inputs import check_folds

    return [FoldJob(spec, cfg, f) for cfg in configs for f in check_folds(cohort, folds)]


def plan(jobs: list[FoldJob], runs_dir: Path) -> tuple[list[FoldJob], int]:
    """Jobs still to run (no record of the same experiment yet), and how many were skipped because one exists."""
    todo = [job for job in jobs if find_record(runs_dir, job.cfg, job.fold) is None]
    return todo, len(jobs) - len(todo)


def missing_records(jobs: list[FoldJob], runs_dir: Path) -> list[FoldJob]:
    """The jobs whose record is not in the store: a command exits 0 only when this is empty."""
    return [job for job in jobs if find_record(runs_dir, job.cfg, job.fold) is None]


def _is_builtin_synthetic(source: str) -> bool:
    return not is_table(source) and source.strip().lower().startswith("synthetic")


def cohort_spec(source: str, backbone: str, features: str | None) -> CohortSpec:
    """How one grid cohort is built at one backbone.

    ``features`` may hold ``{cohort}`` (replaced by the cohort's name) for one feature root per cohort. A cohort
    table in a folder that also holds ``splits/`` and ``features/`` (as `milbench synth` writes) uses them when
    the table has no ``fold`` column and no ``features`` root is given.
    """
    splits = root = None
    path = Path(source)
    if is_table(source) and path.is_file():
        if (path.parent / "splits").is_dir() and "fold" not in pd.read_csv(path, nrows=0).columns:
            splits = path.parent / "splits"
        if features is None and (path.parent / "features").is_dir():
            root = path.parent / "features"
    if features is not None:
        name = CohortSpec.of(source, splits).resolve().name if "{cohort}" in features else ""
        root = features.replace("{cohort}", name)
    return CohortSpec.of(source, splits, root, backbone)


def default_recipe(cohort_name: str) -> str:
    """The recipe a run gets when none is named: ``small`` for synthetic cohorts, the paper's otherwise."""
    return "small" if cohort_name.startswith("synthetic") else "paper"


def grid_specs(cohorts: Sequence[str], backbones: Sequence[str], features: str | None
               ) -> tuple[list[CohortSpec], list[str]]:
    """The cohort x backbone specs of a grid, and notes on what was left out (built-in synthetic cohorts have no
    backbone folders: only ``default`` runs)."""
    specs: list[CohortSpec] = []
    notes: list[str] = []
    for source in cohorts:
        for backbone in backbones:
            if backbone != "default" and _is_builtin_synthetic(source):
                notes.append(f"{source} has no backbone folders: backbone {backbone} skipped")
                continue
            specs.append(cohort_spec(source, backbone, features))
    return specs, notes


def model_overrides(models: Sequence[str], overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each model's share of ``--set``: run fields for all, a model option only for the models that have it
    (``MODEL.key`` for one model alone). A key that no model and no run field knows is refused, with the closest."""
    from milbench.config.run import RunConfig, unknown_key
    from milbench.models.registry import model_class

    fields = set(RunConfig.__dataclass_fields__) - {"model_options", "inputs", "model", "cohort"}
    params = {m: [p for p in inspect.signature(model_class(m).__init__).parameters if p not in ("self", "in_dim",
                                                                                               "n_bins")]
              for m in models}
    shares: dict[str, dict[str, Any]] = {m: {} for m in models}
    for raw, value in overrides.items():
        key = raw.replace("-", "_")
        target, name = key.split(".", 1) if "." in key else (None, key)
        if target is not None and target not in params:
            raise unknown_key(raw, [f"{m}.{p}" for m in models for p in params[m]])
        takers = [m for m in models if target in (None, m) and (name in fields or name in params[m])]
        if not takers:
            options = sorted({p for m in models if target in (None, m) for p in params[m]})
            raise unknown_key(raw, sorted(fields) + options)
        for m in takers:
            shares[m][name] = value
    return shares


def build_jobs(models: Sequence[str], specs: Sequence[CohortSpec], folds: list[int] | None, recipe: str | None,
               overrides: dict[str, Any]) -> list[FoldJob]:
    """Every fold of every model on every cohort spec, grouped by cohort and backbone (so a worker's feature cache
    stays warm): the one place jobs are built. Every check that needs no training runs here, before anything is
    submitted: configurations (types and bounds), model names and options, folds (present, with events), and the
    header of every feature file the folds will read. Each configuration carries the fingerprints of its inputs."""
    from milbench.tasks.inputs import inspect_inputs

    for m in models:
        get_card(m)  # an unknown model fails first, with the closest names
    shares = model_overrides(models, overrides)
    jobs: list[FoldJob] = []
    built: set[str] = set()
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        cohort = spec.resolve()
        backbone = spec.backbone or "default"
        if seen.setdefault((cohort.name, backbone), spec.source) != spec.source:
            raise MilbenchError(f"cohorts {seen[cohort.name, backbone]} and {spec.source} are both named "
                                f"'{cohort.name}': rename one of the tables (the run store keys runs by name)")
        rec = recipe or default_recipe(cohort.name)
        scales = sorted({s for m in models for s in get_card(m).scales})
        inputs = inspect_inputs(cohort, scales, folds)
        configs = [make_config(m, cohort.name, rec, {**shares[m], "backbone": backbone,
                                                    "inputs": inputs.fingerprints(get_card(m).scales)})
                   for m in models]
        for cfg in configs:
            check_options(cfg, inputs.dim, built)
            card = get_card(cfg.model)
            if coords_reason(card):  # the headers say which files lack the coordinates this model needs
                lacking = next((h for (_, scale), h in inputs.headers.items()
                                if scale in card.scales and h.coords is None), None)
                if lacking is not None:
                    raise no_coords(lacking.path, card)
        jobs += [FoldJob(spec, cfg, f) for cfg in configs for f in inputs.folds]
    return jobs


def check_options(cfg: RunConfig, in_dim: int, built: set[str]) -> None:
    """Build the model of ``cfg`` at the cohort's feature width (read from the headers), once per distinct model
    configuration in ``built``, so a bad option fails before anything is submitted."""
    key = json.dumps([cfg.model, in_dim, cfg.n_bins, cfg.model_options], sort_keys=True, default=str)
    if key in built:
        return
    built.add(key)
    try:
        create_model(cfg.model, in_dim=in_dim, n_bins=cfg.n_bins, **cfg.model_options)
    except (TypeError, ValueError, AssertionError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in cfg.model_options.items()) or "its defaults"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise MilbenchError(f"model '{cfg.model}' cannot be built with {shown} ({first}): check the value of each "
                            f"--set option") from None
