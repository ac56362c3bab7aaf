#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one invocation (about 8 minutes on one H100).
#
#   OUT=/path/to/results scripts/bench_gpu.sh            # run from the repository root
#   OUT=/path/to/results scripts/bench_gpu.sh steps      # its first half: the anchor table and packed bags
#   OUT=/path/to/results scripts/bench_gpu.sh epoch      # its second half: end-to-end epochs, eager baselines
#   OUT=/path/to/results scripts/bench_gpu.sh diagnose   # 3-4 minutes: where a step's time goes (profiles)
#
# Writes under $OUT: one JSON Lines file (records) and one markdown file (tables) per measurement, their logs,
# env.txt (GPU, driver, versions), profile_crossfusion_avg.txt (top CUDA kernels of one compiled step), errors.md
# (one line per failed or skipped measurement) and summary.md (everything, in the order of docs/performance.md).
# Nothing is installed: milbench runs from the checkout (PYTHONPATH) on the machine's torch. Each measurement is a
# separate process under a hard time limit taken from the budget left, so one failure or hang costs only itself;
# `milbench bench` itself records an error line per failed model/bag and falls back to eager when compiling fails.
set -u

OUT=${OUT:-bench_out}
BUDGET=${BUDGET:-500}            # seconds for the whole script
WORKDIR=${WORKDIR:-$PWD}          # holds the epoch benchmark's cohort (about 19 GB) on a real disk, never under $OUT
PY=${PYTHON:-python}
# SMOKE=1: the same steps on the CPU with tiny bags, to check the script itself anywhere (seconds, not minutes).
if [ "${SMOKE:-0}" = 1 ]; then
    DEV=cpu; DIM=16; BAGS=(--bag 4,12,40 --bag 6,20,80); EPOCH=(--patients 6 --size 2,6,20 --disk-slides 3 --workers 1)
    STEPS=(--steps 1 --warmup 1); PACKS=(32 8); PACKED_BAGS=(--bag 40); COMPILE=${COMPILE:-off}
else
    DEV=cuda; DIM=2048; BAGS=(--bag avg --bag p90 --bag max)
    EPOCH=(--patients 1000 --size avg --disk-slides 64 --workers 8)
    STEPS=(--steps 5 --warmup 2); PACKS=(32 8); PACKED_BAGS=(--bag avg --bag p90 --bag avg/8)
    COMPILE=${COMPILE:-blocks}
