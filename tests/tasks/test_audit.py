"""The split audit: passes every shipped cohort, catches planted defects, reads CLAM splits folders."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench import MilbenchError
from milbench.tasks import audit, tcga

SITES = ("A1", "B2", "C3", "D4")


def write_custom_cohort(root: Path, n_patients: int = 24, n_folds: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """A cohort table (TCGA-like IDs, some patients with 2 slides) and a CLAM splits folder; returns both paths."""
    rng = np.random.default_rng(seed)
    cases = [f"TCGA-{SITES[i % len(SITES)]}-{i:04d}" for i in range(n_patients)]
    rows = []
    for i, case in enumerate(cases):
        time, cens = round(float(rng.uniform(1, 100)), 2), int(i % 3 == 0)
        for s in range(1 + (i % 5 == 0)):
            rows.append({"case_id": case, "slide_id": f"{case}-01Z-00-DX{s + 1}.AB{i:02d}.svs",
                         "survival_months": time, "censorship": cens})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    splits = root / "splits"
    splits.mkdir()
    for k in range(n_folds):
        val = cases[k::n_folds]
        train = [c for c in cases if c not in val]
        pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val)}).to_csv(splits / f"splits_{k}.csv")
    return root / "cohort.csv", splits


def levels(report: audit.AuditReport, check: str) -> set[str]:
    return {f.level for f in report.findings if f.check == check}


@pytest.mark.parametrize("name", sorted(tcga.COHORTS))
def test_every_shipped_cohort_passes(name):
    report = audit.audit_cohort(name)
    assert report.errors == []
    assert len(report.folds) == 5 and report.folds["inner edges"].map(len).eq(3).all()
    assert "ok" in levels(report, "provenance") and "ok" in levels(report, "patient-level folds")


def test_coad_and_luad_anomalies_are_reported():
    coad = audit.audit_cohort("coad")
    assert levels(coad, "never held out") == {"anomaly"} and levels(coad, "survival_months = 0") == {"anomaly"}
    assert {"slide-keyed splits", "slides in no val list", "slides left out of train"} <= {f.check for f in
                                                                                          coad.recorded}
    luad = audit.audit_cohort("luad")
    assert any(f.check == "no clinical row" and len(f.ids) == 9 for f in luad.recorded)


def test_fold_report_shows_site_overlap_and_training_bins():
    table = tcga.shipped_table("blca")
    report, _ = audit.fold_report(table)
    train0 = tcga.patient_table(table[table["fold"] != 0])
    assert report.loc[0, "inner edges"] == tcga.inner_edges(train0)
    assert report["held-out patients"].tolist() == [75, 75, 75, 74, 74]
    assert (report["sites also in train"] <= report["held-out sites"]).all()
    assert report["held-out patients at shared sites"].between(0, 1).all()


@pytest.fixture
def blca_copy(tmp_path) -> Path:
    path = tmp_path / "blca.csv"
    shutil.copy(tcga.table_path("blca"), path)
    return path


def _plant(path: Path, edit) -> Path:
    table = pd.read_csv(path, dtype={"case_id": str})
    edit(table)
    table.to_csv(path, index=False)
    return path


def test_patient_in_two_folds_is_a_defect(blca_copy):
    def split_a_patient(t):
        multi = t["case_id"][t["case_id"].duplicated()].iloc[0]
        row = t.index[t["case_id"] == multi][0]
        t.loc[row, "fold"] = (t.loc[row, "fold"] + 1) % 5
    report = audit.audit_files(_plant(blca_copy, split_a_patient))
    assert levels(report, "patient-level folds") == {"error"}


def test_duplicate_slide_is_a_defect(blca_copy):
    table = pd.read_csv(blca_copy)
    pd.concat([table, table.iloc[[3]]]).to_csv(blca_copy, index=False)
    assert "error" in levels(audit.audit_files(blca_copy), "duplicate IDs")


def test_missing_survival_is_a_defect(blca_copy):
    report = audit.audit_files(_plant(blca_copy, lambda t: t.__setitem__("survival_months",
                                                                         t["survival_months"].mask(t.index == 7))))
    assert levels(report, "survival data") == {"error"}


def test_slide_of_another_patient_is_a_defect(blca_copy):
    report = audit.audit_files(_plant(blca_copy, lambda t: t.loc.__setitem__((0, "case_id"), t.loc[1, "case_id"])))
    assert "error" in levels(report, "IDs match slide names")


def test_edited_shipped_table_no_longer_matches_its_sidecar(blca_copy):
    shutil.copy(tcga.table_path("blca").with_suffix(".json"), blca_copy.with_suffix(".json"))
    assert audit.audit_files(blca_copy).errors == []
    _plant(blca_copy, lambda t: t.__setitem__("censorship", 1 - t["censorship"]))
    assert levels(audit.audit_files(blca_copy), "provenance") == {"error"}


def test_custom_table_with_a_clam_splits_folder(tmp_path):
    table, splits = write_custom_cohort(tmp_path)
    report = audit.audit_files(table, splits)
    assert report.errors == [] and report.patients == 24 and len(report.folds) == 3
    assert report.folds["held-out patients"].tolist() == [8, 8, 8]
    assert report.folds["sites also in train"].tolist() == [4, 4, 4]
    assert levels(report, "folds partition the cohort") == {"ok"}


def test_clam_splits_with_a_patient_in_two_val_lists(tmp_path):
    table, splits = write_custom_cohort(tmp_path)
    f0, f1 = (pd.read_csv(splits / f"splits_{k}.csv", index_col=0) for k in (0, 1))
    f1.loc[len(f1), "val"] = f0["val"].iloc[0]
    f1.to_csv(splits / "splits_1.csv")
    report = audit.audit_files(table, splits)
    assert levels(report, "patient-level folds") == {"error"}
    assert levels(report, "train/held-out overlap") == {"error"}  # it is also still in fold 1's train list


def test_clam_splits_with_an_unknown_id_or_a_missing_patient(tmp_path):
    table, splits = write_custom_cohort(tmp_path)
    f0 = pd.read_csv(splits / "splits_0.csv", index_col=0)
    dropped = f0["train"].iloc[0]
    f0.loc[0, "train"] = "TCGA-ZZ-9999"
    f0.to_csv(splits / "splits_0.csv")
    report = audit.audit_files(table, splits)
    assert levels(report, "survival data") >= {"error"}
    left_out = [f for f in report.findings if f.check == "train = complement of held-out"]
    assert left_out and left_out[0].level == "warning" and left_out[0].ids == (dropped,)


def test_slide_keyed_reference_holds_siblings_out_with_their_patient():
    table = pd.DataFrame({"case_id": ["TCGA-A1-0001"] * 2 + ["TCGA-B2-0002", "TCGA-C3-0003"],
                          "slide_id": ["TCGA-A1-0001-01Z-00-DX1.a", "TCGA-A1-0001-01Z-00-DX2.b",
                                       "TCGA-B2-0002-01Z-00-DX1.c", "TCGA-C3-0003-01Z-00-DX1.d"],
                          "survival_months": [5.0, 5.0, 9.0, 20.0], "censorship": [0, 0, 1, 0]})
    s = table["slide_id"].tolist()
    reference = [audit.ReferenceFold(train=(s[2], s[3]), val=(s[0],)),  # s[1] in neither list
                 audit.ReferenceFold(train=(s[0], s[1]), val=(s[2], s[3]))]
    out, found = audit.folds_from_reference(table, reference, "ref")
    assert out["fold"].tolist() == [0, 0, 1, 1]
    checks = {f.check: f for f in found}
    assert checks["slides in no val list"].ids == (f"fold 0: {s[1]}",)
    assert "slide-keyed splits" in checks and not [f for f in found if f.level == "error"]


def test_bad_fold_labels_and_non_tcga_ids(tmp_path):
    table = pd.DataFrame({"case_id": ["p1", "p2", "p3", "p4"], "slide_id": ["s1", "s2", "s3", "s4"],
                          "survival_months": [1.0, 2.0, 3.0, 4.0], "censorship": [0, 0, 0, 1],
                          "fold": pd.array([0, 0, 2, 2], dtype="Int64")})
    found = audit.check_table(table)
    assert {f.level for f in found if f.check == "folds partition the cohort"} == {"error"}
    assert {f.level for f in found if f.check == "IDs match slide names"} == {"info"}


def test_rows_without_ids_are_user_errors(tmp_path):
    table, _ = write_custom_cohort(tmp_path)
    raw = pd.read_csv(table)
    raw.loc[2, "slide_id"] = None
    with pytest.raises(MilbenchError, match="lack a case_id or slide_id"):
        audit.cohort_table(raw, str(table))
