"""The `milbench` command line: thin Typer commands, one module per command group, that parse, call the library and
print with rich. Importing it loads typer and rich only: each command imports what it needs when it runs, so
`milbench --help`, `models` and `cohorts` answer without importing torch.

Exit codes: 0 when everything asked for is done; 1 when folds failed for another reason than bad input (each named,
its error kept in the store); 2 for bad input or configuration (one plain line on stderr naming the culprit and the
fix, no traceback unless ``--debug``); 3 when ``--no-wait`` left folds that another process holds; 130 on Ctrl-C
(completed folds are kept).
"""

from __future__ import annotations

import os
import sys

import click
import typer

try:  # typer >= 0.2x vendors its own click; older typer uses click itself
    from typer._click import exceptions as _vendored
except ImportError:  # pragma: no cover - depends on the installed typer
    _vendored = click.exceptions
_USAGE = (click.UsageError, _vendored.UsageError)
_ABORT = (KeyboardInterrupt, click.Abort, typer.Abort)
_CLICK = (click.ClickException, _vendored.ClickException)

from milbench import MilbenchError
from milbench.cli import bench, extract, info, leaderboard, plot, run, splits  # noqa: F401  (registers commands)
from milbench.cli import submit  # noqa: F401  (registers `milbench submit`)
from milbench.cli.app import app

app.add_typer(splits.app, name="splits", help="Import, audit and make patient-level splits.")
app.add_typer(plot.app, name="plot", help="Kaplan-Meier curves and attention heatmaps from a run store.")
app.command("extract")(extract.extract)

DEBUG_ENV = "MILBENCH_DEBUG"
INTERRUPTED = ("interrupted: every fold completed so far is kept in the run store, and a fold in training resumes at "
               "its last epoch: rerun the same command\n")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error.")) -> None:
    """Benchmark MIL survival models on WSI patch features: same folds, loss, metrics and protocol."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main() -> None:
    """Entry point: a user error prints one plain line on stderr and exits 2, without a traceback."""
    try:
        code = app(standalone_mode=False)
    except MilbenchError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        sys.stderr.write(f"error: {_one_line(err)}\n")
        sys.exit(2)
    except _USAGE as err:
        command = err.ctx.command_path if err.ctx else "milbench"
        if not err.format_message().strip() and err.ctx is not None:  # no arguments at all: the help
            sys.stdout.write(err.ctx.get_help() + "\n")
            sys.exit(2)
        sys.stderr.write(f"error: {_one_line(err.format_message())} (see `{command} --help`)\n")
        sys.exit(2)
    except _ABORT:
        sys.stderr.write(INTERRUPTED)
        sys.exit(130)
    except _CLICK as err:
        sys.stderr.write(f"error: {_one_line(err.format_message())}\n")
        sys.exit(err.exit_code)
    if code == 130:  # typer turns Ctrl-C into an exit code itself
        sys.stderr.write(INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
