"""The training device and what lives there: bags kept on the GPU in half precision, autocast, the model's input.

Bags stay on the device once read (:class:`DeviceBagStore`), so a cohort that fits is copied from the host once per
process; features enter the model in float32, or in their stored half precision for models whose card declares
``autocast_inputs`` (the same values reach the first autocast op).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import torch

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.training.contracts import traits_of
from milbench.training.datasets import BagDataset, tensor_bytes


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu`` or ``cuda``; asking for CUDA without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MilbenchError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return torch.device(device)


def default_amp(device: torch.device) -> torch.dtype | None:
    """The engine's autocast dtype: bf16 on CUDA, none (float32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; float32 throughout when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def to_device(bag: Bag, device: torch.device) -> Bag:
    """The bag on ``device`` in float32."""
    return bag.to(device, dtype=torch.float32)


def float_bag(bag: Bag) -> Bag:
    """Float32 features, cast where the bag lies (the same values as casting on the host, no host copy); a fresh
    extras dict, so what a step adds there never sticks to a stored bag."""
    return replace(bag, features={k: v.float() for k, v in bag.features.items()}, extras=dict(bag.extras))


def model_input(model: torch.nn.Module, bag: Bag, amp: torch.dtype | None) -> Bag:
    """The bag as the model is fed: float32, or under autocast the stored half precision for a model whose features
    only enter autocast ops (its card's ``traits.autocast_inputs``): the same values reach the op (float16 converts to
    bf16 exactly as through float32), without a float32 copy of the bag (twice its size) in the step's memory."""
    if amp is not None and traits_of(model).autocast_inputs:
        return replace(bag, features=dict(bag.features), extras=dict(bag.extras))
    return float_bag(bag)


CUDA_CONTEXT_BYTES = 2**29  # what a process's CUDA context and kernels take beside its allocations (about 0.5 GiB)


def store_budget(free: int, total: int, fraction: float | None = None) -> int:
    """Bytes of bags a process may keep on a GPU with ``free`` of ``total`` bytes free, given ``fraction`` of it.

    Headroom for training (activations, gradients, the optimizer) is a tenth of the process's share plus its CUDA
    context; the share is the whole GPU when ``fraction`` is None. Several processes sharing one GPU by fraction
    each keep within theirs whatever the others have not yet taken (all of them see the GPU free at start).
    """
    share = total * (1.0 if fraction is None else min(1.0, fraction))
    headroom = 0.1 * share + (CUDA_CONTEXT_BYTES if fraction is not None else 0)
    return max(0, int(min(free, share) - headroom))


@contextmanager
def memory_share(device: torch.device, fraction: float | None) -> Iterator[None]:
    """Hold this process's CUDA caching allocator to ``fraction`` of the GPU while the block runs (a fold given a
    quarter of a GPU then fails with out-of-memory at its quarter instead of starving the folds beside it)."""
    if fraction is None or fraction >= 1.0 or torch.device(device).type != "cuda":
        yield
        return
    device = torch.device(device)
    if device.index is None:  # set_per_process_memory_fraction wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


class DeviceBagStore:
    """Bags on the training device in the feature cache's half precision, copied there once and kept while they fit.

    On CUDA the budget is :func:`store_budget`: the free memory at creation, or the process's ``fraction`` of the GPU
    when it was given one, less headroom for training, so a cohort that fits is read from the host once per process;
    bags beyond the budget are copied per use (non-blocking). A
    stored bag may also live in pinned host memory (``put``): it is then copied per use without a host sync.
    ``fetch`` returns fresh dicts, so a caller adding extras never alters the stored bag. ``dtype`` stores the
    features in another precision: the autocast dtype when bags are packed (``forward_packed`` only feeds them to
    autocast ops, which cast them to it anyway), so the concatenation of a packed step moves half the bytes.
    """

    def __init__(self, device: torch.device, max_bytes: int | None = None, dtype: torch.dtype | None = None,
                 fraction: float | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to the tensors' cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        if max_bytes is None:
            max_bytes = 0
            if self.device.type == "cuda":
                max_bytes = store_budget(*torch.cuda.mem_get_info(self.device), fraction)
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
        return float_bag(bag) if as_float else bag


def _bag_bytes(bag: Bag) -> int:
    return sum(tensor_bytes(part) for part in (bag.features, bag.coords, bag.slide_index, bag.extras))


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
