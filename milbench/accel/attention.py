"""The attention kernel for each shape class, chosen by measurement on the GPU at hand.

``scaled_dot_product_attention`` has several fused kernels on CUDA (cuDNN's, FlashAttention-2, the memory-efficient
one) that compute the same function (with attention dropout: the same distribution, from another random stream).
Which is fastest depends on the shape: on an H200, cuDNN's ran CrossFusion's attentions at 390-550 TFLOP/s against
190-330 for FlashAttention-2 (../shared/reference/gpu_anchor_h200.md), but not every shape, dropout setting or GPU
agrees. :func:`chosen_sdpa` therefore times the kernels that accept a call's inputs (forward and backward) the first
time a shape class is met and runs every later call of that class with the fastest first in the priority list
(``torch.nn.attention.sdpa_kernel(..., set_priority=True)``, the others kept as fallbacks, then the math kernel).

A shape class is (device, dtype, heads, head widths, dropout or not, gradient or not, and the query and key lengths
rounded up to a power of two): bags of similar size share the decision. The choice is made once per class and
process, outside any CUDA graph capture: the step that first meets a class runs eagerly (the first step of a fold
and the benchmark's first warm-up step do); a class first met while a graph is being recorded runs with the default
order (cuDNN first) and is measured as soon as no capture is under way (:func:`tune_pending`, which the step graphs
call after each recording), and graphs recorded before a choice that differs from the default are dropped and
recorded again. Measuring saves and restores the random generator's state, so the training run's dropout masks are
those it would draw without the measurement. :func:`choices` lists every decision with the times measured: the
benchmark records it under ``execution``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from milbench.accel.eager import eager

CANDIDATES = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
DEFAULT = (*CANDIDATES, SDPBackend.MATH)  # cuDNN first: what PyTorch itself prefers on Hopper
NAMES = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
         SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}
TIMED_REPEATS = 3  # calls timed per kernel (10 for calls under 2 ms)


def _bucket(n: int) -> int:
    """The power of two at or above ``n``: sequence lengths in one bucket share a decision."""
    return 1 << max(0, (int(n) - 1).bit_length())


def shape_class(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> tuple:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (q.device.index or 0, str(q.dtype).removeprefix("torch."), q.shape[-3] if q.dim() > 2 else 1,
            q.shape[-1], v.shape[-1], dropout_p > 0, grad, _bucket(q.shape[-2]), _bucket(k.shape[-2]))


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being recorded on the current stream of ``t``'s device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class KernelChoice:
    """Decisions per shape class: the priority order used and, once measured, each kernel's milliseconds."""

    def __init__(self) -> None:
        self.orders: dict[tuple, tuple[SDPBackend, ...]] = {}
        self.records: dict[tuple, dict[str, Any]] = {}
        self.pending: dict[tuple, tuple] = {}  # class -> (shapes, strides, dtype, device, dropout_p, grad)
        self.used: set[tuple] = set()  # classes called since the last :func:`choices` with reset
        self.forced: SDPBackend | None = None  # a kernel asked for by name (``milbench bench --sdpa``)

    def order(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> tuple[SDPBackend, ...]:
        if self.forced is not None:
            return (self.forced, *(b for b in DEFAULT if b != self.forced))
        key = shape_class(q, k, v, dropout_p)
        self.used.add(key)
        order = self.orders.get(key)
        if order is not None:
            return order
        spec = ([(tuple(t.shape), t.stride()) for t in (q, k, v)], q.dtype, q.device, dropout_p, key[6])
        if capturing(q):
            self.orders[key] = DEFAULT
            self.pending[key] = spec
            self.records[key] = {"kernel": NAMES[DEFAULT[0]], "measured": False}
            return DEFAULT
        return self._decide(key, spec)

    def tune_pending(self) -> bool:
        """Measure the classes first met during a graph capture; True if a choice now differs from the default
        those graphs were recorded with (they should be recorded again)."""
        changed = False
        for key, spec in list(self.pending.items()):
            del self.pending[key]
            changed |= self._decide(key, spec)[0] != DEFAULT[0]
        return changed

    def _decide(self, key: tuple, spec: tuple) -> tuple[SDPBackend, ...]:
        shapes, dtype, device, dropout_p, grad = spec
        times = measure_kernels(shapes, dtype, device, dropout_p, grad)
        ok = {b: t for b, t in times.items() if t is not None}
        best = min(ok, key=ok.get) if ok else DEFAULT[0]
        order = (best, *(b for b in DEFAULT if b != best))
        self.orders[key] = order
        self.records[key] = {"kernel": NAMES[best], "measured": True,
                             "ms": {NAMES[b]: (None if t is None else round(t, 4)) for b, t in times.items()}}
        return order

    def summary(self, used_only: bool = False) -> list[dict[str, Any]]:
        out = []
        for key, rec in self.records.items():
            if used_only and key not in self.used:
                continue
            _, dtype, heads, dqk, dv, dropout, grad, nq, nk = key
            out.append({"dtype": dtype, "heads": heads, "head_dim": dqk, "value_dim": dv, "dropout": dropout,
                        "backward": grad, "queries_upto": nq, "keys_upto": nk, **rec})
        return out


def measure_kernels(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], dtype: torch.dtype, device: torch.device, dropout_p: float,
                    grad: bool) -> dict[SDPBackend, float | None]:
    """Median milliseconds of one call (forward, and backward when ``grad``) of each candidate kernel on random
    inputs of the (shape, strides) in ``shapes`` (the call's own layout: heads are often a view); None for a kernel that refuses them. The CUDA random generator's state is restored, so
    the caller's dropout masks do not depend on whether a measurement happened."""
    gen = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else None
    state = gen.get_state() if gen is not None else None
    times: dict[SDPBackend, float | None] = {}
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            q, k, v = (torch.empty_strided(shape, stride, device=device, dtype=dtype).normal_().requires_grad_(grad)
                       for shape, stride in shapes)
            for backend in CANDIDATES:
                times[backend] = _time_kernel(backend, q, k, v, dropout_p, grad)
    finally:
        if gen is not None:
            gen.set_state(state)
    return times


