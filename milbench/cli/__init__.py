"""The `milbench` command line: thin Typer commands, one module per command group, that parse, call the library and
print with rich. Importing it loads typer and rich only: each command imports what it needs when it runs, so
`milbench --help`, `models` and `cohorts` answer without importing torch."""

from __future__ import annotations

import sys

from rich.console import Console

from milbench import MilbenchError
from milbench.cli import bench, extract, info, leaderboard, plot, run, splits  # noqa: F401  (registers commands)
from milbench.cli.app import app

app.add_typer(splits.app, name="splits", help="Import, audit and make patient-level splits.")
app.add_typer(plot.app, name="plot", help="Kaplan-Meier curves and attention heatmaps from a run store.")
app.command("extract")(extract.extract)


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback (usage errors exit 2 too)."""
    try:
        app()
    except MilbenchError as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
