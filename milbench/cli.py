"""The `milbench` command line: thin Typer commands that parse, call the library and print with rich."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from milbench import MilbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark MIL survival models on WSI patch features: same folds, loss, metrics and protocol.")
console = Console()

# Execution options shared by `run` and `grid`.
EXECUTOR = typer.Option("local", help="local (this process, or --max-parallel worker processes) | ray")
RAY_ADDRESS = typer.Option(None, help="Ray cluster to join (e.g. auto); default: a local instance.")
GPUS_PER_FOLD = typer.Option(None, help="Ray: GPUs per fold, fractions share a GPU (default 1 if the cluster has "
                             "GPUs, else 0).")
CPUS_PER_FOLD = typer.Option(1, help="CPU cores and torch threads per fold.")
MAX_PARALLEL = typer.Option(None, help="Folds at once (local default 1; ray default: no limit).")
RETRIES = typer.Option(2, help="Retries of a failed fold (bad input is never retried).")
COMPILE = typer.Option(False, "--compile", help="CUDA: torch.compile each model's hot blocks (about a minute per "
                       "model and worker; CrossFusion's step 12.6 -> 9.4 ms, docs/performance.md).")


def _folds(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MilbenchError(f"--folds expects comma-separated integers such as 0,1,2, got '{text}'") from None


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
    compile_: bool = COMPILE,
) -> None:
    """Cross-validate models on a cohort; completed folds are skipped, each fold's record is stored."""
    from milbench.config import make_config, parse_set
    from milbench.grid import check_options, drive
    from milbench.registry import get_card
    from milbench.runner import CohortSpec, check_executor, expand, plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    spec = CohortSpec.of(cohort, splits, features, backbone, exclude_missing)
    the_cohort = spec.resolve()
    recipe = recipe or ("small" if the_cohort.name.startswith("synthetic") else "paper")
    overrides = {"epochs": epochs, "lr": lr, "protocol": protocol, "seed": seed, "bins_on": bins_on,
                 "backbone": backbone or "default", **parse_set(set_)}
    configs = [make_config(m, the_cohort.name, recipe, overrides) for m in model]
    scales = sorted({s for cfg in configs for s in get_card(cfg.model).scales})  # bad model names fail here
    the_cohort.check_features(scales)  # every missing feature file is reported before any training
    jobs = expand(spec, the_cohort, configs, _folds(folds))
    check_options(jobs)  # a bad model option fails here, before any training
    todo, skipped = plan(jobs, runs_dir)
    console.print(f"cohort [bold]{the_cohort.name}[/]: {len(the_cohort.patients)} patients, recipe {recipe}, "
                  f"protocol {protocol}; {len(todo)} fold(s) to run, {skipped} already complete in {runs_dir}")
    report = drive(jobs, todo, runs_dir, console, device=device, cpus_per_fold=cpus_per_fold,
                   save_checkpoints=save_checkpoints, executor=executor, max_parallel=max_parallel,
                   ray_address=ray_address, gpus_per_fold=gpus_per_fold, compile=compile_)
    if skipped or report.count("trained"):
        _print_leaderboard(runs_dir, cohorts={the_cohort.name}, models=set(model))
    if report.failed:
        raise typer.Exit(1)


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
    node_cache: Optional[Path] = typer.Option(None, help="Node-local folder: each node copies the feature files of "
                                              "its folds there once and reads them from there."),
    cache_gb: Optional[float] = typer.Option(None, help="Memory each worker may fill with cached slides (GiB; "
                                             "default: no limit, every slide of its cohort stays in memory)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Run store (shared by all nodes)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default: the recipe's)."),
    recipe: Optional[str] = typer.Option(None, help="paper | small (default: small for synthetic cohorts, else paper)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe field or model option: key=value."),
    compile_: bool = COMPILE,
) -> None:
    """Train model x cohort x backbone x fold; resumable; two drivers on one store never train the same fold."""
    from milbench.config import parse_set
    from milbench.grid import build_jobs, drive, split_list
    from milbench.runner import check_executor, plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    names = split_list(models, "--models")
    jobs, notes = build_jobs(names, split_list(cohorts, "--cohorts"), split_list(backbones, "--backbones"),
                             _folds(folds), features, recipe, {"epochs": epochs, **parse_set(set_)})
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    todo, skipped = plan(jobs, runs_dir)
    pairs = len({(j.cfg.cohort, j.cfg.backbone) for j in jobs})
    console.print(f"grid: {len(names)} model(s) x {pairs} cohort-backbone(s) = {len(jobs)} folds; {len(todo)} to run, "
                  f"{skipped} already complete in {runs_dir}", highlight=False)
    report = drive(jobs, todo, runs_dir, console, device=device, cpus_per_fold=cpus_per_fold, executor=executor,
                   max_parallel=max_parallel, ray_address=ray_address, gpus_per_fold=gpus_per_fold, retries=retries,
                   node_cache=node_cache, cache_gb=cache_gb, compile=compile_)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def benchmark(
    config: Path = typer.Argument(..., help="Benchmark file, e.g. benchmarks/synthetic.toml."),
    models: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's models (default: all)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated subset of the file's seeds (default: all)."),
    dry_run: bool = typer.Option(False, help="Write the cohorts and print the plan; train nothing."),
    executor: str = EXECUTOR,
    ray_address: Optional[str] = RAY_ADDRESS,
    gpus_per_fold: Optional[float] = GPUS_PER_FOLD,
    cpus_per_fold: int = CPUS_PER_FOLD,
    max_parallel: Optional[int] = MAX_PARALLEL,
    retries: int = RETRIES,
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    compile_: bool = COMPILE,
) -> None:
    """Run a benchmark file: write its synthetic cohorts, then every model x scenario x seed x fold (resumable)."""
    from milbench.benchmark import benchmark_jobs, load_spec, prepare_cohorts
    from milbench.grid import drive, split_list
    from milbench.runner import check_executor, plan

    check_executor(executor, max_parallel, ray_address, gpus_per_fold, cpus_per_fold)
    spec = load_spec(config)
    tables = prepare_cohorts(spec, lambda name, fresh: console.print(
        f"cohort {name}: {'written' if fresh else 'present'} in {spec.data_dir / name}", highlight=False))
    jobs, notes = benchmark_jobs(spec, tables, split_list(models, "--models") if models else None,
                                 [int(s) for s in split_list(seeds, "--seeds")] if seeds else None)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    todo, skipped = plan(jobs, spec.runs_dir)
    console.print(f"benchmark {spec.name}: {len(jobs)} folds ({len({j.cfg.model for j in jobs})} models x "
                  f"{len(spec.scenarios)} scenarios x {len({j.cfg.seed for j in jobs})} seeds x {spec.cohort.folds} "
                  f"folds); "
                  f"{len(todo)} to run, {skipped} already complete in {spec.runs_dir}", highlight=False)
    if dry_run or not todo:
        return
    report = drive(jobs, todo, spec.runs_dir, console, device=device, cpus_per_fold=cpus_per_fold, executor=executor,
                   max_parallel=max_parallel, ray_address=ray_address, gpus_per_fold=gpus_per_fold, retries=retries,
                   compile=compile_)
    if report.failed:
        raise typer.Exit(1)


