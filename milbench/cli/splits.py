"""`milbench splits import`, `audit` and `make`: thin commands over milbench.tasks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from milbench import MilbenchError

if TYPE_CHECKING:  # the tasks load pandas and the feature readers: imported by each command when it runs
    from milbench.tasks import audit as audit_lib

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Import, audit and make patient-level splits.")
console = Console()
STYLE = {"error": "bold red", "warning": "yellow", "anomaly": "magenta", "info": "cyan", "ok": "green"}
SHOWN_IDS = 5


@app.command("import")
def import_(
    source: Path = typer.Option(Path("../shared/tcga"), help="Folder with the reference files (shared/tcga)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the package's milbench/splits)."),
    cohort: list[str] = typer.Option([], "--cohort", help="Cohort to import, e.g. blca; repeat (default: all)."),
) -> None:
    """Write tcga_<cohort>.csv and its provenance sidecar from the reference split files and clinical tables."""
    from milbench.tasks.splits_import import import_cohorts
    from milbench.tasks.tcga import SPLITS_DIR

    for result in import_cohorts(cohort, source, out or SPLITS_DIR):
        console.print(f"[green]wrote[/] {result.table} ({result.patients} patients, {result.slides} slides, "
                      f"{result.never_held_out} never held out) and {result.sidecar.name}")
        for finding in result.anomalies:
            if finding.check != "README":
                _print_finding(finding)
        site = result.site_folds
        console.print(f"[green]wrote[/] {site.table} (site-preserved folds; held-out patients "
                      f"{_counts(site.balance['patients'])}, events {_counts(site.balance['events'])}) "
                      f"and {site.sidecar.name}")
        for finding in site.anomalies:
            _print_finding(finding)


def _print_finding(finding: audit_lib.Finding) -> None:
    console.print(f"  [{STYLE[finding.level]}]{finding.level}[/] {finding.check}: {finding.message}", highlight=False)


def _counts(values) -> str:
    return "/".join(str(int(v)) for v in values)


@app.command()
def audit(
    cohort: Optional[str] = typer.Argument(None, help="A shipped cohort, e.g. tcga_blca, blca or tcga_blca_sitefolds."),
    table: Optional[Path] = typer.Option(None, help="A split table (with a fold column), or a cohort table."),
    splits: Optional[Path] = typer.Option(None, help="CLAM splits folder (splits_k.csv: train, val) for --table."),
) -> None:
    """Check a cohort's folds; exit 1 on a defect, 0 when only warnings and known anomalies remain."""
    from milbench.tasks import audit as audit_lib
    from milbench.tasks import site_folds

    if (cohort is None) == (table is None):
        raise MilbenchError("give either a shipped COHORT or --table T.csv (with --splits DIR for a cohort table)")
    if splits is not None and table is None:
        raise MilbenchError("--splits needs --table: the cohort table that the split files refer to")
    if cohort and site_folds.is_site_folds_name(cohort):
        report = audit_lib.audit_files(site_folds.site_folds_path(cohort))
    else:
        report = audit_lib.audit_cohort(cohort) if cohort else audit_lib.audit_files(table, splits)
    _print_report(report)
    if report.errors:
        raise typer.Exit(1)


@app.command()
def make(
    table: Path = typer.Argument(..., help="Cohort table: case_id, slide_id, survival_months, censorship (+ others)."),
    out: Path = typer.Option(..., help="Split table to write: the input rows with a fold column."),
    folds: int = typer.Option(5, help="Number of held-out folds."),
    seed: int = typer.Option(0, help="Seed of the search (tie-breaks and random starts)."),
    by: str = typer.Option("site", help="site: whole tissue-source sites per fold (TCGA barcodes); patient: patients."),
) -> None:
    """Make patient-level folds that keep each tissue-source site (or patient) in one held-out fold."""
    from milbench.files import atomic_write
    from milbench.tasks import site_folds
    from milbench.tasks.cohort import load_table

    made = site_folds.make_folds(load_table(table), folds, seed, by)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, made.to_csv(index=False, lineterminator="\n").encode())
    shown = Table(title=f"{out.name}: {made['case_id'].nunique()} patients, {len(made)} slides, {folds} folds "
                        f"by {by}, seed {seed}")
    columns = ("fold", "held-out patients", "share", "events", "slides") + (("sites",) if by == "site" else ())
    for col in columns:
        shown.add_column(col)
    for r in site_folds.fold_balance(made, by).to_dict("records"):
        cells = (r["fold"], r["patients"], f"{r['share']:.0%}", r["events"], r["slides"], r["groups"])
        shown.add_row(*(str(c) for c in cells[:len(columns)]))
    console.print(shown)
    console.print(f"[green]wrote[/] {out}; check it with: milbench splits audit --table {out}")


def _detail(finding: audit_lib.Finding) -> str:
    ids = ", ".join(finding.ids[:SHOWN_IDS]) + (f", ... (+{len(finding.ids) - SHOWN_IDS})"
                                                if len(finding.ids) > SHOWN_IDS else "")
    return finding.message + (f": {ids}" if ids else "")


def _percent(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"


def _findings_table(title: str, findings: list[audit_lib.Finding]) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("status", "check", "detail"):
        table.add_column(col, overflow="fold")
    from milbench.tasks.audit import LEVELS

    for f in sorted(findings, key=lambda f: LEVELS.index(f.level)):
        table.add_row(f"[{STYLE[f.level]}]{f.level}[/]", f.check, _detail(f))
    return table


def _print_report(report: audit_lib.AuditReport) -> None:
    console.print(f"[bold]{report.name}[/]: {report.patients} patients, {report.slides} slides, "
                  f"{len(report.folds)} folds")
    console.print(_findings_table("checks", report.findings))
    folds = Table(title="held-out folds (patients unless noted)")
    for col in ("fold", "train", "held-out", "slides train / held-out", "events held-out", "sites held-out",
                "sites also in train", "held-out at shared sites", "bin inner edges (train, months)"):
        folds.add_column(col, overflow="fold")
    for _, r in report.folds.iterrows():
        folds.add_row(str(r["fold"]), str(r["train patients"]), str(r["held-out patients"]),
                      f"{r['train slides']} / {r['held-out slides']}", str(r["held-out events"]),
                      str(r["held-out sites"]), str(r["sites also in train"]),
                      _percent(r["held-out patients at shared sites"]), ", ".join(f"{e:g}" for e in r["inner edges"]))
    console.print(folds)
    live = {f.check for f in report.findings}
    recorded = [f for f in report.recorded if f.check not in live]
    if recorded:
        console.print(_findings_table("recorded at import (sidecar)", recorded))
    counts = {lvl: sum(f.level == lvl for f in report.findings + recorded) for lvl in ("warning", "anomaly")}
    if report.errors:
        console.print(f"[bold red]audit failed[/]: {len(report.errors)} defect(s)")
    else:
        console.print(f"[green]audit passed[/] ({counts['warning']} warning(s), {counts['anomaly']} known anomalies)")
