"""`milbench plot km` and `milbench plot heatmap`: pictures from a run store, written as PNG and PDF."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Kaplan-Meier curves and attention heatmaps from a run store (PNG and PDF).")
console = Console()

RUNS_DIR = typer.Option(Path("runs"), help="Run store to read.")
BACKBONE = typer.Option(None, help="Backbone of the run, when the store has several.")
PROTOCOL = typer.Option(None, help="Protocol of the run (fixed, inner-val, best-val), when the store has several.")
SEED = typer.Option(None, help="Seed of the run, when the store has several.")
RUN = typer.Option(None, "--run", help="Config hash (or its prefix) of the run, to pick one of several.")


def _display(model: str) -> str:
    from milbench.report.aggregate import _card

    return _card(model)[0]


@app.command()
def km(
    runs_dir: Path = RUNS_DIR,
    model: str = typer.Option(..., "--model", "-m", help="Registered model name of the run."),
    cohort: str = typer.Option(..., help="Cohort of the run as stored (tcga_blca or blca, synthetic_coarse, ...)."),
    backbone: Optional[str] = BACKBONE,
    protocol: Optional[str] = PROTOCOL,
    seed: Optional[int] = SEED,
    run: Optional[str] = RUN,
    out: Optional[Path] = typer.Option(None, help="Output file (.png and .pdf both written; default RUNS_DIR/plots/)."),
) -> None:
    """Kaplan-Meier curves of high vs low risk (cut at each training fold's median), folds pooled, at-risk table."""
    from milbench.report import plots  # imported here: plotting and statistics libraries are slow to load

    the_run = plots.select_run(runs_dir, model, cohort, backbone, protocol, seed, run)
    rec = the_run.record
    fig = plots.km_figure(the_run, _display(model))
    name = f"km_{rec['cohort']}_{rec['backbone']}_{model}_{rec['protocol']}-{the_run.config_hash}"
    out = out or runs_dir / "plots" / name
    for path in plots.save_figure(fig, out):
        console.print(f"wrote {path}")


@app.command()
def heatmap(
    runs_dir: Path = RUNS_DIR,
    model: str = typer.Option(..., "--model", "-m", help="Registered model name of the run."),
    case: str = typer.Option(..., help="case_id of a held-out patient (see the run's predictions.csv)."),
    cohort: Optional[str] = typer.Option(None, help="Cohort name or table (default: the run's cohort)."),
    features: Optional[Path] = typer.Option(None, help="Features root (default: the cohort's own, e.g. synthetic)."),
    splits: Optional[Path] = typer.Option(None, help="Splits folder, for a custom cohort table."),
    backbone: Optional[str] = BACKBONE,
    protocol: Optional[str] = PROTOCOL,
    seed: Optional[int] = SEED,
    run: Optional[str] = RUN,
    slide: Optional[str] = typer.Option(None, help="Slide ID or 0-based number among the case's slides (default 0)."),
    raw: bool = typer.Option(False, help="Colour by raw attention instead of its percentile within the panel."),
    out: Optional[Path] = typer.Option(None, help="Output file (.png/.pdf, both written; default RUNS_DIR/plots/...)."),
) -> None:
    """The model's attention over the case's patches, one panel per named map and scale, from the checkpoint of
    the fold that held the case out (the run needs --save-checkpoints)."""
    from milbench.report import plots

    the_run = plots.select_run(runs_dir, model, cohort, backbone, protocol, seed, run)
    found = plots.case_attention(the_run, case, cohort, features, splits)
    rec = found.fold.record
    slides = found.slides
    number = plots.slide_number(case, slides, slide)
    panels, skipped = plots.attention_panels(found.bag, found.maps, number)
    title = (f"{_display(model)} attention, case {case}, slide {slides[number]} ({number + 1} of {len(slides)}); "
             f"held out in fold {rec['fold']}, risk {found.risk:.3f} (stored {found.stored_risk:.3f})")
    fig = plots.heatmap_figure(panels, title, raw=raw)
    if skipped:
        console.print(f"[yellow]not drawn[/] (no magnification has that many patches): {', '.join(skipped)}")
    if abs(found.risk - found.stored_risk) > 1e-3 * max(1.0, abs(found.stored_risk)):
        console.print(f"[yellow]warning:[/] the checkpoint gives risk {found.risk:.4f} but the stored prediction is "
                      f"{found.stored_risk:.4f}: the features or the model code changed since the run")
    out = out or runs_dir / "plots" / f"heatmap_{rec['cohort']}_{model}_{case}_fold{rec['fold']}"
    for path in plots.save_figure(fig, out):
        console.print(f"wrote {path}")

