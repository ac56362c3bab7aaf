"""Where a training step's time goes on the GPU, in one process (issue 20's first device call).

1. every fused attention kernel at the attention shapes of CrossFusion and its ablations (forward + backward, with
   and without the self-attention's dropout 0.2), through the same measurement the kernel choice uses;
2. the 7 x 7 depthwise convolution (PPEG, Conv Processor) forward + backward on the token grids of the presets, as
   the model feeds it (a channels-last view of the tokens) and as a contiguous NCHW copy;
3. ``milbench bench``'s step (CUDA graphs, compiled blocks) per model and bag, with the attention choices;
4. one step of each listed model and bag profiled without graphs: device time per kernel kind and the top kernels.

    PYTHONPATH=. python3 scripts/h200_probe.py --out results [--budget 300]

Writes results/probe.jsonl (one record per measurement) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from milbench.accel.attention import NAMES, measure_kernels
from milbench.bench.bags import parse_bag
from milbench.bench.step import bench_step
from milbench.bench.timing import guarded

DEV = torch.device("cuda")
T0 = time.perf_counter()


def attention_shapes() -> list[tuple[str, int, int, float]]:
    """(label, queries, keys, dropout) of every attention in a CrossFusion step and its ablation's."""
    out = []
    for bag in ("avg", "p90", "max"):
        n5, n10, n20 = parse_bag(bag).n5, parse_bag(bag).n10, parse_bag(bag).n20
        side = math.ceil(math.sqrt(n10))
        out += [(f"{bag} cross-fine", n10, n20, 0.0), (f"{bag} cross-coarse", n10, n5, 0.0),
                (f"{bag} self", side * side, side * side, 0.2), (f"{bag} self p=0", side * side, side * side, 0.0),
                (f"{bag} self+cls", side * side + 1, side * side + 1, 0.2)]
        s20 = math.ceil(math.sqrt(n20))
        out += [(f"{bag} single self", s20 * s20, s20 * s20, 0.2)]
        if bag != "max":
            out += [(f"{bag} single self p=0", s20 * s20, s20 * s20, 0.0)]
    return out


def heads_view(n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[1, 4, n, 128] as a view of [1, n, 512] tokens (split_heads), the layout the model passes."""
    return (1, 4, n, 128), (n * 512, 128, 512, 1)


def probe_attention(write) -> None:
    for label, nq, nk, p in attention_shapes():
        times = measure_kernels([heads_view(nq), heads_view(nk), heads_view(nk)], torch.bfloat16, DEV, p, True)
        flop = 14 * nq * nk * 128 * 4  # forward 4 N M d per head, backward 2.5x
        rec = {"kind": "attention", "shape": label, "nq": nq, "nk": nk, "dropout": p,
               "ms": {NAMES[b]: t for b, t in times.items()},
               "tflops": {NAMES[b]: (flop / t / 1e9 if t else None) for b, t in times.items()}}
        write(rec)
        print(f"attn {label:24s} {nq:>7d} x {nk:<7d} p={p}: " + "  ".join(
            f"{k} {v:.2f} ms" if v else f"{k} -" for k, v in rec["ms"].items()), flush=True)


def _time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return sorted(ms)[len(ms) // 2]


def probe_conv(write) -> None:
    for side in (59, 100, 117, 186, 200, 372):
        c = 512
        w = torch.randn(c, 1, 7, 7, device=DEV, requires_grad=True)
        bias = torch.randn(c, device=DEV, requires_grad=True)
        tokens = torch.randn(1, side * side, c, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        out = {}
        for layout in ("nhwc view", "nchw copy"):
            def step():
                grid = tokens.transpose(1, 2).reshape(1, c, side, side)
                if layout == "nchw copy":
                    grid = grid.contiguous()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = F.conv2d(grid, w, bias, padding=3, groups=c)
                y.backward(torch.ones_like(y))
                tokens.grad = w.grad = bias.grad = None
            out[layout] = _time(step)
        write({"kind": "conv", "side": side, "channels": c, "ms": out})
        print(f"conv dw7 {side}x{side}x{c}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in out.items()), flush=True)


def summary(rec: dict) -> str:
    if "error" in rec:
        return f"{rec.get('model')} {rec.get('bag')}: {rec['error']}"
    head = f"{rec['model']} {rec['bag']}: {rec['step_ms']:.2f} ms, peak {rec['peak_bytes'] / 2**30:.3f} GiB"
    if "device_by_kind_ms" in rec:
        head += f" | busy {rec['device_busy_ms']:.2f} ms: " + ", ".join(
            f"{k} {v:.2f}" for k, v in rec["device_by_kind_ms"].items())
    att = (rec.get("execution") or {}).get("attention") or []
    if att:
        head += " | attention: " + ", ".join(f"{a['queries_upto']}x{a['keys_upto']}{' p' if a['dropout'] else ''}"
                                             f"->{a['kernel']}" for a in att)
    return head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=300, help="seconds after which no new section starts")
    parser.add_argument("--sections", default="attention,conv,steps,profile")
    parser.add_argument("--steps", default="amil:avg,p90,max;dsmil:avg,p90,max;crossfusion:avg,p90,max;"
                                           "crossfusion_single:avg,max;transmil:avg,p90,max")
    parser.add_argument("--profile", default="amil:max;dsmil:max;crossfusion:avg,max;crossfusion_single:avg,max;"
                                             "transmil:max")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sink = (args.out / "probe.jsonl").open("a")

    def write(rec: dict) -> None:
        sink.write(json.dumps(rec) + "\n")
        sink.flush()

    def left() -> bool:
        return time.perf_counter() - T0 < args.budget

    def plan(text: str) -> list[tuple[str, str]]:
        return [(m, b) for part in text.split(";") if part for m, bags in [part.split(":")] for b in bags.split(",")]

    sections = args.sections.split(",")
    print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(0))
    if "attention" in sections:
        probe_attention(write)
    if "conv" in sections and left():
        probe_conv(write)
    if "steps" in sections:
        for name, bag in plan(args.steps):
            if not left():
                print(f"skipped {name} {bag}: budget")
                continue
            rec = guarded(lambda: bench_step(name, parse_bag(bag), 2048, DEV, "bf16", 5, 2, "blocks", graphs=True),
                          {"model": name, "bag": bag}, DEV)
            write({"kind": "step", **rec})
            print(f"[{time.perf_counter() - T0:.0f}s] step " + summary(rec), flush=True)
    if "profile" in sections:
        for name, bag in plan(args.profile):
            if not left():
                print(f"skipped profile {name} {bag}: budget")
                continue
            rec = guarded(lambda: bench_step(name, parse_bag(bag), 2048, DEV, "bf16", 1, 2, "blocks", profile=True,
                                             graphs=False), {"model": name, "bag": bag}, DEV)
            rec.pop("top_device", None)
            top_host = rec.pop("top_host", "")
            write({"kind": "profile", **rec})
            (args.out / "profiles.txt").open("a").write(f"\n== {name} {bag}\n" + "\n".join(
                f"{ms:9.3f} ms {n:5d}x {k}" for k, n, ms in rec.get("top_kernels", [])) + "\n" + top_host[:3000])
            print(f"[{time.perf_counter() - T0:.0f}s] profile " + summary(rec), flush=True)
            for k, n, ms in rec.get("top_kernels", [])[:8]:
                print(f"    {ms:8.3f} ms {n:4d}x {k[:90]}")


if __name__ == "__main__":
    main()
