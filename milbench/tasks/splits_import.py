"""Write milbench's split tables for the TCGA cohorts from the reference split files and clinical tables.

For each cohort of ``tcga.COHORTS``: read the 5 CrossFusion split files and the clinical table from the source
folder (../shared/tcga), add the rows a cohort takes from a second table (LUAD), turn the reference folds into
a per-patient fold column while checking them (``audit.folds_from_reference``), refuse to write on any defect,
and write ``<name>.csv`` (sorted, ``\\n`` line ends: the same bytes on every run) and the provenance sidecar
``<name>.json`` (sources with repository, commit and SHA-256, the steps, the anomalies), each atomically.
Beside them go the cohort's site-preserved folds, ``<name>_sitefolds.csv`` and ``.json``: the same rows with the
folds of :mod:`milbench.tasks.site_folds` (seed 0, 5 folds; the same bytes on every run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from milbench import MilbenchError
from milbench.files import atomic_write
from milbench.tasks import audit, site_folds, tcga
from milbench.tasks.audit import Finding

FOLD_SEMANTICS = ("fold = the patient's held-out fold in the reference; every slide of a patient has the same "
                  "fold; training set of fold k = all patients whose fold is not k, empty fold included (an empty "
                  "fold: the reference holds the patient out in no fold and trains on it in every fold)")
SITE_FOLD_SEMANTICS = ("fold = the held-out fold of the patient's tissue-source site (second field of the barcode); "
                       "every patient of a site has the same fold, so no site is in both the training and the "
                       "held-out set of any fold; training set of fold k = all patients whose fold is not k")


@dataclass
class SiteFoldsResult:
    """What the import wrote for one cohort's site-preserved folds, with the per-fold balance."""

    name: str
    table: Path
    sidecar: Path
    balance: pd.DataFrame
    anomalies: list[Finding]


@dataclass
class ImportResult:
    """What the import wrote for one cohort."""

    name: str
    table: Path
    sidecar: Path
    patients: int
    slides: int
    never_held_out: int
    anomalies: list[Finding]
    site_folds: SiteFoldsResult


def table_bytes(table: pd.DataFrame) -> bytes:
    """The CSV text of a split table: fixed columns, float months, int censorship, empty fold when none."""
    out = table[list(tcga.SPLIT_COLUMNS)].copy()
    out["survival_months"] = out["survival_months"].astype(float)
    out["censorship"] = out["censorship"].astype(int)
    out["fold"] = out["fold"].astype("Int64")
    return out.to_csv(index=False, lineterminator="\n").encode()


def _read_clinical(root: Path, rel: str, patient_from_slide: bool = False) -> pd.DataFrame:
    raw = pd.read_csv(root / rel, index_col=0, dtype={"case_id": str, "slide_id": str})
    return audit.cohort_table(raw, rel, patient_from_slide)


def _fill_missing(clinical: pd.DataFrame, cohort: tcga.TcgaCohort, root: Path,
                  reference: list[audit.ReferenceFold]) -> tuple[pd.DataFrame, list[Finding]]:
    """Take the rows of split patients that the clinical table lacks from the cohort's fill-in table."""
    listed = {i for f in reference for i in (*f.train, *f.val)}
    missing = listed - set(clinical["case_id"]) - set(clinical["slide_id"])
    if not missing or cohort.fill_from is None:
        return clinical, []
    fill = _read_clinical(root, cohort.fill_from)
    both = clinical.merge(fill, on="slide_id", suffixes=("", "_fill"))
    differ = both[(both["case_id"] != both["case_id_fill"]) | (both["censorship"] != both["censorship_fill"])
                  | (both["survival_months"] != both["survival_months_fill"])]
    found = []
    if len(differ):
        found.append(Finding("warning", "clinical fill-in", f"{cohort.fill_from} disagrees with {cohort.clinical} on "
                             f"{len(differ)} shared slide(s)", tuple(sorted(differ["slide_id"]))))
    add = fill[fill["case_id"].isin(missing)]
    agree = f"; the two tables agree on all {len(both)} shared slides" if not len(differ) else ""
    found.append(Finding("anomaly", "no clinical row", f"{len(missing)} split patient(s) have no row in "
                         f"{cohort.clinical} (the CrossFusion loader drops them); their {len(add)} slide(s) come "
                         f"from {cohort.fill_from}{agree}", tuple(sorted(missing))))
    return pd.concat([clinical, add], ignore_index=True), found


def _manifest_findings(table: pd.DataFrame, root: Path, rel: str) -> list[Finding]:
    """Slides missing from, or listed twice in, the GDC manifest that the CrossFusion loader inner-joins on."""
    names = pd.read_csv(root / rel, sep="\t", dtype=str)["filename"]
    counts = names.value_counts()
    files = table["slide_id"] + ".svs"
    absent = table.loc[~files.isin(counts.index), "slide_id"]
    twice = table.loc[files.map(counts).fillna(0).gt(1), "slide_id"]
    found = []
    if len(absent):
        found.append(Finding("anomaly", "GDC manifest", f"{len(absent)} slide(s) are not in {rel} (the CrossFusion "
                             f"loader's inner join drops them; milbench keeps them)", tuple(sorted(absent))))
    if len(twice):
        found.append(Finding("anomaly", "GDC manifest", f"{len(twice)} slide(s) are listed twice in {rel} (an inner "
                             f"join on filename duplicates them)", tuple(sorted(twice))))
    return found


