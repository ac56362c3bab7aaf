"""`milbench models`, `cohorts` and `synth`: what is available, read without importing torch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from milbench.cli.app import app, console


@app.command()
def models() -> None:
    """List registered models with their scales, needs and reference parameter counts."""
    from milbench.models.registry import list_cards

    table = Table(title="milbench models")
    for col in ("name", "model", "group", "scales", "needs", "params @1024", "params @2048", "paper"):
        table.add_column(col)
    for card in list_cards():
        p = card.reference_params
        table.add_row(card.name, card.display_name, card.group, ",".join(card.scales), ",".join(card.needs) or "-",
                      f"{p[1024]:,}" if 1024 in p else "-", f"{p[2048]:,}" if 2048 in p else "-", card.paper)
    console.print(table)


@app.command()
def cohorts() -> None:
    """List the built-in cohorts: TCGA (shipped folds) and synthetic."""
    from milbench.tasks.synthetic import SCENARIOS
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
    from milbench.tasks.synthetic import generate_cohort

    path = generate_cohort(out, scenario, patients, seed, size=size, in_dim=in_dim, censoring=censoring)
    console.print(f"wrote synthetic cohort '{scenario}' ({patients} patients) to {path}; "
                  f"run it with: milbench run --model amil --cohort {path / 'cohort.csv'} "
                  f"--splits {path / 'splits'} --features {path / 'features'}")
