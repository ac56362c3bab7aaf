"""Fit and evaluate one fold under a protocol: the only place that trains a model.

Recipe (DESIGN.md): Adam, one bag per step with gradient accumulation, warm-up epochs before any epoch can be
selected, bf16 autocast on CUDA. Protocols: ``fixed`` scores the final model; ``inner-val`` selects the epoch
on a patient-level inner split of the training fold; ``best-val`` selects it on the held-out fold itself (the
CrossFusion paper's protocol: optimistic, kept to reproduce published tables).
"""

from __future__ import annotations

import copy
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

import milbench
from milbench.config import RunConfig
from milbench.data.bag import Bag
from milbench.data.cache import FeatureCache
from milbench.data.dataset import BagDataset
from milbench.registry import create_model, get_card
from milbench.survival.binning import assign_bins, fit_bins
from milbench.survival.losses import get_loss, hazards_to_survival
from milbench.survival.metrics import fold_metrics, harrell_c, logrank_p
from milbench.tasks.cohort import Cohort

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class FoldResult:
    record: dict[str, Any]
    predictions: pd.DataFrame
    state_dict: dict[str, torch.Tensor] | None = None  # the scored model's weights, kept when asked


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise milbench.MilbenchError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def inner_split(case_ids: list[str], events: np.ndarray, bins: np.ndarray, fraction: float, seed: int
                ) -> tuple[list[str], list[str]]:
    """Patient-level split of a training fold, stratified by (event, time bin), for the inner-val protocol."""
    rng = np.random.default_rng(seed)
    strata = pd.Series(list(zip(events, bins)), index=case_ids)
    val: list[str] = []
    for _, group in strata.groupby(strata):
        ids = list(group.index)
        rng.shuffle(ids)
        val += ids[: int(round(fraction * len(ids)))]
    val_set = set(val)
    return [c for c in case_ids if c not in val_set], [c for c in case_ids if c in val_set]


class _Labels:
    """Survival labels of a set of patients, with their bins under the fold's edges."""

    def __init__(self, cohort: Cohort, case_ids: list[str], edges: np.ndarray) -> None:
        self.case_ids = list(case_ids)
        self.time, self.event = cohort.labels(self.case_ids)
        self.bins = assign_bins(self.time, edges)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _to_device(bag: Bag, device: torch.device) -> Bag:
    return bag.to(device, dtype=torch.float32)


@torch.no_grad()
def predict(model: torch.nn.Module, data: BagDataset, device: torch.device) -> np.ndarray:
    """Hazard logits of every patient of ``data``, in order: [n, n_bins]."""
    model.eval()
    out = []
    for i in range(len(data)):
        with _autocast(device):
            out.append(model(_to_device(data[i], device)).logits.float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0))


