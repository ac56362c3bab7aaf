"""Audit a cohort's folds: patient-level, partitioning, survival data, IDs, site overlap, per-fold time bins.

Two inputs: a milbench split table (one row per slide with a ``fold`` column), or a cohort table plus a CLAM
splits folder (``splits_{k}.csv`` with ``train`` and ``val`` columns, keyed by patient or by slide), which is
first turned into a fold column while checking the reference (``folds_from_reference``; the import uses the
same function). Findings are graded: ``error`` is a real defect (the CLI exits 1), ``warning`` needs a look,
``anomaly`` is a known quirk of the reference, ``info`` is a report, ``ok`` a passed check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from milbench import MilbenchError
from milbench.tasks import tcga

TCGA_CASE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$")
STANDARD_SLIDE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-01Z-00-DX[0-9]+\.")
LEVELS = ("error", "warning", "anomaly", "info", "ok")


@dataclass(frozen=True)
class Finding:
    """One audit result: its grade, the check it belongs to, a one-line message and the IDs concerned."""

    level: str
    check: str
    message: str
    ids: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "check": self.check, "message": self.message, "ids": list(self.ids)}


@dataclass(frozen=True)
class ReferenceFold:
    """The ID lists of one reference split file."""

    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass
class AuditReport:
    """Everything the audit found for one cohort: findings, a per-fold table, anomalies recorded at import."""

    name: str
    patients: int
    slides: int
    findings: list[Finding]
    folds: pd.DataFrame
    recorded: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]


def read_clam_splits(folder: Path) -> list[ReferenceFold]:
    """Read splits_0.csv, splits_1.csv, ... (columns train and val; blank cells dropped per column)."""
    folder = Path(folder)
    files = []
    while (folder / f"splits_{len(files)}.csv").is_file():
        files.append(folder / f"splits_{len(files)}.csv")
    if len(files) < 2:
        raise MilbenchError(f"{folder} holds no splits_0.csv, splits_1.csv, ...: pass a CLAM splits folder with one "
                            f"splits_k.csv per fold (columns train and val)")
    folds = []
    for path in files:
        df = pd.read_csv(path, dtype=str)
        if not {"train", "val"} <= set(df.columns):
            raise MilbenchError(f"{path} has columns {list(df.columns)}: a split file needs columns train and val")
        folds.append(ReferenceFold(tuple(df["train"].dropna()), tuple(df["val"].dropna())))
    return folds


def cohort_table(df: pd.DataFrame, where: str, patient_from_slide: bool = False) -> pd.DataFrame:
    """Reduce a clinical table to case_id, slide_id (no .svs), survival_months, censorship: one row per slide."""
    missing = [c for c in ("case_id", "slide_id", "survival_months", "censorship") if c not in df.columns]
    if missing:
        raise MilbenchError(f"{where} lacks column(s) {', '.join(missing)}: a cohort table has case_id, slide_id, "
                            f"survival_months, censorship (1 = censored)")
    blank = df["slide_id"].isna() | (df["case_id"].isna() & (not patient_from_slide))
    if blank.any():
        raise MilbenchError(f"{where}: {int(blank.sum())} row(s) lack a case_id or slide_id (first: row "
                            f"{df.index[blank][0]}): fill them or drop the rows")
    out = pd.DataFrame({"slide_id": df["slide_id"].astype(str).str.removesuffix(".svs")})
    out["case_id"] = out["slide_id"].str[:12] if patient_from_slide else df["case_id"].astype(str).to_numpy()
    out["survival_months"] = pd.to_numeric(df["survival_months"], errors="coerce").astype(float).to_numpy()
    out["censorship"] = pd.to_numeric(df["censorship"], errors="coerce").to_numpy()
    return out[["case_id", "slide_id", "survival_months", "censorship"]].reset_index(drop=True)


def _ids(values) -> tuple[str, ...]:
    return tuple(sorted(str(v) for v in values))


def folds_from_reference(table: pd.DataFrame, reference: list[ReferenceFold], where: str
                         ) -> tuple[pd.DataFrame, list[Finding]]:
    """Give each patient of the reference splits its held-out fold, checking the reference on the way.

    Split IDs may be patients (case_id) or slides (slide_id). A patient's fold is the fold whose val list names
    it or one of its slides; patients in no val list get an empty fold (trained on in every fold).
    """
    findings: list[Finding] = []
    cases = set(table["case_id"])
    slide_case = dict(zip(table["slide_id"], table["case_id"]))
    listed = {i for f in reference for i in (*f.train, *f.val)}
    unknown = {i for i in listed if i not in cases and i not in slide_case}
    if unknown:
        findings.append(Finding("error", "survival data", f"{len(unknown)} IDs of {where} have no row in the "
                                f"cohort table, so no survival data: add their rows or remove them", _ids(unknown)))
    by_slide = {i for i in listed if i not in cases and i in slide_case}
    if by_slide:
        findings.append(Finding("anomaly", "slide-keyed splits", f"{where} lists {len(by_slide)} slide names, not "
                                f"patients: a slide's patient is its case_id"))
    pat = {i: (i if i in cases else slide_case.get(i)) for i in listed}
    held: dict[str, set[int]] = defaultdict(set)
    train_pats = []
    for k, fold in enumerate(reference):
        for col, ids in (("train", fold.train), ("val", fold.val)):
            dup = pd.Series(ids)[pd.Series(ids).duplicated()]
            if len(dup):
                findings.append(Finding("error", "duplicate IDs", f"fold {k} {col} lists {len(dup)} ID(s) twice",
                                        _ids(dup)))
        val_p = {pat[i] for i in fold.val} - {None}
        train_p = {pat[i] for i in fold.train} - {None}
        if val_p & train_p:
            findings.append(Finding("error", "train/held-out overlap", f"fold {k}: {len(val_p & train_p)} patient(s) "
                                    f"in both train and val of the reference", _ids(val_p & train_p)))
        for p in val_p:
            held[p].add(k)
        train_pats.append(train_p)
    twice = {p for p, ks in held.items() if len(ks) > 1}
    if twice:
        findings.append(Finding("error", "patient-level folds", f"{len(twice)} patient(s) in two held-out folds "
                                f"of the reference", _ids(f"{p} (folds {sorted(held[p])})" for p in twice)))
    fold_of = {p: min(ks) for p, ks in held.items()}
    split_pats = set(pat.values()) - {None}
    never = split_pats - set(fold_of)
    if never:
        findings.append(Finding("anomaly", "never held out", f"{len(never)} patient(s) are in no val list of the "
                                f"reference: empty fold, trained on in every fold", _ids(never)))
    for k, train_p in enumerate(train_pats):
        left_out = {p for p in split_pats if fold_of.get(p) != k} - train_p
        if left_out:
            findings.append(Finding("warning", "train = complement of held-out", f"fold {k}: the reference's train "
                                    f"list leaves out {len(left_out)} patient(s) not held out in that fold; the "
                                    f"single fold column cannot express this and trains on them", _ids(left_out)))
    if by_slide:
        findings += _slide_level(table[table["case_id"].isin(split_pats)], reference, fold_of)
    extra = cases - split_pats
    if extra:
        n_slides = int(table["case_id"].isin(extra).sum())
        findings.append(Finding("warning", "patients in no split file", f"{len(extra)} patient(s) ({n_slides} "
                                f"slides) of the cohort table are in no split file of {where}: left out", _ids(extra)))
    out = table[table["case_id"].isin(split_pats)].copy()
    out["fold"] = out["case_id"].map(fold_of).astype("Int64")
    return out.sort_values(["case_id", "slide_id"]).reset_index(drop=True), findings


def _slide_level(table: pd.DataFrame, reference: list[ReferenceFold], fold_of: dict[str, int]) -> list[Finding]:
    """For slide-keyed splits: slides that the reference leaves out of val or train, which a fold column cannot."""
    found = []
    unheld, untrained = [], []
    for k, fold in enumerate(reference):
        val, train = set(fold.val), set(fold.train)
        in_k = table["case_id"].map(fold_of).eq(k).fillna(False).astype(bool)
        unheld += [f"fold {k}: {s}" for s in table.loc[in_k, "slide_id"] if s not in val]
        untrained += [f"fold {k}: {s}" for s in table.loc[~in_k, "slide_id"] if s not in train]
    if unheld:
        found.append(Finding("anomaly", "slides in no val list", f"{len(unheld)} slide(s) of held-out patients are in "
                             f"neither train nor val of their fold: milbench holds them out with their patient",
                             tuple(sorted(unheld))))
    if untrained:
        found.append(Finding("anomaly", "slides left out of train", f"{len(untrained)} (fold, slide) pair(s): the "
                             f"reference's train list leaves out a slide of a training patient; milbench trains on "
                             f"all slides of a patient", tuple(sorted(untrained))))
    return found


def check_table(table: pd.DataFrame) -> list[Finding]:
    """Table-level checks: duplicate IDs, survival data, IDs vs slide names, patient-level fold partition."""
    return _check_ids(table) + _check_survival(table) + _check_folds(table)


def _check_ids(table: pd.DataFrame) -> list[Finding]:
    found = []
    dup = table.loc[table["slide_id"].duplicated(), "slide_id"]
    found.append(Finding("error", "duplicate IDs", f"{len(dup)} slide_id(s) appear on more than one row", _ids(dup))
                 if len(dup) else Finding("ok", "duplicate IDs", f"{len(table)} distinct slide IDs"))
    case = table["case_id"].astype(str)
    barcode = case.str.match(TCGA_CASE)
    if not case.str.startswith("TCGA-").any():
        found.append(Finding("info", "IDs match slide names", "case IDs are not TCGA barcodes: barcode and site "
                             "checks skipped"))
        return found
    if not barcode.all():
        found.append(Finding("error", "IDs match slide names", f"{int((~barcode).sum())} case_id(s) are not "
                             f"12-character TCGA patient barcodes: use the first 12 characters of the slide name",
                             _ids(case[~barcode])))
    mismatch = ~pd.Series([s.startswith(c + "-") for s, c in zip(table["slide_id"], case)], index=table.index)
    if mismatch.any():
        found.append(Finding("error", "IDs match slide names", f"{int(mismatch.sum())} slide name(s) do not start "
                             f"with their case_id", _ids(table.loc[mismatch, "slide_id"])))
    elif barcode.all():
        found.append(Finding("ok", "IDs match slide names", "every slide's TCGA barcode starts with its case_id"))
    odd = table.loc[~table["slide_id"].str.match(STANDARD_SLIDE), "slide_id"]
    if len(odd):
        found.append(Finding("anomaly", "non-standard slide names", f"{len(odd)} slide(s) are not -01Z-00-DX<n> "
                             f"(another sample type such as -02Z or -06Z, -01A-..-DX, or DXA-DXF)", _ids(odd)))
    return found


def _check_survival(table: pd.DataFrame) -> list[Finding]:
    time, cens = table["survival_months"], table["censorship"]
    bad = time.isna() | cens.isna()
    if bad.any():
        return [Finding("error", "survival data", f"{int(bad.sum())} slide(s) lack survival_months or censorship: "
                        f"fill them or drop the case", _ids(table.loc[bad, "case_id"].unique()))]
    found = []
    if (time < 0).any():
        found.append(Finding("error", "survival data", f"{int((time < 0).sum())} slide(s) have negative "
                             f"survival_months", _ids(table.loc[time < 0, "case_id"].unique())))
    if not cens.isin([0, 1]).all():
        found.append(Finding("error", "survival data", "censorship must be 0 (event) or 1 (censored)",
                             _ids(table.loc[~cens.isin([0, 1]), "case_id"].unique())))
    per = table.groupby("case_id")[["survival_months", "censorship"]].nunique()
    mixed = per.index[(per > 1).any(axis=1)]
    if len(mixed):
        found.append(Finding("error", "survival data", f"{len(mixed)} patient(s) have different survival values on "
                             f"different slides", _ids(mixed)))
    if not found:
        found.append(Finding("ok", "survival data", "every case has survival_months >= 0 and censorship 0/1, "
                             "the same on all its slides"))
    zero = table.loc[time == 0, "case_id"].unique()
    if len(zero):
        found.append(Finding("anomaly", "survival_months = 0", f"{len(zero)} patient(s) have 0 months "
                             f"(ties at the start; they fall in the first bin)", _ids(zero)))
    return found


def _check_folds(table: pd.DataFrame) -> list[Finding]:
    found = []
    per = table.groupby("case_id")["fold"].agg(lambda s: sorted({("none" if pd.isna(v) else int(v)) for v in s},
                                                                key=str))
    split = per[per.map(len) > 1]
    if len(split):
        found.append(Finding("error", "patient-level folds", f"{len(split)} patient(s) have slides in different "
                             f"folds (a patient in two held-out folds, or partly in none)",
                             _ids(f"{p} (folds {', '.join(map(str, f))})" for p, f in split.items())))
    labels = sorted(int(v) for v in table["fold"].dropna().unique())
    if labels != list(range(len(labels))) or len(labels) < 2:
        found.append(Finding("error", "folds partition the cohort", f"fold labels are {labels}: they must be "
                             f"0, 1, ..., K-1 with K >= 2, each fold non-empty"))
        return found
    patients = tcga.patient_table(table)
    none = patients.loc[patients["fold"].isna(), "case_id"]
    if len(none):
        found.append(Finding("anomaly", "never held out", f"{len(none)} patient(s) have an empty fold: in no "
                             f"held-out fold, trained on in every fold", _ids(none)))
    if not len(split):
        found.append(Finding("ok", "patient-level folds", "all slides of a patient share one fold"))
        found.append(Finding("ok", "folds partition the cohort", f"{len(labels)} held-out folds partition "
                             f"{len(patients) - len(none)} of {len(patients)} patients; each fold's training set "
                             f"is all other patients"))
    for k in labels:
        if (patients.loc[patients["fold"] == k, "censorship"] == 1).all():
            found.append(Finding("warning", "events per fold", f"held-out fold {k} has no event: its C-index is "
                                 f"undefined"))
    return found


def _site(case_id: str) -> str | None:
    return case_id.split("-")[1] if TCGA_CASE.match(case_id) else None


def fold_report(table: pd.DataFrame, n_bins: int = 4) -> tuple[pd.DataFrame, list[Finding]]:
    """Per held-out fold: sizes, events, tissue-source-site overlap with training, time bins fitted on training."""
    patients = tcga.patient_table(table)
    patients["site"] = patients["case_id"].map(_site)
    found, rows = [], []
    for k in sorted(int(v) for v in patients["fold"].dropna().unique()):
        test = patients["fold"].eq(k).fillna(False).astype(bool)
        train, held = patients[~test], patients[test]
        train_sites, held_sites = set(train["site"].dropna()), set(held["site"].dropna())
        try:  # patients without survival data are reported by check_table; the bins are fitted on the others
            edges = tcga.inner_edges(train.dropna(subset=["survival_months", "censorship"]), n_bins)
        except MilbenchError as err:
            edges = []
            found.append(Finding("error", "time bins per training fold", f"fold {k}: {err}"))
        rows.append({"fold": k, "train patients": len(train), "held-out patients": len(held),
                     "train slides": int(table["case_id"].isin(train["case_id"]).sum()),
                     "held-out slides": int(table["case_id"].isin(held["case_id"]).sum()),
                     "held-out events": int((held["censorship"] == 0).sum()),
                     "held-out sites": len(held_sites), "sites also in train": len(held_sites & train_sites),
                     "held-out patients at shared sites": float(held["site"].isin(train_sites).mean())
                     if held_sites else float("nan"),
                     "inner edges": edges})
    report = pd.DataFrame(rows)
    if len(report) and report["held-out sites"].gt(0).all():
        share = report["held-out patients at shared sites"]
        found.append(Finding("info", "site overlap", f"{share.min():.0%}-{share.max():.0%} of held-out patients per "
                             f"fold come from a tissue-source site that is also in training"
                             + (": the folds are not site-preserved" if share.max() > 0 else ": site-preserved")))
    if not any(f.level == "error" for f in found):
        found.append(Finding("ok", "time bins per training fold", f"{n_bins} bins fitted on each training fold "
                             f"(MCAT recipe, one row per patient)"))
    return report, found


def _sidecar_findings(table_file: Path, sidecar: dict[str, Any]) -> tuple[list[Finding], list[Finding]]:
    """Check the table against the hash its sidecar recorded; return (findings, anomalies recorded at import)."""
    recorded = [Finding(a["level"], a["check"], a["message"], tuple(a.get("ids", ()))) for a in sidecar["anomalies"]]
    sha = hashlib.sha256(table_file.read_bytes()).hexdigest()
    if sha != sidecar["table"]["sha256"]:
        return [Finding("error", "provenance", f"{table_file} differs from the table its sidecar describes: "
                        f"re-run `milbench splits import`")], recorded
    return [Finding("ok", "provenance", f"table matches its sidecar (sources: {len(sidecar['sources'])} files, "
                    f"SHA-256 recorded)")], recorded


def audit_table(table: pd.DataFrame, name: str, n_bins: int = 4, findings: list[Finding] | None = None,
                recorded: list[Finding] | None = None) -> AuditReport:
    """Audit a split table (one row per slide with a fold column); earlier findings are kept in front."""
    folds, fold_findings = fold_report(table, n_bins)
    found = list(findings or []) + check_table(table) + fold_findings
    failed = {f.check for f in found if f.level == "error"}  # a check that failed upstream is not also "ok"
    found = [f for f in found if not (f.level == "ok" and f.check in failed)]
    return AuditReport(name, int(table["case_id"].nunique()), len(table), found, folds, list(recorded or []))


def audit_cohort(name: str, n_bins: int = 4) -> AuditReport:
    """Audit a shipped TCGA cohort, with the anomalies its sidecar recorded at import."""
    name = tcga.cohort_name(name)
    path = tcga.table_path(name)
    findings, recorded = _sidecar_findings(path, tcga.shipped_provenance(name))
    return audit_table(tcga.shipped_table(name), name, n_bins, findings, recorded)


def audit_files(table_file: Path, splits_dir: Path | None = None, n_bins: int = 4) -> AuditReport:
    """Audit a split table, or a cohort table plus a CLAM splits folder (whose folds replace any fold column)."""
    table_file = Path(table_file)
    if splits_dir is None:
        table = tcga.read_split_table(table_file)
        sidecar = table_file.with_suffix(".json")
        findings, recorded = ([], [])
        if sidecar.is_file():
            findings, recorded = _sidecar_findings(table_file, json.loads(sidecar.read_text()))
        return audit_table(table, table_file.stem, n_bins, findings, recorded)
    if not table_file.is_file():
        raise MilbenchError(f"cohort table {table_file} not found: check the path")
    raw = pd.read_csv(table_file, dtype={"case_id": str, "slide_id": str})
    table, findings = folds_from_reference(cohort_table(raw, str(table_file)), read_clam_splits(splits_dir),
                                           str(splits_dir))
    if "fold" in raw.columns:
        findings.insert(0, Finding("info", "folds", f"the fold column of {table_file.name} is ignored: folds come "
                                   f"from {splits_dir}"))
    return audit_table(table, table_file.stem, n_bins, findings)
