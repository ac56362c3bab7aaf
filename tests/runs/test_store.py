import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from milbench import MilbenchError
from milbench.config.run import make_config
from milbench.runs.store import clean_stale, fold_dir, is_complete, iter_folds, write_fold
from milbench.report.aggregate import build, fold_table, summary
from milbench.report.markdown import to_markdown


def _fake_fold(runs, cfg, fold, seed):
    rng = np.random.default_rng(seed)
    n = 30
    pred = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "time": rng.uniform(1, 50, n),
                         "event": rng.integers(0, 2, n), "risk": rng.normal(size=n), "fold": fold})
    pred.loc[0, "event"] = 1
    record = {"protocol": cfg.protocol, "cohort": cfg.cohort, "backbone": cfg.backbone, "model": cfg.model,
              "config_hash": cfg.hash, "fold": fold, "config": cfg.to_dict(), "metrics": {"c_index": 0.99}}
    write_fold(runs, cfg, fold, record, pred)
    return concordance_index_censored(pred.event.astype(bool), pred.time, pred.risk)[0]


def test_write_is_atomic_and_complete(tmp_path):
    cfg = make_config("amil", "syn", "small")
    (fold_dir(tmp_path, cfg, 0).parent / ".tmp-fold_0-1").mkdir(parents=True)
    assert not is_complete(tmp_path, cfg, 0)
    _fake_fold(tmp_path, cfg, 0, 0)
    assert is_complete(tmp_path, cfg, 0)
    clean_stale(tmp_path, cfg)
    assert not list(tmp_path.rglob(".tmp-*"))
    assert [f.record["fold"] for f in iter_folds(tmp_path)] == [0]


def test_an_interrupted_write_leaves_no_fold_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A write killed after the predictions but before the record (here: the record's JSON raising) leaves no fold
    folder where there was none, and a complete fold being rewritten stays byte for byte what it was."""
    import milbench.runs.store as store

    cfg = make_config("amil", "syn", "small")
    _fake_fold(tmp_path, cfg, 0, 0)
    before = {p: p.read_bytes() for p in fold_dir(tmp_path, cfg, 0).iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.json, "dump", killed)
    for fold in (1, 0):
        with pytest.raises(KeyboardInterrupt):
            _fake_fold(tmp_path, cfg, fold, 0)
    monkeypatch.undo()
    assert not fold_dir(tmp_path, cfg, 1).exists() and not is_complete(tmp_path, cfg, 1)
    assert {p: p.read_bytes() for p in fold_dir(tmp_path, cfg, 0).iterdir()} == before
    assert [f.record["fold"] for f in iter_folds(tmp_path)] == [0]


def test_corrupt_record_is_named(tmp_path):
    cfg = make_config("amil", "syn", "small")
    _fake_fold(tmp_path, cfg, 0, 0)
    (fold_dir(tmp_path, cfg, 0) / "record.json").write_text("{oops")
    with pytest.raises(MilbenchError, match="record.json is not valid JSON"):
        list(iter_folds(tmp_path))


def test_leaderboard_recomputes_from_predictions(tmp_path):
    cfg = make_config("amil", "syn", "small")
    cs = [_fake_fold(tmp_path, cfg, f, f) for f in range(3)]
    other = make_config("amil", "syn", "small", {"protocol": "best-val"})
    _fake_fold(tmp_path, other, 0, 9)
    table = summary(fold_table(tmp_path))
    fixed = table[table.protocol == "fixed"].iloc[0]
    assert fixed["mean"] == pytest.approx(np.mean(cs)) and fixed["std"] == pytest.approx(np.std(cs, ddof=1))
    assert fixed.folds == 3 and len(table) == 2  # protocols never pooled
    md = to_markdown(build(tmp_path, n_boot=0))
    assert "Protocol: best-val" in md and "Protocol: fixed" in md and "0.990" not in md


def test_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(MilbenchError, match="no completed folds"):
        fold_table(tmp_path)
    with pytest.raises(MilbenchError, match="does not exist"):
        fold_table(tmp_path / "missing")
