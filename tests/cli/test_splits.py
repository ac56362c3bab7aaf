"""`milbench splits import` and `milbench splits audit` through Typer: exit codes and printed results."""

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from milbench import MilbenchError
from milbench.cli.splits import app
from milbench.tasks import tcga
from tests.tasks.test_audit import write_custom_cohort
from tests.tasks.test_tcga import SHARED, needs_shared

runner = CliRunner()


def test_audit_a_shipped_cohort_passes():
    res = runner.invoke(app, ["audit", "coad"])
    assert res.exit_code == 0, res.output
    assert "audit passed" in res.output and "never held out" in res.output and "recorded at import" in res.output


def test_audit_exits_1_on_a_planted_defect(tmp_path):
    path = tmp_path / "t.csv"
    table = tcga.shipped_table("ucec")
    multi = table["case_id"][table["case_id"].duplicated()].iloc[0]
    table.loc[table.index[table["case_id"] == multi][0], "fold"] += 1
    table.to_csv(path, index=False)
    res = runner.invoke(app, ["audit", "--table", str(path)])
    assert res.exit_code == 1 and "audit failed" in res.output and multi in res.output


def test_audit_a_custom_table_with_clam_splits(tmp_path):
    table, splits = write_custom_cohort(tmp_path)
    res = runner.invoke(app, ["audit", "--table", str(table), "--splits", str(splits)])
    assert res.exit_code == 0, res.output
    assert "audit passed" in res.output and "cohort" in res.output


@pytest.mark.parametrize("args", [[], ["blca", "--table", "x.csv"], ["--splits", "dir"]])
def test_audit_needs_exactly_one_input(args):
    res = runner.invoke(app, ["audit", *args])
    assert isinstance(res.exception, MilbenchError)


@needs_shared
def test_import_writes_the_shipped_bytes(tmp_path):
    res = runner.invoke(app, ["import", "--source", str(SHARED), "--out", str(tmp_path), "--cohort", "luad"])
    assert res.exit_code == 0, res.output
    assert "no clinical row" in res.output and "tcga_luad" in res.output
    assert (tmp_path / "tcga_luad.csv").read_bytes() == tcga.table_path("luad").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tcga_luad.csv", "tcga_luad.json", "tcga_luad_sitefolds.csv", "tcga_luad_sitefolds.json"]


def test_import_from_a_missing_source_is_a_user_error(tmp_path):
    res = runner.invoke(app, ["import", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert isinstance(res.exception, MilbenchError) and "--source" in str(res.exception)


def test_audit_reads_a_table_copied_with_its_sidecar(tmp_path):
    for suffix in (".csv", ".json"):
        shutil.copy(tcga.table_path("brca").with_suffix(suffix), tmp_path / f"brca{suffix}")
    res = runner.invoke(app, ["audit", "--table", str(tmp_path / "brca.csv")])
    assert res.exit_code == 0 and "PORPOISE" in res.output
    assert len(pd.read_csv(tmp_path / "brca.csv")) == 1022
