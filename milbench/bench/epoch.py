"""Whole training epochs from disk: milbench's data path (feature cache, device store, the training loop) beside the
reference's per-slide loading (a DataLoader reading each slide's h5 every epoch), in the same run."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milbench.accel.graphs import StepGraphs, can_graph
from milbench.bench.bags import SCALES, BagSize, nested_coords, parse_bag, random_bag
from milbench.bench.timing import base_record, build_model, compile_mode_for, guarded, sync, warm_up, why
from milbench.data.bag import Bag
from milbench.models.registry import get_card
from milbench.survival.losses import get_loss
from milbench.training.device import DeviceBagStore, default_amp
from milbench.training.steps import bag_loss, train_epoch


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
    sync(device)
    return time.perf_counter() - t0


def milbench_epochs(model: torch.nn.Module, name: str, root: Path, slides: list[str], device: torch.device,
                    epochs: int = 2, grad_accum: int = 32, graphs: bool = True) -> list[float]:
    """Seconds per epoch of milbench's path on the cohort at ``root``: the real data layer (readers, feature cache
    in float16, prepared bags) behind the engine's device store and epoch loop (bf16 autocast on CUDA). The first
    epoch reads every slide from disk; later epochs find the bags on the device."""
    import pandas as pd

    from milbench.data.cache import FeatureCache
    from milbench.tasks.cohort import Cohort
    from milbench.training.datasets import BagDataset
    from milbench.training.device import DeviceBags

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
        sync(device)
        t0 = time.perf_counter()
        train_epoch(model, bags, order, y, c, loss_fn, optim, grad_accum, 1, amp, graphs=step_graphs)
        sync(device)
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
    record: dict[str, Any] = {**base_record(name, size, in_dim, device, "bf16" if device.type == "cuda" else "fp32"),
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
        warm_up(reference, warm, device, torch.float16 if device.type == "cuda" else None)
        record["page_cache"] = drop_page_cache(root)
        seconds = reference_epoch(reference, root, slides, device, workers)
        record["reference"] = {"slides": disk_slides, "seconds": seconds, "slides_per_s": disk_slides / seconds,
                               "model": "eager, float16 autocast" if device.type == "cuda" else "eager, float32"}
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()  # so the device store's budget sees the memory the reference model held

        fast = build_model(name, in_dim, device, compile_mode, backend=backend)
        try:
            warm_up(fast, warm, device, default_amp(device))
        except Exception as err:  # a compiler failure: time the eager model, keep the reason
            record["compile_error"] = why(err)
            torch._dynamo.reset()
            fast = build_model(name, in_dim, device)
            warm_up(fast, warm, device, default_amp(device))
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



def run_epoch(name: str, patients: int, size: str, in_dim: int, device: torch.device, workdir: Path | None = None,
              disk_slides: int = 64, workers: int = 8, compile_mode: str = "auto", graphs: bool = True
              ) -> dict[str, Any]:
    """:func:`bench_epoch`, guarded, in ``workdir`` (a fresh temporary folder by default)."""
    import tempfile

    compile_mode = compile_mode_for(compile_mode, device)
    bag = parse_bag(size)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="milbench-bench-") as tmp:
        return guarded(lambda: bench_epoch(name, patients, bag, in_dim, device, Path(tmp), disk_slides, workers,
                                            compile_mode, graphs=graphs),
                        {"model": name, "bag": bag.name, "kind": "epoch"}, device)
