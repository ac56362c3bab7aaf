"""Time bins: the MCAT / Patch-GCN recipe (qcut on uncensored times, widened outer edges, pd.cut labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench import MilbenchError
from milbench.survival.binning import assign_bins, fit_bins

SHARED = Path(__file__).resolve().parents[3] / "shared"
BLCA_TABLE = SHARED / "tcga" / "mcat" / "datasets_csv" / "tcga_blca_all_clean.csv"
BLCA_SPLIT = SHARED / "tcga" / "mcat" / "splits" / "5foldcv" / "tcga_blca" / "splits_0.csv"


def test_known_case_by_hand():
    # Uncensored 1..5: quartiles 1, 2, 3, 4, 5; the outer edges come from all patients (0.5 and 10, censored).
    time = np.array([0.5, 1, 2, 3, 4, 5, 10])
    event = np.array([0, 1, 1, 1, 1, 1, 0])
    edges = fit_bins(time, event)
    assert np.allclose(edges, [0.5 - 1e-6, 2, 3, 4, 10 + 1e-6], rtol=0, atol=1e-12)
    # bins are [e_k, e_{k+1}): an inner edge belongs to the bin it opens
    assert assign_bins(time, edges).tolist() == [0, 0, 1, 2, 3, 3, 3]


def test_matches_pandas_qcut_and_cut():
    rng = np.random.default_rng(0)
    time = rng.exponential(20, 200).round(2)
    event = rng.uniform(size=200) < 0.4
    edges = fit_bins(time, event, n_bins=4)
    _, q = pd.qcut(time[event], q=4, retbins=True, labels=False)
    assert np.allclose(edges[1:-1], q[1:-1], rtol=0, atol=1e-12)
    assert edges[0] == time.min() - 1e-6 and edges[-1] == time.max() + 1e-6
    labels = pd.cut(time, bins=edges, right=False, include_lowest=True, labels=False)
    assert np.array_equal(assign_bins(time, edges), labels.astype(int))


def test_times_outside_the_edges_are_clipped():
    edges = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert assign_bins(np.array([0.0, 1.0, 4.999, 5.0, 99.0]), edges).tolist() == [0, 0, 3, 3, 3]


@pytest.mark.skipif(not (BLCA_TABLE.exists() and BLCA_SPLIT.exists()),
                    reason=f"TCGA reference tables not found under {SHARED / 'tcga'} (shared data folder absent)")
def test_blca_inner_edges_match_published_recipe():
    table = pd.read_csv(BLCA_TABLE, index_col=0)
    split = pd.read_csv(BLCA_SPLIT, index_col=0)
    patients = set(split["train"].dropna()) | set(split["val"].dropna())
    one_per_patient = table.drop_duplicates("case_id")
    one_per_patient = one_per_patient[one_per_patient["case_id"].isin(patients)]
    assert len(one_per_patient) == 373
    time = one_per_patient["survival_months"].to_numpy(float)
    event = 1 - one_per_patient["censorship"].to_numpy(int)
    edges = fit_bins(time, event, n_bins=4)
    assert np.allclose(edges[1:-1], [7.62, 13.57, 21.85], rtol=0, atol=1e-9)
    assert np.bincount(assign_bins(time, edges)).tolist() == [63, 75, 95, 140]


def test_bad_inputs_raise():
    with pytest.raises(MilbenchError, match="one of each"):
        fit_bins(np.arange(5.0), np.ones(4))
    with pytest.raises(MilbenchError, match="NaN"):
        fit_bins(np.array([1.0, np.nan, 3.0]), np.ones(3))
    with pytest.raises(MilbenchError, match="no uncensored"):
        fit_bins(np.arange(5.0), np.zeros(5))
    with pytest.raises(MilbenchError, match="duplicate quantile edges"):
        fit_bins(np.array([1.0, 1.0, 1.0, 1.0, 2.0]), np.ones(5))
    with pytest.raises(MilbenchError, match="strictly increasing"):
        assign_bins(np.arange(3.0), np.array([0.0, 2.0, 1.0]))