def _time_kernel(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                 grad: bool) -> float | None:
    """Device milliseconds of one call: the calls are queued behind a spin kernel, so they run back to back as in a
    replayed graph and the host's time to issue them (larger for some kernels than others) stays out."""
    def call() -> None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        if grad:
            out.backward(torch.ones_like(out))

    try:
        with sdpa_kernel([backend]):
            call()  # warm-up: plans, workspaces; an unsupported kernel raises here
            torch.cuda.synchronize(q.device)
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize(q.device)
            once = time.perf_counter() - t0
            if once > 0.05:  # a long call: the host's share is negligible, one timing suffices
                return 1000 * once
            repeats = TIMED_REPEATS if once > 2e-3 else 10
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(int(repeats * 5e5))  # about 0.25 ms per call at 2 GHz: the host queues them meanwhile
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeats
    except Exception:  # the kernel refuses these inputs (or fails on them): not a candidate
        return None
    finally:
        for t in (q, k, v):
            t.grad = None


CHOICE = KernelChoice()


@eager  # decided and run eagerly: a compiled block calls it between its compiled halves
def chosen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`` with the kernel measured fastest for the
    call's shape class first in the priority list (CUDA, no mask; otherwise PyTorch's own choice)."""
    if not q.is_cuda or attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    with sdpa_kernel(list(CHOICE.order(q, k, v, dropout_p)), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def choices(used_only: bool = False, reset: bool = False) -> list[dict[str, Any]]:
    """The shape classes decided in this process (``used_only``: those called since the last reset): the kernel
    and, when measured, each kernel's milliseconds. ``reset`` starts a new count of the classes used."""
    out = CHOICE.summary(used_only)
    if reset:
        CHOICE.used.clear()
    return out


@contextlib.contextmanager
def forced_kernel(name: str | None):
    """Run every :func:`chosen_sdpa` with kernel ``name`` (cudnn, flash, efficient, math) first, measuring
    nothing; None leaves the measured choice."""
    previous = CHOICE.forced
    CHOICE.forced = None if name is None else {v: k for k, v in NAMES.items()}[name]
    try:
        yield
    finally:
        CHOICE.forced = previous


def tune_pending() -> bool:
    """Measure the shape classes first met during a graph capture (call with no capture under way); True if a
    recorded graph used an order that is no longer the choice."""
    return CHOICE.tune_pending()
