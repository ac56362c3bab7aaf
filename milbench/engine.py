"""Fit and evaluate one fold under a protocol: the only place that trains a model.

Recipe (DESIGN.md): Adam, one bag per step with gradient accumulation, warm-up epochs before any epoch can be
selected, bf16 autocast on CUDA. Speed (docs/performance.md): bags stay on the GPU in half precision once read
(:class:`DeviceBagStore`), labels are indexed on the device (no host synchronisation per step), ``pack`` bags can
share one forward pass (models with ``forward_packed``; the same gradient as accumulating them one by one), each bag's
step is replayed from a CUDA graph in later epochs (:mod:`milbench.step_graphs`; models that declare ``cuda_graphs``),
and ``compile=True`` compiles each model's ``hot_blocks``. Protocols: ``fixed`` scores the final model; ``inner-val``
selects the epoch on a patient-level inner split of the training fold; ``best-val`` selects it on the held-out fold
itself (the CrossFusion paper's protocol: optimistic, kept to reproduce published tables).

What is trained: the survival loss of the model's ``logits`` and of each of its ``tasks`` (same loss, same target),
plus its ``aux_loss``. The loss follows the model's ``head_kind`` (:mod:`milbench.survival.losses`): nll or ce per bag
for the hazard head, the Cox partial likelihood per accumulation window for a cox head (or a hazard head with
loss=cox), the mixture NLL per bag for an mdn head. A model's ``policies()`` (large-bag policies) go to the record.
"""

from __future__ import annotations

import copy
import platform
import resource
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

import milbench
from milbench.config import RunConfig
from milbench.data.bag import Bag
from milbench.data.cache import FeatureCache
from milbench.data.dataset import BagDataset, _tensor_bytes
from milbench.models.blocks import ModelOutput, compile_blocks
from milbench.registry import create_model, get_card
from milbench.step_graphs import StepGraphs, can_graph, graph_key
from milbench.survival.binning import assign_bins, fit_bins
from milbench.survival.losses import SurvivalLoss, get_loss, risk_and_survival
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


def default_amp(device: torch.device) -> torch.dtype | None:
    """The engine's autocast dtype: bf16 on CUDA, none (float32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; float32 throughout when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _to_device(bag: Bag, device: torch.device) -> Bag:
    return bag.to(device, dtype=torch.float32)


def _as_float(bag: Bag) -> Bag:
    """Float32 features, cast where the bag lies (the same values as casting on the host, no host copy); a fresh
    extras dict, so what a step adds there never sticks to a stored bag."""
    return replace(bag, features={k: v.float() for k, v in bag.features.items()}, extras=dict(bag.extras))


def model_input(model: torch.nn.Module, bag: Bag, amp: torch.dtype | None) -> Bag:
    """The bag as the model is fed: float32, or under autocast the stored half precision for a model whose features
    only enter autocast ops (``autocast_inputs = True``): the same values reach the op (float16 converts to bf16
    exactly as through float32), without a float32 copy of the bag (twice its size) in the step's memory."""
    if amp is not None and getattr(model, "autocast_inputs", False):
        return replace(bag, features=dict(bag.features), extras=dict(bag.extras))
    return _as_float(bag)


