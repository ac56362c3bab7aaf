from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import milbench.tasks.synthetic
from milbench import MilbenchError
from milbench.tasks.cohort import (SHIPPED_SPLITS, Cohort, load_splits_folder, load_table, resolve_cohort)
from tests.data.files import clam_h5, grid, random_features, splits_folder, table_csv


def rows(n_cases: int = 4, extra_slide: bool = True) -> list[dict]:
    """One slide per case (case c0 has a second slide), survival 10, 20, ...; odd cases censored."""
    out = [{"case_id": f"c{i}", "slide_id": f"s{i}.svs", "survival_months": 10.0 * (i + 1), "censorship": i % 2,
            "age": 50 + i} for i in range(n_cases)]
    if extra_slide:
        out.insert(1, {**out[0], "slide_id": "s0b.svs"})
    return out


TWO_FOLDS = [(["c2", "c3"], ["c0", "c1"]), (["c0", "c1"], ["c2", "c3"])]


def test_load_table_strips_svs_keeps_covariates(tmp_path):
    table = load_table(table_csv(tmp_path / "t.csv", rows()))
    assert list(table.columns) == ["case_id", "slide_id", "survival_months", "censorship", "age"]
    assert table.slide_id.tolist() == ["s0", "s0b", "s1", "s2", "s3"]
    assert table.censorship.dtype == int and table.age.tolist()[:2] == [50, 50]


def test_load_table_without_index_and_with_stale_index_column(tmp_path):
    frame = pd.DataFrame(rows(extra_slide=False))
    frame.insert(0, "Unnamed: 0", range(4))  # LUAD's stale index column, next to the unnamed one
    frame.to_csv(tmp_path / "t.csv")
    assert "Unnamed: 0" not in load_table(tmp_path / "t.csv").columns
    table_csv(tmp_path / "u.csv", rows(), index=False)
    assert len(load_table(tmp_path / "u.csv")) == 5


@pytest.mark.parametrize("change,pattern", [
    (lambda r: [{k: v for k, v in x.items() if k != "censorship"} for x in r], r"t\.csv lacks column\(s\) censorship"),
    (lambda r: [{**r[0], "survival_months": None}, *r[1:]], r"t\.csv line 2 \(slide s0\): survival_months is empty"),
    (lambda r: [{**r[0], "survival_months": "soon"}, *r[1:]], r"line 2 \(slide s0\): survival_months 'soon' is not"),
    (lambda r: [*r[:2], {**r[2], "survival_months": -1.0}, *r[3:]], r"t\.csv line 4 \(slide s1\): .* is negative"),
    (lambda r: [*r[:3], {**r[3], "censorship": 2}, *r[4:]], r"t\.csv line 5 \(slide s2\): censorship '2' must be 0"),
    (lambda r: [*r, {**r[3], "case_id": "c9"}], r"t\.csv: slide s2 appears on lines 5, 7: keep one row per slide"),
    (lambda r: [r[0], {**r[1], "survival_months": 99.0}, *r[2:]], r"t\.csv: case c0 has conflicting survival_months"),
    (lambda r: [r[0], {**r[1], "censorship": 1}, *r[2:]], r"t\.csv: case c0 has conflicting censorship"),
    (lambda r: [{**r[0], "case_id": ""}, *r[1:]], r"t\.csv line 2: empty case_id"),
    (lambda r: [{**x, "fold": 0.5} for x in r], r"t\.csv line 2: fold '0.5' is not a whole number"),
])
def test_load_table_rejects_bad_rows(tmp_path, change, pattern):
    table_csv(tmp_path / "t.csv", change(rows()))
    with pytest.raises(MilbenchError, match=pattern):
        load_table(tmp_path / "t.csv")


def test_load_table_missing_file(tmp_path):
    with pytest.raises(MilbenchError, match=r"cohort table .*nope\.csv not found"):
        load_table(tmp_path / "nope.csv")


def test_splits_folder_ragged_columns_and_empty_test(tmp_path):
    folder = splits_folder(tmp_path / "splits", TWO_FOLDS + [(["c0", "c1", "c2"], ["c3"])])
    frame = pd.read_csv(folder / "splits_2.csv", index_col=0)
    frame["test"] = np.nan
    frame.to_csv(folder / "splits_2.csv")
    assert (folder / "splits_2.csv").read_text().splitlines()[3].endswith(",,")  # val and test padded
    folds = load_splits_folder(folder)
    assert sorted(folds) == [0, 1, 2]
    assert folds[2] == (["c0", "c1", "c2"], ["c3"]) and folds[0] == TWO_FOLDS[0]


