"""Training-step time and peak memory per model and bag size, and packed-bag throughput.

A training step is what training runs per bag: the half-precision bag (as the feature cache holds it, already on
the device) cast to float32 on the device, forward under autocast, survival loss, backward; gradients are set to
None between steps and the optimizer step (once per 32 bags under the recipe's accumulation) is left out, as in the
anchor measurement (forward + backward of one bag). On CUDA each step is timed with CUDA events and the median after
warm-up is reported; on the CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from functools import partial
from typing import Any, Callable

import torch

from milbench import MilbenchError
from milbench.accel.attention import choices
from milbench.accel.graphs import StepGraphs, can_graph, graph_key
from milbench.bench.bags import DTYPES, BagSize, parse_bag, random_bag
from milbench.bench.timing import (
    PeakMemory,
    base_record,
    compile_mode_for,
    guarded,
    sdpa_preference,
    sync,
    time_calls,
    with_compile_fallback,
)
from milbench.data.bag import Bag
from milbench.models.registry import count_parameters, get_card
from milbench.survival.losses import get_loss
from milbench.training.device import float_bag, model_input
from milbench.training.steps import bag_loss, bag_step, check_pack, train_epoch


def bench_step(name: str, size: BagSize, in_dim: int, device: torch.device, dtype: str = "bf16", steps: int = 10,
               warmup: int = 3, compile_mode: str = "off", backend: str = "inductor",
               profile: bool = False, graphs: bool = False) -> dict[str, Any]:
    """Median training-step time (forward + loss + backward of one bag) and peak memory of ``name`` on one bag;
    with ``profile``, where one step's time goes (:func:`profile_step`). With ``graphs`` (CUDA, models that declare
    ``cuda_graphs``) the step is the engine's graphed one (:mod:`milbench.step_graphs`): the first warm-up call runs
    eagerly, the second records the graph, the timed calls replay it; the peak includes the recording."""
    record = base_record(name, size, in_dim, device, dtype)
    bag = random_bag(name, size, in_dim, device)
    loss_fn = get_loss("nll", alpha=0.2)
    y = torch.tensor([1], device=device)
    c = torch.tensor([0.0], device=device)

    def measure(model: torch.nn.Module) -> dict[str, Any]:
        if hasattr(model, "fit_priors"):  # priors from the training fold in a run; here from the bag, untimed
            model.fit_priors([float_bag(bag)])

        graphed = StepGraphs(model, device) if graphs and can_graph(model, device) else None

        def step() -> None:
            if graphed is None:
                model.zero_grad(set_to_none=True)
                bag_loss(model, model_input(model, bag, DTYPES[dtype]), y, c, loss_fn, DTYPES[dtype]).backward()
            else:  # zeroed in place as the optimizer does it (one multi-tensor kernel; in training once per 32 bags)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads:
                    torch._foreach_zero_(grads)
                graphed.run(graph_key(bag), y, c, partial(bag_step, model, bag, loss_fn, DTYPES[dtype], 1))

        choices(reset=True)
        times, peak = time_calls(step, device, steps, warmup, peak_over_warmup=graphed is not None)
        return {"params": count_parameters(model), "steps": steps, "warmup": warmup,
                "cuda_graphs": graphed.stats() if graphed else None,
                "execution": {"attention": choices(used_only=True)} if device.type == "cuda" else {},
                "step_ms": statistics.median(times),
                "step_ms_min": min(times), "step_ms_all": [round(t, 3) for t in times], "peak_bytes": peak,
                "peak_kind": PeakMemory(device).kind, **(profile_step(step, device) if profile else {})}

    return with_compile_fallback(record, name, in_dim, device, compile_mode, measure, backend)


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 15) -> dict[str, Any]:
    """Where one step's time goes: the host time to issue it (no sync; close to the step time when the host is the
    bottleneck), the summed kernel time on the device, kernel and aten-op counts, torch.compile's graph counters,
    and the top kernels by device time and ops by host time (torch.profiler)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    issue = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        step()
        issue.append(1000 * (time.perf_counter() - t0))
        sync(device)
    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.key)] = by_kind.get(kernel_kind(e.key), 0.0) + e.self_device_time_total / 1000
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    return {"host_issue_ms": statistics.median(issue),
            "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1000 if cuda else None,
            "device_by_kind_ms": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[e.key[:110], e.count, round(e.self_device_time_total / 1000, 3)] for e in top],
            "kernels": sum(e.count for e in kernels), "aten_ops": sum(e.count for e in events
                                                                      if e.key.startswith("aten::")),
            "compile_stats": dict(counters["stats"]),
            "top_device": events.table(sort_by="self_device_time_total", row_limit=rows) if cuda else "",
            "top_host": events.table(sort_by="self_cpu_time_total", row_limit=rows)}


def kernel_kind(name: str) -> str:
    """A CUDA kernel's kind from its name: attention forward / backward, matrix product, convolution, Fourier
    transform, compiled (Triton), copy, element-wise, reduction, other."""
    n = name.lower()
    if any(s in n for s in ("sdpa", "fmha", "flash", "attention")):
        return "attention_bwd" if any(s in n for s in ("bprop", "bwd", "backward")) else "attention_fwd"
    if any(s in n for s in ("conv", "dgrad", "wgrad", "depthwise")):
        return "conv"
    if "fft" in n:
        return "fft"
    if n.startswith("triton"):
        return "triton"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk")):
        return "gemm"
    if "copy" in n:
        return "copy"
    if "reduce" in n:
        return "reduce"
    if "elementwise" in n:
        return "elementwise"
    return "other"


