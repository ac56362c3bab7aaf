"""The authors' model code timed on this GPU, as ../shared/reference/gpu_anchor_h200.md measured it.

The CrossFusion repository's ``models/`` (and ``utils/train_utils.py`` for its NLL survival loss) are imported from
a folder given on the command line, never from this project: fetch RustinS/CrossFusion and point ``--ref`` at a
checkout (or an extracted copy) of it. Each model is built as the repository's ``train.py`` builds it (embed 512,
4 heads, 1 attention layer, backbone width 2048, 4 bins; AMIL gated; moved to the GPU; ``--data-parallel`` adds
train.py's ``DataParallel`` wrapper, which on one GPU costs host time only) and trained as its
``train_single_epoch`` does: float32 features of one bag (batch 1) moved to the GPU inside ``torch.amp.autocast('cuda', dtype=float16)`` (what train.sh's ``--bfloat16 1``
selects), no grad scaler, the NLL survival loss, loss divided by the accumulation steps, backward. One step = forward + backward of one bag;
gradients set to None before each step (the optimizer step, once per 32 bags, is left out). Timed with CUDA
events, the median of ``--steps`` after ``--warmup`` untimed steps; peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (absolute: weights, gradients and the bag included).

    python scripts/anchor_h200.py --ref /path/to/CrossFusion --out anchor.jsonl \
        --model crossfusion --model amil --bag avg --bag p90 --bag max

One JSON line per model and bag (an ``error`` line when a measurement fails, e.g. out of memory); bag presets as
``milbench bench --bag`` (avg / p90 / max, or N5,N10,N20), features N(0, 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {"avg": (895, 3_449, 13_496), "p90": (2_500, 10_000, 40_000), "max": (8_625, 34_500, 137_990)}
MODELS = {  # milbench name -> (the repository's module, class)
    "crossfusion": ("models.CrossFusion", "CrossFusion"),
    "crossfusion_concat": ("models.CrossFusionConcat", "CrossFusionConcat"),
    "crossfusion_single": ("models.CrossFusionSingle", "CrossFusionSingle"),
    "transmil": ("models.TransMIL", "TransMIL"),
    "amil": ("models.AMIL", "AMIL"),
    "dsmil": ("models.DSMIL", "DSMIL"),
}


def parse_bag(text: str) -> tuple[int, int, int]:
    if text in PRESETS:
        return PRESETS[text]
    n5, n10, n20 = (int(p) for p in text.split(","))
    return n5, n10, n20


def build(name: str, ref: Path, in_dim: int, data_parallel: bool = False):
    """The model as train.py's build_model builds it (opts: embed_dim 512, num_heads 4, num_attn_layers 1); train.py
    also wraps it in ``DataParallel``, which on one GPU only adds host work per step (``data_parallel``)."""
    import importlib

    import torch

    module, cls = MODELS[name]
    model_cls = getattr(importlib.import_module(module), cls)
    if name.startswith("crossfusion"):
        model = model_cls(embed_dim=512, num_heads=4, num_layers=1, backbone_dim=in_dim, n_classes=4)
    elif name == "amil":
        model = model_cls(backbone_dim=in_dim, n_classes=4, gate=True)
    else:
        model = model_cls(backbone_dim=in_dim, n_classes=4)
    model = model.cuda()
    return torch.nn.DataParallel(model) if data_parallel else model


def measure(name: str, bag: str, ref: Path, in_dim: int, steps: int, warmup: int, grad_accum: int,
            data_parallel: bool = False) -> dict:
    import torch
    from utils.train_utils import (
        NLLSurvLoss,  # the repository's loss (its folder is on sys.path: main)
    )

    torch.manual_seed(0)
    model = build(name, ref, in_dim, data_parallel).train()
    loss_fn = NLLSurvLoss(alpha=0.15)
    n5, n10, n20 = parse_bag(bag)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # the DataLoader's batch of one slide: float32 [1, N, D] per magnification (here already on the GPU; .to() is a
    # no-op, as the copy is not what is timed)
    x5, x10, x20 = (torch.randn(1, n, in_dim, generator=gen, device="cuda") for n in (n5, n10, n20))
    label = torch.tensor([1], device="cuda")
    censorship = torch.tensor([0.0], device="cuda")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.amp.autocast("cuda", dtype=torch.float16):
            hazards, S, _, _, _ = model(x5.to("cuda"), x10.to("cuda"), x20.to("cuda"))
            loss = loss_fn(hazards=hazards, S=S, Y=label, c=censorship)
            loss = loss / grad_accum
            loss.backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    return {"step_ms": statistics.median(times), "step_ms_all": [round(t, 3) for t in times],
            "peak_bytes": int(torch.cuda.max_memory_allocated()),
            "params": sum(p.numel() for p in model.parameters())}


def ref_commit(ref: Path) -> str | None:
    """The checkout's commit, or the one a COMMIT file beside models/ names (an extracted copy)."""
    if (ref / "COMMIT").is_file():
        return (ref / "COMMIT").read_text().strip() or None
    try:
        return subprocess.run(["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", type=Path, required=True, help="the CrossFusion repository (holds models/, utils/)")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="repeat; default: all")
    parser.add_argument("--bag", action="append", help="avg | p90 | max | N5,N10,N20; repeat (default avg p90 max)")
    parser.add_argument("--in-dim", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=32)
    parser.add_argument("--out", type=Path, help="append one JSON line per measurement")
    parser.add_argument("--data-parallel", action="store_true",
                        help="wrap in DataParallel as train.py does (on one GPU: host work only; off by default, as "
                             "gpu_anchor_h200.md measured the model code itself)")
    args = parser.parse_args()

    import torch

    ref = args.ref.resolve()
    if not (ref / "models" / "CrossFusion.py").is_file():
        parser.error(f"--ref {ref}: no models/CrossFusion.py there")
    sys.path.insert(0, str(ref))  # the repository's own imports (models.X, utils.train_utils) resolve there
    base = {"source": "authors", "ref_commit": ref_commit(ref), "device_name": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "dtype": "fp16", "in_dim": args.in_dim, "steps": args.steps,
            "warmup": args.warmup, "data_parallel": args.data_parallel}
    for name in args.model or list(MODELS):
        for bag in args.bag or ["avg", "p90", "max"]:
            record = {**base, "model": name, "bag": bag}
            t0 = time.perf_counter()
            try:
                record.update(measure(name, bag, ref, args.in_dim, args.steps, args.warmup, args.grad_accum,
                                      args.data_parallel))
            except Exception as err:  # one failure (out of memory) must not stop the rest
                record["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            record["wall_s"] = round(time.perf_counter() - t0, 1)
            line = json.dumps(record)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")
            ms = record.get("step_ms")
            print(f"authors {name} {bag}: " + (f"{ms:.2f} ms, peak {record['peak_bytes'] / 2**30:.3f} GiB"
                                                if ms is not None else record["error"]), flush=True)


if __name__ == "__main__":
    main()