fi
mkdir -p "$OUT"
: > "$OUT/errors.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# bench NAME SHARE ARGS...: `milbench bench ARGS` with at most SHARE seconds of measurements started (and a hard
# limit of whatever budget is left), records in $OUT/NAME.jsonl, tables in $OUT/NAME.md, output in $OUT/NAME.log.
bench() {
    local name=$1 share=$2; shift 2
    local limit; limit=$(left)
    if [ "$limit" -le 20 ]; then echo "- $name: skipped, time budget spent" >> "$OUT/errors.md"; return; fi
    [ "$share" -gt "$limit" ] && share=$limit
    echo "== $name ($(date +%T), ${limit}s left): milbench bench $*"
    timeout --kill-after=15 "$limit" "$PY" -m milbench.cli bench "$@" --budget "$share" \
        --out "$OUT/$name.jsonl" --md "$OUT/$name.md" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && echo "- $name: exit code $rc (see $name.log)" >> "$OUT/errors.md"
    tail -n 3 "$OUT/$name.log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0)); import triton; print('triton', triton.__version__)" 2>&1
    echo "cpu cores: $(nproc)"; echo "cc: $(command -v cc gcc | head -n 1)"; df -hT "$WORKDIR" | tail -n 1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

ANCHOR_MODELS=(--model crossfusion --model crossfusion_concat --model crossfusion_single --model transmil)
SECTIONS=(anchor_fast packed packed8 epoch sdpa_flash anchor_eager anchor_eager_fp16)

if [ "${1:-all}" = diagnose ]; then
    # One profiled step each (host time to issue it, summed kernel time, kernel and aten-op counts, top kernels and
    # ops): CrossFusion at the average bag eager with FlashAttention-2 and with cuDNN attention, compiled with
    # FlashAttention-2, and the other models at the average bag; then CrossFusion at p90 with each kernel.
    SECTIONS=(diag_cf_eager_flash diag_cf_eager_cudnn diag_cf_compiled_flash diag_models diag_p90_flash diag_p90_cudnn)
    AVG=(--bag "${BAGS[1]}"); P90=(--bag "${BAGS[3]}")
    COMMON=(--in-dim "$DIM" --device "$DEV" --dtype bf16 "${STEPS[@]}")
    bench diag_cf_eager_flash 40 --model crossfusion "${AVG[@]}" "${COMMON[@]}" --compile off --sdpa flash --profile
    bench diag_cf_eager_cudnn 40 --model crossfusion "${AVG[@]}" "${COMMON[@]}" --compile off --sdpa cudnn --profile
    bench diag_cf_compiled_flash 40 --model crossfusion "${AVG[@]}" "${COMMON[@]}" --compile "$COMPILE" \
        --sdpa flash --profile
    bench diag_models 60 --model transmil --model crossfusion_single --model amil --model dsmil "${AVG[@]}" \
        "${COMMON[@]}" --compile off --profile
    bench diag_p90_flash 30 --model crossfusion "${P90[@]}" "${COMMON[@]}" --compile off --sdpa flash
    bench diag_p90_cudnn 30 --model crossfusion "${P90[@]}" "${COMMON[@]}" --compile off --sdpa cudnn
    # The token-grid convolutions alone (PPEG: depthwise 7/5/3; Conv Processor: grouped, 2 channels per group),
    # forward + backward, bf16 autocast, at the grids of the average bag (59 x 59) and of its 20x tokens (117 x 117):
    # as the models run them (a channels-last view of the tokens), on a contiguous NCHW copy, and the depthwise
    # ones as a compiled sum of shifted products (one fused kernel instead of cuDNN).
    SECTIONS+=(diag_convs)
    DEV="$DEV" timeout --kill-after=10 "$(left)" "$PY" - > "$OUT/diag_convs.md" 2> "$OUT/diag_convs.log" <<'PYEOF' \
        || echo "- diag_convs: failed (see diag_convs.log)" >> "$OUT/errors.md"
import os
import statistics

import torch
import torch.nn.functional as F

from milbench.models.layers.position import PPEG
from milbench.models.crossfusion import ConvProcessor

dev = torch.device(os.environ["DEV"])
cuda = dev.type == "cuda"
amp = torch.autocast(dev.type, dtype=torch.bfloat16)


def ms(fn, n=10):
    """Median milliseconds of fn() (forward + backward) after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def shifted_depthwise(grid, conv):
    """conv(grid) for a depthwise conv with odd kernel and 'same' padding, as a sum of shifted products."""
    k = conv.kernel_size[0]
    p = k // 2
    h, w = grid.shape[-2:]
    padded = F.pad(grid, (p, p, p, p))
    out = conv.bias.view(1, -1, 1, 1).to(grid.dtype)
    weight = conv.weight.to(grid.dtype)
    for dy in range(k):
        for dx in range(k):
            out = out + weight[:, 0, dy, dx].view(1, -1, 1, 1) * padded[:, :, dy:dy + h, dx:dx + w]
    return out


def ppeg_shifted(ppeg, tokens, side):
    b, n, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, d, side, side)
    return grid + sum(shifted_depthwise(grid, c) for c in (ppeg.proj7, ppeg.proj5, ppeg.proj3))


compiled_shifted = torch.compile(ppeg_shifted, dynamic=False)
print("| grid | block | variant | fwd + bwd ms |")
print("|---|---|---|---|")
for side in (59, 117) if cuda else (7,):
    x = torch.randn(1, side * side, 512, device=dev, requires_grad=True)
    ppeg = PPEG(512).to(dev)
    fusion = ConvProcessor(512, 0.3, n_scales=3).to(dev)
    rows = {
        ("PPEG", "as the model runs it (channels-last view)"): lambda: ppeg(x, side),
        ("PPEG", "contiguous NCHW copy"): lambda: ppeg(x.transpose(1, 2).reshape(1, 512, side, side).contiguous()
                                                  .flatten(2).transpose(1, 2), side),
        ("PPEG", "compiled sum of shifted products"): lambda: compiled_shifted(ppeg, x, side),
        ("Conv Processor", "as the model runs it"): lambda: fusion([x, x * 1.5, x * 0.5], side),
    }
    for (block, variant), fwd in rows.items():
        def step():
            with amp:
                y = fwd()
            y.float().sum().backward()
        try:
            print(f"| {side} x {side} | {block} | {variant} | {ms(step):.2f} |", flush=True)
        except Exception as err:
            print(f"| {side} x {side} | {block} | {variant} | failed: {type(err).__name__}: {str(err)[:120]} |")
PYEOF
fi
PART=${1:-all}
if [ "$PART" = steps ]; then SECTIONS=(anchor_fast packed packed8); fi
if [ "$PART" = epoch ]; then SECTIONS=(epoch sdpa_flash anchor_eager anchor_eager_fp16); fi
if [ "$PART" = all ] || [ "$PART" = steps ]; then

# 1. The anchor table: the fast path (bf16 autocast, compiled hot blocks, each step replayed from a CUDA graph as
#    training replays it), 5 timed steps after 2 (the first warm-up step eager, the second records the graph).
bench anchor_fast 300 "${ANCHOR_MODELS[@]}" "${BAGS[@]}" --in-dim "$DIM" --device "$DEV" --dtype bf16 \
    --compile "$COMPILE" "${STEPS[@]}"

# 2. Packed bags: training throughput, one bag per step against 32 (and 8) bags per forward pass.
bench packed 60 --model amil --model dsmil "${PACKED_BAGS[@]}" --in-dim "$DIM" --device "$DEV" --dtype bf16 \
    --pack "${PACKS[0]}"
bench packed8 30 --model amil --model dsmil "${PACKED_BAGS[@]:0:2}" --in-dim "$DIM" --device "$DEV" --dtype bf16 \
    --pack "${PACKS[1]}"
fi
if [ "$PART" = all ] || [ "$PART" = epoch ]; then

# 3. End to end: 64 slides on disk read the reference's way, milbench's first and second epoch on them, and one
#    epoch of 1,000 cached patients, CrossFusion at the average bag, width 2048.
bench epoch 240 --epoch --model crossfusion "${EPOCH[@]}" --in-dim "$DIM" --device "$DEV" --compile "$COMPILE" \
    --workdir "$WORKDIR"

# 4. The attention kernel: on this H100 PyTorch prefers cuDNN's fused attention once the first attention has run
#    (`sdpa_priority` in the records); the large bags, where attention is 80-95% of the arithmetic, with
#    FlashAttention-2 preferred instead (eager, bf16), to compare with the eager rows below.
bench sdpa_flash 60 --model crossfusion --model crossfusion_concat --model crossfusion_single "${BAGS[@]:2}" \
    --in-dim "$DIM" --device "$DEV" --dtype bf16 --compile off --sdpa flash "${STEPS[@]}"

# 5. Eager baselines: the same models without compilation or CUDA graphs, bf16 and the reference's fp16 autocast.
bench anchor_eager 60 "${ANCHOR_MODELS[@]}" "${BAGS[@]}" --in-dim "$DIM" --device "$DEV" --dtype bf16 \
    --compile off --no-graphs "${STEPS[@]}"
bench anchor_eager_fp16 30 --model crossfusion --model transmil "${BAGS[@]}" --in-dim "$DIM" --device "$DEV" \
    --dtype fp16 --compile off --no-graphs "${STEPS[@]}"

# 6. Where a compiled CrossFusion step spends its GPU time (for the next round of work).
if [ "$(left)" -gt 40 ]; then
    DEV="$DEV" DIM="$DIM" COMPILE="$COMPILE" timeout --kill-after=10 "$(left)" "$PY" - > "$OUT/profile_crossfusion_avg.txt" 2>&1 \
        <<'PYEOF' || echo "- profile: failed (see profile_crossfusion_avg.txt)" >> "$OUT/errors.md"
import os

import torch
from milbench.bench.bags import parse_bag, random_bag
from milbench.bench.timing import build_model
from milbench.training.device import float_bag as _as_float
from milbench.training.steps import bag_loss
from milbench.survival.losses import get_loss

dev, dim = torch.device(os.environ["DEV"]), int(os.environ["DIM"])
bag = random_bag("crossfusion", parse_bag("avg" if dev.type == "cuda" else "4,12,40"), dim, dev)
model = build_model("crossfusion", dim, dev, os.environ["COMPILE"])
loss_fn, y, c = get_loss("nll", alpha=0.2), torch.tensor([1], device=dev), torch.tensor([0.0], device=dev)


def step():
    model.zero_grad(set_to_none=True)
    bag_loss(model, _as_float(bag), y, c, loss_fn, torch.bfloat16 if dev.type == "cuda" else None).backward()


for _ in range(3):
    step()
cuda = dev.type == "cuda"
activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
with torch.profiler.profile(activities=activities) as prof:
    step()
    if cuda:
        torch.cuda.synchronize()
events = prof.key_averages()
print(events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=70))
PYEOF
else
    echo "- profile: skipped, time budget spent" >> "$OUT/errors.md"
fi
fi

{
    echo "# milbench bench: scripts/bench_gpu.sh"
    echo; echo '```'; cat "$OUT/env.txt"; echo '```'; echo
    for name in "${SECTIONS[@]}"; do
        [ -s "$OUT/$name.md" ] && { echo "## $name"; echo; cat "$OUT/$name.md"; echo; }
    done
    echo "## errors and skips"; echo; cat "$OUT/errors.md"
    echo; echo "total: $(( $(date +%s) - START )) s"
} > "$OUT/summary.md"
echo "summary: $OUT/summary.md ($(( $(date +%s) - START )) s)"
