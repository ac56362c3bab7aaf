"""What a run was trained on is part of its identity (issue 16, "Identity"; DESIGN.md "Errors and exit codes").

The store starts with one completed record: fold 0 of AMIL (one epoch) on ``base_cohort``. Each test reruns that
fold with one input changed, or only moved or renamed, and counts the records afterwards:

- another table under the same file name, another feature root (other width, or other patch counts: a header-level
  fingerprint sees both), other splits: a new record is trained, the old one stays byte-identical;
- the same table renamed, the same features or splits copied to another path: nothing is trained, the existing
  record is reused, and the command exits 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.cli.helpers import MODEL, CohortFiles, records, run_milbench, snapshot, store_changes, write_cohort

pytestmark = pytest.mark.slow


def _run(runs: Path, table: Path, splits: Path, features: Path):
    return run_milbench("run", "--model", MODEL, "--cohort", table, "--splits", splits, "--features", features,
                        "--epochs", 1, "--device", "cpu", "--folds", 0, "--runs-dir", runs, timeout=600)


def _check(runs: Path, before: dict[str, bytes], res, expected_records: int) -> None:
    problems = []
    if res.returncode != 0:
        problems.append(f"exit code {res.returncode}, expected 0")
    found = len(records(runs))
    if found != expected_records:
        what = "retrained (a new record)" if found > expected_records else "reused a record it should not have"
        problems.append(f"{found} record(s) in the store, expected {expected_records}: {what}")
    problems += [p for p in store_changes(before, runs) if not p.startswith("new record")]
    assert not problems, "; ".join(problems) + "\n" + res.describe()


@pytest.fixture
def before(runs_dir):
    assert len(records(runs_dir)) == 1
    return snapshot(runs_dir)


def test_the_same_command_reuses_its_record(base_cohort: CohortFiles, runs_dir, before):
    res = _run(runs_dir, base_cohort.table, base_cohort.splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=1)


# ---- other inputs: train anew ------------------------------------------------------------------------------------

def test_another_table_under_the_same_file_name_trains_anew(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    table = pd.read_csv(base_cohort.table)
    table.loc[table.case_id == "CASE-05", "survival_months"] += 7.0  # one patient's follow-up differs
    table.to_csv(other / "cohort.csv", index=False)
    res = _run(runs_dir, other / "cohort.csv", base_cohort.splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=2)


def test_another_table_with_other_censorship_trains_anew(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    table = pd.read_csv(base_cohort.table)
    table.loc[table.case_id == "CASE-04", "censorship"] = 0  # censored before, an event now
    table.to_csv(other / "cohort.csv", index=False)
    res = _run(runs_dir, other / "cohort.csv", base_cohort.splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=2)


def test_another_feature_root_of_other_width_trains_anew(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    wide = write_cohort(tmp_path / "wide", width=16, seed=3)
    res = _run(runs_dir, base_cohort.table, base_cohort.splits, wide.features)
    _check(runs_dir, before, res, expected_records=2)


def test_another_feature_root_of_other_patches_trains_anew(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    other = write_cohort(tmp_path / "other", patches=9, seed=4)  # same names and width, other shapes and sizes
    res = _run(runs_dir, base_cohort.table, base_cohort.splits, other.features)
    _check(runs_dir, before, res, expected_records=2)


def test_other_splits_train_anew(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    folds = [(list(t), list(v)) for t, v in base_cohort.folds]
    train, held = folds[0]
    moved_in, moved_out = train[0], held[-1]  # swap one patient between train and held-out in fold 0
    folds[0] = ([c for c in train if c != moved_in] + [moved_out], [c for c in held if c != moved_out] + [moved_in])
    splits = tmp_path / "splits"
    splits.mkdir()
    for k, (tr, va) in enumerate(folds):
        pd.DataFrame({"train": pd.Series(tr, dtype=object), "val": pd.Series(va, dtype=object)}).to_csv(
            splits / f"splits_{k}.csv")
    res = _run(runs_dir, base_cohort.table, splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=2)


# ---- the same inputs moved or renamed: reuse ---------------------------------------------------------------------

def test_the_same_table_renamed_does_not_retrain(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(base_cohort.table, elsewhere / "my_patients.csv")
    res = _run(runs_dir, elsewhere / "my_patients.csv", base_cohort.splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=1)


def test_the_same_table_in_another_folder_does_not_retrain(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(base_cohort.table, elsewhere / "cohort.csv")
    res = _run(runs_dir, elsewhere / "cohort.csv", base_cohort.splits, base_cohort.features)
    _check(runs_dir, before, res, expected_records=1)


def test_the_same_features_under_another_path_do_not_retrain(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    copy = tmp_path / "copied_features"
    shutil.copytree(base_cohort.features, copy)
    res = _run(runs_dir, base_cohort.table, base_cohort.splits, copy)
    _check(runs_dir, before, res, expected_records=1)


def test_the_same_splits_in_another_folder_do_not_retrain(base_cohort: CohortFiles, runs_dir, before, tmp_path):
    copy = tmp_path / "my_folds"
    shutil.copytree(base_cohort.splits, copy)
    res = _run(runs_dir, base_cohort.table, copy, base_cohort.features)
    _check(runs_dir, before, res, expected_records=1)