def _risk(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    surv = hazards_to_survival(torch.from_numpy(logits)).numpy()
    return -surv.sum(axis=1), surv


def _sample_order(labels: _Labels, sampler: str, gen: torch.Generator) -> list[int]:
    n = len(labels.case_ids)
    if sampler == "uniform":
        return torch.randperm(n, generator=gen).tolist()
    # weighted by the inverse frequency of (bin, censorship), with replacement, as the reference recipe
    strata = pd.Series(list(zip(labels.bins, labels.event)))
    weights = 1.0 / strata.map(strata.value_counts()).to_numpy(dtype=float)
    return torch.multinomial(torch.tensor(weights), n, replacement=True, generator=gen).tolist()


def _selection_score(labels: _Labels, risk: np.ndarray) -> float:
    """Harrell's C on the selection set, NaN when it has no event (a tiny inner split can have none)."""
    if labels.event.sum() == 0:
        return float("nan")
    return harrell_c(labels.time, labels.event, risk)


def fit_fold(cohort: Cohort, cfg: RunConfig, fold: int, device: str = "auto",
             cache: FeatureCache | None = None, progress: ProgressFn | None = None,
             keep_weights: bool = False) -> FoldResult:
    """Train ``cfg.model`` on the training patients of ``fold`` and score it on the held-out patients."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    seed_everything(cfg.seed + fold)
    card = get_card(cfg.model)
    train_ids, test_ids = cohort.folds[fold]
    cache = cache or FeatureCache()

    bin_ids = cohort.patients.index.tolist() if cfg.bins_on == "cohort" else train_ids
    edges = fit_bins(*cohort.labels(bin_ids), n_bins=cfg.n_bins)
    train = _Labels(cohort, train_ids, edges)
    select_ids: list[str] = []
    if cfg.protocol == "inner-val":
        fit_ids, select_ids = inner_split(train.case_ids, train.event, train.bins, cfg.inner_val_fraction, cfg.seed)
        fitting = _Labels(cohort, fit_ids, edges)
    else:
        fitting = train
    test = _Labels(cohort, test_ids, edges)
    if cfg.protocol == "best-val":
        select_ids = test_ids

    fit_data = BagDataset(cohort, fitting.case_ids, card.scales, card=card, cache=cache)
    test_data = BagDataset(cohort, test_ids, card.scales, card=card, cache=cache)
    select_data = BagDataset(cohort, select_ids, card.scales, card=card, cache=cache) if select_ids else None
    select_labels = _Labels(cohort, select_ids, edges) if select_ids else None

    model = create_model(cfg.model, in_dim=fit_data.in_dim, n_bins=cfg.n_bins, **cfg.model_options).to(dev)
    if hasattr(model, "fit_priors"):
        model.fit_priors([_to_device(fit_data[i], dev) for i in range(len(fit_data))])
    loss_fn = get_loss(cfg.loss, alpha=cfg.alpha)
    if loss_fn.needs_batch:
        raise milbench.MilbenchError(f"loss '{cfg.loss}' needs several patients per step and the engine trains one "
                                     "bag per step: use loss=nll or loss=ce")
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + fold)
    y_all = torch.as_tensor(fitting.bins, dtype=torch.long)
    c_all = torch.as_tensor(1 - fitting.event, dtype=torch.float32)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    best = {"score": -np.inf, "epoch": cfg.epochs - 1, "state": None}
    history: list[dict[str, float]] = []
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = _sample_order(fitting, cfg.sampler, gen)
        optim.zero_grad(set_to_none=True)
        total = torch.zeros((), device=dev)
        for step, i in enumerate(order, start=1):
            bag = _to_device(fit_data[i], dev)
            with _autocast(dev):
                out, tasks = model.forward_tasks(bag) if hasattr(model, "forward_tasks") else (model(bag), {})
            y, c = y_all[i : i + 1].to(dev), c_all[i : i + 1].to(dev)
            loss = loss_fn(out.logits.float(), y, c)
            for task_logits in tasks.values():  # auxiliary heads trained on the same target (MuSTMIL's scales)
                loss = loss + loss_fn(task_logits.float(), y, c)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss.float()
            (loss / cfg.grad_accum).backward()
            total += loss.detach()
            if step % cfg.grad_accum == 0 or step == len(order):  # no gradient leaks into the next epoch
                optim.step()
                optim.zero_grad(set_to_none=True)
            if progress:
                progress("bag", step, len(order))
        entry = {"epoch": epoch, "train_loss": float(total) / max(1, len(order))}
        if select_data is not None and epoch >= cfg.warmup_epochs:
            risk, _ = _risk(predict(model, select_data, dev))
            score = _selection_score(select_labels, risk)
            entry["selection_c_index"] = score
            if score > best["score"]:  # NaN (no comparable pair) never wins: the last epoch is kept
                best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        history.append(entry)
        if progress:
            progress("epoch", epoch + 1, cfg.epochs)
    train_seconds = time.perf_counter() - t_train
    if best["state"] is not None:
        model.load_state_dict(best["state"])

    t_eval = time.perf_counter()
    test_logits = predict(model, test_data, dev)
    test_risk, test_surv = _risk(test_logits)
    train_risk, _ = _risk(predict(model, BagDataset(cohort, train_ids, card.scales, card=card, cache=cache), dev))
    cutoff = float(np.median(train_risk))
    metrics = fold_metrics(train.time, train.event, test.time, test.event, test_risk, test_surv, edges)
    metrics["logrank_p"] = logrank_p(test.time, test.event, test_risk, cutoff)
    if cohort.oracle_risk is not None:
        metrics["oracle_c_index"] = harrell_c(test.time, test.event, cohort.oracle_risk.loc[test_ids].to_numpy())
    eval_seconds = time.perf_counter() - t_eval

    predictions = pd.DataFrame({"case_id": test_ids, "time": test.time, "event": test.event.astype(int),
                                "risk": test_risk, "fold": fold, "bin": test.bins, "train_median_risk": cutoff})
    for k in range(test_surv.shape[1]):
        predictions[f"surv_{k}"] = test_surv[:, k]
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.hash, "protocol": cfg.protocol, "fold": fold,
        "cohort": cfg.cohort, "model": cfg.model, "backbone": cfg.backbone,
        "n_train": len(train_ids), "n_fit": len(fitting.case_ids), "n_select": len(select_ids), "n_test": len(test_ids),
        "in_dim": fit_data.in_dim, "bin_edges": edges.tolist(), "selected_epoch": best["epoch"], "history": history,
        "metrics": metrics, "n_params": sum(p.numel() for p in model.parameters()),
        "timings": {"train_s": train_seconds, "eval_s": eval_seconds, "total_s": time.perf_counter() - t_start,
                    "s_per_epoch": train_seconds / cfg.epochs},
        "peak_memory_bytes": _peak_memory(dev),
        "excluded_slides": list(getattr(cohort, "excluded", []) or []),
        "environment": environment(dev),
    }
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep_weights else None
    return FoldResult(record, predictions, weights)


def _peak_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


def environment(dev: torch.device) -> dict[str, Any]:
    """Versions, commit and device, so every record says what produced it."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("milbench", "torch", "torch-geometric", "numpy", "pandas", "scikit-survival", "lifelines"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return {"versions": versions, "git_commit": commit, "device": str(dev), "device_name": name,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
