"""`milbench leaderboard`: every figure recomputed from the stored predictions, written in the asked formats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from milbench import MilbenchError
from milbench.cli.app import app, console

if TYPE_CHECKING:
    import pandas as pd


@app.command()
def leaderboard(
    runs_dir: Path = typer.Option(Path("runs"), help="Run store to read."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default RUNS_DIR/leaderboard)."),
    format_: str = typer.Option("md,tex,html,csv", "--format", help="Comma-separated subset of md,tex,html,csv."),
    metric: str = typer.Option("c_index", help="c_index | uno_c | ibs | td_auc: every table follows it (per fold, "
                                               "pooled, paired, ranks)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of each pooled interval (0: none)."),
    paired_bootstrap: int = typer.Option(10_000, help="Bootstrap resamples of the paired comparisons (the smallest "
                                                      "p is 2 / (N + 1); 0: none)."),
    seed: int = typer.Option(0, help="Seed of the bootstraps."),
    pooled: str = typer.Option("within-fold", help="Pairs of the pooled figure: within-fold (pairs held out in the "
                                                   "same fold, the default) or cross-fold (every pair, labelled)."),
    baseline: Optional[str] = typer.Option(None, help="Reference model of the paired comparisons (registry or "
                                                      "display name; default: CrossFusion where it was run)."),
    test: str = typer.Option("bootstrap", help="Paired test behind the marks and stars: bootstrap (paired bootstrap) "
                                               "or ttest (corrected resampled t-test); both are shown."),
    adjust: str = typer.Option("table", help="Holm adjustment across every comparison of the table (table) or "
                                             "within each cohort and backbone (cohort)."),
    posthoc: str = typer.Option("nemenyi", help="Post-hoc test of the ranks over cohorts: nemenyi or wilcoxon-holm."),
    reported_only: bool = typer.Option(False, help="Write only the published figures (needs --out, no run store)."),
) -> None:
    """Recompute every figure from the stored predictions: tables per protocol, statistics, the reported block."""
    from milbench.report.aggregate import Options, build
    from milbench.report.write import parse_formats, write

    formats = parse_formats(format_)
    board = None
    if reported_only:
        if out is None:
            raise MilbenchError("--reported-only needs --out DIR (where to write the reported block)")
    else:
        options = Options(metric=metric, n_boot=bootstrap, paired_boot=paired_bootstrap, seed=seed, pooled=pooled,
                          baseline=baseline, test=test, adjust_by=adjust, posthoc=posthoc)
        board = build(runs_dir, options=options)
        from milbench.runs.store import iter_folds

        submitted = {f.record["model"] for f in iter_folds(runs_dir) if f.record.get("source") == "submitted"}
        print_cells(board.cells, metric, submitted)
        for note in board.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    for path in write(board, out or runs_dir / "leaderboard", formats):
        console.print(f"wrote {path}")


def print_cells(cells: pd.DataFrame, metric: str, submitted: set[str] | None = None) -> None:
    """The cells of a leaderboard as rich tables, one per protocol (bold: best where the paired test says so)."""
    import pandas as pd

    from milbench.report.aggregate import INCOMPLETE, METRICS, SIGNIFICANT, TIED

    for protocol, part in cells.groupby("protocol"):
        t = Table(title=f"{METRICS[metric].label}, mean ± fold sd — protocol {protocol}")
        has_oracle = "oracle" in part and part.oracle.notna().any()
        for col in ["cohort", "backbone", "model", metric, "folds×seeds"] + (["oracle C"] if has_oracle else []):
            t.add_column(col)
        for _, r in part.sort_values(["cohort", "backbone", "order", "model"]).iterrows():
            std = "–" if pd.isna(r["std"]) else f"{r['std']:.3f}"
            value = f"{r['mean']:.3f} ± {std}" + ("" if r.complete else f" {INCOMPLETE}")
            value += f" {SIGNIFICANT}" if r.get("significant", False) else ""
            mark = r.get("mark")
            value += f" {TIED}" if mark in ("tied-best", "tied-second") else ""
            model = r.model + (f" ({r.variant_label})" if r.variant_label else "")
            model += " (submitted)" if r.model in (submitted or set()) else ""
            row = [r.cohort, r.backbone, model, f"[bold]{value}[/]" if mark == "best" else value,
                   f"{r.folds}×{r.seeds}"]
            if has_oracle:
                row.append("" if pd.isna(r.oracle) else f"{r.oracle:.3f}")
            t.add_row(*row)
        console.print(t)
