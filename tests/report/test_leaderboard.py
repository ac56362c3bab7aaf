"""Leaderboard tables rebuilt from a tiny hand-made run store, every cell checked against an independent
computation (scikit-survival, lifelines, scipy, statsmodels on the written predictions)."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from milbench import MilbenchError
from milbench.report import published as reference
from milbench.report.aggregate import FORMATS, build, fold_table, summary
from milbench.report.cells import fmt_num
from milbench.report.document import _main_block, cohort_title, document
from milbench.report.latex import to_latex
from milbench.report.markdown import render_markdown, to_markdown
from milbench.report.write import parse_formats, write
from milbench.survival.binning import fit_bins
from milbench.survival.metrics import cohort_times, fold_metrics
from tests.report.conftest import find_cell as _cell
from tests.runstore import CACHED, COHORTS, ORACLE, Spec, cohort_labels, write_run


def _c(pred):
    return concordance_index_censored(pred.event.astype(bool).to_numpy(), pred.time.to_numpy(float),
                                      pred.risk.to_numpy(float))[0]


def _per_fold(seeds, score=lambda wf: _c(wf.predictions)):
    """Fold -> mean over seeds of ``score`` of that fold's predictions."""
    values = {}
    for written in seeds:
        for wf in written:
            values.setdefault(wf.fold, []).append(score(wf))
    return {k: float(np.mean(v)) for k, v in sorted(values.items())}


def _md_rows(md, title_part):
    """Header and (group, first cell, other cells) of the first markdown table whose heading has ``title_part``."""
    text = next(b for b in md.split("### ") if title_part in b.splitlines()[0])
    lines = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    rows, group = [], ""
    for cells in lines[1:]:
        if cells[0].startswith("**"):  # a group heading row (row labels are never bold)
            group = cells[0].strip("*")
        else:
            rows.append((group, cells[0], cells[1:]))
    return lines[0], rows


def _md_table(md, title_part):
    """Header and {first cell: other cells} of the first markdown table whose heading has ``title_part``."""
    header, rows = _md_rows(md, title_part)
    return header, {label: cells for _, label, cells in rows}


DISPLAY = {"crossfusion": "CrossFusion", "amil": "AMIL", "transmil": "TransMIL", "crossfusion_single":
           "CrossFusion w/o F&C", "dsmil": "DSMIL"}


def test_every_cell_is_recomputed_from_predictions(store, board):
    _, written = store
    md = to_markdown(board)
    for (protocol, cohort, backbone, model, lr), seeds in written.items():
        values = list(_per_fold(seeds).values())
        cell = _cell(board, protocol, cohort, backbone, model, lr)
        assert cell["mean"] == pytest.approx(np.mean(values))
        assert cell["std"] == pytest.approx(np.std(values, ddof=1))
        assert (cell.folds, cell.seeds) == (len(values), len(seeds))
        header, rows = _md_table(md, f"protocol {protocol}, backbone {backbone}")
        assert cell.display == DISPLAY[model]
        shown = rows[_row_label(cell)][header.index(cohort_title(cohort)) - 1]
        plain = re.sub(r"\*\*|</?ins>", "", shown)
        assert plain.startswith(f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} ({len(values)}×{len(seeds)})")
    assert f"{CACHED}" not in md and f"{CACHED:.3f}" not in md  # cached record metrics are never shown
    header, rows = _md_table(md, "Pooled out-of-fold C-index (Harrell) — protocol fixed, backbone default")
    assert header[-1] == "Oracle C" and {cells[-1] for cells in rows.values()} == {f"{ORACLE:.3f}"}


def test_incomplete_cells_are_marked_and_never_bold(board):
    md = to_markdown(board)
    header, rows = _md_table(md, "protocol fixed, backbone default")
    for cohort in COHORTS:
        part = board.cells[(board.cells.protocol == "fixed") & (board.cells.backbone == "default")
                           & (board.cells.cohort == cohort)]
        assert set(part[~part.complete].model) == {"crossfusion_single", "dsmil"}  # a seed missing; 3 folds of 5
        col = header.index(cohort_title(cohort)) - 1
        for _, r in part.iterrows():
            text = rows[_row_label(r)][col]
            assert ("†" in text) == (not r.complete)
            assert text.startswith("**") == (r["mark"] == "best")
            assert text.startswith("<ins>") == (r["mark"] == "second")
            if not r.complete:
                assert r["mark"] is None and "≈" not in text


def _row_label(r):
    return f"{r.display} ({r.variant_label})" if r.variant_label else r.display


def test_groups_and_variants_are_rows(board):
    md = to_markdown(board)
    text = md.split("protocol fixed, backbone default")[1].split("###")[0]
    order = [text.index(s) for s in ("**Single-scale**", "AMIL (lr=0.001)", "AMIL (lr=0.01)", "TransMIL",
                                      "**Multi-scale**", "CrossFusion", "**Ablations**", "CrossFusion w/o F&C")]
    assert order == sorted(order)


