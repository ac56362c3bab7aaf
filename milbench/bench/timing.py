"""How a benchmark measures: models built as training builds them, warm-up, timed calls (CUDA events on a GPU),
peak memory (device allocator or process RSS), the attention kernel preference, and failures kept as records."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from milbench import MilbenchError
from milbench.accel.compile import compile_blocks
from milbench.accel.rewrites import accelerate
from milbench.bench.bags import BagSize
from milbench.data.bag import Bag
from milbench.models.registry import create_model
from milbench.survival.losses import get_loss
from milbench.training.device import model_input
from milbench.training.provenance import device_name
from milbench.training.steps import bag_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class PeakMemory:
    """Peak memory over a region: ``torch.cuda.max_memory_allocated`` on CUDA (absolute: weights and inputs
    included, as in the anchor). On the CPU, the rise of the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) over the resident set at the start: the region's working memory (activations,
    gradients, the float32 copy of the features), weights and inputs excluded. glibc keeps freed memory mapped, so
    inside the region large blocks come from (and return to) the kernel (mmap threshold 1 MiB, after a trim);
    that slows allocation, so on the CPU memory is measured on one extra call after the timed ones, and the
    threshold is set back to glibc's largest dynamic value (32 MiB) after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak_rise"

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import ctypes

            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except (OSError, AttributeError):
            self.kind = "rss_process_peak"  # no reset possible: the process's peak so far
        self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            high = _status_bytes("VmHWM")
            self.peak = high if self.kind == "rss_process_peak" else max(0, high - self.start)
            if self.kind == "rss_peak_rise":
                self.libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _status_bytes(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def time_calls(fn: Callable[[], None], device: torch.device, steps: int, warmup: int,
                peak_over_warmup: bool = False) -> tuple[list[float], int]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` calls, and the peak memory of a call
    (over the timed calls on CUDA, on one more call on the CPU; see :class:`PeakMemory`). ``peak_over_warmup``
    (CUDA) counts the warm-up calls after the first too: a CUDA graph allocates its memory when it is recorded, not
    replayed; the first call, which compiles (and autotunes) compiled blocks, is a one-off and not counted."""
    if warmup:
        fn()
    with PeakMemory(device) if peak_over_warmup and device.type == "cuda" else contextlib.nullcontext() as warm:
        for _ in range(warmup - 1):
            fn()
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(steps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events], max(mem.peak, warm.peak if warm else 0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    with PeakMemory(device) as mem:
        fn()
    return times, mem.peak


COMPILE_MODES = ("off", "blocks")


def build_model(name: str, in_dim: int, device: torch.device, compile_mode: str = "off", seed: int = 0,
                backend: str = "inductor") -> torch.nn.Module:
    """The model in training mode on ``device`` with training's speed rewrites; with ``compile_mode`` "blocks" the
    blocks its card names are compiled (training's ``--compile``)."""
    if compile_mode not in COMPILE_MODES:
        raise MilbenchError(f"--compile {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    torch.manual_seed(seed)
    model = create_model(name, in_dim=in_dim).to(device).train()
    accelerate(model)
    if compile_mode != "off" and compile_blocks(model, backend=backend) == 0:
        compile_mode = "off"  # a model without hot blocks (AMIL, DSMIL ...) runs eagerly
    model.compile_mode = compile_mode
    return model


def base_record(name: str, size: BagSize, in_dim: int, device: torch.device, dtype: str) -> dict[str, Any]:
    record = {"model": name, "bag": size.name, "n5": size.n5, "n10": size.n10, "n20": size.n20, "in_dim": in_dim,
              "device": str(device), "device_name": device_name(device), "dtype": dtype, "torch": torch.__version__}
    if device.type == "cpu":  # CPU timings depend on what else runs: keep the load beside them
        record.update(torch_threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0])
    else:
        record["sdpa_priority"] = sdpa_priority()
    return record


def sdpa_priority() -> list[str] | None:
    """PyTorch's current order of scaled_dot_product_attention kernels (which one a call gets first)."""
    from torch.nn.attention import SDPBackend

    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is None:
        return None
    names = {b.value: n.lower() for n, b in SDPBackend.__members__.items()}
    return [names.get(int(i), str(i)) for i in order()]


def with_compile_fallback(record: dict[str, Any], name: str, in_dim: int, device: torch.device, compile_mode: str,
                           measure: Callable[[torch.nn.Module], dict[str, Any]], backend: str) -> dict[str, Any]:
    """Run ``measure`` on the (compiled) model; if compilation fails, measure the eager model and say why."""
    if compile_mode != "off":
        try:
            model = build_model(name, in_dim, device, compile_mode, backend=backend)
            return {**record, "compile": model.compile_mode, **measure(model)}
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # any compiler failure: fall back to eager, keep the reason
            record["compile_error"] = why(err)
            torch._dynamo.reset()
    return {**record, "compile": "off", **measure(build_model(name, in_dim, device))}


def why(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"



def warm_up(model: torch.nn.Module, bag: Bag, device: torch.device, amp: torch.dtype | None, steps: int = 2) -> None:
    """A few training steps on ``bag`` (compilation, cuBLAS/cuDNN set-up) before anything is timed."""
    loss_fn = get_loss("nll", alpha=0.2)
    y, c = torch.tensor([1], device=device), torch.tensor([0.0], device=device)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        bag_loss(model, model_input(model, bag, amp), y, c, loss_fn, amp).backward()
    model.zero_grad(set_to_none=True)
    sync(device)


# ----------------------------------------------------------------------------------------------------------------
# Driver: every measurement guarded, so one failure (out of memory, a compiler error) never stops the rest


SDPA_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def sdpa_preference(name: str):
    """A context preferring one scaled_dot_product_attention kernel (the others stay as fallbacks, in PyTorch's
    order), also for the attention that otherwise runs the kernel measured fastest per shape
    (:mod:`milbench.accel.attention`): the same function, another implementation; "default" leaves the choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from milbench.accel.attention import forced_kernel

    if name not in SDPA_BACKENDS:
        raise MilbenchError(f"--sdpa {name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    if name == "default":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([first] + [b for b in order if b != first], set_priority=True))
    stack.enter_context(forced_kernel(name))
    return stack


def compile_mode_for(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "blocks" if device.type == "cuda" else "off"
    if mode not in COMPILE_MODES:
        raise MilbenchError(f"--compile {mode!r}: use auto or one of {', '.join(COMPILE_MODES)}")
    return mode


def guarded(measure: Callable[[], dict[str, Any]], what: dict[str, Any], device: torch.device) -> dict[str, Any]:
    try:
        return measure()
    except Exception as err:  # report and go on: one failure must not cost the rest of a GPU session
        return {**what, "error": why(err)}
    finally:
        # a model held only by reference cycles (a compiled block's forward refers back to its module) would still
        # hold its weights, gradients and graphs in the next measurement's absolute peak
        gc.collect()
        if device.type == "cuda":
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:  # workspaces of streams the next measurement may not use: not its memory
                clear()
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Reports
