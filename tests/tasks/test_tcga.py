"""Shipped TCGA split tables: they reproduce the reference folds, their provenance, and a deterministic import."""

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

from milbench import MilbenchError
from milbench.tasks import tcga
from milbench.tasks.audit import read_clam_splits
from milbench.tasks.splits_import import import_cohort, import_cohorts

SHARED = Path(__file__).resolve().parents[3] / "shared" / "tcga"  # tests/tasks/ -> repo root -> ../shared/tcga
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference files {SHARED} are absent (../shared/tcga "
                                  f"beside the repository); the shipped tables are checked against them when present")

# (patients, slides) per cohort: ../shared/tcga/README.md "Cohort counts" (LUAD: the MCAT table's 453 / 516).
COUNTS = {"tcga_blca": (373, 437), "tcga_brca": (956, 1022), "tcga_coad": (416, 424), "tcga_coadread": (339, 344),
          "tcga_gbmlgg": (569, 1011), "tcga_luad": (453, 516), "tcga_ucec": (480, 539)}
LUAD_MISSING = {f"TCGA-05-{n}" for n in (4384, 4390, 4425, 5420, 5423, 5425, 5428, 5429, 5715)}


@pytest.fixture(scope="module")
def reimported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("splits")
    list(import_cohorts([], SHARED, out))
    return out


def test_every_cohort_is_shipped_with_its_counts():
    assert set(tcga.COHORTS) == set(COUNTS)
    for name, (patients, slides) in COUNTS.items():
        table = tcga.shipped_table(name)
        assert list(table.columns) == list(tcga.SPLIT_COLUMNS)
        assert (table["case_id"].nunique(), len(table)) == (patients, slides), name
        assert not table["slide_id"].str.endswith(".svs").any()


def test_shipped_files_are_small_package_data():
    size = sum(p.stat().st_size for p in tcga.SPLITS_DIR.glob("tcga_*.*"))
    assert len(list(tcga.SPLITS_DIR.glob("tcga_*.json"))) == 2 * len(COUNTS)  # reference + site-preserved
    assert size < 1_000_000


@needs_shared
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_folds_equal_the_reference_folds(name):
    """Held-out patients of fold k = the reference val list; training patients = its train list (patient level)."""
    table = tcga.shipped_table(name)
    reference = read_clam_splits(SHARED / tcga.COHORTS[name].splits)
    assert len(reference) == 5
    for k, fold in enumerate(reference):
        held = set(table.loc[table["fold"] == k, "case_id"])
        train = set(table.loc[table["fold"] != k, "case_id"]) | set(table.loc[table["fold"].isna(), "case_id"])
        assert held == {i[:12] for i in fold.val}, f"{name} fold {k}"
        assert train == {i[:12] for i in fold.train}, f"{name} fold {k}"
        if name != "tcga_coad":  # patient-keyed: the very same ID set
            assert held == set(fold.val)


@needs_shared
def test_coad_slide_keyed_folds_and_their_anomalies():
    table = tcga.shipped_table("coad")
    reference = read_clam_splits(SHARED / "crossfusion/data/splits/tcga_coad")
    recorded = {a["check"]: a for a in tcga.shipped_provenance("coad")["anomalies"]}
    extra_held = set()
    for k, fold in enumerate(reference):
        held = set(table.loc[table["fold"] == k, "slide_id"])
        assert set(fold.val) <= held
        extra_held |= {f"fold {k}: {s}" for s in held - set(fold.val)}
    assert extra_held == set(recorded["slides in no val list"]["ids"]) and len(extra_held) == 3
    never = set(table.loc[table["fold"].isna(), "case_id"])
    assert never == {"TCGA-3L-AA1B", "TCGA-4N-A93T", "TCGA-QG-A5Z2", "TCGA-T9-A92H"}
    assert never == set(recorded["never held out"]["ids"])
    assert len(recorded["slides left out of train"]["ids"]) == 9


