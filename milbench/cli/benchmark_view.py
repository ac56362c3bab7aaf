"""What `milbench benchmark` prints for a TCGA benchmark file: the dry run (per cohort and backbone, the slides found
and missing, widths, magnifications and bag sizes; the GPU-hour estimate; the plan) and, after a run, the
comparison with the paper."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from milbench.config.benchmark import BenchmarkSpec
from milbench.runs.benchmark import DryRun

SHOWN_MISSING = 10


def _hours(h: float) -> str:
    return f"{h:,.1f} h" if h >= 1 else f"{h * 60:,.0f} min" if h >= 1 / 60 else f"{h * 3600:,.0f} s"


def _bags(inv, scale: str) -> str:
    s = inv.bag_summary(scale)
    if not s:
        return "–"
    return f"{s['median']:,.0f} ({s['p90']:,.0f}, {s['max']:,.0f})"


def print_dry_run(console: Console, spec: BenchmarkSpec, result: DryRun, runs_dir: Path,
                  list_missing: bool = False) -> None:
    """The dry run's report; every missing slide listed with ``list_missing``, else the first ten per pair."""
    from milbench.report.published import backbone_width
    from milbench.runs.estimate import step_source

    invs = list(result.inventories.values())
    scales = invs[0].scales if invs else ()
    table = Table(title=f"{spec.name}: feature files (headers only; nothing trained)")
    for col in ["cohort", "backbone", "slides found", "width", "mags",
                *[f"{s} bag: median (p90, max)" for s in scales]]:
        table.add_column(col)
    for inv in invs:
        expected = backbone_width(inv.backbone)
        width = "–" if inv.width is None else str(inv.width)
        if len(inv.widths) > 1:
            width += f" (also {', '.join(str(w) for w in inv.widths if w != inv.width)}: mixed)"
        if expected and inv.width and inv.width != expected:
            width += f" (paper: {expected})"
        found = f"{inv.found}/{inv.slides}" + (f", {len(inv.unreadable)} unreadable" if inv.unreadable else "")
        table.add_row(inv.cohort.removeprefix("tcga_"), inv.backbone, found, width, " ".join(inv.present) or "none",
                      *[_bags(inv, s) for s in scales])
    console.print(table)
    console.print("bag = patches per patient (its slides summed) among the patients whose slides are all there",
                  highlight=False)
    for inv in invs:
        where = "" if inv.root.is_dir() else " (does not exist)"
        console.print(f"{inv.cohort} · {inv.backbone}: root {inv.root}{where}", highlight=False)
        if inv.missing:
            per = ", ".join(f"{n} at {s}" for s, n in inv.missing_by_scale.items() if n)
            shown = inv.missing if list_missing else inv.missing[:SHOWN_MISSING]
            more = len(inv.missing) - len(shown)
            console.print(f"  missing {len(inv.missing)} of {inv.slides} slides ({per}): {', '.join(shown)}"
                          + (f" ... and {more} more (--list-missing lists them all)" if more else ""),
                          highlight=False, soft_wrap=True)
        for slide, why in inv.unreadable[: None if list_missing else SHOWN_MISSING]:
            console.print(f"  unreadable: {why}", highlight=False, soft_wrap=True)
    est = result.estimate
    cost = Table(title=f"Estimated compute of {len(est.folds)} fold(s) on {est.gpus} GPU(s): step times measured on "
                       f"an NVIDIA H200, interpolated at these bag sizes")
    for col in ["model", "folds", "GPU-hours", "longest fold", "step times"]:
        cost.add_column(col)
    by_model = est.by_model()
    for r in by_model.itertuples():
        measured, why = step_source(r.model)
        cost.add_row(r.model, str(r.folds), _hours(r.gpu_hours), _hours(r.longest_fold_h),
                     "measured" if why == "measured" else f"estimated from {measured}")
    console.print(cost)
    for model in by_model.model:
        measured, why = step_source(model)
        if why != "measured":
            console.print(f"  {model}: no H200 measurement; {measured}'s step times stand in ({why})",
                          highlight=False, soft_wrap=True)
    console.print(f"total: {_hours(est.gpu_hours)} of GPU time; about {_hours(est.wall_seconds / 3600)} wall-clock "
                  f"on {est.gpus} GPU(s), one fold per GPU at a time, longest first", highlight=False)
    for note in est.notes:
        console.print(f"  note: {note}", highlight=False, soft_wrap=True)
    if result.stop is not None:
        console.print(f"[yellow]a run would stop before training:[/] {result.stop}", highlight=False, soft_wrap=True)
        console.print(f"benchmark {spec.name}: {result.planned} folds planned; none can start until that is fixed "
                      f"(or pass --exclude-missing to leave out slides without features, listed in every record)",
                      highlight=False)
    else:
        console.print(f"benchmark {spec.name}: {result.planned} folds; {result.todo} to run, {result.skipped} already "
                      f"complete in {runs_dir}", highlight=False)


def print_paper(console: Console, runs_dir: Path) -> list[Path]:
    """After a run: ours beside the paper's figures, per protocol (printed), and the full comparison with its
    Kaplan-Meier plots written under ``RUNS/leaderboard/`` (paper.md and the PNG/PDF files)."""
    from milbench.report.paper import comparison, write_report

    cmp = comparison(runs_dir)
    if cmp.empty:
        return []
    waiting = int((cmp.folds == 0).sum())
    for protocol, part in cmp[cmp.folds > 0].groupby("protocol", sort=False):
        table = Table(title=f"C-index, ours beside the paper's — protocol {protocol} (ranked within it only)")
        for col in ["cohort", "backbone", "model", "ours: mean ± std [95% CI]", "paper", "Δ", "within ± std",
                    "rank"]:
            table.add_column(col)
        for r in part.itertuples():
            table.add_row(r.cohort_title, r.backbone, r.model_label, r.ours_text, r.paper_text, r.diff_text,
                          r.within_text, r.rank_text)
        console.print(table)
    if waiting:
        console.print(f"{waiting} cell(s) of the benchmark files not run yet: listed with the paper's figures in "
                      f"paper.md", highlight=False)
    paths = write_report(runs_dir, Path(runs_dir) / "leaderboard")
    for path in paths:
        console.print(f"wrote {path}", highlight=False)
    return paths
