"""`milbench run`, `grid`, `benchmark` and `status`: build the fold jobs, drive them, print what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from milbench.cli.app import app, console
from milbench.cli.options import (
    COMPILE,
    CPUS_PER_FOLD,
    EXECUTOR,
    GPUS_PER_FOLD,
    MAX_PARALLEL,
    NO_WAIT,
    NODE_CACHE,
    NODE_CACHE_GB,
    RAY_ADDRESS,
    RETRIES,
    check_device,
    finish,
    parse_folds,
    split_list,
)


@app.command()
def run(
    model: list[str] = typer.Option(..., "--model", "-m", help="Registered model name; repeat for several."),
    cohort: str = typer.Option(..., help="synthetic[_SCENARIO], tcga_* (or blca brca coad gbmlgg luad ucec), or TABLE.csv"),
    splits: Optional[Path] = typer.Option(None, help="Folder of splits_{k}.csv (custom cohorts)."),
    features: Optional[Path] = typer.Option(None, help="Features root (CLAM or TRIDENT layout)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone sub-folder of the features root, e.g. resnet50."),
    folds: Optional[str] = typer.Option(None, help="Folds to run, e.g. 0,1 (default: all)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the recipe's)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the recipe's)."),
    protocol: str = typer.Option("fixed", help="fixed | inner-val | best-val"),
    seed: int = typer.Option(7, help="Random seed (the fold number is added per fold)."),
    recipe: Optional[str] = typer.Option(None, help="paper | small (default: small for synthetic cohorts, else paper)."),
    bins_on: str = typer.Option("train", help="Fit time bins on the training fold (train) or the whole cohort."),
    runs_dir: Path = typer.Option(Path("runs"), help="Run store."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    exclude_missing: bool = typer.Option(False, help="Drop slides without feature files (listed in the record)."),
    save_checkpoints: bool = typer.Option(False, help="Keep each fold's model weights (for attention heatmaps)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field or model option: key=value."),
    executor: str = EXECUTOR,
    ray_address: Optional[str] = RAY_ADDRESS,
    gpus_per_fold: Optional[float] = GPUS_PER_FOLD,
    cpus_per_fold: int = CPUS_PER_FOLD,
    max_parallel: Optional[int] = MAX_PARALLEL,
    node_cache: Optional[Path] = NODE_CACHE,
    node_cache_gb: float = NODE_CACHE_GB,
    compile_: bool = COMPILE,
    no_wait: bool = NO_WAIT,
) -> None:
    """Cross-validate models on a cohort; completed folds are skipped, each fold's record is stored."""
    from milbench.config.run import parse_set
    from milbench.runs.drive import drive
    from milbench.runs.executors import check_executor
    from milbench.runs.jobs import CohortSpec, build_jobs, plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    check_device(device)
    spec = CohortSpec.of(cohort, splits, features, backbone, exclude_missing)
    overrides = {"epochs": epochs, "lr": lr, "protocol": protocol, "seed": seed, "bins_on": bins_on, **parse_set(set_)}
    jobs = build_jobs(model, [spec], parse_folds(folds), recipe, overrides)  # every input checked before training
    the_cohort = spec.resolve()
    recipe = jobs[0].cfg.recipe
    todo, skipped = plan(jobs, runs_dir)
    console.print(f"cohort [bold]{the_cohort.name}[/]: {len(the_cohort.patients)} patients, recipe {recipe}, "
                  f"protocol {protocol}; {len(todo)} fold(s) to run, {skipped} already complete in {runs_dir}")
    report = drive(jobs, todo, runs_dir, console, device=device, cpus_per_fold=cpus_per_fold,
                   save_checkpoints=save_checkpoints, executor=executor, max_parallel=max_parallel,
                   ray_address=ray_address, gpus_per_fold=gpus_per_fold, node_cache=node_cache,
                   node_cache_gb=node_cache_gb, compile=compile_, wait=not no_wait)
    if skipped or report.count("trained"):
        _print_leaderboard(runs_dir, cohorts={the_cohort.name}, models=set(model))
    finish(jobs, runs_dir, report)