@app.command()
def status(
    runs_dir: Path = typer.Option(Path("runs"), help="Run store of the grid."),
    plan: Optional[str] = typer.Option(None, help="Plan id (default: the latest plan in the store)."),
) -> None:
    """Print the grid table (done / running / failed / pending, elapsed, ETA) of a grid running anywhere."""
    from milbench.grid import print_status

    print_status(console, runs_dir, plan)


@app.command()
def models() -> None:
    """List registered models with their scales, needs and reference parameter counts."""
    from milbench.registry import list_models

    table = Table(title="milbench models")
    for col in ("name", "model", "group", "scales", "needs", "params @1024", "params @2048", "paper"):
        table.add_column(col)
    for card in list_models():
        p = card.reference_params
        table.add_row(card.name, card.display_name, card.group, ",".join(card.scales), ",".join(card.needs) or "-",
                      f"{p[1024]:,}" if 1024 in p else "-", f"{p[2048]:,}" if 2048 in p else "-", card.paper)
    console.print(table)


@app.command()
def cohorts() -> None:
    """List the built-in cohorts: TCGA (shipped folds) and synthetic."""
    from milbench.synthetic import SCENARIOS
    from milbench.tasks.tcga import cohort_summaries

    table = Table(title="milbench cohorts")
    for col in ("name", "patients", "slides", "censored", "time bins (months)", "source"):
        table.add_column(col)
    for s in cohort_summaries():
        table.add_row(s["name"], str(s["patients"]), str(s["slides"]), f"{s['censored_fraction']:.2f}",
                      ", ".join(f"{e:g}" for e in s["inner_edges"]), s["source"])
    for sc in SCENARIOS:
        table.add_row(f"synthetic_{sc}" + (" (= synthetic)" if sc == "mixed" else ""), "150", "~190", "~0.70",
                      "fitted per training fold", "milbench synth (generated on first use)")
    console.print(table)