def _steps(cohort: tcga.TcgaCohort, filled: bool) -> list[str]:
    steps = [f"Read {cohort.splits}/splits_{{0..4}}.csv: train and val columns, blank cells dropped per column.",
             f"Read {cohort.clinical}: one row per slide; slide_id without .svs"
             + ("; case_id = the first 12 characters of the slide name." if cohort.patient_from_slide else ".")]
    if filled:
        steps.append(f"Added the rows of split patients missing from it from {cohort.fill_from}.")
    steps += ["Kept the patients that the split files list; a patient's fold is the split file whose val column "
              "lists it (or one of its slides); patients in no val column get an empty fold.",
              f"Checked every slide against {cohort.manifest} (reported, not used to filter).",
              "Checked the table as `milbench splits audit` does; sorted by case_id, slide_id; wrote CSV."]
    return steps


def import_cohort(name: str, source: Path, out: Path) -> ImportResult:
    """Build, check and write one cohort's split table and provenance sidecar; raise on any defect."""
    cohort = tcga.COHORTS[tcga.cohort_name(name)]
    root = Path(source)
    if not root.is_dir():
        raise MilbenchError(f"source folder {root} not found: pass --source pointing at the shared/tcga folder")
    split_files = [f"{cohort.splits}/splits_{k}.csv" for k in range(5)]
    sources = [{"role": f"splits fold {k}", **tcga.source_record(root, rel)} for k, rel in enumerate(split_files)]
    sources.append({"role": "clinical", **tcga.source_record(root, cohort.clinical)})
    reference = audit.read_clam_splits(root / cohort.splits)
    if len(reference) != 5:
        raise MilbenchError(f"{root / cohort.splits} holds {len(reference)} split files, expected 5")
    clinical = _read_clinical(root, cohort.clinical, cohort.patient_from_slide)
    clinical, found = _fill_missing(clinical, cohort, root, reference)
    filled = any(f.check == "no clinical row" for f in found)
    if filled:
        sources.append({"role": "clinical fill-in", **tcga.source_record(root, cohort.fill_from)})
    sources.append({"role": "GDC manifest (checked only)", **tcga.source_record(root, cohort.manifest)})
    table, converted = audit.folds_from_reference(clinical, reference, cohort.splits)
    checked = [f for f in audit.check_table(table) if f.check not in {c.check for c in converted}]
    found += converted + _manifest_findings(table, root, cohort.manifest) + checked
    errors = [f for f in found if f.level == "error"]
    if errors:
        detail = "; ".join(f.message + (f" ({', '.join(f.ids[:3])})" if f.ids else "") for f in errors[:3])
        raise MilbenchError(f"{cohort.name}: {len(errors)} defect(s) in the sources, nothing written: {detail}")
    if cohort.paper_slides is not None and cohort.paper_slides != len(table):
        found.append(Finding("anomaly", "slide count", f"the CrossFusion paper reports {cohort.paper_slides} slides; "
                             f"this table has {len(table)}"))
    found += [Finding("anomaly", "README", note) for note in cohort.notes]
    anomalies = [f for f in found if f.level not in ("ok", "error")]
    identical = []
    for other in cohort.same_splits:
        copies = [tcga.source_record(root, f"{other}/splits_{k}.csv") for k in range(5)]
        if [c["sha256"] for c in copies] != [s["sha256"] for s in sources[:5]]:
            raise MilbenchError(f"{cohort.name}: the split files in {other} differ from {cohort.splits}, which the "
                                f"README says are byte-identical: check the source folder")
        identical += copies
    data = table_bytes(table)
    patients = tcga.patient_table(table)
    sidecar = {
        "cohort": cohort.name,
        "table": {"file": f"{cohort.name}.csv", "sha256": hashlib.sha256(data).hexdigest(),
                  "columns": list(tcga.SPLIT_COLUMNS), "rows": len(table), "patients": len(patients),
                  "fold_semantics": FOLD_SEMANTICS},
        "counts": _counts(table, patients),
        "sources": sources,
        "identical_split_files": identical,
        "steps": _steps(cohort, filled),
        "anomalies": [f.as_dict() for f in anomalies],
    }
    table_path, sidecar_path = _write_table_and_sidecar(out, cohort.name, data, sidecar)
    site = write_site_folds(table, sidecar, out)
    return ImportResult(cohort.name, table_path, sidecar_path, len(patients), len(table),
                        int(patients["fold"].isna().sum()), anomalies, site)


