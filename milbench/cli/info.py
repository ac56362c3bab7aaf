"""`milbench models`, `cohorts` and `synth`: what is available, read without importing torch."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from milbench.cli.app import app, console


def _short_paper(paper: str) -> str:
    """``"Ilse et al., Attention-based ..., ICML 2018"`` -> ``"Ilse et al. 2018"``: a citation that fits a column."""
    years = re.findall(r"(?:19|20)\d\d", paper)
    first = paper.split(",")[0].split(" and ")[0].replace(" et al.", "").strip().split()
    return f"{first[0] if first else ''} {years[-1] if years else ''}".strip() or "-"


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


@app.command()
def models() -> None:
    """List registered models with their scales, needs and reference parameter counts (80 columns)."""
    from milbench.models.registry import list_cards

    table = Table(title="milbench models", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=18)
    table.add_column("scales", no_wrap=True)
    table.add_column("needs")
    table.add_column("params (M)", no_wrap=True)
    table.add_column("paper", no_wrap=True)
    for card in list_cards():
        p = card.reference_params
        scales = ",".join(s.removesuffix("x") for s in card.scales) + "x"
        table.add_row(card.name, scales, " ".join(card.needs) or "-",
                      f"{_params(p.get(1024))} / {_params(p.get(2048))}", _short_paper(card.paper))
    console.print(table)
    console.print("Built-ins and installed plug-ins; params: the reference code's, at input width 1024 / 2048. Papers, display names and "
                  "deviations: docs/fidelity.md", highlight=False)


@app.command()
def cohorts() -> None:
    """List the built-in cohorts: TCGA (shipped folds) and synthetic (80 columns)."""
    from milbench.tasks.synthetic import SCENARIOS
    from milbench.tasks.tcga import cohort_summaries

    table = Table(title="milbench cohorts", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "patients", "slides", "censored", "time-bin edges (months)"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("name", "time-bin edges (months)") else "right")
    for s in cohort_summaries():
        table.add_row(s["name"], str(s["patients"]), str(s["slides"]), f"{s['censored_fraction']:.2f}",
                      " / ".join(f"{e:.1f}" for e in s["inner_edges"]))
    for sc in SCENARIOS:
        table.add_row(f"synthetic_{sc}", "150", "~190", "~0.70", "per training fold")
    console.print(table)
    console.print("TCGA: the CrossFusion / MCAT / Patch-GCN 5-fold splits (`milbench splits audit NAME` for their "
                  "provenance); short names work (brca), and tcga_NAME_sitefolds are site-preserved folds. "
                  "synthetic = synthetic_mixed, generated on first use.", highlight=False)


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
