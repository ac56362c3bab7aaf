"""The pooled table: the metric pooled within folds (pairs of patients held out in the same fold) with an interval
about the same statistic, the cross-fold option, one log-rank test over seeds and D-calibration, each checked against
scikit-survival, lifelines and scipy on the written predictions; and the committed synthetic leaderboard's pooled
figures inside their own intervals."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from scipy import stats as sps
from sksurv.metrics import concordance_index_censored

from milbench.report.aggregate import Options, build
from milbench.report.markdown import to_markdown
from milbench.survival.binning import fit_bins
from milbench.survival.calibration import d_calibration_counts, head_curve, survival_at_own_time
from tests.report.conftest import cell_arrays, find_cell
from tests.runstore import Spec, write_run

SYNTHETIC = Path(__file__).resolve().parents[2] / "leaderboards" / "synthetic"


def _within_fold_c(time, event, fold, risk):
    """Harrell's C over the pairs inside each fold, from scikit-survival's pair counts per fold."""
    num = den = 0.0
    for k in np.unique(fold):
        mine = fold == k
        _, conc, disc, tied, _ = concordance_index_censored(event[mine].astype(bool), time[mine], risk[mine])
        num, den = num + conc + 0.5 * tied, den + conc + disc + tied
    return num / den


def test_pooled_c_counts_pairs_within_folds_and_lies_in_its_interval(store, board):
    _, written = store
    for (protocol, cohort, backbone, model, lr), seeds in written.items():
        cell = find_cell(board, protocol, cohort, backbone, model, lr)
        row = board.pooled[board.pooled.variant == cell.variant].iloc[0]
        _, time, event, fold, risks, cutoffs = cell_arrays(seeds)
        expected = np.mean([_within_fold_c(time, event, fold, r) for r in risks])
        assert row.pooled == pytest.approx(expected, abs=1e-12)
        assert row.pairs == "within-fold" and row.patients == len(time) and row.seeds == len(seeds)
        assert row.ci_low <= row.pooled <= row.ci_high and row.ci_low < row.ci_high
        high = (risks - cutoffs).mean(axis=0) > 0  # one log-rank test over all seeds
        p = logrank_test(time[high], time[~high], event[high], event[~high]).p_value
        assert row.logrank_p == pytest.approx(p)
    md = to_markdown(board)
    assert "pooled within folds: only pairs of patients held out in the same fold" in md


def test_cross_fold_pool_is_a_labelled_option(store):
    _, written = store
    board = build(store[0], options=Options(pooled="cross-fold", n_boot=100, paired_boot=0))
    for (protocol, cohort, backbone, model, lr), seeds in written.items():
        cell = find_cell(board, protocol, cohort, backbone, model, lr)
        row = board.pooled[board.pooled.variant == cell.variant].iloc[0]
        _, time, event, _, risks, _ = cell_arrays(seeds)
        expected = np.mean([concordance_index_censored(event.astype(bool), time, r)[0] for r in risks])
        assert row.pooled == pytest.approx(expected, abs=1e-12) and row.pairs == "cross-fold"
        assert row.ci_low <= row.pooled <= row.ci_high
    assert "pooled across folds (labelled option)" in to_markdown(board)


def test_pooled_bootstrap_is_seeded(tmp_path):
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0))
    first = build(tmp_path, options=Options(n_boot=100, seed=1, paired_boot=0)).pooled
    pd.testing.assert_frame_equal(first, build(tmp_path, options=Options(n_boot=100, seed=1, paired_boot=0)).pooled)
    other = build(tmp_path, options=Options(n_boot=100, seed=2, paired_boot=0)).pooled
    assert first.ci_low.iloc[0] != other.ci_low.iloc[0] and first.pooled.iloc[0] == other.pooled.iloc[0]


@pytest.fixture(scope="module")
def ibs_board(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ibs") / "runs"
    for model, quality in (("crossfusion", 1.5), ("amil", 0.5)):
        for seed in (7, 8):
            write_run(runs, Spec(model, "tcga_blca", quality, seed=seed))
    write_run(runs, Spec("amil", "synthetic_coarse", 1.0))
    return build(runs, options=Options(metric="ibs", n_boot=100, paired_boot=200))


def test_pooled_table_follows_the_metric(ibs_board):
    """The pooled IBS is the patient-weighted mean of the fold IBSs (scikit-survival's, in the fold table, on the
    cohort's fixed grid), averaged over seeds; its interval holds it."""
    board = ibs_board
    folds = board.folds[np.isfinite(board.folds.ibs)]
    assert len(folds) == len(board.folds) == 25
    for _, row in board.pooled.iterrows():
        mine = folds[folds.variant == row.variant]
        per_seed = mine.groupby("seed").apply(lambda p: np.average(p.ibs, weights=p.n_test), include_groups=False)
        assert row.pooled == pytest.approx(per_seed.mean(), abs=1e-12) and row.metric == "ibs"
        assert row.ci_low <= row.pooled <= row.ci_high
    md = to_markdown(board)
    assert "Pooled IBS" in md and "the Brier score has no pairs" in md and "Integrated Brier score" in md
    assert set(board.grids) == {"tcga_blca", "synthetic_coarse"} and all(len(g) >= 2 for g in board.grids.values())


def test_d_calibration_of_a_one_seed_cell(store, board):
    """D-calibration: each fold's head curve read at the patient's own time, bin masses summed over folds, Pearson's
    chi-square on 9 df (scipy)."""
    _, written = store
    (seed_folds,) = written[("best-val", "tcga_blca", "default", "amil", 0.001)]
    counts = np.zeros(10)
    for wf in seed_folds:
        p = wf.predictions
        edges = fit_bins(wf.train.time.to_numpy(), wf.train.event.to_numpy())
        s = survival_at_own_time(*head_curve(p[[f"surv_{j}" for j in range(4)]].to_numpy(), edges), p.time)
        counts += d_calibration_counts(s, p.event.to_numpy(bool))
    stat, p = sps.chisquare(counts)
    cell = find_cell(board, "best-val", "tcga_blca", "default", "amil", 0.001)
    row = board.pooled[board.pooled.variant == cell.variant].iloc[0]
    assert (row.dcal_chi2, row.dcal_p) == pytest.approx((stat, p))


def test_committed_synthetic_pooled_figures_lie_inside_their_intervals():
    pooled = pd.read_csv(SYNTHETIC / "pooled.csv")
    assert len(pooled) == 52 and (pooled.pairs == "within-fold").all() and (pooled.metric == "c_index").all()
    inside = (pooled.ci_low <= pooled.pooled) & (pooled.pooled <= pooled.ci_high)
    assert inside.all(), pooled.loc[~inside, ["cohort", "model", "pooled", "ci_low", "ci_high"]]
    cells = pd.read_csv(SYNTHETIC / "leaderboard.csv").set_index("variant")
    # within folds the pooled C is the pair-weighted mean of the fold Cs: close to the fold mean (equal-size folds)
    assert (pooled.set_index("variant").pooled - cells["mean"]).abs().max() < 0.02
    for name in ("cd-fixed-default.png", "cd-fixed-default.pdf"):
        assert (SYNTHETIC / name).stat().st_size > 1000


@pytest.mark.slow
def test_committed_synthetic_leaderboard_rebuilds_from_its_store(tmp_path, monkeypatch):
    """`make leaderboards` reproduces the committed tables and diagrams byte for byte."""
    from milbench.report.write import write

    monkeypatch.chdir(SYNTHETIC.parents[1])
    board = build(Path("leaderboards/synthetic/runs"), options=Options())
    for path in write(board, tmp_path):
        committed = SYNTHETIC / path.name
        assert committed.read_bytes() == path.read_bytes(), path.name


def test_synthetic_readme_quotes_only_cells_of_the_tables():
    """Every figure of the README's reading (two or more decimals, or a p in e-notation) is a cell of the rendered
    tables (signs and the '-' of a range aside)."""
    readme = (SYNTHETIC / "README.md").read_text()
    reading = readme[readme.index("## What the numbers say"):readme.index("## Timings")]
    tables = (SYNTHETIC / "leaderboard.md").read_text()
    cells = set(re.findall(r"[0-9]+\.[0-9]+(?:e[-+][0-9]+)?", tables))
    quoted = re.findall(r"(?<![0-9.])[0-9]+\.[0-9]{2,}(?:e[-+][0-9]+)?", reading)
    assert len(quoted) > 80
    missing = sorted(set(quoted) - cells)
    assert not missing, missing