@app.command()
def grid(
    models: str = typer.Option(..., help="Comma-separated model names, e.g. amil,transmil."),
    cohorts: str = typer.Option(..., help="Comma-separated cohorts: synthetic_*, tcga_* names or TABLE.csv paths "
                                "(a table beside splits/ and features/ folders uses them)."),
    backbones: str = typer.Option("default", help="Comma-separated backbone folders of the features root "
                                  "(built-in synthetic cohorts run only 'default')."),
    folds: Optional[str] = typer.Option(None, help="Folds to run, e.g. 0,1 (default: all)."),
    features: Optional[str] = typer.Option(None, help="Features root ROOT/<backbone>/x20/...; '{cohort}' in it is "
                                           "replaced by each cohort's name."),
    executor: str = EXECUTOR,
    ray_address: Optional[str] = RAY_ADDRESS,
    gpus_per_fold: Optional[float] = GPUS_PER_FOLD,
    cpus_per_fold: int = CPUS_PER_FOLD,
    max_parallel: Optional[int] = MAX_PARALLEL,
    retries: int = RETRIES,
    node_cache: Optional[Path] = NODE_CACHE,
    node_cache_gb: float = NODE_CACHE_GB,
    cache_gb: Optional[float] = typer.Option(None, help="Memory each worker may fill with cached slides (GiB; "
                                             "default: no limit, every slide of its cohort stays in memory)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Run store (shared by all nodes)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the recipe's)."),
    recipe: Optional[str] = typer.Option(None, help="paper | small (default: small for synthetic cohorts, else paper)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field or model option: key=value."),
    compile_: bool = COMPILE,
    no_wait: bool = NO_WAIT,
) -> None:
    """Train model x cohort x backbone x fold; resumable; two drivers on one store never train the same fold."""
    from milbench.config.run import parse_set
    from milbench.runs.drive import drive
    from milbench.runs.executors import check_executor
    from milbench.runs.jobs import build_jobs, grid_specs, plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    check_device(device)
    names = split_list(models, "--models")
    specs, notes = grid_specs(split_list(cohorts, "--cohorts"), split_list(backbones, "--backbones"), features)
    jobs = build_jobs(names, specs, parse_folds(folds), recipe, {"epochs": epochs, **parse_set(set_)})
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    todo, skipped = plan(jobs, runs_dir)
    pairs = len({(j.cfg.cohort, j.cfg.backbone) for j in jobs})
    console.print(f"grid: {len(names)} model(s) x {pairs} cohort-backbone(s) = {len(jobs)} folds; {len(todo)} to run, "
                  f"{skipped} already complete in {runs_dir}", highlight=False)
    report = drive(jobs, todo, runs_dir, console, device=device, cpus_per_fold=cpus_per_fold, executor=executor,
                   max_parallel=max_parallel, ray_address=ray_address, gpus_per_fold=gpus_per_fold, retries=retries,
                   node_cache=node_cache, node_cache_gb=node_cache_gb, cache_gb=cache_gb, compile=compile_,
                   wait=not no_wait)
    finish(jobs, runs_dir, report)


