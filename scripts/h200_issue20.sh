#!/usr/bin/env bash
# Issue 20's measurements in one device call (one NVIDIA H200), in this order:
#   1. the authors' model code (scripts/anchor_h200.py, their models/ imported from $REF) at avg / p90 / max, and
#      CrossFusion at four more bag sizes for the per-fold time at the paper's bag-size distribution;
#   2. `milbench bench` with the same bags (anchor.jsonl and bench.jsonl come from the same machine and run);
#   3. the end-to-end epoch benchmark (reference data path and milbench's, same run), scaled down to fit;
#   4. milbench's CUDA-only tests of the fast paths (tests/accel).
#
#   OUT=/path/to/results REF=refcode/CrossFusion BUDGET=450 bash scripts/h200_issue20.sh
#
# $REF holds the CrossFusion repository's models/ and utils/train_utils.py (fetched outside the project; on the
# device machine a git-ignored copy inside the checkout, carried with the call). Every part runs under a hard time
# limit taken from what is left of $BUDGET, so a slow part costs only itself. Under $OUT: anchor.jsonl,
# bench.jsonl, epoch.jsonl (one record per line), log.txt (versions, every part's output), errors.txt.
set -u
OUT=${OUT:-results}
REF=${REF:-refcode/CrossFusion}
BUDGET=${BUDGET:-450}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
part() {  # part NAME SECONDS CMD...: run CMD under min(SECONDS, time left), output to $OUT/NAME.log
    local name=$1 share=$2; shift 2
    local limit; limit=$(left)
    [ "$share" -lt "$limit" ] && limit=$share
    if [ "$limit" -le 10 ]; then echo "== $name: skipped, budget spent" | tee -a "$OUT/errors.txt"; return; fi
    echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$OUT/log.txt"
    timeout --kill-after=10 "$limit" "$@" > "/tmp/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && echo "- $name: exit code $rc" | tee -a "$OUT/errors.txt"
    cat "/tmp/$name.log" >> "$OUT/log.txt"
    tail -n 25 "/tmp/$name.log"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version())"; } > "$OUT/log.txt" 2>&1

MODELS=(crossfusion crossfusion_concat crossfusion_single transmil amil dsmil)
MODEL_ARGS=(); for m in "${MODELS[@]}"; do MODEL_ARGS+=(--model "$m"); done
PRESETS=(--bag avg --bag p90 --bag max)
DIST_MILBENCH=(--bag 2000 --bag 6000 --bag 25000 --bag 70000)     # N20 at the paper's 1:4:16
DIST_AUTHORS=(--bag 125,500,2000 --bag 375,1500,6000 --bag 1563,6250,25000 --bag 4375,17500,70000)
COMMON=(--in-dim 2048 --device cuda --dtype bf16 --compile blocks --steps 5 --warmup 2)

part anchor 110 "$PY" scripts/anchor_h200.py --ref "$REF" "${MODEL_ARGS[@]}" "${PRESETS[@]}" --out "$OUT/anchor.jsonl"
part anchor_dist 30 "$PY" scripts/anchor_h200.py --ref "$REF" --model crossfusion "${DIST_AUTHORS[@]}" \
    --out "$OUT/anchor.jsonl"
part bench 200 "$PY" -m milbench.cli bench "${MODEL_ARGS[@]}" "${PRESETS[@]}" "${COMMON[@]}" \
    --out "$OUT/bench.jsonl" --md /tmp/bench.md
part bench_dist 50 "$PY" -m milbench.cli bench --model crossfusion "${DIST_MILBENCH[@]}" "${COMMON[@]}" \
    --out "$OUT/bench.jsonl" --md /tmp/bench_dist.md
part epoch 110 "$PY" -m milbench.cli bench --epoch --model crossfusion --patients 100 --size avg --in-dim 2048 \
    --disk-slides 16 --workers 8 --device cuda --compile blocks --workdir /tmp --out "$OUT/epoch.jsonl" \
    --md /tmp/epoch.md
part gpu_tests 90 "$PY" -m pytest -q -x tests/accel -p no:cacheprovider
rm -rf /tmp/milbench-bench-* 2>/dev/null
echo "done in $(( $(date +%s) - START ))s"