@app.command()
def synth(
    out: Path = typer.Option(..., help="Output folder (CLAM layout)."),
    scenario: str = typer.Option("mixed", help="coarse | fine | cross-scale | mixed"),
    patients: int = typer.Option(150, help="Number of patients."),
    seed: int = typer.Option(0, help="Random seed."),
    size: float = typer.Option(1.0, help="Bag-size scale (1.0: ~16 5x / ~64 10x / ~256 20x patches per slide)."),
    in_dim: int = typer.Option(64, help="Feature width."),
    censoring: float = typer.Option(0.7, help="Target censored fraction."),
) -> None:
    """Write a synthetic multi-scale cohort with a known (oracle) risk, in the CLAM layout."""
    from milbench.synthetic import generate_cohort

    path = generate_cohort(out, scenario, patients, seed, size=size, in_dim=in_dim, censoring=censoring)
    console.print(f"wrote synthetic cohort '{scenario}' ({patients} patients) to {path}; "
                  f"run it with: milbench run --model amil --cohort {path / 'cohort.csv'} "
                  f"--splits {path / 'splits'} --features {path / 'features'}")


@app.command()
def leaderboard(
    runs_dir: Path = typer.Option(Path("runs"), help="Run store to read."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default RUNS_DIR/leaderboard)."),
    format_: str = typer.Option("md,tex,html,csv", "--format", help="Comma-separated subset of md,tex,html,csv."),
    metric: str = typer.Option("c_index", help="c_index | uno_c | ibs | td_auc, recomputed per fold."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the pooled C-index CI (0: none)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    reported_only: bool = typer.Option(False, help="Write only the published figures (needs --out, no run store)."),
) -> None:
    """Recompute every figure from the stored predictions: tables per protocol, statistics, the reported block."""
    from milbench import leaderboard as lb

    formats = lb.parse_formats(format_)
    board = None
    if reported_only:
        if out is None:
            raise MilbenchError("--reported-only needs --out DIR (where to write the reported block)")
    else:
        board = lb.build(runs_dir, metric=metric, n_boot=bootstrap, seed=seed)
        _print_cells(board.cells, metric)
        for note in board.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    for path in lb.write(board, out or runs_dir / "leaderboard", formats):
        console.print(f"wrote {path}")


def _print_leaderboard(runs_dir: Path, cohorts: set[str] | None = None, models: set[str] | None = None):
    """C-index per cell (no bootstrap: quick), printed after a run."""
    from milbench import leaderboard as lb

    cells = lb.summary(lb.fold_table(runs_dir))
    shown = cells
    if cohorts:
        shown = shown[shown.cohort.isin(cohorts)]
    if models:
        shown = shown[shown.model.isin(models)]
    _print_cells(shown, "c_index")
    return cells


def _print_cells(cells: pd.DataFrame, metric: str) -> None:
    from milbench.leaderboard import INCOMPLETE, METRICS, SIGNIFICANT

    for protocol, part in cells.groupby("protocol"):
        t = Table(title=f"{METRICS[metric].label}, mean ± std over folds — protocol {protocol}")
        has_oracle = "oracle" in part and part.oracle.notna().any()
        for col in ["cohort", "backbone", "model", metric, "folds×seeds"] + (["oracle C"] if has_oracle else []):
            t.add_column(col)
        for _, r in part.sort_values(["cohort", "backbone", "order", "model"]).iterrows():
            std = "–" if pd.isna(r["std"]) else f"{r['std']:.3f}"
            value = f"{r['mean']:.3f} ± {std}" + ("" if r.complete else f" {INCOMPLETE}")
            value += f" {SIGNIFICANT}" if r.get("significant", False) else ""
            model = r.model + (f" ({r.variant_label})" if r.variant_label else "")
            row = [r.cohort, r.backbone, model, f"[bold]{value}[/]" if r["rank"] == 1 else value,
                   f"{r.folds}×{r.seeds}"]
            if has_oracle:
                row.append("" if pd.isna(r.oracle) else f"{r.oracle:.3f}")
            t.add_row(*row)
        console.print(t)


@app.command()
def bench(
    model: list[str] = typer.Option([], "--model", "-m",
                                    help="Model to time; repeat for several (default crossfusion)."),
    bag: list[str] = typer.Option([], "--bag", help="avg | p90 | max | avg/16 (scaled down) | N20 | N5,N10,N20; "
                                  "repeat for several (default avg)."),
    in_dim: int = typer.Option(2048, help="Feature width."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 autocast (default: bf16 on CUDA, fp32 on CPU)."),
    steps: Optional[int] = typer.Option(None, help="Timed steps, median reported (default 10 on CUDA, 3 on CPU)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up steps (default 3 on CUDA, 1 on CPU)."),
    compile_: str = typer.Option("auto", "--compile", help="auto (blocks on CUDA, off on CPU) | off | blocks "
                                 "(torch.compile the models' hot blocks: the engine's fast path)."),
    pack: int = typer.Option(0, help="Training throughput, one bag per step against PACK bags per forward pass."),
    sdpa: str = typer.Option("default", help="Attention kernel preferred: default | cudnn | flash | efficient | math."),
    profile: bool = typer.Option(False, "--profile", help="Also profile one step: host vs device time, top kernels."),
    graphs: bool = typer.Option(True, "--graphs/--no-graphs",
                                help="CUDA: replay each training step from a CUDA graph, as training does (models "
                                     "that declare cuda_graphs)."),
    epoch: bool = typer.Option(False, "--epoch",
                               help="End-to-end epochs from disk: the reference's loading vs milbench."),
    patients: int = typer.Option(1000, help="--epoch: patients in milbench's cached epoch."),
    size: str = typer.Option("avg", help="--epoch: bag size of every synthetic patient."),
    disk_slides: int = typer.Option(64, help="--epoch: slides written to disk (float32 .pt and .h5)."),
    workers: int = typer.Option(8, help="--epoch: DataLoader workers of the reference path."),
    workdir: Optional[Path] = typer.Option(None, help="--epoch: folder for the synthetic cohort (default: temp)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    budget: Optional[float] = typer.Option(None, help="Seconds after which no further measurement starts."),
    json_: bool = typer.Option(False, "--json", help="Print the records as JSON instead of tables."),
    out: Optional[Path] = typer.Option(None, help="Also append the records to this JSON Lines file, one per line."),
    md: Optional[Path] = typer.Option(None, help="Also write the markdown tables to this file."),
) -> None:
    """Time training steps (forward + backward, median after warm-up) and peak memory per model and bag size."""
    import json

    import torch

    from milbench import bench as lib
    from milbench.engine import resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    records: list[dict] = []

    def report(record: dict) -> None:  # files are written as records come, so a killed run keeps what it measured
        records.append(record)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if md:
            md.write_text(lib.markdown(records))
        if not json_:
            console.print(lib.one_line(record), highlight=False, soft_wrap=True)

    if epoch:
        report(lib.run_epoch(model[0] if model else "crossfusion", patients, size, in_dim, dev, workdir, disk_slides,
                             workers, compile_, graphs))
    else:
        lib.run(model or ["crossfusion"], bag or ["avg"], in_dim, dev, dtype, steps, warmup, compile_, pack, budget,
                report, sdpa, profile, graphs)
    if json_:
        print(json.dumps(records, indent=1))
    else:
        console.print(lib.markdown(records), highlight=False, soft_wrap=True)


def _add_subcommands() -> None:
    try:
        from milbench.commands import splits
    except ModuleNotFoundError:
        return
    app.add_typer(splits.app, name="splits", help="Import, audit and make patient-level splits.")
    from milbench.commands import plot

    app.add_typer(plot.app, name="plot", help="Kaplan-Meier curves and attention heatmaps from a run store.")
    from milbench.commands import extract

    app.command("extract")(extract.extract)


_add_subcommands()


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback (usage errors exit 2 too)."""
    try:
        app()
    except MilbenchError as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
