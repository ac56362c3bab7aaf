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
    metric: str = typer.Option("c_index", help="c_index | uno_c | ibs | td_auc, recomputed per fold."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the pooled C-index CI (0: none)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    reported_only: bool = typer.Option(False, help="Write only the published figures (needs --out, no run store)."),
) -> None:
    """Recompute every figure from the stored predictions: tables per protocol, statistics, the reported block."""
    from milbench.report.aggregate import build
    from milbench.report.write import parse_formats, write

    formats = parse_formats(format_)
    board = None
    if reported_only:
        if out is None:
            raise MilbenchError("--reported-only needs --out DIR (where to write the reported block)")
    else:
        board = build(runs_dir, metric=metric, n_boot=bootstrap, seed=seed)
        print_cells(board.cells, metric)
        for note in board.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    for path in write(board, out or runs_dir / "leaderboard", formats):
        console.print(f"wrote {path}")


def print_cells(cells: pd.DataFrame, metric: str) -> None:
    """The cells of a leaderboard as rich tables, one per protocol."""
    import pandas as pd

    from milbench.report.aggregate import INCOMPLETE, METRICS, SIGNIFICANT

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