@needs_shared
def test_luad_keeps_the_patients_missing_from_the_crossfusion_table():
    table = tcga.shipped_table("luad")
    assert LUAD_MISSING <= set(table["case_id"])
    mcat = pd.read_csv(SHARED / "mcat/datasets_csv/tcga_luad_all_clean.csv", index_col=0)
    mcat = mcat[mcat["case_id"].isin(LUAD_MISSING)].sort_values("case_id")
    mine = table[table["case_id"].isin(LUAD_MISSING)].sort_values("case_id")
    assert mine["survival_months"].tolist() == mcat["survival_months"].tolist()
    assert mine["censorship"].tolist() == mcat["censorship"].astype(int).tolist()
    recorded = {a["check"]: a for a in tcga.shipped_provenance("luad")["anomalies"]}
    assert set(recorded["no clinical row"]["ids"]) == LUAD_MISSING


def test_blca_patient_level_bins_match_the_readme():
    assert tcga.inner_edges(tcga.patient_table(tcga.shipped_table("blca"))) == [7.62, 13.57, 21.85]


def test_cohort_summaries_list_every_cohort():
    rows = {r["name"]: r for r in tcga.cohort_summaries()}
    assert set(rows) == set(COUNTS)
    assert (rows["tcga_blca"]["patients"], rows["tcga_blca"]["slides"]) == COUNTS["tcga_blca"]
    assert rows["tcga_blca"]["censored_fraction"] == pytest.approx(1 - 169 / 373)
    assert rows["tcga_ucec"]["inner_edges"] == pytest.approx([12.125, 23.46, 33.855])
    assert rows["tcga_luad"]["inner_edges"] == pytest.approx([10.0975, 20.55, 35.445])  # the MCAT table's edges
    assert all(r["folds"] == 5 and r["source"] for r in rows.values())


@needs_shared
def test_sidecars_record_the_source_hashes():
    for name in COUNTS:
        side = tcga.shipped_provenance(name)
        assert side["table"]["sha256"] == hashlib.sha256(tcga.table_path(name).read_bytes()).hexdigest()
        for src in side["sources"] + side["identical_split_files"]:
            assert src["sha256"] == hashlib.sha256((SHARED / src["path"]).read_bytes()).hexdigest()
            assert len(src["commit"]) == 40 and "/" in src["repository"]
    assert len(tcga.shipped_provenance("blca")["identical_split_files"]) == 5  # MCAT/Patch-GCN copies checked


@needs_shared
def test_import_is_deterministic_and_matches_the_shipped_files(reimported):
    for name in COUNTS:
        for suffix in (".csv", ".json"):
            assert (reimported / f"{name}{suffix}").read_bytes() == (tcga.SPLITS_DIR / f"{name}{suffix}").read_bytes()
    assert not [p for p in reimported.iterdir() if p.name.startswith(".")]  # no temporary files left


@needs_shared
def test_import_refuses_a_reference_with_a_patient_in_two_folds(tmp_path):
    cohort = tcga.COHORTS["tcga_blca"]
    src = tmp_path / "src"
    for rel in (cohort.clinical, cohort.manifest):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED / rel, src / rel)
    shutil.copytree(SHARED / cohort.splits, src / cohort.splits)
    f1 = pd.read_csv(src / cohort.splits / "splits_1.csv", index_col=0)
    moved = pd.read_csv(src / cohort.splits / "splits_0.csv", index_col=0)["val"].iloc[0]
    f1.loc[len(f1), "val"] = moved  # now in val of folds 0 and 1
    f1.to_csv(src / cohort.splits / "splits_1.csv")
    with pytest.raises(MilbenchError, match="two held-out folds"):
        import_cohort("blca", src, tmp_path / "out")
    assert not (tmp_path / "out" / "tcga_blca.csv").exists()


def test_import_names_a_missing_source(tmp_path):
    with pytest.raises(MilbenchError, match="--source"):
        import_cohort("blca", tmp_path / "nowhere", tmp_path / "out")


def test_cohort_names_are_normalised():
    assert tcga.cohort_name("BLCA") == tcga.cohort_name("tcga_blca") == "tcga_blca"
    with pytest.raises(MilbenchError, match="unknown TCGA cohort"):
        tcga.cohort_name("kirc")


def test_split_table_reader_rejects_a_bad_fold(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("case_id,slide_id,survival_months,censorship,fold\nTCGA-AA-0001,TCGA-AA-0001-01Z-00-DX1.x,3,0,a\n")
    with pytest.raises(MilbenchError, match="fold must be an integer"):
        tcga.read_split_table(path)
