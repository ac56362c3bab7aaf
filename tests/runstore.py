"""A tiny hand-made run store for the leaderboard, statistics and plot tests: known risks, no training.

Every cohort has 60 patients in 5 folds (patient i held out in fold i % 5, so the other folds are exactly the
training patients). A run's risk is ``quality * signal + noise``; its records carry a cached C-index of 0.999
that no leaderboard figure may show (only the oracle C, a property of the cohort, is read from records).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from milbench.config.run import RunConfig, make_config
from milbench.runs.store import write_fold
from milbench.survival.binning import assign_bins, fit_bins

N_PATIENTS, N_FOLDS = 60, 5
CACHED = 0.999
ORACLE = 0.777  # the cohort's oracle C, the one figure a leaderboard reads from the records


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def cohort_labels(cohort: str) -> pd.DataFrame:
    """Patients of a fake cohort: time (months), event, held-out fold and the true risk signal."""
    rng = _rng("cohort", cohort)
    signal = rng.normal(size=N_PATIENTS)
    time = np.round(rng.exponential(20 * np.exp(-signal)) + 0.5, 1)
    event = (rng.random(N_PATIENTS) < 0.7).astype(int)
    return pd.DataFrame({"case_id": [f"{cohort}-{i:03d}" for i in range(N_PATIENTS)], "time": time, "event": event,
                         "fold": np.arange(N_PATIENTS) % N_FOLDS, "signal": signal})


@dataclass
class Spec:
    model: str
    cohort: str
    quality: float
    seed: int = 7
    backbone: str = "default"
    protocol: str = "fixed"
    folds: tuple[int, ...] = tuple(range(N_FOLDS))
    overrides: dict = field(default_factory=dict)
    train_labels_in_record: bool = False


@dataclass
class WrittenFold:
    fold: int
    predictions: pd.DataFrame
    train: pd.DataFrame  # the training patients' labels (time, event)
    train_risk: np.ndarray


def write_run(runs, spec: Spec) -> tuple[RunConfig, list[WrittenFold]]:
    """Write every fold of one run; returns its config and what was written, for independent recomputation."""
    labels = cohort_labels(spec.cohort)
    cfg = make_config(spec.model, spec.cohort, "small", {"seed": spec.seed, "protocol": spec.protocol,
                                                          "backbone": spec.backbone, **spec.overrides})
    written = []
    for k in spec.folds:
        rng = _rng(spec.model, spec.cohort, spec.seed, spec.backbone, spec.protocol, sorted(spec.overrides.items()), k)
        risk = spec.quality * labels.signal.to_numpy() + rng.normal(size=N_PATIENTS)
        test, train = labels.fold == k, labels.fold != k
        edges = fit_bins(labels.time[train].to_numpy(), labels.event[train].to_numpy())
        surv = np.exp(-np.exp(risk[test])[:, None] * edges[1:][None, :] / 25.0)
        cutoff = float(np.median(risk[train]))
        pred = pd.DataFrame({"case_id": labels.case_id[test].to_numpy(), "time": labels.time[test].to_numpy(),
                             "event": labels.event[test].to_numpy(), "risk": risk[test], "fold": k,
                             "bin": assign_bins(labels.time[test].to_numpy(), edges), "train_median_risk": cutoff})
        for j in range(surv.shape[1]):
            pred[f"surv_{j}"] = surv[:, j]
        record = {"config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": cfg.protocol, "fold": k,
                  "cohort": cfg.cohort, "model": cfg.model, "backbone": cfg.backbone, "n_train": int(train.sum()),
                  "n_test": int(test.sum()), "in_dim": 16, "bin_edges": edges.tolist(),
                  "metrics": {"c_index": CACHED, "uno_c": CACHED, "ibs": CACHED, "td_auc": CACHED,
                              "oracle_c_index": ORACLE},
                  "timings": {"train_s": 10.0 * (k + 1), "s_per_epoch": float(k + 1)},
                  "peak_memory_bytes": (k + 1) * 2**30, "environment": {"device": "cpu", "device_name": "x86_64"}}
        if spec.train_labels_in_record:
            record["train_labels"] = {"case_id": labels.case_id[train].tolist(), "time": labels.time[train].tolist(),
                                      "event": labels.event[train].tolist()}
        write_fold(runs, cfg, k, record, pred)
        written.append(WrittenFold(k, pred, labels.loc[train, ["case_id", "time", "event"]].reset_index(drop=True),
                                   risk[train]))
    return cfg, written


COHORTS = ("tcga_blca", "synthetic_coarse")

# (model, quality, seeds, folds, extra) of the fixed-protocol, default-backbone runs on both cohorts
STANDARD = [
    ("crossfusion", 1.6, (7, 8), None, {}),
    ("amil", 1.0, (7, 8), None, {}),
    ("amil", 0.9, (7, 8), None, {"lr": 0.01}),  # a second variant of amil: its own row
    ("transmil", -1.0, (7, 8), None, {}),  # worse than chance: significantly below the best
    ("crossfusion_single", 0.3, (7,), None, {}),  # one seed fewer: incomplete
    ("dsmil", 1.2, (7, 8), (0, 1, 2), {}),  # three folds of five: incomplete
]


def standard_store(runs) -> dict[tuple, list[list[WrittenFold]]]:
    """The store most tests use; returns, per (protocol, cohort, backbone, model, lr), the written folds per seed."""
    out: dict[tuple, list[list[WrittenFold]]] = {}
    for cohort in COHORTS:
        for model, quality, seeds, folds, extra in STANDARD:
            for seed in seeds:
                spec = Spec(model, cohort, quality, seed=seed, overrides=extra,
                            folds=folds or tuple(range(N_FOLDS)), train_labels_in_record=model == "transmil")
                cfg, written = write_run(runs, spec)
                out.setdefault(("fixed", cohort, "default", model, cfg.lr), []).append(written)
        for seed in (7, 8):  # a second backbone for CrossFusion
            cfg, written = write_run(runs, Spec("crossfusion", cohort, 1.2, seed=seed, backbone="uni"))
            out.setdefault(("fixed", cohort, "uni", "crossfusion", cfg.lr), []).append(written)
        cfg, written = write_run(runs, Spec("amil", cohort, 3.0, protocol="best-val"))  # never ranked with fixed
        out.setdefault(("best-val", cohort, "default", "amil", cfg.lr), []).append(written)
    return out
