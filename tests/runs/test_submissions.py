"""Predictions made outside milbench: a valid file becomes one submitted record per fold, ranked beside milbench's own
runs and labelled; each kind of bad file is refused with its reason, and the store is left byte for byte as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from milbench import MilbenchError
from milbench.report.paper import comparison
from milbench.runs.store import iter_folds
from milbench.runs.submissions import SubmissionRefused, submit
from milbench.tasks.cohort import resolve_cohort

COHORT = "tcga_blca"


@pytest.fixture(scope="module")
def valid() -> pd.DataFrame:
    """Every held-out patient of every fold once, with time, event, a 4-bin curve and the training median risk."""
    cohort = resolve_cohort(COHORT)
    rng = np.random.default_rng(0)
    rows = []
    for k, (_, held) in cohort.folds.items():
        time, event = cohort.labels(held)
        for case, t, e in zip(held, time, event):
            curve = np.sort(rng.uniform(0.05, 0.95, 4))[::-1]
            rows.append({"case_id": case, "fold": k, "risk": -t / 40 + rng.normal(0, 0.3), "time": t, "event": e,
                         "train_median_risk": -0.5, **{f"surv_{j}": curve[j] for j in range(4)}})
    return pd.DataFrame(rows)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "pred.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_a_valid_file_is_written_as_submitted_runs_ranked_and_labelled(tmp_path, valid):
    runs = tmp_path / "runs"
    written, fresh = submit(write(tmp_path, valid), COHORT, "extmil", runs, backbone="resnet50",
                            protocol="best-val", by="group A", note="trained on our own cluster")
    assert fresh and len(written) == 5
    folds = list(iter_folds(runs))
    assert len(folds) == 5 and {f.record["fold"] for f in folds} == set(range(5))
    record = folds[0].record
    assert record["source"] == "submitted" and record["model"] == "extmil" and record["protocol"] == "best-val"
    sub = record["submission"]
    assert len(sub["sha256"]) == 64 and sub["submitted_by"] == "group A" and sub["note"].startswith("trained")
    assert sub["cutoff"] == "train_median_risk column"
    pred = folds[0].predictions
    assert {"case_id", "time", "event", "risk", "fold", "train_median_risk", "surv_3"} <= set(pred.columns)
    assert len(record["bin_edges"]) == 5 and record["n_test"] == len(pred)
    # the same file again: nothing new
    again, fresh = submit(write(tmp_path, valid), COHORT, "extmil", runs, backbone="resnet50", protocol="best-val")
    assert not fresh and len(list(iter_folds(runs))) == 5
    # ranked beside the paper and marked as submitted
    cmp = comparison(runs)
    row = cmp[cmp.model == "extmil"].iloc[0]
    assert row.submitted and "(submitted)" in row.model_label and row["rank"] == 1 and row.folds == 5
    assert 0.5 < row["mean"] <= 1 and np.isfinite(row.logrank_p)


def test_a_file_without_curves_or_labels_is_enough(tmp_path, valid):
    runs = tmp_path / "runs"
    written, _ = submit(write(tmp_path, valid[["case_id", "fold", "risk"]]), COHORT, "riskonly", runs)
    record = json.loads((written[0] / "record.json").read_text())
    assert record["head"] == "risk" and record["backbone"] == "default" and record["protocol"] == "fixed"
    assert record["submission"]["cutoff"].startswith("the held-out fold's median")
    assert np.isnan(record["metrics"]["ibs"])  # no curve: no integrated Brier score, never 0


def _rows(frame: pd.DataFrame, k: int) -> pd.Index:
    return frame.index[frame.fold == k]


def _breakages(valid: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    v = valid.copy
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    f = v().drop(index=valid.index[3])
    out["missing patient"] = (f, "held-out patient(s) missing")
    f = v()
    f.loc[_rows(f, 0)[0], "fold"] = 1
    out["training patient"] = (f, "is a training patient of fold 1")
    f = pd.concat([v(), v().iloc[[5]]], ignore_index=True)
    out["duplicated patient"] = (f, "appears 2 times in fold")
    f = v()
    f.loc[2, "time"] += 3.0
    out["wrong time"] = (f, "time")
    f = v()
    f.loc[2, "event"] = 1 - f.loc[2, "event"]
    out["wrong event"] = (f, "event")
    f = v()
    f.loc[7, "risk"] = np.nan
    out["NaN risk"] = (f, "risk is empty")
    f = v()
    f["risk"] = f.risk.astype(object)
    f.loc[8, "risk"] = "inf"
    out["infinite risk"] = (f, "risk is 'inf'")
    f = v()
    f.loc[4, ["surv_1", "surv_2"]] = [0.2, 0.6]
    out["non-monotone curve"] = (f, "survival curve rises from surv_1")
    f = v()
    f.loc[4, "surv_0"] = 1.4
    out["curve above 1"] = (f, "numbers in [0, 1]")
    f = v()
    f.loc[9, "fold"] = 7
    out["wrong fold"] = (f, "fold 7 is not a fold of tcga_blca")
    f = v().assign(grade=1)
    out["unknown column"] = (f, "unknown column(s) grade")
    f = v().drop(columns=["risk"])
    out["no risk column"] = (f, "missing column(s) risk")
    f = v()
    f.loc[0, "case_id"] = "TCGA-XX-0000"
    out["unknown patient"] = (f, "TCGA-XX-0000 is not a patient of tcga_blca")
    f = v().rename(columns={"surv_1": "surv_5"})
    out["survival columns with a gap"] = (f, "without gaps")
    f = v()
    f.loc[_rows(f, 2)[0], "train_median_risk"] = 3.0
    out["two cuts in one fold"] = (f, "train_median_risk takes several values")
    out["no rows"] = (v().iloc[:0], "no rows")
    return out


def test_each_bad_file_is_refused_with_its_reason_and_the_store_unchanged(tmp_path, valid):
    runs = tmp_path / "runs"
    submit(write(tmp_path, valid), COHORT, "extmil", runs, backbone="resnet50")
    before = snapshot(runs)
    breakages = _breakages(valid)
    assert len(breakages) >= 12
    for name, (frame, reason) in breakages.items():
        with pytest.raises(SubmissionRefused) as err:
            submit(write(tmp_path, frame, f"{name.replace(' ', '_')}.csv"), COHORT, "other", runs)
        assert reason in str(err.value), (name, str(err.value))
        assert err.value.problems and all("\n" not in p for p in err.value.problems)
        assert snapshot(runs) == before, name


@pytest.mark.parametrize("kwargs, reason", [
    ({"model": "amil"}, "is a milbench model"),
    ({"model": "my model"}, "letters, digits"),
    ({"protocol": "best"}, "declare one of"),
    ({"cohort": "tcga_nowhere"}, "unknown cohort"),
])
def test_bad_names_are_refused_before_reading(tmp_path, valid, kwargs, reason):
    runs = tmp_path / "runs"
    runs.mkdir()
    args = {"cohort": COHORT, "model": "extmil", **kwargs}
    with pytest.raises(MilbenchError, match=reason):
        submit(write(tmp_path, valid), args["cohort"], args["model"], runs, protocol=kwargs.get("protocol", "fixed"))
    assert snapshot(runs) == {}


def test_another_file_under_a_taken_name_is_refused(tmp_path, valid):
    runs = tmp_path / "runs"
    submit(write(tmp_path, valid), COHORT, "extmil", runs)
    before = snapshot(runs)
    other = valid.assign(risk=valid.risk * 2 + 1)
    with pytest.raises(MilbenchError, match="already has fixed runs with seed 7"):
        submit(write(tmp_path, other, "other.csv"), COHORT, "extmil", runs)
    assert snapshot(runs) == before
    written, fresh = submit(write(tmp_path, other, "other.csv"), COHORT, "extmil", runs, seed=8)  # another seed
    assert fresh and len(written) == 5
