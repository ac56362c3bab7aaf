"""GPU-hours and wall-clock time of a benchmark before it runs, from measured training-step times at the bag sizes
its feature root holds (the dry run's estimate; nothing is trained).

The step times are a table in this module, **measured on one NVIDIA H200** (2026-12-03; PyTorch 2.11, bf16,
compiled blocks, CUDA graphs; `milbench bench --model ... --bag avg --bag p90 --bag max --in-dim 2048 --device cuda
--dtype bf16 --compile blocks`; ../shared/reference/gpu_anchor_h200.md, docs/performance.md): forward + backward of
one bag, at the paper's bag presets (5x / 10x / 20x patches) avg 895 / 3,449 / 13,496, p90 2,500 / 10,000 / 40,000,
max 8,625 / 34,500 / 137,990. A patient's step is interpolated linearly by its patches at the finest magnification
the model reads (in 20x-equivalents at the presets' 1:4:16 ratio); below the average bag the average bag's time is
taken (small steps are bound by launch overhead, which was not measured smaller), beyond the largest the last
segment is extended. Width 2048 throughout: other widths are taken at the same time (attention, not the input
projection, dominates these steps).

Eight models have no H200 measurement; each is estimated from a measured model named in :data:`PROXIES`, with the
reason. A prediction pass (selection each epoch, the final evaluation) is taken as a third of a training step.
The first epoch's disk read is counted apart, once per cohort and backbone on each GPU (every worker keeps the
slides it read in memory), at 4.4 slides per second: the rate of milbench's first CrossFusion epoch on one H100
(docs/performance.md, "One epoch end to end").
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from milbench.runs.inventory import Inventory

DEVICE = "NVIDIA H200"
PRESETS = {"avg": (895, 3449, 13496), "p90": (2500, 10000, 40000), "max": (8625, 34500, 137990)}  # 5x, 10x, 20x
STEP_MS: dict[str, tuple[float, float, float]] = {  # avg, p90, max; milbench on the H200 (see the module notes)
    "crossfusion": (9.04, 35.04, 292.15),
    "crossfusion_concat": (8.82, 34.70, 291.40),
    "crossfusion_single": (23.02, 136.48, 1476.28),
    "transmil": (6.45, 15.75, 48.51),
    "amil": (0.71, 1.51, 4.04),
}
PROXIES: dict[str, tuple[str, str]] = {  # model -> (measured model whose times it takes, why)
    "dsmil": ("transmil", "DSMIL's kernels took 6.4 ms at the average bag on an H100, about TransMIL's H200 step"),
    "deepgraphsurv": ("transmil", "graph convolutions over the 20x patches, linear in them like TransMIL's "
                                  "Nyström attention"),
    "patchgcn": ("transmil", "graph convolutions over the 20x patches, linear in them like TransMIL's Nyström "
                             "attention"),
    "scmil": ("transmil", "attention over the 20x patches at the input width"),
    "protosurv": ("transmil", "prototype attention over the 20x patches"),
    "zoommil": ("crossfusion", "three magnifications; CrossFusion's step as an upper bound"),
    "csmil": ("crossfusion", "three magnifications; CrossFusion's step as an upper bound"),
    "mustmil": ("crossfusion", "5x and 10x only; CrossFusion's step (which also reads 20x) as an upper bound"),
}
FORWARD_SHARE = 1 / 3  # a prediction pass against a training step (forward + backward)
READ_SLIDES_PER_S = 4.4  # first epoch, CrossFusion, 3 magnifications, one H100 (docs/performance.md)
SCALE_INDEX = {"5x": 0, "10x": 1, "20x": 2}


def step_source(model: str) -> tuple[str, str]:
    """(the model whose measured times are used, "measured" or the proxy's reason); unknown models take
    CrossFusion's, the slowest measured model at the average bag but one."""
    if model in STEP_MS:
        return model, "measured"
    if model in PROXIES:
        return PROXIES[model]
    return "crossfusion", "not a built-in model: CrossFusion's step as a stand-in"


def step_seconds(model: str, scales: Sequence[str], bags: np.ndarray) -> np.ndarray:
    """Training-step seconds of ``model`` for each row of ``bags`` ([patients, len(scales)] patches per scale)."""
    measured, _ = step_source(model)
    finest = max(scales, key=lambda s: SCALE_INDEX[s])
    col = list(scales).index(finest)
    k = SCALE_INDEX[finest]
    ratio = PRESETS["avg"][2] / PRESETS["avg"][k]  # to 20x-equivalents
    x = np.asarray(bags, float).reshape(len(bags), -1)[:, col] * ratio
    xs = np.array([PRESETS[p][k] * ratio for p in ("avg", "p90", "max")])
    ys = np.array(STEP_MS[measured]) / 1000
    t = np.interp(x, xs, ys)  # clamped to the avg time below the avg bag
    beyond = x > xs[-1]
    t[beyond] = ys[-1] + (x[beyond] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return t


@dataclass(frozen=True)
class FoldCost:
    """The estimated compute of one fold job."""

    model: str
    cohort: str
    backbone: str
    protocol: str
    seed: int
    fold: int
    seconds: float


@dataclass
class Estimate:
    """Every fold's compute, the disk reads, and the wall-clock on ``gpus`` GPUs (longest folds first)."""

    folds: list[FoldCost]
    read_seconds: float
    gpus: int
    wall_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return (sum(f.seconds for f in self.folds) + self.read_seconds) / 3600

    def by_model(self) -> pd.DataFrame:
        """Per model: folds, GPU-hours, and where its step times come from."""
        frame = pd.DataFrame([f.__dict__ for f in self.folds])
        if frame.empty:
            return pd.DataFrame(columns=["model", "folds", "gpu_hours", "longest_fold_h", "steps"])
        out = frame.groupby("model", sort=False).agg(folds=("fold", "size"), gpu_hours=("seconds", "sum"),
                                                     longest_fold_h=("seconds", "max")).reset_index()
        out["gpu_hours"] /= 3600
        out["longest_fold_h"] /= 3600
        out["steps"] = [_source_text(m) for m in out.model]
        return out


def _source_text(model: str) -> str:
    measured, why = step_source(model)
    return f"measured ({DEVICE})" if why == "measured" else f"no measurement: {measured}'s as a proxy ({why})"


def makespan(seconds: Sequence[float], gpus: int) -> float:
    """Wall-clock of running these folds on ``gpus`` GPUs, one fold per GPU at a time, longest first."""
    loads = [0.0] * max(1, gpus)
    for s in sorted(seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + s)
    return max(loads)


def fold_seconds(model: str, scales: Sequence[str], inv: Inventory, fold: int, protocol: str, epochs: int,
                 warmup: int, inner_fraction: float) -> float:
    """One fold: ``epochs`` passes over the fitting patients, selection predictions from epoch ``warmup`` on
    (best-val: the held-out patients; inner-val: its share of the training fold), final predictions of the
    held-out and training patients. Patients without all their features are left out (a run would stop or
    exclude them); with none found the paper's average bag stands in for every patient."""
    train, test = inv.folds[fold]
    bags = inv.bags[list(scales)] if not inv.bags.empty else pd.DataFrame(columns=list(scales))
    if bags.empty:
        avg = np.array([[PRESETS["avg"][SCALE_INDEX[s]] for s in scales]])
        per = step_seconds(model, scales, avg)[0]
        s_train, s_test = per * len(train), per * len(test)
    else:
        step = pd.Series(step_seconds(model, scales, bags.to_numpy()), index=bags.index)
        s_train = float(step.reindex(train).dropna().sum())
        s_test = float(step.reindex(test).dropna().sum())
    if protocol == "inner-val":
        fit, select = s_train * (1 - inner_fraction), s_train * inner_fraction
    elif protocol == "best-val":
        fit, select = s_train, s_test
    else:
        fit, select = s_train, 0.0
    passes = max(0, epochs - warmup)
    return epochs * fit + FORWARD_SHARE * (passes * select + s_test + s_train)


def estimate(jobs: Sequence[dict], inventories: dict[tuple[str, str], Inventory], gpus: int) -> Estimate:
    """The estimate of ``jobs``: dicts with model, scales, cohort, backbone, protocol, seed, fold, epochs,
    warmup_epochs and inner_val_fraction (what the benchmark would run)."""
    folds = []
    for j in jobs:
        inv = inventories[(j["cohort"], j["backbone"])]
        seconds = fold_seconds(j["model"], j["scales"], inv, j["fold"], j["protocol"], j["epochs"],
                               j["warmup_epochs"], j["inner_val_fraction"])
        folds.append(FoldCost(j["model"], j["cohort"], j["backbone"], j["protocol"], j["seed"], j["fold"], seconds))
    pairs = {(j["cohort"], j["backbone"]) for j in jobs}
    read = sum(max(inventories[p].found, 0) / READ_SLIDES_PER_S for p in pairs) * max(1, gpus)
    notes = [f"step times measured on one {DEVICE} with compiled blocks and CUDA graphs (`--compile`; without it "
             f"steps take longer); interpolated by bag size; a prediction pass counted as {FORWARD_SHARE:.2f} of a "
             f"step", f"disk reads: {read / 3600:.2f} GPU-h, once per cohort and backbone on each GPU at "
             f"{READ_SLIDES_PER_S} slides/s (one H100, docs/performance.md)"]
    empty = sorted({p[0] for p in pairs if inventories[p].bags.empty})
    if empty:
        notes.append(f"no complete patient found for {', '.join(empty)}: the paper's average bag (13,496 20x "
                     f"patches) stands in for each patient")
    wall = makespan([f.seconds for f in folds], gpus) + read / max(1, gpus)
    return Estimate(folds, read, gpus, wall, notes)
