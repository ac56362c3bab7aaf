"""The TCGA cohorts of the CrossFusion paper: where each comes from, and the shipped split tables.

Each cohort is the CrossFusion 5-fold split folder plus one clinical table (../shared/tcga/README.md):
CrossFusion's own table where the repository has it, PORPOISE's mutation-signature table as the stand-in for
BRCA and GBMLGG (CrossFusion's are too large for the stored snapshots), and for LUAD the 9 split patients that
CrossFusion's table lacks are taken from the MCAT/Patch-GCN table, so the shipped folds hold every patient the
reference split files list (the CrossFusion loader drops them silently). COAD's splits are keyed by slide
name; its patient is the first 12 characters.

A shipped table (``milbench/splits/tcga_<x>.csv``) has one row per slide: ``case_id, slide_id,
survival_months, censorship, fold`` (censorship 1 = censored). ``fold`` is the patient's held-out fold; an
empty fold means the reference never holds the patient out, and the patient is in the training set of every
fold (4 COAD patients). Its sidecar ``tcga_<x>.json`` records the sources and the anomalies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.survival.binning import fit_bins

SPLITS_DIR = Path(__file__).resolve().parents[1] / "splits"
SPLIT_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship", "fold")


@dataclass(frozen=True)
class SourceRepo:
    """A public repository that a folder of ../shared/tcga was copied from."""

    local_prefix: str
    repository: str
    commit: str
    original_prefix: str


SOURCE_REPOS = (
    SourceRepo("crossfusion/data/", "RustinS/CrossFusion", "df5473de130e4a25de944f12407dc51d0d1d2985", "data/"),
    SourceRepo("crossfusion/history/", "RustinS/CrossFusion", "9f0ef10d97ddc0cf63873416d35c6f6264ccb558", "data/"),
    SourceRepo("mcat/splits/", "mahmoodlab/MCAT", "b9cca63be83c67de7f95308d54a58f80b78b0da1", "splits/"),
    SourceRepo("mcat/datasets_csv/", "mahmoodlab/Patch-GCN", "823addaee5b8f4cc2bec3ea8e5e0077b2a5115a4",
               "datasets_csv/"),
    SourceRepo("porpoise/", "mahmoodlab/PORPOISE", "3390dc40e15995ba852d7a561faf0e996cf20501", ""),
)
# Local copies that were unzipped and had their *_rnaseq / *_cnv / *_mut columns removed (README "Edits").
REDUCED_COPIES = frozenset(
    [f"crossfusion/data/tcga_{c}_all_clean.csv" for c in ("blca", "luad", "ucec")]
    + [f"mcat/datasets_csv/tcga_{c}_all_clean.csv" for c in ("blca", "luad", "ucec")]
    + [f"porpoise/datasets_csv_mutsig/tcga_{c}_all_clean.csv"
       for c in ("blca", "brca", "coadread", "gbmlgg", "luad", "ucec")])


@dataclass(frozen=True)
class TcgaCohort:
    """One shipped cohort: its reference split folder, clinical table(s) and GDC manifest, relative to the source."""

    name: str
    splits: str
    clinical: str
    manifest: str
    source: str  # one line for `milbench cohorts`
    fill_from: str | None = None  # table for split patients that the clinical table lacks
    patient_from_slide: bool = False  # clinical case_id is the slide name: patient = its first 12 characters
    paper_slides: int | None = None  # slides the CrossFusion paper reports
    same_splits: tuple[str, ...] = ()  # other copies of the split files, checked byte for byte
    notes: tuple[str, ...] = ()  # anomalies known from the README that the sources alone cannot show


def _mcat(c: str) -> tuple[str, ...]:
    return (f"mcat/splits/5foldcv/tcga_{c}",)


COHORTS: dict[str, TcgaCohort] = {c.name: c for c in (
    TcgaCohort("tcga_blca", "crossfusion/data/splits/tcga_blca", "crossfusion/data/tcga_blca_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_BLCA.csv", "CrossFusion folds + clinical table",
               paper_slides=437, same_splits=_mcat("blca")),
    TcgaCohort("tcga_brca", "crossfusion/data/splits/tcga_brca", "porpoise/datasets_csv_mutsig/tcga_brca_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_BRCA.csv",
               "CrossFusion folds; clinical: PORPOISE table (stand-in)", paper_slides=1016, same_splits=_mcat("brca"),
               notes=("CrossFusion's BRCA clinical table is not retrievable (over 4 MiB); PORPOISE's mutation-"
                      "signature table stands in. Its survival values equal Patch-GCN's published per-patient "
                      "values for all 956 patients.",)),
    TcgaCohort("tcga_coad", "crossfusion/data/splits/tcga_coad", "crossfusion/data/tcga_coad_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_COAD.csv",
               "CrossFusion folds (slide-keyed) + clinical table", patient_from_slide=True, paper_slides=424,
               notes=("CrossFusion COAD exists only in CrossFusion; its survival_months are integers, "
                      "round(survival_days / 30), and 23 slides have 0 months.",
                      "COAD (TCGA-COAD manifest only) and COADREAD (Mahmood-lab COAD + READ) are different cohorts "
                      "with survival values from different sources.")),
    TcgaCohort("tcga_coadread", "crossfusion/data/splits/tcga_coadread",
               "crossfusion/history/tcga_coadread_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_COADREAD.csv",
               "CrossFusion folds + clinical table (from git history)",
               notes=("The CrossFusion COADREAD clinical table was deleted from the repository in b9bac2b while its "
                      "splits were kept; the copy comes from commit 9f0ef10. The paper reports no COADREAD result.",
                      "PORPOISE's COADREAD folds (340 patients) are assigned independently (val Jaccard 0.10-0.15).")),
    TcgaCohort("tcga_gbmlgg", "crossfusion/data/splits/tcga_gbmlgg",
               "porpoise/datasets_csv_mutsig/tcga_gbmlgg_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_GBMLGG.csv",
               "CrossFusion folds; clinical: PORPOISE table (stand-in)", paper_slides=1041,
               same_splits=_mcat("gbmlgg"),
               notes=("CrossFusion's GBMLGG clinical table is not retrievable (over 4 MiB); PORPOISE's mutation-"
                      "signature table stands in. Its survival values equal Patch-GCN's published per-patient values "
                      "for all 569 patients.",
                      "Patch-GCN's published bin labels put the inner edges in (9.89, 10.28], (16.75, 16.82] and "
                      "(32.33, 32.42]: 10 of 569 patients get a different cohort-level bin with this table.")),
    TcgaCohort("tcga_luad", "crossfusion/data/splits/tcga_luad", "crossfusion/data/tcga_luad_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_LUAD.csv",
               "CrossFusion folds + clinical table; 9 patients from MCAT table",
               fill_from="mcat/datasets_csv/tcga_luad_all_clean.csv", paper_slides=507, same_splits=_mcat("luad"),
               notes=("The CrossFusion loader drops the 9 split patients that its table lacks; milbench keeps them "
                      "(rows from the MCAT/Patch-GCN table, which equals CrossFusion's on every shared slide), so the "
                      "folds are the reference folds and the cohort is MCAT/Patch-GCN's 453 patients, 516 slides.",)),
    TcgaCohort("tcga_ucec", "crossfusion/data/splits/tcga_ucec", "crossfusion/data/tcga_ucec_all_clean.csv",
               "crossfusion/data/TCGA-Manifests/gdc_manifest_UCEC.csv", "CrossFusion folds + clinical table",
               paper_slides=539, same_splits=_mcat("ucec")),
)}


def cohort_name(text: str) -> str:
    """Canonical cohort name: accepts 'blca', 'BLCA' or 'tcga_blca'."""
    name = text.strip().lower()
    name = name if name.startswith("tcga_") else f"tcga_{name}"
    if name not in COHORTS:
        raise MilbenchError(f"unknown TCGA cohort '{text}': use one of {', '.join(sorted(COHORTS))}")
    return name


def source_record(root: Path, rel: str) -> dict[str, Any]:
    """Provenance of one file of the source folder: repository, commit, original path, copy kind, SHA-256."""
    path = root / rel
    if not path.is_file():
        raise MilbenchError(f"source file {path} is missing: pass --source pointing at the shared/tcga folder")
    repo = next((r for r in SOURCE_REPOS if rel.startswith(r.local_prefix)), None)
    if repo is None:
        raise MilbenchError(f"no known repository for source file {rel}")
    original = repo.original_prefix + rel[len(repo.local_prefix):]
    reduced = rel in REDUCED_COPIES
    return {"path": rel, "repository": repo.repository, "commit": repo.commit,
            "original_path": original + (".zip" if reduced else ""),
            "copy": "unzipped; *_rnaseq, *_cnv, *_mut columns removed" if reduced else "byte-identical",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_split_table(path: Path) -> pd.DataFrame:
    """Read a milbench split table (one row per slide), checking its columns; fold is nullable Int64."""
    path = Path(path)
    if not path.is_file():
        raise MilbenchError(f"split table {path} not found: check the path or run `milbench splits import`")
    df = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise MilbenchError(f"{path} lacks column(s) {', '.join(missing)}: a split table has columns "
                            f"{', '.join(SPLIT_COLUMNS)}")
    blank = df["case_id"].isna() | df["slide_id"].isna()
    if blank.any():
        raise MilbenchError(f"{path} line {df.index[blank][0] + 2}: no case_id or slide_id; every row needs both")
    fold = pd.to_numeric(df["fold"], errors="coerce")
    bad = df["fold"].notna() & (fold.isna() | (fold % 1 != 0))
    if bad.any():
        raise MilbenchError(f"{path}: fold must be an integer or empty, got '{df.loc[bad, 'fold'].iloc[0]}' "
                            f"(slide {df.loc[bad, 'slide_id'].iloc[0]})")
    df["fold"] = fold.astype("Int64")
    return df


def table_path(name: str) -> Path:
    """Path of a shipped split table."""
    return SPLITS_DIR / f"{cohort_name(name)}.csv"


def shipped_table(name: str) -> pd.DataFrame:
    """The shipped split table of a TCGA cohort."""
    return read_split_table(table_path(name))


def shipped_provenance(name: str) -> dict[str, Any]:
    """The provenance sidecar of a shipped cohort."""
    path = table_path(name).with_suffix(".json")
    if not path.is_file():
        raise MilbenchError(f"{path} not found: run `milbench splits import`")
    return json.loads(path.read_text())


def patient_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (case_id, survival_months, censorship, fold), in case_id order."""
    return table.groupby("case_id", sort=True)[["survival_months", "censorship", "fold"]].first().reset_index()


def inner_edges(patients: pd.DataFrame, n_bins: int = 4) -> list[float]:
    """The n_bins - 1 inner edges of the MCAT-recipe time bins fitted on these patients (one row each)."""
    edges = fit_bins(patients["survival_months"].to_numpy(float), 1 - patients["censorship"].to_numpy(int), n_bins)
    return [float(e) for e in np.round(edges[1:-1], 6)]


def cohort_summaries() -> list[dict[str, Any]]:
    """Per shipped cohort: patients, slides, censored fraction (patients), cohort-level time bins and source."""
    rows = []
    for name, cohort in COHORTS.items():
        table = shipped_table(name)
        patients = patient_table(table)
        rows.append({"name": name, "patients": len(patients), "slides": len(table),
                     "censored_fraction": float(patients["censorship"].mean()),
                     "folds": int(table["fold"].max()) + 1, "inner_edges": inner_edges(patients),
                     "source": cohort.source})
    return rows
