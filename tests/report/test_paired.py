"""Paired comparisons in the leaderboard: the declared reference or --baseline, the paired bootstrap on the same
patients (against ``comparisons.paired_bootstrap_c`` on the written predictions), the corrected t-test over seeds
(scipy), Holm across the table or per cohort (statsmodels), and marks only where the paired test separates cells."""

import re
from itertools import combinations

import numpy as np
import pytest
from scipy import stats as sps
from sksurv.metrics import concordance_index_censored
from statsmodels.stats.multitest import multipletests

from milbench import MilbenchError
from milbench.report.aggregate import Options, build
from milbench.report.markdown import to_markdown
from milbench.survival.comparisons import paired_bootstrap_c, rank_marks
from tests.report.conftest import BOARD_OPTIONS, cell_arrays
from tests.runstore import COHORTS, Spec, write_run


def _lr(cell):
    return 0.01 if cell.variant_label == "lr=0.01" else 0.001


def _written(written, cell):
    return written[(cell.protocol, cell.cohort, cell.backbone, cell.model, _lr(cell))]


def _boot(written, a, b, n_boot):
    """comparisons.paired_bootstrap_c of cell a against cell b on the patients both held out."""
    ida, ta, ea, fa, ra, _ = cell_arrays(_written(written, a))
    idb, _, _, _, rb, _ = cell_arrays(_written(written, b))
    common = np.intersect1d(ida, idb)
    pa, pb = np.searchsorted(ida, common), np.searchsorted(idb, common)
    return paired_bootstrap_c(ta[pa], ea[pa], ra[:, pa], rb[:, pb], fa[pa], n_boot=n_boot, seed=0)