def test_protocols_are_never_ranked_together(board):
    best_val = board.cells[board.cells.protocol == "best-val"]
    assert (best_val["rank"] == 1).all()  # alone in its own tables, though far better than every fixed run
    fixed = board.cells[board.cells.protocol == "fixed"]
    assert (fixed[fixed.complete & (fixed.backbone == "default")].groupby("cohort")["rank"].min() == 1).all()
    md = to_markdown(board)
    assert "## Protocol: best-val" in md and "## Protocol: fixed" in md
    header, rows = _md_table(md, "protocol fixed, backbone default")
    assert "AMIL" not in rows  # the best-val AMIL run has no row here


@pytest.fixture(scope="module")
def ipcw_folds(store):
    """The fold table with uno_c, ibs and td_auc recomputed (one pass over the store)."""
    return fold_table(store[0], metrics=("c_index", "uno_c", "ibs", "td_auc"))


def test_uno_c_uses_the_training_folds_labels(store, board, ipcw_folds):
    _, written = store
    folds = ipcw_folds.set_index(["variant", "seed", "fold"])
    for (protocol, cohort, backbone, model, lr), seeds in written.items():
        variant = _cell(board, protocol, cohort, backbone, model, lr).variant
        for written_run, seed in zip(seeds, sorted(ipcw_folds[ipcw_folds.variant == variant].seed.unique())):
            for wf in written_run:
                got = folds.loc[(variant, seed, wf.fold)]
                if model == "dsmil":  # 3 folds of 5 stored: the training patients cannot be rebuilt
                    assert np.isnan(got.uno_c) and got.train_labels == "unavailable"
                    continue
                p, tr = wf.predictions, wf.train
                expected = concordance_index_ipcw(Surv.from_arrays(tr.event.astype(bool), tr.time),
                                                  Surv.from_arrays(p.event.astype(bool), p.time), p.risk,
                                                  tau=tr.time.max(), tied_tol=1e-8)[0]
                assert got.uno_c == pytest.approx(expected)
                assert got.train_labels == ("record" if model == "transmil" else "other folds")
    cells = summary(ipcw_folds, "uno_c")
    dsmil = cells[cells.model == "dsmil"]
    assert (dsmil.folds == 0).all() and not dsmil.complete.any()


def test_missing_training_labels_are_a_note(tmp_path):
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0, folds=(0, 1)))
    board = build(tmp_path, metric="uno_c", n_boot=0)
    assert board.folds.uno_c.isna().all() and board.folds.c_index.notna().all()
    fold_notes = [n for n in board.notes if "training fold's labels" in n]
    assert len(fold_notes) == 2 and all("fold_" in n for n in fold_notes)
    assert any("no pooled uno_c" in n and "training folds' labels" in n for n in board.notes)
    assert np.isnan(board.pooled.pooled.iloc[0]) and "Note: " in to_markdown(board)


@pytest.mark.parametrize("metric", ["ibs", "td_auc"])
def test_ibs_and_td_auc_equal_fold_metrics_on_the_true_training_fold(store, board, ipcw_folds, metric):
    _, written = store
    seeds = written[("fixed", "tcga_blca", "default", "amil", 0.001)]
    variant = _cell(board, "fixed", "tcga_blca", "default", "amil", 0.001).variant
    labels = cohort_labels("tcga_blca")  # the whole cohort: its grid is fixed before any fold is scored
    grid, _ = cohort_times(labels.time, labels.event, [(labels.time[labels.fold == k], labels.time[labels.fold != k])
                                                        for k in range(5)])
    expected = []
    for wf in seeds[0] + seeds[1]:
        p, tr = wf.predictions, wf.train
        surv = p[[f"surv_{j}" for j in range(4)]].to_numpy()
        edges = fit_bins(tr.time.to_numpy(), tr.event.to_numpy())
        expected.append(fold_metrics(tr.time, tr.event, p.time, p.event, p.risk, surv, edges, times=grid)[metric])
    got = ipcw_folds[ipcw_folds.variant == variant].sort_values(["seed", "fold"])[metric].to_numpy()
    np.testing.assert_allclose(got, expected)


def test_lower_is_better_metric_ranks_the_smallest_first(ipcw_folds):
    cells = summary(ipcw_folds, "ibs")
    fam = cells[(cells.protocol == "fixed") & (cells.backbone == "default") & (cells.cohort == "tcga_blca")
                & cells.complete]
    assert fam.loc[fam["rank"] == 1, "mean"].iloc[0] == fam["mean"].min()
    assert fam.loc[fam["rank"] == 1, "mean"].iloc[0] != fam["mean"].max()
    assert "Integrated Brier score (lower is better)" in _main_block(cells, "fixed", "default", "ibs").title


