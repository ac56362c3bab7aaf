"""Site-preserved folds: the seeded search, the shipped tcga_<x>_sitefolds tables, `milbench splits make`."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from milbench import MilbenchError
from milbench.cli.splits import app
from milbench.tasks import audit, site_folds, tcga
from milbench.tasks.splits_import import write_site_folds
from tests.tasks.test_tcga import SHARED, needs_shared

runner = CliRunner()
COHORTS = sorted(tcga.COHORTS)


def brute_force_cost(sizes, events, n_folds):
    """The lowest cost over every assignment with no empty fold (small instances only)."""
    best = np.inf
    for fold in itertools.product(range(n_folds), repeat=len(sizes)):
        fold = np.array(fold)
        if len(set(fold)) == n_folds:
            best = min(best, site_folds._cost(sizes, events, fold, n_folds))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_search_finds_the_optimum_of_a_small_instance(seed):
    names = ["A1", "B2", "C3", "D4", "E5", "F6", "G7", "H8"]
    sizes, events = np.array([30, 21, 12, 9, 8, 5, 3, 2.0]), np.array([20, 4, 9, 1, 5, 0, 3, 1.0])
    got = site_folds.assign_folds(names, sizes, events, n_folds=3, seed=seed)
    fold = np.array([got[n] for n in names])
    assert sorted(set(fold)) == [0, 1, 2]
    assert site_folds._cost(sizes, events, fold, 3) == pytest.approx(brute_force_cost(sizes, events, 3))


def test_assignment_is_seeded_canonical_and_independent_of_input_order():
    rng = np.random.default_rng(3)
    names = [f"S{i:02d}" for i in range(30)]
    sizes, events = rng.integers(1, 40, 30), rng.integers(0, 10, 30)
    first = site_folds.assign_folds(names, sizes, events, 5, seed=0)
    perm = rng.permutation(30)
    assert site_folds.assign_folds([names[i] for i in perm], sizes[perm], events[perm], 5, seed=0) == first
    assert first["S00"] == 0  # folds numbered by their alphabetically first site
    firsts = [min(n for n, f in first.items() if f == k) for k in range(5)]
    assert firsts == sorted(firsts)
    assert any(site_folds.assign_folds(names, sizes, events, 5, seed=s) != first for s in (1, 2, 3))


def test_a_dominant_site_keeps_the_other_folds_balanced():
    names = ["AA"] + [f"B{i}" for i in range(12)]
    got = site_folds.assign_folds(names, np.array([60] + [10] * 12), np.array([6] + [1] * 12), 4)
    others = [sum(got[n] == k for n in names[1:]) for k in range(4) if k != got["AA"]]
    assert all(got[n] != got["AA"] for n in names[1:]) and others == [4, 4, 4]


def test_too_few_sites_and_non_tcga_ids_are_user_errors():
    with pytest.raises(MilbenchError, match="only 3 group"):
        site_folds.assign_folds(["A", "B", "C"], np.ones(3), np.ones(3), 5)
    with pytest.raises(MilbenchError, match="at least 2 folds"):
        site_folds.assign_folds(["A", "B", "C"], np.ones(3), np.ones(3), 1)
    with pytest.raises(MilbenchError, match="p1 is not a TCGA patient barcode.*--by patient"):
        site_folds.tissue_source_site("p1")
    assert site_folds.tissue_source_site("TCGA-XF-A9SJ") == "XF"


@pytest.mark.parametrize("name", COHORTS)
def test_shipped_site_folds_keep_sites_apart_and_pass_the_audit(name):
    reference = tcga.shipped_table(name)
    path = site_folds.site_folds_path(name)
    table = tcga.read_split_table(path)
    assert path.name == f"{name}_sitefolds.csv"
    cols = ["case_id", "slide_id", "survival_months", "censorship"]
    pd.testing.assert_frame_equal(table[cols], reference[cols])  # same rows, only the folds differ
    assert table["fold"].notna().all() and sorted(table["fold"].unique()) == [0, 1, 2, 3, 4]
    sites = table.assign(site=table["case_id"].map(site_folds.tissue_source_site))
    assert sites.groupby("site")["fold"].nunique().eq(1).all()
    report = audit.audit_files(path)
    assert report.errors == [] and report.folds["sites also in train"].eq(0).all()
    assert report.folds["held-out patients at shared sites"].eq(0).all()
    side = json.loads(path.with_suffix(".json").read_text())
    balance = site_folds.fold_balance(table)
    assert side["counts"]["held_out_patients"] == balance["patients"].tolist()
    assert side["counts"]["held_out_events"] == balance["events"].tolist()
    assert side["derived_from"]["sha256"] == tcga.shipped_provenance(name)["table"]["sha256"]
    assert side["sources"] == tcga.shipped_provenance(name)["sources"]


def test_shipped_site_folds_are_balanced():
    """Patients per fold within 12% of an equal share, unless one site alone exceeds it (COAD: AA, 145 of 416)."""
    for name in COHORTS:
        path = site_folds.site_folds_path(name)
        balance = site_folds.fold_balance(tcga.read_split_table(path))
        side = json.loads(path.with_suffix(".json").read_text())
        oversized = {a["ids"][0] for a in side["anomalies"] if "patients" in a["message"]}
        if oversized:  # the other folds share the rest equally
            assert name == "tcga_coad" and oversized == {"AA"} and balance["patients"].max() == 145
            balance = balance[balance["patients"] != 145]
        share = balance["patients"] / balance["patients"].mean()
        assert share.between(0.88, 1.12).all(), name
        assert balance["events"].min() >= 0.5 * balance["events"].mean(), name


@pytest.mark.parametrize("name", ["tcga_blca", "tcga_coad"])
def test_site_folds_are_rebuilt_byte_for_byte(name, tmp_path):
    """The import writes them from the reference table: same bytes from the shipped table and sidecar."""
    result = write_site_folds(tcga.shipped_table(name), tcga.shipped_provenance(name), tmp_path)
    shipped = site_folds.site_folds_path(name)
    assert result.table.read_bytes() == shipped.read_bytes()
    assert result.sidecar.read_bytes() == shipped.with_suffix(".json").read_bytes()
    if name == "tcga_coad":
        assert [a.ids for a in result.anomalies if "patients" in a.message] == [("AA",)]


def test_site_folds_names():
    assert site_folds.site_folds_name("BLCA") == site_folds.site_folds_name("tcga_blca_sitefolds") == \
        "tcga_blca_sitefolds"
    assert site_folds.is_site_folds_name("blca_sitefolds") and not site_folds.is_site_folds_name("tcga_blca")
    with pytest.raises(MilbenchError, match="unknown TCGA cohort"):
        site_folds.site_folds_name("kirc_sitefolds")


def test_make_on_the_reference_table_writes_the_shipped_site_folds(tmp_path):
    out = tmp_path / "made" / "blca_sites.csv"
    res = runner.invoke(app, ["make", str(tcga.table_path("blca")), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == site_folds.site_folds_path("blca").read_bytes()
    assert "held-out patients" in res.output and "75" in res.output


def test_make_keeps_extra_columns_and_groups_by_patient(tmp_path):
    rows = [{"case_id": f"p{i}", "slide_id": f"p{i}-s{j}.svs", "survival_months": 5.0 + i,
             "censorship": int(i % 3 == 0), "age": 40 + i} for i in range(12) for j in range(1 + (i % 4 == 0))]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv")
    res = runner.invoke(app, ["make", str(tmp_path / "t.csv"), "--out", str(tmp_path / "f.csv"), "--folds", "3",
                              "--by", "patient", "--seed", "4"])
    assert res.exit_code == 0, res.output
    made = pd.read_csv(tmp_path / "f.csv")
    assert list(made.columns) == ["case_id", "slide_id", "survival_months", "censorship", "age", "fold"]
    assert made["slide_id"].tolist() == [r["slide_id"].removesuffix(".svs") for r in rows]
    per = made.groupby("case_id")["fold"].agg(["nunique", "first"])
    assert per["nunique"].eq(1).all() and per["first"].value_counts().tolist() == [4, 4, 4]
    res = runner.invoke(app, ["make", str(tmp_path / "t.csv"), "--out", str(tmp_path / "g.csv")])
    assert isinstance(res.exception, MilbenchError) and "--by patient" in str(res.exception)


def test_audit_of_shipped_site_folds_shows_no_site_overlap():
    res = runner.invoke(app, ["audit", "tcga_blca_sitefolds"])
    assert res.exit_code == 0, res.output
    assert "audit passed" in res.output and "site-preserved" in res.output and "0%-0%" in res.output
    res = runner.invoke(app, ["audit", "coad_sitefolds"])
    assert res.exit_code == 0 and "site larger than a fold" in res.output


@needs_shared
def test_import_writes_the_site_folds_beside_the_reference_folds(tmp_path):
    res = runner.invoke(app, ["import", "--source", str(SHARED), "--out", str(tmp_path), "--cohort", "ucec"])
    assert res.exit_code == 0, res.output
    assert "site-preserved folds" in res.output and "96/96/96/96/96" in res.output
    assert (tmp_path / "tcga_ucec_sitefolds.csv").read_bytes() == site_folds.site_folds_path("ucec").read_bytes()
