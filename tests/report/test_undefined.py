"""Undefined is NaN with a reason (issue 16): NaN risks never stop a leaderboard and are left out with a note."""

from __future__ import annotations

import numpy as np

from milbench.report.aggregate import build
from milbench.runs.store import iter_folds
from milbench.survival.metrics import fold_metrics, logrank_p
from tests.runstore import Spec, write_run


def test_nan_risks_are_left_out_with_a_note_and_the_board_builds(tmp_path):
    write_run(tmp_path, Spec("amil", "tcga_blca", 1.0))
    write_run(tmp_path, Spec("transmil", "tcga_blca", 0.5))
    stored = next(f for f in iter_folds(tmp_path) if f.record["model"] == "amil" and f.record["fold"] == 2)
    pred = stored.predictions
    pred.loc[[0, 3], "risk"] = np.nan
    pred.to_csv(stored.path / "predictions.csv", index=False)
    board = build(tmp_path, n_boot=20)
    note = [n for n in board.notes if "NaN or infinite risk" in n]
    assert len(note) == 1 and "2 of" in note[0] and str(stored.path) in note[0]
    amil = board.folds[(board.folds.model == "amil") & (board.folds.fold == 2)]
    assert np.isfinite(amil.c_index).all()  # scored on the other patients
    assert np.isfinite(board.cells.loc[board.cells.model == "amil", "mean"]).all()


def test_one_risk_group_is_nan_never_p_1():
    time, event = np.array([5.0, 3.0, 9.0, 1.0]), np.array([1, 0, 1, 1])
    assert np.isnan(logrank_p(time, event, np.array([1.0, 2.0, 3.0, 4.0]), cutoff=10.0))
    assert np.isfinite(logrank_p(time, event, np.array([1.0, 2.0, 3.0, 4.0]), cutoff=2.5))  # two groups: a p


def test_metrics_that_cannot_be_computed_say_why():
    reasons: dict[str, str] = {}
    train_t, train_e = np.array([2.0, 4.0, 6.0, 8.0, 10.0]), np.array([1, 1, 0, 1, 1])
    t, e = np.array([3.0, 3.0, 3.0]), np.array([1, 1, 1])  # all times tied: no comparable pair
    edges = np.array([0.0, 4.0, 8.0, 1e9])
    surv = np.tile([0.9, 0.6, 0.3], (3, 1))
    out = fold_metrics(train_t, train_e, t, e, np.array([0.1, 0.2, 0.3]), surv, edges, reasons=reasons)
    assert np.isnan(out["c_index"]) and reasons["c_index"]
    assert set(reasons) == {k for k, v in out.items() if not np.isfinite(v)}
    assert all(isinstance(r, str) and r for r in reasons.values())
