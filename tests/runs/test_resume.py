"""Folds that resume: a fold interrupted after epoch k continues from its checkpoint and gives exactly the
predictions of an uninterrupted one (CPU); the checkpoint is removed once the record exists."""

import pandas as pd
import pytest

from milbench.config.run import make_config
from milbench.runs.claims import resume_path
from milbench.runs.executors import run_fold
from milbench.runs.jobs import CohortSpec, RunOptions, expand
from milbench.runs.store import fold_dir
from milbench.training.fold import fit_fold, load_resume


class Interrupt(Exception):
    pass


def _stop_after(k):
    def progress(stage, done, total):
        if stage == "epoch" and done == k + 1:
            raise Interrupt(f"stopped after epoch {k}")
    return progress


@pytest.mark.parametrize("protocol", ["fixed", "inner-val"])
def test_a_resumed_fold_gives_the_uninterrupted_predictions(synth_cohort, tmp_path, protocol):
    cfg = make_config("amil", "syn", "small", {"epochs": 4, "warmup_epochs": 1, "protocol": protocol})
    whole = fit_fold(synth_cohort, cfg, 1, device="cpu")
    path = tmp_path / "fold_1.resume.pt"
    with pytest.raises(Interrupt):
        fit_fold(synth_cohort, cfg, 1, device="cpu", resume_path=path, progress=_stop_after(1))
    assert load_resume(path, cfg, 1)["epoch"] == 1
    assert load_resume(path, make_config("amil", "syn", "small", {"epochs": 5}), 1) is None  # another config's
    assert load_resume(path, cfg, 2) is None
    epochs = []
    resumed = fit_fold(synth_cohort, cfg, 1, device="cpu", resume_path=path,
                       progress=lambda stage, done, total: stage == "epoch" and epochs.append(done))
    assert epochs == [2, 3, 4]  # announced where it picked up, then epochs 3 and 4 trained
    assert resumed.record["execution"]["resumed_after_epoch"] == 1
    assert whole.record["execution"]["resumed_after_epoch"] is None
    pd.testing.assert_frame_equal(whole.predictions, resumed.predictions, check_exact=True)
    pd.testing.assert_frame_equal(pd.DataFrame(whole.record["history"]), pd.DataFrame(resumed.record["history"]))
    assert whole.record["selected_epoch"] == resumed.record["selected_epoch"]
    pd.testing.assert_series_equal(pd.Series(whole.record["metrics"]), pd.Series(resumed.record["metrics"]))


def test_run_fold_resumes_and_removes_its_checkpoint(synth_dir, tmp_path):
    spec = CohortSpec.of(synth_dir / "cohort.csv", synth_dir / "splits", synth_dir / "features")
    cfg = make_config("amil", "cohort", "small", {"epochs": 3})
    (job,) = expand(spec, spec.resolve(), [cfg], [0])
    opts = RunOptions(str(tmp_path / "runs"), device="cpu")
    reference = run_fold(job, RunOptions(str(tmp_path / "reference"), device="cpu"))
    assert reference.status == "trained"
    out = run_fold(job, opts, progress=_stop_after(0))
    assert out.status == "failed" and "stopped after epoch 0" in out.error
    ckpt = resume_path(tmp_path / "runs", cfg, 0)
    assert ckpt.is_file()
    assert run_fold(job, opts).status == "trained"
    assert not ckpt.exists()
    a = pd.read_csv(fold_dir(tmp_path / "reference", cfg, 0) / "predictions.csv")
    b = pd.read_csv(fold_dir(tmp_path / "runs", cfg, 0) / "predictions.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
