#!/usr/bin/env bash
# Four AMIL folds at --gpus-per-fold 0.25 at once on one GPU, against the same four folds one at a time (issue 19).
#
# Run from the repository root on a machine with one CUDA GPU, where torch (CUDA), scikit-survival, lifelines and
# ray (pip install -c constraints.txt -e ".[ray]", or the packages from wheels) are installed; milbench itself runs
# from this checkout (python -m milbench.cli), installed or not. Prints the folds per hour of each way, the training
# seconds per fold from the records (which leave out reading the features), the peak GPU memory per fold, and
# whether any fold ran out of GPU memory (a retry at a larger share shows up as "OutOfMemoryError" in the driver log).
#
# Knobs (environment): PYTHON, WORK (scratch folder, default ./gpu-fractions-<date>), PATIENTS (240), SIZE (bag-size
# scale of `milbench synth`, 40: about 10,000 20x patches per slide), IN_DIM (1024), EPOCHS (100).
set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=${WORK:-$PWD/gpu-fractions-$(date +%Y%m%d-%H%M%S)}
PATIENTS=${PATIENTS:-240}
SIZE=${SIZE:-40}
IN_DIM=${IN_DIM:-1024}
EPOCHS=${EPOCHS:-100}
FOLDS=0,1,2,3

if [[ ! -f milbench/__init__.py ]]; then
    echo "run this from the milbench repository root" >&2
    exit 2
fi
"$PYTHON" - <<'PY' || exit 2
import importlib, sys
missing = [m for m in ("torch", "sksurv", "lifelines", "ray") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)} (pip install -c constraints.txt -e '.[ray]')")
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible")
print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB; "
      f"torch {torch.__version__}")
PY

mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
milbench() { "$PYTHON" -m milbench.cli "$@"; }

if [[ ! -f "$WORK/cohort/cohort.csv" ]]; then
    echo "writing a synthetic cohort: $PATIENTS patients, bag scale $SIZE, width $IN_DIM -> $WORK/cohort"
    milbench synth --out "$WORK/cohort" --scenario coarse --patients "$PATIENTS" --size "$SIZE" --in-dim "$IN_DIM" \
        --censoring 0.5 --seed 0 > "$WORK/synth.log"
fi
du -sh "$WORK/cohort" | awk '{print "cohort on disk: " $1}'

run() {  # name, extra grid options...
    local name=$1; shift
    local runs="$WORK/runs-$name"
    rm -rf "$runs"
    local t0 t1
    t0=$(date +%s.%N)
    set +e
    milbench grid --models amil --cohorts "$WORK/cohort/cohort.csv" --folds "$FOLDS" --epochs "$EPOCHS" \
        --recipe small --device cuda --executor ray --gpus-per-fold 0.25 --runs-dir "$runs" "$@" \
        > "$WORK/$name.log" 2>&1
    local rc=$?
    set -e
    t1=$(date +%s.%N)
    "$PYTHON" - "$name" "$runs" "$WORK/$name.log" "$t0" "$t1" "$rc" <<'PY'
import json, pathlib, sys
name, runs, log, t0, t1, rc = sys.argv[1:]
wall = float(t1) - float(t0)
records = [json.loads(p.read_text()) for p in pathlib.Path(runs).rglob("record.json")]
text = pathlib.Path(log).read_text(errors="replace")
oom = "OutOfMemoryError" in text or "out of memory" in text.lower()
train = [r["timings"]["train_s"] for r in records]
peak = [r.get("peak_memory_bytes", 0) / 2**30 for r in records]
print(f"{name}: exit {rc}, {len(records)}/4 folds in {wall:.1f} s wall = {len(records) * 3600 / wall:.1f} folds/hour; "
      f"training {sum(train) / max(1, len(train)):.1f} s/fold (records), peak {max(peak, default=0):.2f} GiB/fold; "
      f"out of memory: {'YES' if oom else 'no'} (log: {log})")
PY
}

echo "four folds at once, 0.25 GPU each"
run together --max-parallel 4
echo "the same four folds one at a time"
run one-by-one --max-parallel 1