def test_splits_with_index_header_and_no_final_newline(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "splits_0.csv").write_text("index,train,val\n0,c2,c0\n1,c3,")
    assert load_splits_folder(folder) == {0: (["c2", "c3"], ["c0"])}


def test_splits_test_column_differing_from_val(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "splits_0.csv").write_text(",train,val,test\n0,c2,c0,c1\n1,c3,,\n")
    with pytest.raises(MilbenchError, match=r"splits_0\.csv: the test column differs from val"):
        load_splits_folder(folder)


def test_splits_folder_errors(tmp_path):
    with pytest.raises(MilbenchError, match="splits folder .* not found"):
        load_splits_folder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MilbenchError, match="has no splits_<k>.csv"):
        load_splits_folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "splits_0.csv").write_text(",train,test\n0,c1,c2\n")
    with pytest.raises(MilbenchError, match=r"splits_0\.csv lacks column\(s\) val"):
        load_splits_folder(tmp_path / "bad")


def custom(tmp_path, table_rows=None, folds=TWO_FOLDS, **kwargs) -> Cohort:
    table = table_csv(tmp_path / "t.csv", table_rows or rows())
    return resolve_cohort(table, splits=splits_folder(tmp_path / "splits", folds), **kwargs)


def test_custom_cohort_patients_slides_labels(tmp_path):
    cohort = custom(tmp_path)
    assert cohort.name == "t" and cohort.folds[1] == TWO_FOLDS[1]
    assert cohort.patients.index.tolist() == ["c0", "c1", "c2", "c3"]
    assert cohort.slides_of("c0") == ["s0", "s0b"]
    time, event = cohort.labels(["c3", "c0"])
    assert time.tolist() == [40.0, 10.0] and event.tolist() == [0, 1] and event.dtype == np.int64
    assert cohort.oracle_risk is None and cohort.features_root is None
    with pytest.raises(MilbenchError, match="case zz is not in cohort 't'"):
        cohort.labels(["zz"])


def test_case_in_splits_not_in_table(tmp_path):
    with pytest.raises(MilbenchError, match=r"splits_1\.csv: case c7 is not in the table .*t\.csv: "
                                            r"add it to the table or remove it from splits_1\.csv"):
        custom(tmp_path, folds=[TWO_FOLDS[0], (["c0", "c7"], ["c2", "c3"])])


def test_patient_in_train_and_heldout(tmp_path):
    with pytest.raises(MilbenchError, match=r"splits_0\.csv: patient c1 is in both the train and held-out sets"):
        custom(tmp_path, folds=[(["c1", "c2"], ["c0", "c1"])])


def test_fold_column(tmp_path):
    table = [{**r, "fold": f} for r, f in zip(rows(), [0, 0, 1, 2, None])]
    cohort = resolve_cohort(table_csv(tmp_path / "t.csv", table))
    # c3 has no fold: never held out, so it trains in every fold (the reference COAD semantics)
    assert cohort.folds == {0: (["c1", "c2", "c3"], ["c0"]), 1: (["c0", "c2", "c3"], ["c1"]),
                            2: (["c0", "c1", "c3"], ["c2"])}


def test_fold_column_patient_split_across_folds(tmp_path):
    table = [{**r, "fold": f} for r, f in zip(rows(), [0, 1, 1, 2, 2])]
    with pytest.raises(MilbenchError, match=r"t\.csv: patient c0 has slides in different folds \(0, 1\)"):
        resolve_cohort(table_csv(tmp_path / "t.csv", table))


def test_no_folds_anywhere(tmp_path):
    with pytest.raises(MilbenchError, match=r"t\.csv has no fold column: pass --splits"):
        resolve_cohort(table_csv(tmp_path / "t.csv", rows()))


def test_oracle_risk_per_case(tmp_path):
    table = [{**r, "oracle_risk": float(r["case_id"][1:])} for r in rows()]
    cohort = custom(tmp_path, table)
    assert cohort.oracle_risk.loc[["c2", "c0"]].tolist() == [2.0, 0.0]


def test_unknown_name_lists_valid_names():
    with pytest.raises(MilbenchError, match="unknown cohort 'foo': use one of synthetic, .*tcga_blca.*ucec"):
        resolve_cohort("foo")


