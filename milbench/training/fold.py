"""Fit and evaluate one fold: the only place that trains a model.

Recipe (DESIGN.md): Adam, one bag per step with gradient accumulation, warm-up epochs before any epoch can be
selected, bf16 autocast on CUDA. The loop itself is :mod:`milbench.training.steps`; the protocols and labels are
:mod:`milbench.training.protocols`; speed comes from :mod:`milbench.training.device` (bags kept on the GPU) and
:mod:`milbench.accel` (CUDA graphs of whole steps for models whose card allows them, ``compile=True`` for the
card's compiled blocks). The record says what was trained, how, on what, and what it scored.

Resume: with ``resume_path``, the end of every epoch is checkpointed there atomically (model, optimizer, the sampling
generator and the global numpy / torch / Python random states, the history, the selection state, the training time
so far), and a fit that finds a checkpoint of the same configuration and fold there continues after its epoch: on
the CPU the resumed fold gives exactly the predictions of an uninterrupted one (tests/runs/test_resume.py). The
caller removes the checkpoint once the fold's record exists.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from milbench.accel.attention import choices as attention_choices
from milbench.accel.compile import compile_blocks
from milbench.accel.graphs import StepGraphs, can_graph
from milbench.accel.rewrites import accelerate
from milbench.config.run import RunConfig
from milbench.data.cache import FeatureCache
from milbench.files import atomic_path
from milbench.models.registry import create_model, get_card
from milbench.survival.binning import fit_bins
from milbench.survival.losses import get_loss, risk_and_survival
from milbench.tasks.cohort import Cohort
from milbench.training.contracts import has_priors, head_kind, policies
from milbench.training.datasets import BagDataset
from milbench.training.device import DeviceBags, DeviceBagStore, default_amp, resolve_device, to_device
from milbench.training.protocols import Labels, c_or_nan, inner_split, sample_order
from milbench.training.provenance import environment, peak_memory
from milbench.training.steps import ProgressFn, check_pack, predict, train_epoch


@dataclass
class FoldResult:
    """A trained fold: its record, its held-out predictions, and (when asked) its weights."""

    record: dict[str, Any]
    predictions: pd.DataFrame
    state_dict: dict[str, torch.Tensor] | None = None  # the scored model's weights, kept when asked


def seed_everything(seed: int) -> None:
    """Seed numpy's and torch's global generators (model initialisation, dropout)."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_states() -> dict[str, Any]:
    """The global random states (torch, CUDA, numpy, Python) in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                        int(has_gauss), float(gauss)],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_resume(path: Path, cfg: RunConfig, fold: int, epoch: int, model: torch.nn.Module,
                optim: torch.optim.Optimizer, gen: torch.Generator, history: list[dict[str, float]],
                best: dict[str, Any], train_s: float) -> None:
    """Checkpoint the end of ``epoch`` at ``path``, atomically (a reader sees the previous epoch's or this one's)."""
    state = {"config_hash": cfg.hash, "fold": fold, "epoch": epoch, "epochs": cfg.epochs, "model": model.state_dict(),
             "optim": optim.state_dict(), "generator": gen.get_state(), "rng": _rng_states(), "history": history,
             "best": best, "train_s": train_s, "time": time.time()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume(path: Path | None, cfg: RunConfig, fold: int) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when it belongs to this configuration and fold; None when there is none (or it is
    unreadable or someone else's: the fold then starts over, which is always correct)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file (a killed writer leaves only its .tmp, but a disk may still fail)
        return None
    if state.get("config_hash") != cfg.hash or state.get("fold") != fold or state.get("epochs") != cfg.epochs:
        return None
    return state


def fit_fold(cohort: Cohort, cfg: RunConfig, fold: int, device: str = "auto",
             cache: FeatureCache | None = None, progress: ProgressFn | None = None,
             keep_weights: bool = False, compile: bool = False, graphs: bool = True,
             resume_path: Path | None = None, gpu_fraction: float | None = None) -> FoldResult:
    """Train ``cfg.model`` on the training patients of ``fold`` and score it on the held-out patients.

    ``compile=True`` compiles the blocks its card names on CUDA (the same function, faster; see
    docs/performance.md); it is an execution option like the device, not part of the config, as is ``graphs``:
    on CUDA, one bag per step, a per-bag loss and a model that whose card allows CUDA graphs, each bag's training step
    is recorded as a CUDA graph and replayed in later epochs (:mod:`milbench.accel.graphs`). The risk is read from
    the model's head (:func:`milbench.survival.losses.risk_and_survival`); predictions get ``surv_k`` columns only
    when the head has a survival curve (not cox, whose IBS is then NaN). ``resume_path``: see the module notes.
    ``gpu_fraction``: the share of the GPU this fold was given; its device bag store stays within it
    (:func:`milbench.training.device.store_budget`).
    """
    from milbench.survival.metrics import ONE_GROUP, fold_metrics, logrank_p  # sksurv, lifelines: slow imports

    t_start = time.perf_counter()
    dev = resolve_device(device)
    seed_everything(cfg.seed + fold)
    card = get_card(cfg.model)
    train_ids, test_ids = cohort.folds[fold]
    cache = cache or FeatureCache()

    bin_ids = cohort.patients.index.tolist() if cfg.bins_on == "cohort" else train_ids
    edges = fit_bins(*cohort.labels(bin_ids), n_bins=cfg.n_bins)
    train = Labels(cohort, train_ids, edges)
    select_ids: list[str] = []
    if cfg.protocol == "inner-val":
        fit_ids, select_ids = inner_split(train.case_ids, train.event, train.bins, cfg.inner_val_fraction, cfg.seed)
        fitting = Labels(cohort, fit_ids, edges)
    else:
        fitting = train
    test = Labels(cohort, test_ids, edges)
    if cfg.protocol == "best-val":
        select_ids = test_ids

    fit_data = BagDataset(cohort, fitting.case_ids, card.scales, card=card, cache=cache)
    test_data = BagDataset(cohort, test_ids, card.scales, card=card, cache=cache)
    select_data = BagDataset(cohort, select_ids, card.scales, card=card, cache=cache) if select_ids else None
    select_labels = Labels(cohort, select_ids, edges) if select_ids else None

    model = create_model(cfg.model, in_dim=fit_data.in_dim, n_bins=cfg.n_bins, **cfg.model_options).to(dev)
    accelerate(model)
    head = head_kind(model)
    loss_fn = get_loss(cfg.loss, alpha=cfg.alpha, head=head)
    check_pack(model, cfg.model, cfg.pack, cfg.grad_accum, loss_fn)
    if compile and dev.type == "cuda":
        compile_blocks(model)
    store = DeviceBagStore(dev, dtype=default_amp(dev) if cfg.pack > 1 else None, fraction=gpu_fraction)
    step_graphs = (StepGraphs(model, dev) if graphs and can_graph(model, dev) and cfg.pack == 1
                   and not loss_fn.needs_batch and not loss_fn.needs_time else None)
    if has_priors(model):
        model.fit_priors([to_device(fit_data[i], dev) for i in range(len(fit_data))])
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + fold)
    y_all = torch.as_tensor(fitting.bins, dtype=torch.long).to(dev)
    c_all = torch.as_tensor(1 - fitting.event, dtype=torch.float32).to(dev)
    t_all = torch.as_tensor(fitting.time, dtype=torch.float32).to(dev)
    fit_bags = DeviceBags(fit_data, store)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    best: dict[str, Any] = {"score": -np.inf, "epoch": cfg.epochs - 1, "state": None}
    history: list[dict[str, float]] = []
    first, trained_before = 0, 0.0
    resumed = load_resume(resume_path, cfg, fold)
    if resumed is not None:  # after everything above, which the seeds make the same as in the interrupted run
        model.load_state_dict(resumed["model"])
        optim.load_state_dict(resumed["optim"])
        gen.set_state(resumed["generator"])
        _set_rng_states(resumed["rng"])
        history, best = resumed["history"], resumed["best"]
        first, trained_before = resumed["epoch"] + 1, resumed["train_s"]
        if progress:
            progress("epoch", first, cfg.epochs)
    t_train = time.perf_counter()
    for epoch in range(first, cfg.epochs):
        model.train()
        order = sample_order(fitting, cfg.sampler, gen)
        total = train_epoch(model, fit_bags, order, y_all, c_all, loss_fn, optim, cfg.grad_accum, cfg.pack,
                            default_amp(dev), progress, t_all, step_graphs)
        entry = {"epoch": epoch, "train_loss": float(total) / max(1, len(order))}
        if select_data is not None and epoch >= cfg.warmup_epochs:
            risk, _ = risk_and_survival(head, predict(model, select_data, dev, store), edges)
            score = c_or_nan(select_labels.time, select_labels.event, risk)
            entry["selection_c_index"] = score
            if score > best["score"]:  # NaN (no comparable pair) never wins: the last epoch is kept
                best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        history.append(entry)
        if resume_path is not None:
            save_resume(resume_path, cfg, fold, epoch, model, optim, gen, history, best,
                        trained_before + time.perf_counter() - t_train)
        if progress:
            progress("epoch", epoch + 1, cfg.epochs)
    train_seconds = trained_before + time.perf_counter() - t_train
    if best["state"] is not None:
        model.load_state_dict(best["state"])

    t_eval = time.perf_counter()
    test_risk, test_surv = risk_and_survival(head, predict(model, test_data, dev, store), edges)
    train_data = BagDataset(cohort, train_ids, card.scales, card=card, cache=cache)
    train_risk, _ = risk_and_survival(head, predict(model, train_data, dev, store), edges)
    cutoff = float(np.median(train_risk))
    metric_notes: dict[str, str] = {}
    bad = int((~np.isfinite(test_risk)).sum())
    if bad:  # a diverged model: every metric is undefined, and the record says why
        metrics = dict.fromkeys(("c_index", "uno_c", "ibs", "td_auc", "logrank_p"), float("nan"))
        metric_notes = dict.fromkeys(metrics, f"{bad} of {len(test_risk)} held-out risks are NaN or infinite "
                                              f"(training diverged: lower the learning rate)")
    else:
        metrics = fold_metrics(train.time, train.event, test.time, test.event, test_risk, test_surv, edges,
                               reasons=metric_notes)
        metrics["logrank_p"] = logrank_p(test.time, test.event, test_risk, cutoff)
        if not np.isfinite(metrics["logrank_p"]):
            metric_notes["logrank_p"] = ONE_GROUP
    if cohort.oracle_risk is not None:
        metrics["oracle_c_index"] = c_or_nan(test.time, test.event, cohort.oracle_risk.loc[test_ids].to_numpy())
    eval_seconds = time.perf_counter() - t_eval

    predictions = pd.DataFrame({"case_id": test_ids, "time": test.time, "event": test.event.astype(int),
                                "risk": test_risk, "fold": fold, "bin": test.bins, "train_median_risk": cutoff})
    for k in range(0 if test_surv is None else test_surv.shape[1]):  # a cox head has no survival curve
        predictions[f"surv_{k}"] = test_surv[:, k]
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": cfg.protocol, "fold": fold,
        "cohort": cfg.cohort, "model": cfg.model, "backbone": cfg.backbone,
        "train_labels": {"case_id": train.case_ids, "time": train.time.tolist(),
                         "event": train.event.astype(int).tolist()},  # lets leaderboards recompute Uno C, IBS, td-AUC
        "n_train": len(train_ids), "n_fit": len(fitting.case_ids), "n_select": len(select_ids), "n_test": len(test_ids),
        "in_dim": fit_data.in_dim, "bin_edges": edges.tolist(), "selected_epoch": best["epoch"], "history": history,
        "metrics": metrics, "metric_notes": metric_notes, "n_params": sum(p.numel() for p in model.parameters()),
        "timings": {"train_s": train_seconds, "eval_s": eval_seconds, "total_s": time.perf_counter() - t_start,
                    "s_per_epoch": train_seconds / cfg.epochs},
        "peak_memory_bytes": peak_memory(dev),
        "excluded_slides": list(getattr(cohort, "excluded", []) or []),
        "head": head,
        "policies": policies(model),
        "execution": {"compile": bool(compile and dev.type == "cuda"),
                      "resumed_after_epoch": first - 1 if first else None,
                      "gpu_fraction": gpu_fraction if dev.type == "cuda" else None,
                      "cuda_graphs": step_graphs.stats() if step_graphs else None,
                      "attention": attention_choices(used_only=True, reset=True)},  # kernel per shape class
        "environment": environment(dev),
    }
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep_weights else None
    return FoldResult(record, predictions, weights)
