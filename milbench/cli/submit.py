"""`milbench submit`: predictions made outside milbench, checked against a cohort's fixed folds and written into a run
store as a submitted run (the leaderboard ranks it beside milbench's own runs and labels it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from milbench.cli.app import app, console


@app.command()
def submit(
    predictions: Path = typer.Argument(..., help="CSV: case_id, fold, risk per held-out patient of every fold; "
                                       "optional time, event, train_median_risk, surv_0..surv_K."),
    cohort: str = typer.Option(..., help="The cohort whose fixed folds the predictions follow, e.g. tcga_brca."),
    model: str = typer.Option(..., help="The submission's name in the leaderboard, e.g. mymil_v2 (not a milbench "
                              "model's name)."),
    backbone: str = typer.Option("default", help="The features the model was trained on, e.g. resnet50 (Table 1)."),
    protocol: str = typer.Option("fixed", help="The protocol the submitter declares: fixed | inner-val | best-val."),
    seed: int = typer.Option(7, help="The seed the submitter declares (several seeds: one submission each)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Run store to write into."),
    by: Optional[str] = typer.Option(None, help="Who made the predictions (default: your login name)."),
    note: str = typer.Option("", help="One line kept with the run: where the model comes from, its code, ..."),
) -> None:
    """Check a predictions file against the fixed folds and add it to the run store as a submitted run."""
    from milbench.runs.submissions import SHOWN, SubmissionRefused
    from milbench.runs.submissions import submit as submit_file

    try:
        written, fresh = submit_file(predictions, cohort, model, runs_dir, backbone, protocol, seed, by, note)
    except SubmissionRefused as err:
        more = len(err.problems) - SHOWN
        sys.stderr.write(f"error: {predictions} refused ({len(err.problems)} problem(s)); nothing was written\n")
        for line in err.problems[:SHOWN]:
            sys.stderr.write(f"  {line}\n")
        if more > 0:
            sys.stderr.write(f"  ... and {more} more\n")
        raise typer.Exit(2) from None
    where = written[0].parent if written else runs_dir
    if not fresh:
        console.print(f"{predictions} was submitted before (same sha256): {where} already holds it; nothing written",
                      highlight=False)
        return
    console.print(f"submitted '{model}' on {cohort} (backbone {backbone}, protocol {protocol}, seed {seed}): "
                  f"{len(written)} fold(s) written to {where}; `milbench leaderboard --runs-dir {runs_dir}` ranks it",
                  highlight=False)