def _oversized_sites(table: pd.DataFrame, n_folds: int) -> list[Finding]:
    """Sites holding more than a fold's share of the patients or events: their fold is off balance whatever the
    assignment."""
    patients = tcga.patient_table(table)
    patients["site"] = patients["case_id"].map(site_folds.tissue_source_site)
    patients["event"] = patients["censorship"] == 0
    found = []
    for what, counts in (("patients", patients["site"].value_counts()),
                         ("events", patients.loc[patients["event"], "site"].value_counts())):
        total = len(patients) if what == "patients" else int(patients["event"].sum())
        for site, n in counts[counts > total / n_folds].sort_index().items():
            found.append(Finding("anomaly", "site larger than a fold", f"site {site} holds {n} of {total} {what}, "
                                 f"more than 1/{n_folds}: its held-out fold has more {what} than the others",
                                 (site,)))
    return found


def write_site_folds(table: pd.DataFrame, reference_sidecar: dict[str, Any], out: Path) -> SiteFoldsResult:
    """Write a cohort's site-preserved folds (``<name>_sitefolds.csv`` and sidecar) from its reference table."""
    reference = reference_sidecar["cohort"]
    name = site_folds.site_folds_name(reference)
    k, seed = site_folds.SHIPPED_FOLDS, site_folds.SHIPPED_SEED
    folds = site_folds.make_folds(table, k, seed, by="site")
    data = table_bytes(folds)
    balance = site_folds.fold_balance(folds, by="site")
    patients = tcga.patient_table(folds)
    sites = patients["case_id"].map(site_folds.tissue_source_site)
    anomalies = _oversized_sites(folds, k)
    sidecar = {
        "cohort": name,
        "table": {"file": f"{name}.csv", "sha256": hashlib.sha256(data).hexdigest(),
                  "columns": list(tcga.SPLIT_COLUMNS), "rows": len(folds), "patients": len(patients),
                  "fold_semantics": SITE_FOLD_SEMANTICS},
        "derived_from": {"cohort": reference, "file": reference_sidecar["table"]["file"],
                         "sha256": reference_sidecar["table"]["sha256"]},
        "algorithm": {"module": "milbench.tasks.site_folds", "by": "site", "folds": k, "seed": seed,
                      "restarts": site_folds.RESTARTS,
                      "summary": "whole sites to folds: seeded greedy (largest site first) and random-order "
                                 "starts, each improved by single moves and pairwise swaps of sites, minimising "
                                 "the squared relative deviation of each fold's patients and events from 1/K"},
        "counts": {"patients": len(patients), "slides": len(folds), "sites": int(sites.nunique()),
                   "censored_patients": int(patients["censorship"].sum()),
                   "held_out_patients": balance["patients"].tolist(), "held_out_events": balance["events"].tolist(),
                   "held_out_slides": balance["slides"].tolist(), "held_out_sites": balance["groups"].tolist()},
        "site_folds": {s: int(f) for s, f in sorted(zip(sites, patients["fold"]))},
        "sources": reference_sidecar["sources"],
        "steps": [f"Read the rows of {reference_sidecar['table']['file']} (survival data and provenance as its "
                  f"sidecar records; its reference folds are not used).",
                  f"Assigned whole tissue-source sites to {k} folds with milbench.tasks.site_folds.make_folds "
                  f"(seed {seed}, by site).",
                  "Wrote the same rows, in the same order, with the site folds as the fold column."],
        "anomalies": [f.as_dict() for f in anomalies],
    }
    table_path, sidecar_path = _write_table_and_sidecar(out, name, data, sidecar)
    return SiteFoldsResult(name, table_path, sidecar_path, balance, anomalies)


def _counts(table: pd.DataFrame, patients: pd.DataFrame) -> dict[str, Any]:
    folds = range(int(patients["fold"].max()) + 1)
    return {"patients": len(patients), "slides": len(table),
            "censored_patients": int(patients["censorship"].sum()),
            "held_out_patients": [int((patients["fold"] == k).sum()) for k in folds],
            "held_out_slides": [int((table["fold"] == k).sum()) for k in folds],
            "never_held_out_patients": int(patients["fold"].isna().sum())}


def import_cohorts(names: list[str], source: Path, out: Path) -> Iterator[ImportResult]:
    """Import the named cohorts (all when none named), one at a time so callers can report progress."""
    for name in [tcga.cohort_name(n) for n in names] or list(tcga.COHORTS):
        yield import_cohort(name, source, out)


def _write_table_and_sidecar(out: str | Path, name: str, data: bytes, sidecar: dict) -> tuple[Path, Path]:
    """Write ``<name>.csv`` and its ``<name>.json`` provenance sidecar into ``out``, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table_path, sidecar_path = out / f"{name}.csv", out / f"{name}.json"
    atomic_write(table_path, data)
    atomic_write(sidecar_path, (json.dumps(sidecar, indent=2) + "\n").encode())
    return table_path, sidecar_path
