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
) -> None:
    """Cross-validate models on a cohort; completed folds are skipped, each fold's record is stored."""
    from milbench.config import make_config, parse_set
    from milbench.registry import get_card
    from milbench.runner import plan, run_local
    from milbench.tasks.cohort import resolve_cohort

    the_cohort = resolve_cohort(cohort, splits=splits, features=features, backbone=backbone,
                                exclude_missing=exclude_missing)
    recipe = recipe or ("small" if the_cohort.name.startswith("synthetic") else "paper")
    overrides = {"epochs": epochs, "lr": lr, "protocol": protocol, "seed": seed, "bins_on": bins_on,
                 "backbone": backbone or "default", **parse_set(set_)}
    configs = [make_config(m, the_cohort.name, recipe, overrides) for m in model]
    scales = sorted({s for cfg in configs for s in get_card(cfg.model).scales})  # bad model names fail here
    the_cohort.check_features(scales)  # every missing feature file is reported before any training
    jobs, skipped = plan(the_cohort, configs, _folds(folds), runs_dir)
    console.print(f"cohort [bold]{the_cohort.name}[/]: {len(the_cohort.patients)} patients, recipe {recipe}, "
                  f"protocol {protocol}; {len(jobs)} fold(s) to run, {skipped} already complete in {runs_dir}")
    run_local(the_cohort, jobs, runs_dir, device=device, console=console, save_checkpoints=save_checkpoints)
    _print_leaderboard(runs_dir, cohorts={the_cohort.name}, models=set(model))


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
    out: Optional[Path] = typer.Option(None, help="Folder for leaderboard.md/.csv (default RUNS_DIR/leaderboard)."),
) -> None:
    """Recompute every figure from the stored predictions and render the leaderboard."""
    from milbench import leaderboard as lb

    table = _print_leaderboard(runs_dir)
    for path in lb.write(table, out or runs_dir / "leaderboard"):
        console.print(f"wrote {path}")


def _print_leaderboard(runs_dir: Path, cohorts: set[str] | None = None, models: set[str] | None = None):
    from milbench import leaderboard as lb

    table = lb.summary(lb.fold_table(runs_dir))
    shown = table
    if cohorts:
        shown = shown[shown.cohort.isin(cohorts)]
    if models:
        shown = shown[shown.model.isin(models)]
    for protocol, part in shown.groupby("protocol"):
        t = Table(title=f"C-index (Harrell), mean ± std over folds — protocol {protocol}")
        has_oracle = "oracle" in part and part.oracle.notna().any()
        for col in ["cohort", "backbone", "model", "C-index", "folds", "seeds"] + (["oracle C"] if has_oracle else []):
            t.add_column(col)
        for _, r in part.iterrows():
            row = [r.cohort, r.backbone, r.model, f"{r['mean']:.3f} ± {r['std']:.3f}", str(r.folds), str(r.seeds)]
            if has_oracle:
                row.append("" if pd.isna(r.oracle) else f"{r.oracle:.3f}")
            t.add_row(*row)
        console.print(t)
    return table


def _add_subcommands() -> None:
    try:
        from milbench.commands import splits
    except ModuleNotFoundError:
        return
    app.add_typer(splits.app, name="splits", help="Import and audit the fixed TCGA splits.")


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