class _Bags:
    """Benchmark bags behind the engine's ``get(i, as_float)`` interface (index ``i`` cycles through them)."""

    def __init__(self, bags: list[Bag]) -> None:
        self.bags = bags

    def get(self, i: int, as_float: bool = True) -> Bag:
        bag = self.bags[i % len(self.bags)]
        return float_bag(bag) if as_float else bag

    def resident(self, i: int) -> bool:
        return True


def bench_packed(name: str, size: BagSize, in_dim: int, device: torch.device, pack: int, dtype: str = "bf16",
                 n_bags: int | None = None, grad_accum: int = 32, repeats: int | None = None,
                 compile_mode: str = "off", backend: str = "inductor") -> dict[str, Any]:
    """Training throughput (bags per second) of one bag per step against ``pack`` bags per forward pass.

    Both run the engine's epoch loop (:func:`milbench.engine.train_epoch`) over ``n_bags`` bags (``pack`` distinct
    random bags of ``size``, cycled) with Adam stepping every ``grad_accum`` bags: forward, loss, backward and the
    optimizer, as in training. The best of ``repeats`` timed passes after one warm-up pass (by default 256 bags and
    3 passes on CUDA, 64 and 1 on the CPU).
    """
    cuda = device.type == "cuda"
    n_bags, repeats = n_bags or (256 if cuda else 64), repeats or (3 if cuda else 1)
    record = {**base_record(name, size, in_dim, device, dtype), "pack": pack, "bags_timed": n_bags,
              "grad_accum": grad_accum}
    bags = _Bags([random_bag(name, size, in_dim, device, seed=i) for i in range(pack)])
    # packed training stores the bags in the autocast dtype (engine.DeviceBagStore's dtype), one bag at a time
    packed_bags = _Bags([replace(b, features={k: v.to(DTYPES[dtype] or v.dtype) for k, v in b.features.items()})
                         for b in bags.bags])
    loss_fn = get_loss("nll", alpha=0.2)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n_bags,), generator=gen).to(device)
    c = torch.randint(0, 2, (n_bags,), generator=gen).float().to(device)
    order = list(range(n_bags))

    def measure(model: torch.nn.Module) -> dict[str, Any]:
        check_pack(model, name, pack, grad_accum)
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)
        out: dict[str, Any] = {"params": count_parameters(model)}
        for label, per_pass in (("single", 1), ("packed", pack)):
            held = bags if per_pass == 1 or DTYPES[dtype] is None else packed_bags

            def epoch() -> None:
                train_epoch(model, held, order, y, c, loss_fn, optim, grad_accum, per_pass, DTYPES[dtype])

            times, peak = time_calls(epoch, device, repeats, 1)
            out[f"{label}_bags_per_s"] = n_bags / (min(times) / 1000)
            out[f"{label}_peak_bytes"] = peak
        out["speedup"] = out["packed_bags_per_s"] / out["single_bags_per_s"]
        return out

    return with_compile_fallback(record, name, in_dim, device, compile_mode, measure, backend)


# ----------------------------------------------------------------------------------------------------------------
# End-to-end epochs: a synthetic cohort on disk, the reference's per-slide loading against milbench's cached path.



def run(models: list[str], bags: list[str], in_dim: int, device: torch.device, dtype: str | None = None,
        steps: int | None = None, warmup: int | None = None, compile_mode: str = "auto", pack: int = 0,
        budget_s: float | None = None, report: Callable[[dict[str, Any]], None] | None = None,
        sdpa: str = "default", profile: bool = False, graphs: bool = True) -> list[dict[str, Any]]:
    """Step times (or, with ``pack``, packed throughput) of every model at every bag size; defaults per device:
    bf16, compiled hot blocks, 10 steps after 3 warm-up on CUDA; float32, eager, 3 steps after 1 on the CPU.
    ``compile_mode``: auto (blocks on CUDA, off on the CPU), off or blocks; ``sdpa``: the attention kernel
    preferred (see :func:`sdpa_preference`); ``graphs``: replay each step from a CUDA graph as training does
    (:func:`bench_step`; not the packed throughput, which compares eager steps)."""
    cuda = device.type == "cuda"
    dtype = dtype or ("bf16" if cuda else "fp32")
    if dtype not in DTYPES:
        raise MilbenchError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    steps, warmup = steps or (10 if cuda else 3), (3 if cuda else 1) if warmup is None else warmup
    compile_mode = compile_mode_for(compile_mode, device)
    sizes = [parse_bag(b) for b in bags]
    sdpa_preference(sdpa)
    for name in models:
        get_card(name)  # unknown names fail before anything runs
    t0 = time.perf_counter()
    records = []
    for name in models:
        for size in sizes:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                record = {"model": name, "bag": size.name, "skipped": f"time budget of {budget_s:.0f} s spent"}
            else:
                with sdpa_preference(sdpa):
                    record = guarded(lambda: bench_packed(name, size, in_dim, device, pack, dtype,
                                                           compile_mode=compile_mode) if pack else
                                      bench_step(name, size, in_dim, device, dtype, steps, warmup, compile_mode,
                                                 profile=profile, graphs=graphs),
                                      {"model": name, "bag": size.name, "device": str(device)}, device)
                record["sdpa"] = sdpa
            records.append(record)
            if report:
                report(record)
    return records