@app.command()
def benchmark(
    config: Path = typer.Argument(..., help="Benchmark file, e.g. benchmarks/synthetic.toml or "
                                  "benchmarks/crossfusion_midl2026.toml."),
    features: Optional[str] = typer.Option(None, help="TCGA files: features root template, e.g. "
                                           "'/data/tcga/{cohort}/{backbone}' ({cohort} tcga_blca, {short} blca, "
                                           "{COHORT} BLCA, {backbone} resnet50); default: the file's."),
    models: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's models (default: all)."),
    cohorts: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's TCGA cohorts or "
                                          "scenarios (default: all)."),
    backbones: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's backbones."),
    protocols: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's protocols."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's seeds (default: all)."),
    folds: Optional[str] = typer.Option(None, help="Folds to run, e.g. 0,1 (default: all)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field or model option for every job: "
                                   "key=value (changes the runs' identity)."),
    runs_dir: Optional[Path] = typer.Option(None, help="Run store (default: the file's runs_dir)."),
    exclude_missing: bool = typer.Option(False, help="Drop slides without feature files (listed in each record)."),
    dry_run: bool = typer.Option(False, help="Train nothing: print the plan (synthetic cohorts are written), and "
                                 "for TCGA files what the features root holds and an estimate of GPU-hours."),
    gpus: int = typer.Option(1, help="Dry run: the GPUs to estimate the wall-clock time for."),
    list_missing: bool = typer.Option(False, help="Dry run: list every missing slide (default: the first 10)."),
    executor: str = EXECUTOR,
    ray_address: Optional[str] = RAY_ADDRESS,
    gpus_per_fold: Optional[float] = GPUS_PER_FOLD,
    cpus_per_fold: int = CPUS_PER_FOLD,
    max_parallel: Optional[int] = MAX_PARALLEL,
    retries: int = RETRIES,
    node_cache: Optional[Path] = NODE_CACHE,
    node_cache_gb: float = NODE_CACHE_GB,
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    compile_: bool = COMPILE,
    no_wait: bool = NO_WAIT,
) -> None:
    """Run a benchmark file: every model x cohort (x backbone x protocol) x seed x fold, resumable; a TCGA file's
    runs are then set beside the paper's figures (RUNS/leaderboard/paper.md)."""
    from milbench import MilbenchError
    from milbench.cli.benchmark_view import print_dry_run, print_paper
    from milbench.config.benchmark import load_spec
    from milbench.config.run import parse_set
    from milbench.runs.benchmark import benchmark_jobs, cohort_specs, dry_run as dry, prepare_cohorts, write_sidecar
    from milbench.runs.drive import drive
    from milbench.runs.executors import check_executor
    from milbench.runs.jobs import plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    check_device(device)
    if gpus < 1:
        raise MilbenchError(f"--gpus {gpus}: give the number of GPUs to estimate for, at least 1")
    spec = load_spec(config)
    runs = runs_dir if runs_dir is not None else spec.runs_dir
    subset = {"models": split_list(models, "--models") if models else None,
              "seeds": [int(s) for s in split_list(seeds, "--seeds")] if seeds else None,
              "protocols": split_list(protocols, "--protocols") if protocols else None,
              "folds": parse_folds(folds), "overrides": parse_set(set_)}
    picked = {"cohorts": split_list(cohorts, "--cohorts") if cohorts else None,
              "backbones": split_list(backbones, "--backbones") if backbones else None}
    if spec.kind == "tcga" and dry_run:
        print_dry_run(console, spec, dry(spec, features, runs, gpus, **picked, **subset,
                                         exclude_missing=exclude_missing), runs, list_missing)
        return
    tables = prepare_cohorts(spec, lambda name, fresh: console.print(
        f"cohort {name}: {'written' if fresh else 'present'} in {spec.data_dir / name}", highlight=False))
    specs = cohort_specs(spec, tables, features, exclude_missing=exclude_missing, **picked)
    jobs = benchmark_jobs(spec, tables, subset["models"], subset["seeds"], specs=specs, folds=subset["folds"],
                          protocols=subset["protocols"], overrides=subset["overrides"])
    todo, skipped = plan(jobs, runs)
    n = {k: len({getattr(j.cfg, k) for j in jobs}) for k in ("model", "seed", "cohort", "backbone", "protocol")}
    shape = (f"{n['model']} models x {n['cohort']} cohorts x {n['backbone']} backbones x {n['protocol']} protocols x "
             f"{n['seed']} seeds x {len({j.fold for j in jobs})} folds" if spec.kind == "tcga" else
             f"{n['model']} models x {len(specs)} scenarios x {n['seed']} seeds x {len({j.fold for j in jobs})} folds")
    console.print(f"benchmark {spec.name}: {len(jobs)} folds ({shape}); {len(todo)} to run, {skipped} already "
                  f"complete in {runs}", highlight=False)
    if dry_run:
        return
    if spec.kind == "tcga":
        write_sidecar(spec, runs)
    report = None
    if todo:
        report = drive(jobs, todo, runs, console, device=device, cpus_per_fold=cpus_per_fold, executor=executor,
                       max_parallel=max_parallel, ray_address=ray_address, gpus_per_fold=gpus_per_fold,
                       retries=retries, node_cache=node_cache, node_cache_gb=node_cache_gb, compile=compile_,
                       wait=not no_wait)
    if spec.kind == "tcga":
        print_paper(console, runs)
    if report is not None:
        finish(jobs, runs, report)


@app.command()
def status(
    runs_dir: Path = typer.Option(Path("runs"), help="Run store of the grid."),
    plan: Optional[str] = typer.Option(None, help="Plan id (default: the latest plan in the store)."),
) -> None:
    """Print the grid table (done / running / failed / pending, elapsed, ETA) of a grid running anywhere."""
    from milbench.runs.status import print_status

    print_status(console, runs_dir, plan)


def _print_leaderboard(runs_dir: Path, cohorts: set[str] | None = None, models: set[str] | None = None):
    """C-index per cell (no bootstrap: quick), printed after a run."""
    from milbench.cli.leaderboard import print_cells
    from milbench.report.aggregate import fold_table, summary

    cells = summary(fold_table(runs_dir))
    shown = cells
    if cohorts:
        shown = shown[shown.cohort.isin(cohorts)]
    if models:
        shown = shown[shown.model.isin(models)]
    print_cells(shown, "c_index")
    return cells
