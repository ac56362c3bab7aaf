"""Shared leaderboard fixtures: the hand-made run store of ``tests.runstore`` and its leaderboard, built once."""

import numpy as np
import pandas as pd
import pytest

from milbench.report.aggregate import Options, build
from tests.runstore import standard_store

BOARD_OPTIONS = Options(n_boot=200, paired_boot=2000, seed=0)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    runs = tmp_path_factory.mktemp("leaderboard") / "runs"
    return runs, standard_store(runs)


@pytest.fixture(scope="session")
def board(store):
    return build(store[0], options=BOARD_OPTIONS)


def cell_arrays(seeds):
    """A cell's written folds (one list per seed) as (case_id, time, event, fold, risks [S, n], cutoffs [S, n]),
    patients in case-id order: assembled straight from what the store was written with."""
    frames = [pd.concat([wf.predictions for wf in written]).sort_values("case_id") for written in seeds]
    base = frames[0]
    return (base.case_id.to_numpy(), base.time.to_numpy(float), base.event.to_numpy(int), base.fold.to_numpy(),
            np.stack([f.risk.to_numpy(float) for f in frames]), np.stack([f.train_median_risk.to_numpy(float)
                                                                         for f in frames]))


def find_cell(board, protocol, cohort, backbone, model, lr):
    cells = board.cells
    rows = cells[(cells.protocol == protocol) & (cells.cohort == cohort) & (cells.backbone == backbone)
                 & (cells.model == model)]
    if len(rows) > 1:
        rows = rows[rows.variant_label == f"lr={lr:g}"]
    assert len(rows) == 1
    return rows.iloc[0]
