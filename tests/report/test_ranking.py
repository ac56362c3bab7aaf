"""Ranks across cohorts in the leaderboard: average ranks of the complete rows, the Friedman test (scipy), Nemenyi's
critical difference, the Wilcoxon-Holm option, and the critical-difference diagram beside the tables and in the HTML."""

import base64

import numpy as np
import pytest
from scipy import stats as sps

from milbench.report.aggregate import Options, build
from milbench.report.markdown import to_markdown
from milbench.report.write import write
from milbench.survival.ranks import nemenyi_cd
from tests.runstore import COHORTS, Spec, write_run


def test_friedman_and_nemenyi_on_the_complete_rows(board):
    (r,) = [r for r in board.ranks if (r.protocol, r.backbone) == ("fixed", "default")]
    assert sorted(r.excluded) == ["CrossFusion w/o F&C", "DSMIL"]  # incomplete somewhere: not ranked
    cells = board.cells[(board.cells.protocol == "fixed") & (board.cells.backbone == "default") & board.cells.complete]
    label = cells.display + cells.variant_label.map(lambda v: f" ({v})" if v else "")
    table = cells.assign(label=label).pivot(index="label", columns="cohort", values="mean")
    assert sorted(r.labels) == sorted(table.index)
    ranks = table.rank(axis=0, ascending=False)
    for m in r.labels:
        assert r.analysis.avg_ranks[m] == pytest.approx(ranks.loc[m].mean())
    chi2 = sps.friedmanchisquare(*[table.loc[m].to_numpy() for m in r.labels]).statistic
    f = r.analysis.friedman
    assert f.statistic == pytest.approx(chi2) and f.df == len(r.labels) - 1 and f.n_cohorts == len(COHORTS)
    assert r.analysis.posthoc.cd == pytest.approx(nemenyi_cd(len(r.labels), len(COHORTS)))
    md = to_markdown(board)
    assert "Average rank over cohorts (1 = best) — protocol fixed, backbone default" in md
    assert f"Friedman chi-square = {f.statistic:.2f} on {f.df} df" in md and "![Critical-difference" in md


def test_cd_diagram_is_written_beside_the_tables_and_embedded_in_the_page(board, tmp_path):
    paths = {p.name: p for p in write(board, tmp_path, ["html", "md"])}
    png = paths["cd-fixed-default.png"].read_bytes()
    assert png.startswith(b"\x89PNG") and paths["cd-fixed-default.pdf"].read_bytes().startswith(b"%PDF")
    html = paths["leaderboard.html"].read_text()
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert "(cd-fixed-default.png)" in paths["leaderboard.md"].read_text()
    # only protocols and backbones with two cohorts and two complete rows are ranked (uni and best-val have one row)
    assert [(r.protocol, r.backbone) for r in board.ranks] == [("fixed", "default")]


def test_wilcoxon_holm_option_and_a_single_cohort(tmp_path):
    for cohort in COHORTS:
        for model, quality in (("crossfusion", 1.5), ("amil", 1.0), ("transmil", -1.0)):
            write_run(tmp_path / "two", Spec(model, cohort, quality))
    board = build(tmp_path / "two", options=Options(posthoc="wilcoxon-holm", n_boot=0, paired_boot=0))
    (r,) = board.ranks
    assert r.analysis.posthoc.method == "wilcoxon-holm" and np.isnan(r.analysis.posthoc.cd)
    assert "Wilcoxon signed-rank tests over cohorts, Holm-adjusted" in to_markdown(board)
    assert any("no pair can be told apart" in n for n in r.analysis.posthoc.notes)  # 2 cohorts: p >= 0.5
    write_run(tmp_path / "one", Spec("amil", "tcga_blca", 1.0))
    write_run(tmp_path / "one", Spec("transmil", "tcga_blca", 0.5))
    assert build(tmp_path / "one", options=Options(n_boot=0, paired_boot=0)).ranks == []
