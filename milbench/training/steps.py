"""One training step and one epoch: the survival loss of a bag (or a packed group of bags, or a Cox window), its
backward with gradient accumulation, and prediction of a dataset's head outputs.

What is trained: the survival loss of the model's ``logits`` and of each of its ``tasks`` (same loss, same target),
plus its ``aux_loss``. The loss follows the model's head kind (:mod:`milbench.survival.losses`): nll or ce per bag
for the hazard head, the Cox partial likelihood per accumulation window for a cox head (or a hazard head with
loss=cox), the mixture NLL per bag for an mdn head.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Callable

import torch

from milbench import MilbenchError
from milbench.accel.graphs import StepGraphs, graph_key
from milbench.data.bag import Bag
from milbench.models.layers.common import ModelOutput
from milbench.survival.losses import SurvivalLoss
from milbench.training.contracts import card_scales, has_packed
from milbench.training.datasets import BagDataset
from milbench.training.device import DeviceBags, DeviceBagStore, autocast, default_amp, model_input

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


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
    scale = card_scales(model)[0]
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
        raise MilbenchError(f"pack must be at least 1, not {pack}")
    if pack > 1 and not has_packed(model):
        raise MilbenchError(f"model '{name}' cannot pack several bags into one forward pass: use pack=1")
    if pack > 1 and loss_fn is not None and (loss_fn.head != "hazard" or loss_fn.needs_time):
        raise MilbenchError(f"pack={pack} works with the hazard head and loss nll or ce only, not a "
                                     f"{loss_fn.head} head with loss {loss_fn.name}: use pack=1")
    if grad_accum % pack:
        raise MilbenchError(f"pack={pack} must divide grad_accum={grad_accum} (so packed steps sum the same "
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
    (:mod:`milbench.accel.graphs`; one bag per step, per-bag losses); with ``pack`` > 1 the bags of a window go through
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
