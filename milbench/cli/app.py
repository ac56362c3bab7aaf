"""The Typer application and the console every command prints to."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark MIL survival models on WSI patch features: same folds, loss, metrics and protocol.")
console = Console()