def test_backbone_table_has_the_mean_over_cohorts(board):
    md = to_markdown(board)
    header, rows = _md_rows(md, "per backbone")
    assert header[-1] == "Mean"
    shown = {(group, label): cells for group, label, cells in rows}
    for backbone in ("default", "uni"):
        part = board.cells[(board.cells.model == "crossfusion") & (board.cells.backbone == backbone)
                           & (board.cells.protocol == "fixed")]
        mean = re.sub(r"\*\*|</?ins>", "", shown[("CrossFusion", backbone)][-1])
        assert mean == f"{part['mean'].mean():.3f}"
    assert {group for group, _ in shown} == {"CrossFusion"}  # the only model run on several backbones


def test_reported_block_is_labelled_with_the_papers_protocol(board):
    md = to_markdown(board)
    reported = md.split("## Reported (not recomputed)")[1]
    assert "`best-val`" in reported.split("###")[0]
    t1 = reference.load("table1")
    assert len(t1.frame) == 13 and t1.cohorts == ["BLCA", "BRCA", "COAD", "GBMLGG", "LUAD", "UCEC"]
    assert "Table 1" in t1.comment and "best validation-epoch" in t1.comment
    header, rows = _md_table(reported, "Reported: Table 1")
    assert rows["CrossFusion"][0] == "0.630 ± 0.027"  # no bold: nothing can test the paper's figures apart
    assert rows["CrossFusion w/o CP"][0] == "0.627 ± 0.014" and "<ins>" not in reported
    assert not re.search(r"\| \*\*[0-9]", reported)  # bold only on group headings
    assert reference.load("pvalues").frame.set_index("cohort").p_value["GBMLGG"] == pytest.approx(2.30e-39)
    assert reference.load("table2").frame.set_index("backbone").loc["uni2-h", "mean"] == pytest.approx(0.698)


def test_ours_beside_reported_when_cells_match(tmp_path):
    write_run(tmp_path, Spec("crossfusion", "tcga_blca", 1.0, backbone="resnet50", protocol="best-val"))
    board = build(tmp_path, n_boot=0)
    header, rows = _md_table(to_markdown(board), "Ours beside reported")
    assert rows["CrossFusion"][:3] == ["BLCA", "resnet50", "best-val"]
    assert rows["CrossFusion"][4] == "0.630 ± 0.027"
    assert float(rows["CrossFusion"][5]) == pytest.approx(board.cells["mean"].iloc[0] - 0.630, abs=6e-4)


def test_latex_breaks_tables_across_pages_and_escapes(board):
    tex = to_latex(board)
    assert r"$\pm$" in tex and "synthetic\\_coarse" in tex and r"_{3\times2}^{\dagger}$" in tex
    assert r"\begin{tabular}" not in tex and r"\begin{table}" not in tex
    blocks = [b for sec in document(board)[1] for b in sec.blocks if hasattr(b, "rows")]
    assert tex.count(r"\begin{longtable}") == tex.count(r"\end{longtable}") == len(blocks)
    # every longtable repeats its header on each page and says it continues
    assert tex.count(r"\endhead") == tex.count(r"\endfirsthead") == tex.count(r"\endlastfoot") == len(blocks)
    runs = tex[tex.index(r"\label{tab:runs}"):]
    assert runs.index(r"\endhead") < runs.index(r"\end{longtable}")
    assert runs[:runs.index(r"\end{longtable}")].count(r" \\") >= len(board.runs)
    assert r"\includegraphics[width=\linewidth]{cd-fixed-default.pdf}" in tex
    assert not re.search(r"[^\x00-\x7f]", tex)  # every symbol escaped to TeX
    if "best" in board.cells.mark.astype(str).to_list():
        assert r"\textbf{" in tex


def test_no_negative_zero_anywhere(board, tmp_path):
    assert (fmt_num(-0.0004), fmt_num(-0.0004, signed=True), fmt_num(0.0004, signed=True)) == ("0.000",) * 3
    assert (fmt_num(-0.0006), fmt_num(0.0006, signed=True), fmt_num(np.nan), fmt_num(-1e-9, 2)) == (
        "-0.001", "+0.001", "–", "0.00")
    for path in write(board, tmp_path, ["md", "tex", "html"]):
        if path.suffix in (".md", ".tex", ".html"):
            assert not re.search(r"-0\.0+(?![0-9])", path.read_text()), path


