"""Fixtures of the acceptance suite (tests/cli): tiny cohorts per test, and one run store seeded once per session.

The helpers live in :mod:`tests.cli.helpers`; nothing here imports milbench (the suite drives the command).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli.helpers import CohortFiles, records, run_milbench, write_cohort


@pytest.fixture
def make_cohort(tmp_path):
    """``make_cohort(layout="clam", name="cohort")``: a fresh valid cohort under the test's tmp_path."""
    def make(layout: str = "clam", name: str = "cohort", **kwargs) -> CohortFiles:
        return write_cohort(tmp_path / name, layout, **kwargs)
    return make


# ---- one real run per session: a store that already holds a completed record ------------------------------------

@pytest.fixture(scope="session")
def base_cohort(tmp_path_factory) -> CohortFiles:
    """The valid cohort the seeded store was trained on (do not modify: copy it)."""
    return write_cohort(tmp_path_factory.mktemp("base") / "cohort")


@pytest.fixture(scope="session")
def seeded_store(base_cohort, tmp_path_factory) -> Path:
    """A run store holding one completed record (fold 0 of AMIL, one epoch, on ``base_cohort``), trained once."""
    runs = tmp_path_factory.mktemp("seeded") / "runs"
    res = run_milbench(*base_cohort.run_args(runs), "--folds", "0", timeout=600)
    if res.returncode != 0 or len(records(runs)) != 1:
        pytest.fail(f"could not seed the run store with one real run:\n{res.describe()}")
    return runs


@pytest.fixture
def runs_dir(seeded_store, tmp_path) -> Path:
    """A copy of the seeded store for one test (same bytes, same layout)."""
    runs = tmp_path / "runs"
    shutil.copytree(seeded_store, runs)
    return runs
