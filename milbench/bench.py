"""`milbench bench`: training-step time and peak memory per model and bag size, packed-bag throughput, and whole
training epochs from disk beside the reference's per-slide loading. Every speed figure in docs/performance.md is
a number from this module.

A training step is what the engine runs per bag: the half-precision bag (as the feature cache holds it, already
on the device) cast to float32 on the device, forward under autocast, survival loss, backward; gradients are set
to None between steps and the optimizer step (once per 32 bags under the recipe's accumulation) is left out, as
in the anchor measurement (forward + backward of one bag). On CUDA each step is timed with CUDA events and the
median after warm-up is reported; on the CPU with ``time.perf_counter``.

Imports stay lean (torch, h5py, pandas and milbench's own training step): the GPU machine that runs the benchmark
has no scikit-survival or lifelines.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.engine import (DeviceBagStore, _as_float, bag_loss, bag_step, check_pack, default_amp, device_name,
                             model_input, train_epoch)
from milbench.models.blocks import compile_blocks
from milbench.registry import count_parameters, create_model, get_card
from milbench.step_graphs import StepGraphs, can_graph, graph_key
from milbench.survival.losses import get_loss

# Patches at 5x / 10x / 20x (../shared/reference/gpu_anchor_h100.md): the paper's cohort averages, a 90th
# percentile, and the paper's largest 20x bag.
PRESETS: dict[str, tuple[int, int, int]] = {
    "avg": (895, 3_449, 13_496),
    "p90": (2_500, 10_000, 40_000),
    "max": (8_625, 34_500, 137_990),
}
SCALES = ("5x", "10x", "20x")
PATCH_20X = 256  # level-0 side of a 20x patch (base magnification 20x); 10x = 512, 5x = 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# The authors' model code on one H100 at width 2048 (gpu_anchor_h100.md): (model, preset) -> (fp16 step ms,
# fp16 peak GiB, fp32 step ms, fp32 peak GiB). fp16 is the reference's own autocast setting.
ANCHOR_H100: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("amil", "avg"): (2.7, 0.349, 2.86, 0.352), ("amil", "p90"): (2.97, 0.876, 6.51, 0.894),
    ("amil", "max"): (4.29, 2.706, 19.6, 2.834),
    ("dsmil", "avg"): (3.68, 1.584, 2.6, 0.338), ("dsmil", "p90"): (3.16, 0.948, 3.42, 0.867),
    ("dsmil", "max"): (5.69, 3.107, 7.9, 2.83),
    ("transmil", "avg"): (24.99, 1.601, 33.93, 1.766), ("transmil", "p90"): (55.55, 4.403, 86.79, 4.727),
    ("transmil", "max"): (171.18, 14.809, 284.19, 15.884),
    ("crossfusion", "avg"): (36.72, 1.674, 60.12, 1.459), ("crossfusion", "p90"): (89.41, 3.131, 315.6, 3.753),
    ("crossfusion", "max"): (343.22, 9.985, 3114.39, 12.211),
    ("crossfusion_concat", "avg"): (30.22, 1.677, 61.95, 1.477),
    ("crossfusion_concat", "p90"): (62.94, 3.199, 312.85, 3.8),
    ("crossfusion_concat", "max"): (319.51, 10.209, 3103.75, 12.366),
    ("crossfusion_single", "avg"): (143.64, 1.619, 199.65, 1.976),
    ("crossfusion_single", "p90"): (176.46, 4.446, 1395.39, 5.465),
    ("crossfusion_single", "max"): (1557.4, 14.914, 15891.4, 18.233),
}
# The reference's end-to-end rate on the same H100 machine (per-slide .pt loading, 8 workers, cache dropped).
ANCHOR_EPOCH_SLIDES_PER_S = 10.3


@dataclass(frozen=True)
class BagSize:
    """Patches per magnification of a benchmark bag, and the name it was asked for by."""

    name: str
    n5: int
    n10: int
    n20: int

    def at(self, scale: str) -> int:
        return {"5x": self.n5, "10x": self.n10, "20x": self.n20}[scale]


def parse_bag(text: str) -> BagSize:
    """``avg``/``p90``/``max``, a preset scaled down as ``avg/16`` (each count divided, rounded up), ``N20`` (5x
    and 10x at the paper's 1:4:16 ratio) or ``N5,N10,N20``."""
    key = text.strip().lower()
    if key in PRESETS:
        return BagSize(key, *PRESETS[key])
    preset, _, divisor = key.partition("/")
    if preset in PRESETS and divisor.isdigit() and int(divisor) > 0:
        return BagSize(key, *(math.ceil(n / int(divisor)) for n in PRESETS[preset]))
    try:
        parts = [int(p) for p in key.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        n20 = parts[0]
        return BagSize(key, max(1, math.ceil(n20 / 16)), max(1, math.ceil(n20 / 4)), n20)
    if len(parts) == 3 and min(parts) > 0:
        n5, n10, n20 = parts
        if n10 > 4 * n5 or n20 > 16 * n5:
            raise MilbenchError(f"--bag {text}: a 5x patch holds at most 4 10x and 16 20x patches, so N10 <= 4*N5 and "
                                f"N20 <= 16*N5")
        return BagSize(key, n5, n10, n20)
    raise MilbenchError(f"--bag {text!r}: use avg, p90, max (or one scaled down, such as avg/16), a 20x patch count "
                        f"such as 13496, or N5,N10,N20 such as 895,3449,13496")


def nested_coords(size: BagSize) -> dict[str, torch.Tensor]:
    """Level-0 top-left corners on nested CLAM grids: N5 5x patches on a near-square grid, the first N10 of their
    10x and the first N20 of their 20x children in row-major order."""
    cols = max(1, math.ceil(math.sqrt(size.n5)))
    i = np.arange(size.n5)
    c5 = np.stack([(i % cols) * 4 * PATCH_20X, (i // cols) * 4 * PATCH_20X], 1)
    out = {"5x": c5}
    for scale, per, side in (("10x", 2, 2 * PATCH_20X), ("20x", 4, PATCH_20X)):
        dy, dx = np.divmod(np.arange(per * per), per)
        children = (c5[:, None, :] + np.stack([dx * side, dy * side], 1)[None]).reshape(-1, 2)
        order = np.lexsort((children[:, 0], children[:, 1]))  # CLAM's row-major order
        out[scale] = children[order][: size.at(scale)]
    return {s: torch.from_numpy(c.astype(np.int64)) for s, c in out.items()}


def random_bag(name: str, size: BagSize, in_dim: int, device: torch.device, seed: int = 0,
               case_id: str = "bench") -> Bag:
    """A bag for model ``name``: N(0, 1) features of width ``in_dim`` in half precision (as the feature cache holds
    them) on ``device``, at the card's scales, with nested-grid coordinates and the card's extras when it needs them."""
    card = get_card(name)
    gen = torch.Generator(device=device).manual_seed(seed)
    features = {s: torch.randn(size.at(s), in_dim, generator=gen, device=device, dtype=torch.float16)
                for s in card.scales}
    bag = Bag(case_id=case_id, features=features,
              slide_index={s: torch.zeros(size.at(s), dtype=torch.long, device=device) for s in card.scales})
    if card.needs:
        from milbench.data.prepare import prepare_bag

        coords = nested_coords(size)
        cpu = Bag(case_id, {s: f.cpu() for s, f in features.items()}, {s: v.cpu() for s, v in bag.slide_index.items()},
                  {s: coords[s] for s in card.scales})
        bag = prepare_bag(card, cpu).to(device)
    return bag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class _PeakMemory:
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

    def __enter__(self) -> _PeakMemory:
        _sync(self.device)
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
        _sync(self.device)
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


def _time_calls(fn: Callable[[], None], device: torch.device, steps: int, warmup: int,
                peak_over_warmup: bool = False) -> tuple[list[float], int]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` calls, and the peak memory of a call
    (over the timed calls on CUDA, on one more call on the CPU; see :class:`_PeakMemory`). ``peak_over_warmup``
    (CUDA) counts the warm-up calls after the first too: a CUDA graph allocates its memory when it is recorded, not
    replayed; the first call, which compiles (and autotunes) compiled blocks, is a one-off and not counted."""
    if warmup:
        fn()
    with _PeakMemory(device) if peak_over_warmup and device.type == "cuda" else contextlib.nullcontext() as warm:
        for _ in range(warmup - 1):
            fn()
    if device.type == "cuda":
        with _PeakMemory(device) as mem:
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
    with _PeakMemory(device) as mem:
        fn()
    return times, mem.peak


COMPILE_MODES = ("off", "blocks")


def build_model(name: str, in_dim: int, device: torch.device, compile_mode: str = "off", seed: int = 0,
                backend: str = "inductor") -> torch.nn.Module:
    """The model in training mode on ``device``; with ``compile_mode`` "blocks" its ``hot_blocks`` are compiled
    (the engine's fast path)."""
    if compile_mode not in COMPILE_MODES:
        raise MilbenchError(f"--compile {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    torch.manual_seed(seed)
    model = create_model(name, in_dim=in_dim).to(device).train()
    if compile_mode != "off" and compile_blocks(model, backend=backend) == 0:
        compile_mode = "off"  # a model without hot blocks (AMIL, DSMIL ...) runs eagerly
    model.compile_mode = compile_mode
    return model


def _base_record(name: str, size: BagSize, in_dim: int, device: torch.device, dtype: str) -> dict[str, Any]:
    record = {"model": name, "bag": size.name, "n5": size.n5, "n10": size.n10, "n20": size.n20, "in_dim": in_dim,
              "device": str(device), "device_name": device_name(device), "dtype": dtype, "torch": torch.__version__}
    if device.type == "cpu":  # CPU timings depend on what else runs: keep the load beside them
        record.update(torch_threads=torch.get_num_threads(), load_avg_1min=os.getloadavg()[0])
    else:
        record["sdpa_priority"] = _sdpa_priority()
    return record


def _sdpa_priority() -> list[str] | None:
    """PyTorch's current order of scaled_dot_product_attention kernels (which one a call gets first)."""
    from torch.nn.attention import SDPBackend

    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is None:
        return None
    names = {b.value: n.lower() for n, b in SDPBackend.__members__.items()}
    return [names.get(int(i), str(i)) for i in order()]


def _with_compile_fallback(record: dict[str, Any], name: str, in_dim: int, device: torch.device, compile_mode: str,
                           measure: Callable[[torch.nn.Module], dict[str, Any]], backend: str) -> dict[str, Any]:
    """Run ``measure`` on the (compiled) model; if compilation fails, measure the eager model and say why."""
    if compile_mode != "off":
        try:
            model = build_model(name, in_dim, device, compile_mode, backend=backend)
            return {**record, "compile": model.compile_mode, **measure(model)}
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # any compiler failure: fall back to eager, keep the reason
            record["compile_error"] = _why(err)
            torch._dynamo.reset()
    return {**record, "compile": "off", **measure(build_model(name, in_dim, device))}


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"


def bench_step(name: str, size: BagSize, in_dim: int, device: torch.device, dtype: str = "bf16", steps: int = 10,
               warmup: int = 3, compile_mode: str = "off", backend: str = "inductor",
               profile: bool = False, graphs: bool = False) -> dict[str, Any]:
    """Median training-step time (forward + loss + backward of one bag) and peak memory of ``name`` on one bag;
    with ``profile``, where one step's time goes (:func:`profile_step`). With ``graphs`` (CUDA, models that declare
    ``cuda_graphs``) the step is the engine's graphed one (:mod:`milbench.step_graphs`): the first warm-up call runs
    eagerly, the second records the graph, the timed calls replay it; the peak includes the recording."""
    record = _base_record(name, size, in_dim, device, dtype)
    bag = random_bag(name, size, in_dim, device)
    loss_fn = get_loss("nll", alpha=0.2)
    y = torch.tensor([1], device=device)
    c = torch.tensor([0.0], device=device)

    def measure(model: torch.nn.Module) -> dict[str, Any]:
        if hasattr(model, "fit_priors"):  # priors from the training fold in a run; here from the bag, untimed
            model.fit_priors([_as_float(bag)])

        graphed = StepGraphs(model, device) if graphs and can_graph(model, device) else None

        def step() -> None:
            if graphed is None:
                model.zero_grad(set_to_none=True)
                bag_loss(model, model_input(model, bag, DTYPES[dtype]), y, c, loss_fn, DTYPES[dtype]).backward()
            else:
                model.zero_grad(set_to_none=False)
                graphed.run(graph_key(bag), y, c, partial(bag_step, model, bag, loss_fn, DTYPES[dtype], 1))

        times, peak = _time_calls(step, device, steps, warmup, peak_over_warmup=graphed is not None)
        return {"params": count_parameters(model), "steps": steps, "warmup": warmup,
                "cuda_graphs": graphed.stats() if graphed else None,
                "step_ms": statistics.median(times),
                "step_ms_min": min(times), "step_ms_all": [round(t, 3) for t in times], "peak_bytes": peak,
                "peak_kind": _PeakMemory(device).kind, **(profile_step(step, device) if profile else {})}

    return _with_compile_fallback(record, name, in_dim, device, compile_mode, measure, backend)


def profile_step(step: Callable[[], None], device: torch.device, rows: int = 15) -> dict[str, Any]:
    """Where one step's time goes: the host time to issue it (no sync; close to the step time when the host is the
    bottleneck), the summed kernel time on the device, kernel and aten-op counts, torch.compile's graph counters,
    and the top kernels by device time and ops by host time (torch.profiler)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    issue = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        step()
        issue.append(1000 * (time.perf_counter() - t0))
        _sync(device)
    cuda = device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"host_issue_ms": statistics.median(issue),
            "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1000 if cuda else None,
            "kernels": sum(e.count for e in kernels), "aten_ops": sum(e.count for e in events
                                                                      if e.key.startswith("aten::")),
            "compile_stats": dict(counters["stats"]),
            "top_device": events.table(sort_by="self_device_time_total", row_limit=rows) if cuda else "",
            "top_host": events.table(sort_by="self_cpu_time_total", row_limit=rows)}


class _Bags:
    """Benchmark bags behind the engine's ``get(i, as_float)`` interface (index ``i`` cycles through them)."""

    def __init__(self, bags: list[Bag]) -> None:
        self.bags = bags

    def get(self, i: int, as_float: bool = True) -> Bag:
        bag = self.bags[i % len(self.bags)]
        return _as_float(bag) if as_float else bag

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
    record = {**_base_record(name, size, in_dim, device, dtype), "pack": pack, "bags_timed": n_bags,
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

            times, peak = _time_calls(epoch, device, repeats, 1)
            out[f"{label}_bags_per_s"] = n_bags / (min(times) / 1000)
            out[f"{label}_peak_bytes"] = peak
        out["speedup"] = out["packed_bags_per_s"] / out["single_bags_per_s"]
        return out

    return _with_compile_fallback(record, name, in_dim, device, compile_mode, measure, backend)


# ----------------------------------------------------------------------------------------------------------------
# End-to-end epochs: a synthetic cohort on disk, the reference's per-slide loading against milbench's cached path.


def write_cohort(root: Path, n_slides: int, size: BagSize, in_dim: int, device: torch.device, h5: bool = True,
                 seed: int = 0) -> list[str]:
    """``n_slides`` one-slide patients at ``size`` in the CLAM layout, float32 as extractors write them:
    ``x{5,10,20}/pt_files/<slide>.pt`` (features only, as the CrossFusion reference reads them) and, with ``h5``,
    ``x{5,10,20}/h5_files/<slide>.h5`` (features and coords), plus ``cohort.csv``. Returns the slide IDs."""
    import h5py
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    coords = nested_coords(size)
    slides = [f"BENCH-{i:04d}" for i in range(n_slides)]
    gen = torch.Generator(device=device).manual_seed(seed)
    for scale in SCALES:
        for kind in ("pt_files", "h5_files") if h5 else ("pt_files",):
            (root / f"x{scale[:-1]}" / kind).mkdir(parents=True, exist_ok=True)
    for slide in slides:
        for scale in SCALES:
            feats = torch.randn(size.at(scale), in_dim, generator=gen, device=device).cpu()
            folder = root / f"x{scale[:-1]}"
            torch.save(feats, folder / "pt_files" / f"{slide}.pt")
            if h5:
                with h5py.File(folder / "h5_files" / f"{slide}.h5", "w") as f:
                    f.create_dataset("features", data=feats.numpy())
                    f.create_dataset("coords", data=coords[scale].numpy())
    rng = np.random.default_rng(seed)
    pd.DataFrame({"case_id": slides, "slide_id": slides, "survival_months": rng.uniform(1, 100, n_slides).round(2),
                  "censorship": rng.integers(0, 2, n_slides)}).to_csv(root / "cohort.csv", index=False)
    return slides


def drop_page_cache(root: Path) -> str:
    """Evict the cohort's files from the page cache (fsync then POSIX_FADV_DONTNEED per file; no root needed), so
    the next read comes from the disk as on a cohort larger than memory. Returns how."""
    if not hasattr(os, "posix_fadvise"):
        return "not dropped (no posix_fadvise here)"
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "dropped (fsync + POSIX_FADV_DONTNEED per file)"


class _ReferenceSlides(torch.utils.data.Dataset):
    """The reference's loading: three float32 ``.pt`` tensors per slide read with ``torch.load`` at every step."""

    def __init__(self, root: Path, slides: list[str]) -> None:
        self.root, self.slides = root, slides

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {s: torch.load(self.root / f"x{s[:-1]}" / "pt_files" / f"{self.slides[i]}.pt", weights_only=True)
                for s in SCALES}


def reference_epoch(model: torch.nn.Module, root: Path, slides: list[str], device: torch.device, workers: int = 8,
                    grad_accum: int = 32) -> float:
    """Seconds for one epoch the reference's way: a DataLoader (``workers`` processes, prefetch 3, pinned memory,
    batch size 1) of per-slide ``.pt`` files, float16 autocast (no grad scaler), Adam every ``grad_accum`` slides."""
    loader = torch.utils.data.DataLoader(
        _ReferenceSlides(root, slides), batch_size=None, shuffle=True, num_workers=workers,
        prefetch_factor=3 if workers else None, pin_memory=device.type == "cuda")
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = get_loss("nll", alpha=0.2)
    y, c = torch.tensor([1], device=device), torch.tensor([0.0], device=device)
    amp = torch.float16 if device.type == "cuda" else None
    t0 = time.perf_counter()
    for step, feats in enumerate(loader, start=1):
        bag = Bag("ref", {s: f.to(device, non_blocking=True) for s, f in feats.items()})
        (bag_loss(model, bag, y, c, loss_fn, amp) / grad_accum).backward()
        if step % grad_accum == 0 or step == len(slides):
            optim.step()
            optim.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def milbench_epochs(model: torch.nn.Module, name: str, root: Path, slides: list[str], device: torch.device,
                    epochs: int = 2, grad_accum: int = 32, graphs: bool = True) -> list[float]:
    """Seconds per epoch of milbench's path on the cohort at ``root``: the real data layer (readers, feature cache
    in float16, prepared bags) behind the engine's device store and epoch loop (bf16 autocast on CUDA). The first
    epoch reads every slide from disk; later epochs find the bags on the device."""
    import pandas as pd

    from milbench.data.cache import FeatureCache
    from milbench.data.dataset import BagDataset
    from milbench.engine import DeviceBags
    from milbench.tasks.cohort import Cohort

    table = pd.read_csv(root / "cohort.csv", dtype={"case_id": str, "slide_id": str})
    cohort = Cohort(name="bench", table=table, folds={0: (slides[1:], slides[:1])}, features_root=root)
    data = BagDataset(cohort, slides, get_card(name).scales, card=get_card(name), cache=FeatureCache())
    bags = DeviceBags(data, DeviceBagStore(device))
    return _timed_epochs(model, bags, len(slides), device, epochs, grad_accum, default_amp(device), graphs)


def _timed_epochs(model: torch.nn.Module, bags, n: int, device: torch.device, epochs: int, grad_accum: int,
                  amp: torch.dtype | None, graphs: bool = False) -> list[float]:
    """Seconds of each of ``epochs`` epochs of the engine's loop over ``n`` bags (random labels, Adam); with
    ``graphs`` each bag kept on the device has its step graphed, as in training (:mod:`milbench.step_graphs`)."""
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = get_loss("nll", alpha=0.2)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=gen).to(device)
    c = torch.randint(0, 2, (n,), generator=gen).float().to(device)
    step_graphs = StepGraphs(model, device) if graphs and can_graph(model, device) else None
    seconds = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        _sync(device)
        t0 = time.perf_counter()
        train_epoch(model, bags, order, y, c, loss_fn, optim, grad_accum, 1, amp, graphs=step_graphs)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def cached_cohort_epoch(model: torch.nn.Module, name: str, patients: int, size: BagSize, in_dim: int,
                        device: torch.device, grad_accum: int = 32, graphs: bool = True) -> dict[str, Any]:
    """Two epochs of milbench on ``patients`` cached bags of ``size``: the features are generated straight into the
    engine's device store (float16 on the GPU while its budget allows, pinned host memory beyond it) instead of
    being read from disk, which only a run's first epoch does (measured by :func:`milbench_epochs`). With
    ``graphs`` the first epoch records each bag's CUDA graph and the second, the steady state of the other 99
    epochs of the paper's recipe, replays them; ``slides_per_s`` is the last epoch's rate."""
    store = DeviceBagStore(device)
    scales = get_card(name).scales
    gen = torch.Generator(device=device).manual_seed(1)
    on_device = 0
    for i in range(patients):
        nbytes = sum(size.at(s) for s in scales) * in_dim * 2
        keep = store.fits(nbytes)
        try:
            feats = {s: torch.randn(size.at(s), in_dim, generator=gen, device=device, dtype=torch.float16)
                     for s in scales}
        except torch.cuda.OutOfMemoryError:  # the budget was optimistic: the rest goes to pinned host memory
            store.max_bytes, keep = store.nbytes, False
            torch.cuda.empty_cache()
            feats = {s: torch.randn(size.at(s), in_dim, dtype=torch.float16) for s in scales}
        if device.type == "cuda" and not keep:
            feats = {s: torch.empty(f.shape, dtype=f.dtype, pin_memory=True).copy_(f) for s, f in feats.items()}
        on_device += keep
        store.put(i, Bag(f"P{i}", feats))

    class Stored:
        def get(self, i: int, as_float: bool = True) -> Bag:
            return store.fetch(i, _never, as_float)

        def resident(self, i: int) -> bool:
            return store.resident(i)

    first, seconds = _timed_epochs(model, Stored(), patients, device, 2, grad_accum, default_amp(device), graphs)
    return {"patients": patients, "seconds": seconds, "slides_per_s": patients / seconds,
            "first_epoch_s": first, "first_slides_per_s": patients / first, "bags_on_device": on_device,
            "store_bytes": store.nbytes}


def _never() -> Bag:
    raise AssertionError("every benchmark bag is in the store")


def bench_epoch(name: str, patients: int, size: BagSize, in_dim: int, device: torch.device, workdir: Path,
                disk_slides: int = 64, workers: int = 8, compile_mode: str = "off",
                backend: str = "inductor", graphs: bool = True) -> dict[str, Any]:
    """End-to-end epochs of ``name`` on a synthetic cohort, the reference's path and milbench's, in one run.

    1. ``disk_slides`` one-slide patients at ``size`` are written to ``workdir`` (float32 .pt and CLAM .h5).
    2. Reference path, page cache dropped: :func:`reference_epoch` (eager model, float16 autocast).
    3. milbench's path, page cache dropped: :func:`milbench_epochs` (first epoch from disk, second from the cache).
    4. milbench's steady state on ``patients`` patients: :func:`cached_cohort_epoch`.
    The reference's rate is per slide and loading-bound, so the ``disk_slides`` sample gives its epoch rate on any
    cohort size; a 1,000-patient cohort at the average size and width 2048 would need 146 GB of disk per format.
    """
    record: dict[str, Any] = {**_base_record(name, size, in_dim, device, "bf16" if device.type == "cuda" else "fp32"),
                              "kind": "epoch",
                              "disk_slides": disk_slides, "patients": patients, "workers": workers}
    root = Path(workdir) / "bench_cohort"
    if root.exists():
        shutil.rmtree(root)
    try:
        t0 = time.perf_counter()
        slides = write_cohort(root, disk_slides, size, in_dim, device)
        record["write_s"] = time.perf_counter() - t0
        record["disk_bytes"] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

        warm = random_bag(name, size, in_dim, device)
        reference = build_model(name, in_dim, device)
        _warm_up(reference, warm, device, torch.float16 if device.type == "cuda" else None)
        record["page_cache"] = drop_page_cache(root)
        seconds = reference_epoch(reference, root, slides, device, workers)
        record["reference"] = {"slides": disk_slides, "seconds": seconds, "slides_per_s": disk_slides / seconds,
                               "model": "eager, float16 autocast" if device.type == "cuda" else "eager, float32"}
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()  # so the device store's budget sees the memory the reference model held

        fast = build_model(name, in_dim, device, compile_mode, backend=backend)
        try:
            _warm_up(fast, warm, device, default_amp(device))
        except Exception as err:  # a compiler failure: time the eager model, keep the reason
            record["compile_error"] = _why(err)
            torch._dynamo.reset()
            fast = build_model(name, in_dim, device)
            _warm_up(fast, warm, device, default_amp(device))
        record["compile"], record["cuda_graphs"] = fast.compile_mode, bool(graphs and can_graph(fast, device))
        drop_page_cache(root)
        first, second = milbench_epochs(fast, name, root, slides, device, graphs=graphs)
        record["milbench_disk"] = {"slides": disk_slides, "first_epoch_s": first,
                                   "first_slides_per_s": disk_slides / first,
                                   "second_epoch_s": second, "second_slides_per_s": disk_slides / second}
        del warm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record["milbench_cached"] = cached_cohort_epoch(fast, name, patients, size, in_dim, device, graphs=graphs)
        ref_rate = record["reference"]["slides_per_s"]
        record["speedup_steady"] = record["milbench_cached"]["slides_per_s"] / ref_rate
        # over the paper's 100 epochs: milbench reads each slide once (first-epoch rate), then trains from memory
        per_slide = 1 / record["milbench_disk"]["first_slides_per_s"] + 99 / record["milbench_cached"]["slides_per_s"]
        record["speedup_100_epochs"] = (100 / ref_rate) / per_slide
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return record


def _warm_up(model: torch.nn.Module, bag: Bag, device: torch.device, amp: torch.dtype | None, steps: int = 2) -> None:
    """A few training steps on ``bag`` (compilation, cuBLAS/cuDNN set-up) before anything is timed."""
    loss_fn = get_loss("nll", alpha=0.2)
    y, c = torch.tensor([1], device=device), torch.tensor([0.0], device=device)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        bag_loss(model, model_input(model, bag, amp), y, c, loss_fn, amp).backward()
    model.zero_grad(set_to_none=True)
    _sync(device)


# ----------------------------------------------------------------------------------------------------------------
# Driver: every measurement guarded, so one failure (out of memory, a compiler error) never stops the rest


SDPA_BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def sdpa_preference(name: str):
    """A context preferring one scaled_dot_product_attention kernel (the others stay as fallbacks, in PyTorch's
    order): the same function, another implementation; "default" leaves PyTorch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in SDPA_BACKENDS:
        raise MilbenchError(f"--sdpa {name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    if name == "default":
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([first] + [b for b in order if b != first], set_priority=True)


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
    compile_mode = _compile_mode(compile_mode, device)
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
                    record = _guarded(lambda: bench_packed(name, size, in_dim, device, pack, dtype,
                                                           compile_mode=compile_mode) if pack else
                                      bench_step(name, size, in_dim, device, dtype, steps, warmup, compile_mode,
                                                 profile=profile, graphs=graphs),
                                      {"model": name, "bag": size.name, "device": str(device)}, device)
                record["sdpa"] = sdpa
            records.append(record)
            if report:
                report(record)
    return records


def run_epoch(name: str, patients: int, size: str, in_dim: int, device: torch.device, workdir: Path | None = None,
              disk_slides: int = 64, workers: int = 8, compile_mode: str = "auto", graphs: bool = True
              ) -> dict[str, Any]:
    """:func:`bench_epoch`, guarded, in ``workdir`` (a fresh temporary folder by default)."""
    import tempfile

    compile_mode = _compile_mode(compile_mode, device)
    bag = parse_bag(size)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="milbench-bench-") as tmp:
        return _guarded(lambda: bench_epoch(name, patients, bag, in_dim, device, Path(tmp), disk_slides, workers,
                                            compile_mode, graphs=graphs),
                        {"model": name, "bag": bag.name, "kind": "epoch"}, device)


def _compile_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "blocks" if device.type == "cuda" else "off"
    if mode not in COMPILE_MODES:
        raise MilbenchError(f"--compile {mode!r}: use auto or one of {', '.join(COMPILE_MODES)}")
    return mode


def _guarded(measure: Callable[[], dict[str, Any]], what: dict[str, Any], device: torch.device) -> dict[str, Any]:
    try:
        return measure()
    except Exception as err:  # report and go on: one failure must not cost the rest of a GPU session
        return {**what, "error": _why(err)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Reports


def one_line(record: dict[str, Any]) -> str:
    """A progress line for one record."""
    head = f"{record.get('model')} {record.get('bag', '')}"
    if "error" in record or "skipped" in record:
        return f"{head}: {record.get('error') or record.get('skipped')}"
    if "speedup" in record:
        return (f"{head}: {record['single_bags_per_s']:.1f} bags/s one per step, {record['packed_bags_per_s']:.1f} "
                f"packed by {record['pack']} ({record['speedup']:.1f}x)")
    if "step_ms" in record:
        return (f"{head}: {record['step_ms']:.2f} ms per step, peak {_gib(record['peak_bytes'])} GiB "
                f"({record['peak_kind']})")
    return head


def _graph_cell(stats: dict[str, Any] | None) -> str:
    """'replayed' when the timed steps replayed a graph, 'off' without graphs, else why not."""
    if not stats:
        return "off"
    return f"off: {stats['off']}" if stats.get("off") else ("replayed" if stats["replayed"] else "not replayed")


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """Markdown tables of benchmark records: step times (beside the H100 anchor where it applies), packed
    throughput, end-to-end epochs, and one line per failed or skipped measurement."""
    lines: list[str] = []
    steps = [r for r in records if "step_ms" in r]
    if steps:
        lines += ["| model | bag (5x/10x/20x) | device | dtype | compile | CUDA graph | step ms (median) | peak GiB "
                  "| anchor fp16 ms | anchor fp16 GiB | speed-up |", "|" + "---|" * 11]
        for r in steps:
            anchor = ANCHOR_H100.get((r["model"], r["bag"])) if r["device"].startswith("cuda") else None
            speed = f"{anchor[0] / r['step_ms']:.1f}x" if anchor and r["in_dim"] == 2048 else "-"
            peak = _gib(r["peak_bytes"]) if r["peak_kind"] == "cuda_max_allocated" else \
                f"{_gib(r['peak_bytes'])} ({r['peak_kind']})"
            lines.append(f"| {r['model']} | {r['bag']} ({r['n5']}/{r['n10']}/{r['n20']}) | {r['device_name']} | "
                         f"{r['dtype']} | {r['compile']} | {_graph_cell(r.get('cuda_graphs'))} | "
                         f"{r['step_ms']:.2f} | {peak} | "
                         f"{anchor[0] if anchor else '-'} | {anchor[1] if anchor else '-'} | {speed} |")
        lines.append("")
    packed = [r for r in records if "speedup" in r]
    if packed:
        lines += ["| model | bag | device | pack | one bag per step (bags/s) | packed (bags/s) | speed-up "
                  "| anchor one-bag fp16 (bags/s) | packed vs anchor | peak GiB single / packed |",
                  "|" + "---|" * 10]
        for r in packed:
            anchor = ANCHOR_H100.get((r["model"], r["bag"])) if r["device"].startswith("cuda") else None
            rate, ratio = "-", "-"
            if anchor and r["in_dim"] == 2048:  # the anchor's one-bag step, forward + backward only
                rate, ratio = f"{1000 / anchor[0]:.0f}", f"{r['packed_bags_per_s'] * anchor[0] / 1000:.1f}x"
            lines.append(f"| {r['model']} | {r['bag']} | {r['device_name']} | {r['pack']} | "
                         f"{r['single_bags_per_s']:.1f} | {r['packed_bags_per_s']:.1f} | {r['speedup']:.1f}x | "
                         f"{rate} | {ratio} | {_gib(r['single_peak_bytes'])} / {_gib(r['packed_peak_bytes'])} |")
        lines.append("")
    profiled = [r for r in records if "host_issue_ms" in r]
    if profiled:
        lines += ["| model | bag | compile | attention kernel preferred | step ms | host issue ms | device busy ms "
                  "| kernels | aten ops |", "|" + "---|" * 9]
        for r in profiled:
            busy = "-" if r["device_busy_ms"] is None else f"{r['device_busy_ms']:.2f}"
            lines.append(f"| {r['model']} | {r['bag']} | {r['compile']} | {r.get('sdpa', 'default')} | "
                         f"{r['step_ms']:.2f} | {r['host_issue_ms']:.2f} | {busy} | {r['kernels']} | "
                         f"{r['aten_ops']} |")
        lines.append("")
        for r in profiled:
            lines += [f"{r['model']} {r['bag']}, compile {r['compile']}, attention {r.get('sdpa', 'default')}:", "",
                      "```", r["top_device"], r["top_host"], "```", ""]
    for r in (r for r in records if r.get("kind") == "epoch" and "milbench_cached" in r):
        ref, disk, cached = r["reference"], r["milbench_disk"], r["milbench_cached"]
        lines += [f"End to end, {r['model']} at {r['bag']} bags, width {r['in_dim']}, {r['device_name']} "
                  f"(page cache {r['page_cache']}):", "",
                  "| path | slides | seconds | slides per second |", "|---|---|---|---|",
                  f"| reference: per-slide .pt files each step ({r['workers']} workers), {ref['model']} | "
                  f"{ref['slides']} | {ref['seconds']:.1f} | {ref['slides_per_s']:.1f} |",
                  f"| milbench, first epoch (reads disk into the cache) | {disk['slides']} | "
                  f"{disk['first_epoch_s']:.1f} "
                  f"| {disk['first_slides_per_s']:.1f} |",
                  f"| milbench, second epoch (cached) | {disk['slides']} | {disk['second_epoch_s']:.1f} | "
                  f"{disk['second_slides_per_s']:.1f} |",
                  f"| milbench, first epoch of {cached['patients']} cached patients ({cached['bags_on_device']} on "
                  f"the GPU{'; records the CUDA graphs' if r.get('cuda_graphs') else ''}) | {cached['patients']} | "
                  f"{cached['first_epoch_s']:.1f} | {cached['first_slides_per_s']:.1f} |",
                  f"| milbench, next epoch of the same patients"
                  f"{' (replays the graphs)' if r.get('cuda_graphs') else ''} | {cached['patients']} | {cached['seconds']:.1f} | {cached['slides_per_s']:.1f} |", "",
                  f"Steady-state speed-up {r['speedup_steady']:.1f}x; over 100 epochs (one read, 99 cached) "
                  f"{r['speedup_100_epochs']:.1f}x.", ""]
    for r in records:
        if "error" in r or "compile_error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped") or f"compile failed, eager measured: {r['compile_error']}"
            lines.append(f"- {r.get('model')} {r.get('bag', '')}: {why}")
    return "\n".join(lines) + "\n"