def test_synthetic_names_resolve_through_builtin_cohort(tmp_path, monkeypatch):
    folder = tmp_path / "syn"
    folder.mkdir()
    table_csv(folder / "cohort.csv", [{**r, "oracle_risk": 1.0} for r in rows()], index=False)
    splits_folder(folder / "splits", TWO_FOLDS)
    asked = []
    monkeypatch.setattr(milbench.tasks.synthetic, "builtin_cohort", lambda name: asked.append(name) or folder)
    cohort = resolve_cohort("synthetic")
    assert cohort.name == "synthetic_mixed" and cohort.features_root == folder / "features"
    assert cohort.oracle_risk is not None and len(cohort.folds) == 2
    resolve_cohort("Synthetic_Cross-Scale")
    assert asked == ["synthetic_mixed", "synthetic_cross-scale"]
    with pytest.raises(MilbenchError, match="unknown synthetic scenario 'blurry'"):
        resolve_cohort("synthetic_blurry")


@pytest.mark.skipif(not (SHIPPED_SPLITS / "tcga_blca.csv").is_file(), reason="tcga_blca.csv not shipped yet")
def test_tcga_aliases():
    short, full = resolve_cohort("blca"), resolve_cohort("TCGA_BLCA")
    assert short.name == full.name == "tcga_blca" and len(short.folds) == 5
    assert short.patients.index.tolist() == full.patients.index.tolist()
    with pytest.raises(MilbenchError, match="TCGA features are not shipped: pass --features ROOT"):
        short.require_features_root()


def test_missing_features_fail_up_front_or_are_excluded(tmp_path):
    features = tmp_path / "features"
    for slide in ("s0", "s1", "s2", "s3"):  # s0b is missing at 20x, s3 at 5x
        clam_h5(features, "20x", slide, random_features(2), grid(2))
        if slide != "s3":
            clam_h5(features, "5x", slide, random_features(2), grid(2))
    clam_h5(features, "5x", "s0b", random_features(2), grid(2))
    cohort = custom(tmp_path, features=features)
    with pytest.raises(MilbenchError, match=r"2 feature file\(s\) of cohort 't' are missing \(e\.g\. .*s0b\.h5, "
                                            r".*s3\.h5\): .*--exclude-missing"):
        cohort.check_features(("5x", "20x"))

    kept = resolve_cohort(tmp_path / "t.csv", splits=tmp_path / "splits", features=features, exclude_missing=True)
    assert kept.excluded == ["s0b", "s3"]
    assert kept.slides_of("c0") == ["s0"] and "c3" not in kept.patients.index
    assert kept.folds[1] == (["c0", "c1"], ["c2"])
    kept.check_features(("5x", "20x"))


def test_exclude_missing_needs_features(tmp_path):
    with pytest.raises(MilbenchError, match="cohort 't' has no feature folder: pass --features ROOT"):
        custom(tmp_path, exclude_missing=True)


def test_exclusion_emptying_a_fold_is_an_error(tmp_path):
    features = tmp_path / "features"
    for slide in ("s0", "s0b", "s1"):
        clam_h5(features, "20x", slide, random_features(2), grid(2))
    with pytest.raises(MilbenchError, match=r"splits_1\.csv: fold 1 has no held-out patients"):
        custom(tmp_path, features=features, exclude_missing=True)


def test_table_path_as_string(tmp_path):
    table_csv(tmp_path / "t.csv", [{**r, "fold": i % 2} for i, r in enumerate(rows(extra_slide=False))])
    assert len(resolve_cohort(str(tmp_path / "t.csv")).folds) == 2
    with pytest.raises(MilbenchError, match="not found"):
        resolve_cohort(str(Path(tmp_path) / "missing.csv"))


def test_tcga_alias_resolution_on_a_stand_in_table(tmp_path, monkeypatch):
    shipped = tmp_path / "splits"
    shipped.mkdir()
    table_csv(shipped / "tcga_luad.csv", [{**r, "fold": int(r["case_id"][1:]) % 2} for r in rows()], index=False)
    monkeypatch.setattr("milbench.tasks.cohort.SHIPPED_SPLITS", shipped)
    for name in ("luad", "LUAD", "tcga_luad", "tcga-luad"):
        cohort = resolve_cohort(name)
        assert cohort.name == "tcga_luad" and sorted(cohort.folds) == [0, 1]
    with pytest.raises(MilbenchError, match="cohort 'tcga_luad' has no feature folder: TCGA features are not shipped"):
        cohort.require_features_root()
    assert resolve_cohort("luad", features=tmp_path).features_root == tmp_path
    with pytest.raises(MilbenchError, match=r"shipped table .*tcga_blca\.csv is missing"):
        resolve_cohort("blca")