class DeviceBagStore:
    """Bags on the training device in the feature cache's half precision, copied there once and kept while they fit.

    On CUDA the budget is the free memory at creation less a tenth of the GPU (left for training), so a cohort that
    fits is read from the host once per process; bags beyond the budget are copied per use (non-blocking). A
    stored bag may also live in pinned host memory (``put``): it is then copied per use without a host sync.
    ``fetch`` returns fresh dicts, so a caller adding extras never alters the stored bag. ``dtype`` stores the
    features in another precision: the autocast dtype when bags are packed (``forward_packed`` only feeds them to
    autocast ops, which cast them to it anyway), so the concatenation of a packed step moves half the bytes.
    """

    def __init__(self, device: torch.device, max_bytes: int | None = None, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to the tensors' cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        if max_bytes is None:
            max_bytes = 0
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                max_bytes = max(0, int(free - 0.1 * total))
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._bags: dict[object, Bag] = {}

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be kept on the device (never on the CPU, where the feature cache holds them)."""
        return self.device.type != "cpu" and self.nbytes + nbytes <= self.max_bytes

    def put(self, key: object, bag: Bag) -> None:
        """Keep ``bag`` under ``key``: on the device (counted against the budget) or in pinned host memory."""
        self._bags[key] = bag
        if next(iter(bag.features.values())).device == self.device:
            self.nbytes += _bag_bytes(bag)

    def resident(self, key: object) -> bool:
        """Whether the bag under ``key`` is kept on the device (at one address: what a CUDA graph of its step needs)."""
        bag = self._bags.get(key)
        return bag is not None and next(iter(bag.features.values())).device == self.device

    def fetch(self, key: object, load: Callable[[], Bag], as_float: bool = True) -> Bag:
        """The bag under ``key`` on the device (``load()`` gives it from the host cache on a miss)."""
        bag = self._bags.get(key)
        if bag is None:
            bag = load()
            if self.dtype is not None:
                bag = replace(bag, features={k: v.to(self.device).to(self.dtype) for k, v in bag.features.items()})
            bag = bag.to(self.device)
            if self.fits(_bag_bytes(bag)):
                self.put(key, bag)
        elif next(iter(bag.features.values())).device != self.device:
            bag = bag.to(self.device)
        bag = replace(bag, features=dict(bag.features), slide_index=dict(bag.slide_index), coords=dict(bag.coords),
                      extras=dict(bag.extras))
        return _as_float(bag) if as_float else bag


def _bag_bytes(bag: Bag) -> int:
    return sum(_tensor_bytes(part) for part in (bag.features, bag.coords, bag.slide_index, bag.extras))


class DeviceBags:
    """Item ``i`` of a :class:`BagDataset` on the device, through a shared :class:`DeviceBagStore`."""

    def __init__(self, data: BagDataset, store: DeviceBagStore) -> None:
        self.data, self.store = data, store

    def __len__(self) -> int:
        return len(self.data)

    def get(self, i: int, as_float: bool = True) -> Bag:
        return self.store.fetch(self._key(i), lambda: self.data[i], as_float)

    def resident(self, i: int) -> bool:
        return self.store.resident(self._key(i))

    def _key(self, i: int) -> tuple:
        return self.data.case_ids[i], self.data.scales


def head_kind(model: torch.nn.Module) -> str:
    """The kind of output a model's ``logits`` are (``model.head_kind``; "hazard" when it declares none)."""
    return getattr(model, "head_kind", "hazard")


def _trained_outputs(out: ModelOutput) -> dict[str | None, torch.Tensor]:
    """What the survival loss trains, in float32: ``logits`` (key None) and every task output (same target)."""
    return {None: out.logits.float(), **{name: v.float() for name, v in out.tasks.items()}}


def bag_loss(model: torch.nn.Module, bag: Bag, y: torch.Tensor, c: torch.Tensor, loss_fn: SurvivalLoss,
             amp: torch.dtype | None, t: torch.Tensor | None = None) -> torch.Tensor:
    """Training loss of one bag: the survival loss of its logits and of each of its task outputs (same target), plus
    the model's auxiliary loss; ``t`` (months) is needed by the losses that read times (mdn)."""
    with autocast(y.device, amp):
        out = model(bag)
    loss = sum(loss_fn(v, y, c, t) for v in _trained_outputs(out).values())
    return loss if out.aux_loss is None else loss + out.aux_loss.float()


def bag_step(model: torch.nn.Module, bag: Bag, loss_fn: SurvivalLoss, amp: torch.dtype | None, grad_accum: int,
              y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One bag's loss, its backward (divided by ``grad_accum``), and the detached loss: a step as a graph records it."""
    loss = bag_loss(model, model_input(model, bag, amp), y, c, loss_fn, amp)
    (loss / grad_accum).backward()
    return loss.detach()


def packed_loss(model: torch.nn.Module, bags: list[Bag], y: torch.Tensor, c: torch.Tensor, loss_fn: SurvivalLoss,
                amp: torch.dtype | None) -> torch.Tensor:
    """Summed training loss of several bags from one ``forward_packed`` pass over their concatenated patches.

    The patches go in the autocast dtype when there is one (``forward_packed``'s contract: its first use of them is
    an autocast op, so the values it computes with are the same as from float32), which halves the memory traffic
    of the concatenation against float32. The per-bag loss is a mean over the batch, so times the number of bags it
    is the sum that accumulation adds.
    """
    scale = model.card.scales[0]
    parts = [b.features[scale] for b in bags]
    x = torch.cat(parts).to(amp or torch.float32)
    segment = torch.cat([torch.full((p.shape[0],), i, device=x.device, dtype=torch.long) for i, p in enumerate(parts)])
    with autocast(y.device, amp):
        out = model.forward_packed(x, segment, len(bags))
    loss = sum(loss_fn(v, y, c) * len(bags) for v in _trained_outputs(out).values())
    return loss if out.aux_loss is None else loss + out.aux_loss.float()


def window_loss(model: torch.nn.Module, bags: Iterable[Bag], y: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                loss_fn: SurvivalLoss, amp: torch.dtype | None) -> torch.Tensor:
    """Training loss of one accumulation window under a loss over several patients (cox): the window's bags go
    through the model one by one, then the loss ranks their outputs (and each task's) against each other.

    Returned as n x (window loss) + the summed auxiliary losses, so that, divided by ``grad_accum`` as the per-bag
    losses are, a full window weighs the Cox loss once and each auxiliary loss as a per-bag step does. Memory: the
    autograd graphs of all the window's bags are held until its backward (grad_accum bags, 32 in the paper recipe).
    """
    outputs: dict[str | None, list[torch.Tensor]] = defaultdict(list)
    aux = torch.zeros((), device=y.device)
    for bag in bags:
        with autocast(y.device, amp):
            out = model(bag)
        for name, v in _trained_outputs(out).items():
            outputs[name].append(v)
        if out.aux_loss is not None:
            aux = aux + out.aux_loss.float()
    survival = sum(loss_fn(torch.cat(parts), y, c, t) for parts in outputs.values())
    return survival * len(y) + aux


def check_pack(model: torch.nn.Module, name: str, pack: int, grad_accum: int,
               loss_fn: SurvivalLoss | None = None) -> None:
    """Reject packing where it would change the training: models without ``forward_packed``, uneven windows, and
    losses other than the per-bag losses of the hazard head (``loss_fn``; None stands for nll)."""
    if pack < 1:
        raise milbench.MilbenchError(f"pack must be at least 1, not {pack}")
    if pack > 1 and not hasattr(model, "forward_packed"):
        raise milbench.MilbenchError(f"model '{name}' cannot pack several bags into one forward pass: use pack=1")
    if pack > 1 and loss_fn is not None and (loss_fn.head != "hazard" or loss_fn.needs_time):
        raise milbench.MilbenchError(f"pack={pack} works with the hazard head and loss nll or ce only, not a "
                                     f"{loss_fn.head} head with loss {loss_fn.name}: use pack=1")
    if grad_accum % pack:
        raise milbench.MilbenchError(f"pack={pack} must divide grad_accum={grad_accum} (so packed steps sum the same "
                                     f"bags as accumulation does): e.g. "
                                     f"--set pack={_largest_divisor(grad_accum, pack)}")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def train_epoch(model: torch.nn.Module, bags, order: list[int], y: torch.Tensor, c: torch.Tensor,
                loss_fn: SurvivalLoss, optim: torch.optim.Optimizer, grad_accum: int, pack: int = 1,
                amp: torch.dtype | None = None, progress: ProgressFn | None = None,
                months: torch.Tensor | None = None, graphs: StepGraphs | None = None) -> torch.Tensor:
    """One training epoch over ``order`` (indices into ``bags``, which has ``get(i, as_float)``); returns the summed
    loss on the device.

    ``y``/``c`` [n] are the labels of every index, on the device, and ``months`` [n] the survival times (the cox and
    mdn losses read them). Each bag's loss is divided by ``grad_accum`` and the optimizer steps every
    ``grad_accum`` bags and at the end of the epoch; ``graphs`` replays each bag's step from a CUDA graph
    (:mod:`milbench.step_graphs`; one bag per step, per-bag losses); with ``pack`` > 1 the bags of a window go through
    ``forward_packed`` ``pack`` at a time, which gives the same gradient. A loss over several patients (cox) is
    applied to each window of ``grad_accum`` bags (:func:`window_loss`); a window whose patients are all censored
    has no ranking information and is skipped (no forward pass, no update), as the reference skips all-censored
    batches; which windows those are is read once per epoch (one host synchronisation), otherwise none.
    """
    dev = y.device
    index = torch.as_tensor(order, dtype=torch.long).to(dev, non_blocking=True)
    y_ord, c_ord = y[index], c[index]
    t_ord = months[index] if months is not None else None
    windowed = loss_fn.needs_batch
    has_event = (c_ord == 0).cpu() if windowed else None
    total = torch.zeros((), device=dev)
    fresh_grads = graphs is None  # graphed steps accumulate into gradients that must stay where they are
    optim.zero_grad(set_to_none=fresh_grads)
    done = 0
    size = grad_accum if windowed else pack
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        part = slice(start, start + len(chunk))
        t_part = None if t_ord is None else t_ord[part]
        if windowed:  # None: all censored, skipped
            loss = window_loss(model, (bags.get(i) for i in chunk), y_ord[part], c_ord[part], t_part, loss_fn,
                               amp) if has_event[part].any() else None
        elif graphs is not None and pack == 1:  # one bag: its step replayed from a CUDA graph if the bag is stored
            bag = bags.get(chunk[0], as_float=False)
            key = graph_key(bag) if getattr(bags, "resident", _not_resident)(chunk[0]) else None
            graphs.run(key, y_ord[part], c_ord[part], partial(bag_step, model, bag, loss_fn, amp, grad_accum))
            loss = None
        elif pack == 1:
            bag = model_input(model, bags.get(chunk[0], as_float=False), amp)
            loss = bag_loss(model, bag, y_ord[part], c_ord[part], loss_fn, amp, t_part)
        else:
            loss = packed_loss(model, [bags.get(i, as_float=False) for i in chunk], y_ord[part], c_ord[part], loss_fn,
                               amp)
        if loss is not None:
            (loss / grad_accum).backward()
            total += loss.detach()
        done += len(chunk)
        if done % grad_accum == 0 or done == len(order):  # no gradient leaks into the next epoch; after a skipped
            optim.step()  # window no parameter has a gradient and the step changes nothing
            optim.zero_grad(set_to_none=fresh_grads)
        if progress:
            progress("bag", done, len(order))
    return total if graphs is None else total + graphs.take_loss()


def _not_resident(i: int) -> bool:
    return False


@torch.no_grad()
def predict(model: torch.nn.Module, data: BagDataset, device: torch.device,
            store: DeviceBagStore | None = None) -> torch.Tensor:
    """The head's outputs for every patient of ``data``, in order, on the CPU: [n, n_bins] hazard logits, [n, 1]
    log-risks or [n, 3, K] mixture parameters (see :mod:`milbench.survival.losses`)."""
    model.eval()
    bags = DeviceBags(data, store or DeviceBagStore(device, max_bytes=0))
    out = []
    for i in range(len(data)):
        with autocast(device, default_amp(device)):
            out.append(model(bags.get(i)).logits.float())
    return torch.cat(out).cpu() if out else torch.zeros((0, 0))


def _sample_order(labels: _Labels, sampler: str, gen: torch.Generator) -> list[int]:
    n = len(labels.case_ids)
    if sampler == "uniform":
        return torch.randperm(n, generator=gen).tolist()
    # weighted by the inverse frequency of (bin, censorship), with replacement, as the reference recipe
    strata = pd.Series(list(zip(labels.bins, labels.event)))
    weights = 1.0 / strata.map(strata.value_counts()).to_numpy(dtype=float)
    return torch.multinomial(torch.tensor(weights), n, replacement=True, generator=gen).tolist()


def _c_or_nan(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C, NaN when no pair is comparable (a tiny fold or inner split can have no event)."""
    from milbench import MilbenchError
    from milbench.survival.metrics import harrell_c

    try:
        return harrell_c(time, event, risk)
    except MilbenchError:
        return float("nan")


def fit_fold(cohort: Cohort, cfg: RunConfig, fold: int, device: str = "auto",
             cache: FeatureCache | None = None, progress: ProgressFn | None = None,
             keep_weights: bool = False, compile: bool = False, graphs: bool = True) -> FoldResult:
    """Train ``cfg.model`` on the training patients of ``fold`` and score it on the held-out patients.

    ``compile=True`` compiles the model's ``hot_blocks`` on CUDA (the same function, faster; see
    docs/performance.md); it is an execution option like the device, not part of the config, as is ``graphs``:
    on CUDA, one bag per step, a per-bag loss and a model that declares ``cuda_graphs``, each bag's training step
    is recorded as a CUDA graph and replayed in later epochs (:mod:`milbench.step_graphs`). The risk is read from
    the model's head (:func:`milbench.survival.losses.risk_and_survival`); predictions get ``surv_k`` columns only
    when the head has a survival curve (not cox, whose IBS is then NaN).
    """
    from milbench.survival.metrics import fold_metrics, logrank_p

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
    head = head_kind(model)
    loss_fn = get_loss(cfg.loss, alpha=cfg.alpha, head=head)
    check_pack(model, cfg.model, cfg.pack, cfg.grad_accum, loss_fn)
    if compile and dev.type == "cuda":
        compile_blocks(model)
    store = DeviceBagStore(dev, dtype=default_amp(dev) if cfg.pack > 1 else None)
    step_graphs = (StepGraphs(model, dev) if graphs and can_graph(model, dev) and cfg.pack == 1
                   and not loss_fn.needs_batch and not loss_fn.needs_time else None)
    if hasattr(model, "fit_priors"):
        model.fit_priors([_to_device(fit_data[i], dev) for i in range(len(fit_data))])
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + fold)
    y_all = torch.as_tensor(fitting.bins, dtype=torch.long).to(dev)
    c_all = torch.as_tensor(1 - fitting.event, dtype=torch.float32).to(dev)
    t_all = torch.as_tensor(fitting.time, dtype=torch.float32).to(dev)
    fit_bags = DeviceBags(fit_data, store)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    best = {"score": -np.inf, "epoch": cfg.epochs - 1, "state": None}
    history: list[dict[str, float]] = []
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = _sample_order(fitting, cfg.sampler, gen)
        total = train_epoch(model, fit_bags, order, y_all, c_all, loss_fn, optim, cfg.grad_accum, cfg.pack,
                            default_amp(dev), progress, t_all, step_graphs)
        entry = {"epoch": epoch, "train_loss": float(total) / max(1, len(order))}
        if select_data is not None and epoch >= cfg.warmup_epochs:
            risk, _ = risk_and_survival(head, predict(model, select_data, dev, store), edges)
            score = _c_or_nan(select_labels.time, select_labels.event, risk)
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
    test_risk, test_surv = risk_and_survival(head, predict(model, test_data, dev, store), edges)
    train_data = BagDataset(cohort, train_ids, card.scales, card=card, cache=cache)
    train_risk, _ = risk_and_survival(head, predict(model, train_data, dev, store), edges)
    cutoff = float(np.median(train_risk))
    metrics = fold_metrics(train.time, train.event, test.time, test.event, test_risk, test_surv, edges)
    metrics["logrank_p"] = logrank_p(test.time, test.event, test_risk, cutoff)
    if cohort.oracle_risk is not None:
        metrics["oracle_c_index"] = _c_or_nan(test.time, test.event, cohort.oracle_risk.loc[test_ids].to_numpy())
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
        "metrics": metrics, "n_params": sum(p.numel() for p in model.parameters()),
        "timings": {"train_s": train_seconds, "eval_s": eval_seconds, "total_s": time.perf_counter() - t_start,
                    "s_per_epoch": train_seconds / cfg.epochs},
        "peak_memory_bytes": _peak_memory(dev),
        "excluded_slides": list(getattr(cohort, "excluded", []) or []),
        "head": head,
        "policies": model.policies() if hasattr(model, "policies") else {},  # {}: every patch, no special policy
        "execution": {"compile": bool(compile and dev.type == "cuda"),
                      "cuda_graphs": step_graphs.stats() if step_graphs else None},
        "environment": environment(dev),
    }
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep_weights else None
    return FoldResult(record, predictions, weights)


def _peak_memory(dev: torch.device) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the torch threads in use (what a timing ran on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


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
    return {"versions": versions, "git_commit": commit, "device": str(dev), "device_name": device_name(dev),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