def test_write_all_formats(board, tmp_path):
    paths = write(board, tmp_path, FORMATS)
    names = {p.name for p in paths}
    assert {"leaderboard.md", "leaderboard.tex", "leaderboard.html", "leaderboard.csv", "folds.csv", "pooled.csv",
            "comparisons.csv", "pairs.csv", "ranks.csv", "runs.csv", "reported_table1.csv", "cd-fixed-default.png",
            "cd-fixed-default.pdf"} <= names
    assert (tmp_path / "cd-fixed-default.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "cd-fixed-default.pdf").read_bytes().startswith(b"%PDF")
    folds = pd.read_csv(tmp_path / "folds.csv")
    assert len(folds) == len(board.folds) and CACHED not in folds.c_index.to_numpy()


def test_bad_metric_and_format_are_clear_errors(store):
    with pytest.raises(MilbenchError, match="unknown metric 'brier'"):
        build(store[0], metric="brier")
    with pytest.raises(MilbenchError, match="--format takes"):
        parse_formats("md,pdf")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "milbench.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_writes_the_asked_formats(store, tmp_path):
    res = _cli("leaderboard", "--runs-dir", store[0], "--out", tmp_path / "lb", "--format", "md,csv",
               "--metric", "uno_c", "--bootstrap", "50", "--paired-bootstrap", "200", "--baseline", "amil",
               "--pooled", "cross-fold", "--test", "ttest", "--adjust", "cohort", "--posthoc", "wilcoxon-holm")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "lb").iterdir())
    assert [n for n in names if n.endswith(".csv")] and "leaderboard.md" in names and "paper.md" not in names
    assert len([n for n in names if n.endswith(".csv")]) == 10
    cd = [n for n in names if n.startswith("cd-")]
    assert sorted(n.rsplit(".", 1)[1] for n in cd) == ["pdf", "png"]  # the critical-difference diagram
    km = [n for n in names if n.startswith("km_crossfusion_")]  # CrossFusion's Kaplan-Meier plots (the paper comparison)
    assert km and {n.rsplit(".", 1)[1] for n in km} == {"pdf", "png"}
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "C-index (Uno, IPCW)" in md and "across folds (labelled option)" in md
    assert "reference AMIL (lr=0.001) (--baseline)" in md and "within each cohort and backbone" in md
    assert "Sig. (*) from the corrected resampled t-test" in md and "Wilcoxon signed-rank" in md
    res = _cli("leaderboard", "--runs-dir", store[0], "--out", tmp_path / "bad", "--baseline", "nosuchmodel")
    assert res.returncode == 2 and "--baseline nosuchmodel: no such model" in res.stderr
    res = _cli("leaderboard", "--reported-only", "--out", tmp_path / "rep", "--format", "md,html")
    assert res.returncode == 0, res.stderr
    assert "Reported (not recomputed)" in (tmp_path / "rep" / "reported.md").read_text()
    assert (tmp_path / "rep" / "reported.html").is_file()


def test_cost_block_has_the_oracle_gap_time_and_memory(board):
    md = render_markdown(*document(board))
    header, rows = _md_rows(md, "Gap to the oracle, training time and peak memory — protocol fixed, backbone default")
    assert header == ["Model", "C-index (Harrell)", "Oracle C", "Gap", "Train s per fold", "s per epoch",
                      "Peak memory GiB", "Device"]
    amil = next(cells for group, label, cells in rows if label == "AMIL (lr=0.001)" and group == "synthetic_coarse")
    cell = _cell(board, "fixed", "synthetic_coarse", "default", "amil", 0.001)
    assert amil[1] == f"{ORACLE:.3f}" and amil[2] == f"{ORACLE - cell['mean']:.3f}"
    assert amil[3:] == ["30.0", "3.00", "5.00", "x86_64"]  # folds 0-4: 10..50 s, 1..5 s/epoch, max 5 GiB
    dsmil = next(cells for group, label, cells in rows if label == "DSMIL" and group == "synthetic_coarse")
    assert dsmil[3] == "20.0"  # its three folds only


def test_a_run_without_survival_curves_still_gets_uno_c_and_td_auc(tmp_path):
    """A Cox head stores a risk and no surv_* columns: Uno's C and td-AUC are recomputed, IBS is NaN with a note."""
    runs = tmp_path / "runs"
    write_run(runs, Spec("amil", "synthetic_coarse", 1.0, train_labels_in_record=True))
    for path in runs.rglob("predictions.csv"):
        pred = pd.read_csv(path)
        pred.drop(columns=[c for c in pred if c.startswith("surv_")]).to_csv(path, index=False)
    for metric in ("uno_c", "td_auc"):
        board = build(runs, metric=metric, n_boot=0)
        assert board.folds[metric].notna().all() and board.folds[metric].between(0, 1).all()
    board = build(runs, metric="ibs", n_boot=0)
    assert board.folds["ibs"].isna().all() and any("ibs is NaN" in n for n in board.notes)
