"""TCGA benchmark files: the paper's two shipped files load, and a bad TCGA file fails in one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from milbench import MilbenchError
from milbench.config.benchmark import check_template, fill_template, load_spec
from milbench.report import published

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"

TINY = """
[benchmark]
name = "tiny_tcga"
runs_dir = "runs"
paper = "table1"

[cohorts]
tcga = ["blca", "tcga_ucec"]
backbones = ["resnet50"]
features = "/data/{short}/{backbone}"

[training]
recipe = "paper"
epochs = 3
seeds = [7]
protocols = ["best-val", "inner-val"]

[protocols.best-val]
label = "the paper's"
bins_on = "cohort"

[models]
names = ["amil"]

[unstated]
seed = "seed 7"
"""


def write(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tcga.toml"
    path.write_text(text)
    return path


def test_table1_file_is_the_papers_table():
    spec = load_spec(BENCHMARKS / "crossfusion_midl2026.toml")
    assert spec.kind == "tcga" and spec.paper == "table1"
    assert spec.tcga == tuple(f"tcga_{c}" for c in ("blca", "brca", "coad", "gbmlgg", "luad", "ucec"))
    assert spec.backbones == ("resnet50",) and spec.recipe == "paper" and spec.epochs == 100
    assert [p.name for p in spec.protocols] == ["best-val", "inner-val"]
    assert "optimistic" in spec.protocols[0].label and spec.protocols[0].overrides == {"bins_on": "cohort"}
    assert set(spec.models) == set(published.PAPER_ROWS)  # the thirteen rows of Table 1
    assert len(spec.unstated) >= 8 and all("\n" not in v for v in spec.unstated.values())


def test_table2_file_is_crossfusion_on_the_five_backbones():
    spec = load_spec(BENCHMARKS / "crossfusion_midl2026_table2.toml")
    assert spec.models == ("crossfusion",) and spec.paper == "table2"
    assert list(spec.backbones) == list(published.load("table2").frame.backbone)
    assert spec.runs_dir == load_spec(BENCHMARKS / "crossfusion_midl2026.toml").runs_dir  # shares resnet50 folds


def test_the_synthetic_file_still_loads_unchanged():
    spec = load_spec(BENCHMARKS / "synthetic.toml")
    assert spec.kind == "synthetic" and spec.protocol == "fixed" and spec.cohort.patients == 300
    assert spec.cohorts == ("bench_coarse", "bench_fine", "bench_cross-scale", "bench_mixed")


def test_a_tiny_tcga_file_loads(tmp_path):
    spec = load_spec(write(tmp_path))
    assert spec.tcga == ("tcga_blca", "tcga_ucec") and spec.runs_dir == tmp_path / "runs"
    assert spec.protocols[1].overrides == {} and spec.unstated == {"seed": "seed 7"}
    assert fill_template(spec.features, "tcga_blca", "conch") == "/data/blca/conch"
    assert fill_template("/x/{COHORT}/{cohort}", "tcga_luad", "r") == "/x/LUAD/tcga_luad"


@pytest.mark.parametrize("edit, message", [
    (('tcga = ["blca", "tcga_ucec"]', 'tcga = ["blca", "lung"]'), "unknown TCGA cohort 'lung'"),
    (('tcga = ["blca", "tcga_ucec"]', 'tcga = ["blca", "blca"]'), "names 'blca' twice"),
    (('backbones = ["resnet50"]', 'backbones = ["../x"]'), "not a folder name"),
    (('{short}', '{site}'), "holds {site}"),
    (("protocols = [\"best-val\", \"inner-val\"]", "protocols = [\"best-val\", \"nested\"]"), "unknown protocol"),
    (("protocols = [\"best-val\", \"inner-val\"]", "protocol = \"fixed\"\nprotocols = [\"fixed\"]"), "not both"),
    (("[protocols.best-val]", "[protocols.fixed]"), "[protocols.fixed] is not a protocol"),
    (('bins_on = "cohort"', 'bins_on = "slides"'), "use train or cohort"),
    (('bins_on = "cohort"', 'lr = 0.1'), "unknown key 'lr' in [protocols.best-val]"),
    (('bins_on = "cohort"', 'epochs = 0'), "epochs must be at least 1"),
    (('paper = "table1"', 'paper = "table3"'), "use one of table1, table2"),
    (('[cohorts]', '[cohorts]\nscenarios = ["coarse"]'), "(a key of TCGA files)"),
    (('backbones = ["resnet50"]', 'backbones = ["resnet50"]\npatients = 3'), "(a key of synthetic files)"),
    (('seed = "seed 7"', 'seed = 7'), "[unstated] maps a name to one line"),
    (('[models]', '[model]'), "unknown section [model]"),
    (('tcga = ["blca", "tcga_ucec"]', 'sites = ["blca"]'), "[cohorts] needs 'scenarios'"),
])
def test_bad_tcga_files_fail_in_one_line_naming_the_file(tmp_path, edit, message):
    path = write(tmp_path, TINY.replace(*edit))
    with pytest.raises(MilbenchError) as err:
        load_spec(path)
    assert message in str(err.value), str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_templates_name_only_known_fields():
    assert check_template("/d/{cohort}/{backbone}", "x") == "/d/{cohort}/{backbone}"
    with pytest.raises(MilbenchError, match="malformed"):
        check_template("/d/{cohort", "--features")