def _fold_means(seeds):
    values = {}
    for written in seeds:
        for wf in written:
            p = wf.predictions
            values.setdefault(wf.fold, []).append(concordance_index_censored(p.event.astype(bool), p.time, p.risk)[0])
    return {k: float(np.mean(v)) for k, v in values.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two cohorts, one seed: CrossFusion (default and uni backbones), two AMIL variants, TransMIL."""
    runs = tmp_path_factory.mktemp("paired") / "runs"
    for cohort in COHORTS:
        for model, quality, extra in (("crossfusion", 1.6, {}), ("amil", 1.0, {}), ("amil", 0.9, {"lr": 0.01}),
                                      ("transmil", -1.0, {})):
            write_run(runs, Spec(model, cohort, quality, overrides=extra))
        write_run(runs, Spec("crossfusion", cohort, 1.2, backbone="uni"))
    return runs


def test_reference_is_the_declared_default_or_the_baseline(small, board):
    comp = board.comparisons
    fixed = comp[comp.protocol == "fixed"]
    assert set(fixed.reference_model) == {"crossfusion"} and set(fixed.reference_rule) == {"the declared default"}
    assert not (fixed.model == "crossfusion").any()  # the reference is not compared with itself
    # a family without CrossFusion falls back to registry order, and says so; never to the best-scoring cell
    assert board.cells[board.cells.protocol == "best-val"].is_reference.all()
    for name in ("amil", "AMIL"):
        other = build(small, options=Options(baseline=name, n_boot=0, paired_boot=0))
        fixed = other.comparisons[(other.comparisons.protocol == "fixed") & (other.comparisons.backbone == "default")]
        assert set(fixed.reference_model) == {"amil"} and set(fixed.reference_label) == {"lr=0.001"}
        assert set(fixed.reference_rule) == {"--baseline"}
        uni = other.cells[(other.cells.backbone == "uni")]
        assert uni.is_reference.all()  # AMIL was not run on uni: its one cell is its own reference
    with pytest.raises(MilbenchError, match="--baseline nosuch: no such model"):
        build(small, options=Options(baseline="nosuch", n_boot=0, paired_boot=0))


def test_paired_bootstrap_and_ttest_against_comparisons_scipy_and_statsmodels(store, board):
    _, written = store
    comp = board.comparisons[board.comparisons.protocol == "fixed"]
    assert len(comp) == 2 * 5  # per cohort: five cells against CrossFusion; CrossFusion on uni is alone
    for _, row in comp.iterrows():
        cell = board.cells[board.cells.variant == row.variant].iloc[0]
        ref = board.cells[board.cells.variant == row.reference_variant].iloc[0]
        boot = _boot(written, cell, ref, BOARD_OPTIONS.paired_boot)
        assert (row["diff"], row.ci_low, row.ci_high, row.p_boot) == pytest.approx(
            (boot.diff, boot.low, boot.high, boot.p), abs=1e-12)
        mine, theirs = _fold_means(_written(written, cell)), _fold_means(_written(written, ref))
        common = sorted(set(mine) & set(theirs))
        a, b = np.array([mine[k] for k in common]), np.array([theirs[k] for k in common])
        j = len(common)
        t = sps.ttest_rel(a, b).statistic * np.sqrt((1 / j) / (1 / j + 12 / 48))  # n_test / n_train = 12 / 48
        assert (row.t, row.p_t, row.folds) == pytest.approx((t, 2 * sps.t.sf(abs(t), j - 1), j))
    # Holm across every comparison of the table, both tests
    np.testing.assert_allclose(comp.p_boot_adj, multipletests(comp.p_boot, method="holm")[1])
    np.testing.assert_allclose(comp.p_t_adj, multipletests(comp.p_t, method="holm")[1])
    assert (comp.significant == (comp.p_boot_adj < 0.05)).all()
    assert comp.significant.any() and not comp.significant.all()
    transmil = comp[comp.model == "transmil"]  # worse than chance: separated from CrossFusion in both cohorts
    assert transmil.significant.all() and (transmil["diff"] < 0).all()
    for _, row in comp.iterrows():
        assert board.cells.set_index("variant").significant[row.variant] == row.significant
    md = to_markdown(board)
    assert "paired bootstrap of the difference in pooled C on the same patients beside the corrected resampled " \
           "t-test" in md and "Holm-adjusted across all 10 comparisons of this table" in md


def test_per_cohort_adjustment_and_the_ttest_option(small):
    board = build(small, options=Options(adjust_by="cohort", test="ttest", n_boot=0, paired_boot=500))
    comp = board.comparisons[board.comparisons.protocol == "fixed"]
    for _, part in comp.groupby(["cohort", "backbone"]):
        np.testing.assert_allclose(part.p_t_adj, multipletests(part.p_t, method="holm")[1])
        np.testing.assert_allclose(part.p_boot_adj, multipletests(part.p_boot, method="holm")[1])
    assert (comp.significant == (comp.p_t_adj < 0.05)).all() and set(comp.test) == {"corrected resampled t-test"}
    assert "Sig. (*) from the corrected resampled t-test" in to_markdown(board)


def test_marks_only_where_the_paired_test_separates_cells(store, board):
    _, written = store
    md = to_markdown(board)
    text = md.split("### C-index (Harrell) (higher is better), mean ± fold sd — protocol fixed, backbone "
                    "default")[1].split("###")[0]
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| **")}
    for col, cohort in enumerate(COHORTS[::-1] if text.index("BLCA") < text.index("synthetic") else COHORTS):
        fam = board.cells[(board.cells.protocol == "fixed") & (board.cells.backbone == "default")
                          & (board.cells.cohort == cohort) & board.cells.complete]
        p = {}
        for (_, a), (_, b) in combinations(fam.iterrows(), 2):
            p[(a.variant, b.variant)] = _boot(written, a, b, BOARD_OPTIONS.paired_boot).p
        expected = rank_marks(dict(zip(fam.variant, fam["mean"])), p)
        for _, r in fam.iterrows():
            assert r["mark"] == expected[r.variant]
            label = f"{r.display} ({r.variant_label})" if r.variant_label else r.display
            shown = lines[label][col]
            assert shown.startswith("**") == (r["mark"] == "best")
            assert shown.startswith("<ins>") == (r["mark"] == "second")
            assert ("≈" in shown) == (r["mark"] in ("tied-best", "tied-second"))
    assert "tied-best" in set(board.cells["mark"])  # on 60 patients, CrossFusion and AMIL are not told apart


def test_close_models_are_tied_and_a_clear_leader_is_bold(tmp_path):
    for model, quality in (("crossfusion", 8.0), ("amil", 0.6), ("transmil", 0.5), ("dsmil", -1.0)):
        write_run(tmp_path, Spec(model, "tcga_blca", quality))
    board = build(tmp_path, options=Options(n_boot=0, paired_boot=2000))
    marks = board.cells.set_index("model")["mark"].to_dict()
    assert marks["crossfusion"] == "best" and marks["dsmil"] is None
    assert marks["amil"] == marks["transmil"] == "tied-second"
    md = to_markdown(board)
    assert re.search(r"\*\*0\.\d{3} ± 0\.\d{3}\*\* \(5×1\)°", md)  # bold, and the reference
    assert md.count("≈") >= 2 and "<ins>" not in md.split("## Reported")[0]
