"""`milbench run --cohort tcga_blca` end to end on tiny synthetic CLAM features named after the real BLCA slides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench.tasks import tcga
from milbench.tasks.audit import read_clam_splits
from tests.data.files import clam_h5, grid
from tests.tasks.test_tcga import SHARED

REPO = Path(__file__).resolve().parents[2]
# One intra-op thread: on a busy 2-core machine two torch threads per process slow these tiny bags ~30-fold.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def blca_features(tmp_path_factory) -> Path:
    """ROOT/x20/h5_files/<slide>.h5 for every slide of the shipped BLCA table: 3 patches of width 8 each."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    for slide in tcga.shipped_table("blca")["slide_id"]:
        clam_h5(root, "20x", slide, rng.normal(size=(3, 8)).astype(np.float32), grid(3))
    return root


def milbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "milbench.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_one_fold_of_blca_runs_and_holds_out_the_reference_val_set(blca_features, tmp_path):
    runs = tmp_path / "runs"
    res = milbench("run", "--model", "amil", "--cohort", "tcga_blca", "--features", str(blca_features),
                   "--epochs", "1", "--folds", "0", "--runs-dir", str(runs), "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    records = list(runs.rglob("record.json"))
    assert len(records) == 1 and records[0].parent.name == "fold_0"
    record = json.loads(records[0].read_text())
    assert (record["cohort"], record["model"], record["fold"], record["in_dim"]) == ("tcga_blca", "amil", 0, 8)
    table = tcga.shipped_table("blca")
    held_out = set(table.loc[table["fold"] == 0, "case_id"])
    predicted = pd.read_csv(records[0].parent / "predictions.csv", dtype={"case_id": str})
    assert set(predicted["case_id"]) == held_out and len(predicted) == len(held_out) == 75
    assert (record["n_train"], record["n_test"]) == (298, 75)
    assert np.isfinite(predicted["risk"]).all() and 0 <= record["metrics"]["c_index"] <= 1
    if SHARED.is_dir():  # the reference split file itself, not only the shipped table built from it
        assert held_out == set(read_clam_splits(SHARED / "crossfusion/data/splits/tcga_blca")[0].val)


@pytest.mark.slow
def test_a_missing_slide_under_a_backbone_folder_stops_the_run(blca_features, tmp_path):
    """CrossFusion layout ROOT/<backbone>/x20/h5_files; one slide's file absent: exit 2 naming its path."""
    folder = tmp_path / "root" / "resnet50" / "x20" / "h5_files"
    folder.mkdir(parents=True)
    files = sorted((blca_features / "x20" / "h5_files").iterdir())
    for path in files[1:]:
        (folder / path.name).symlink_to(path)
    res = milbench("run", "--model", "amil", "--cohort", "blca", "--features", str(tmp_path / "root"),
                   "--backbone", "resnet50", "--folds", "0", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "1 feature file(s)" in res.stderr and str(folder / files[0].name) in res.stderr.replace("\n", "")
    assert not list((tmp_path / "runs").rglob("record.json"))
