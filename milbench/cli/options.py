"""Options shared by the commands that train (`run`, `grid`, `benchmark`): one definition each, and their parsers."""

from __future__ import annotations

from typing import Optional

import typer

from milbench import MilbenchError

EXECUTOR = typer.Option("local", help="local (this process, or --max-parallel worker processes) | ray")
RAY_ADDRESS = typer.Option(None, help="Ray cluster to join (e.g. auto); default: a local instance.")
GPUS_PER_FOLD = typer.Option(None, help="Ray: GPUs per fold, fractions share a GPU (default 1 if the cluster has "
                             "GPUs, else 0).")
CPUS_PER_FOLD = typer.Option(1, help="CPU cores and torch threads per fold.")
MAX_PARALLEL = typer.Option(None, help="Folds at once (local default 1; ray default: no limit).")
NO_WAIT = typer.Option(False, "--no-wait", help="Leave folds that another process holds (exit 3) instead of waiting "
                       "for them.")
RETRIES = typer.Option(2, help="Retries of a failed fold (bad input is never retried).")
NODE_CACHE = typer.Option(None, help="Node-local folder (e.g. /local/scratch/milbench): one slide cache per node, "
                          "filled by the first worker that reads a slide and memory-mapped by every worker of the node "
                          "(the features in RAM once per node; docs/cluster.md).")
NODE_CACHE_GB = typer.Option(64.0, help="Disk the --node-cache may fill (GiB); least recently used slides go "
                             "first, a larger slide is read directly.")
COMPILE = typer.Option(False, "--compile", help="CUDA: torch.compile each model's hot blocks (about a minute per "
                       "model and worker; CrossFusion's step 12.6 -> 9.4 ms, docs/performance.md).")


def parse_folds(text: Optional[str]) -> Optional[list[int]]:
    """``0,1,2`` -> [0, 1, 2]; None or empty for every fold."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MilbenchError(f"--folds expects comma-separated integers such as 0,1,2, got '{text}'") from None


def split_list(text: str | None, what: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``; an empty list is an error naming the option."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise MilbenchError(f"{what} expects a comma-separated list, e.g. {what} a,b")
    return items


def check_device(device: str) -> None:
    """Refuse a device that cannot run, before any work: an unknown name, or CUDA without a visible GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise MilbenchError(f"--device {device}: use auto, cpu or cuda")
    if device == "cuda":
        from milbench.training.device import resolve_device

        resolve_device(device)


def finish(jobs: list, runs_dir, report) -> None:
    """End a command that trained folds: exit 0 only when every requested fold has a record (see
    :func:`milbench.runs.drive.verdict`), else print why on stderr and exit 1 or 3."""
    import sys

    from milbench.runs.drive import verdict

    code, line = verdict(jobs, runs_dir, report)
    if line:
        sys.stderr.write(f"error: {line}\n")
    if code:
        raise typer.Exit(code)
