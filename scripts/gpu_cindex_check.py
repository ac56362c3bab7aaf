"""Does the GPU fast path keep the C-index? One model of the synthetic benchmark on one of its scenarios, trained on
CUDA (bf16 autocast) with and without CUDA graphs, fold by fold beside the committed CPU (float32) leaderboard run of
the same configuration and seed. Different hardware, precision and random streams: the folds agree within the
benchmark's noise (a fold's standard error is about 0.05, benchmarks/synthetic.toml), not to the digit.

    PYTHONPATH=. python3 scripts/gpu_cindex_check.py [MODEL] [SCENARIO] [SEED] [FOLDS]   # crossfusion cross-scale 7 5
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from milbench.runs.benchmark import benchmark_jobs, prepare_cohorts
from milbench.config.benchmark import load_spec
from milbench.data.cache import FeatureCache
from milbench.training.fold import fit_fold
from milbench.runs.store import fold_dir


def main(model: str = "crossfusion", scenario: str = "cross-scale", seed: str = "7", folds: str = "5") -> None:
    spec = load_spec("benchmarks/synthetic.toml")
    spec = dataclasses.replace(spec, scenarios=(scenario,))
    tables = prepare_cohorts(spec)
    jobs = benchmark_jobs(spec, tables, [model], [int(seed)])
    print("| fold | CPU float32 (leaderboard) | CUDA, graphs | CUDA, no graphs | seconds (graphs / none) |")
    print("|---|---|---|---|---|")
    rows = []
    cohort, cache = jobs[0].cohort.resolve(), FeatureCache()  # one scenario: every fold reads the same slides
    for job in jobs[: int(folds)]:
        stored = fold_dir(Path(spec.runs_dir), job.cfg, job.fold) / "record.json"
        cpu = json.loads(stored.read_text())["metrics"]["c_index"] if stored.is_file() else float("nan")
        row = [cpu]
        seconds = []
        for graphs in (True, False):
            t0 = time.perf_counter()
            result = fit_fold(cohort, job.cfg, job.fold, device="cuda", cache=cache, graphs=graphs)
            seconds.append(time.perf_counter() - t0)
            row.append(result.record["metrics"]["c_index"])
            if graphs:
                print(f"<!-- fold {job.fold} graphs: {result.record['execution']['cuda_graphs']} -->", flush=True)
        rows.append(row)
        print(f"| {job.fold} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {seconds[0]:.0f} / {seconds[1]:.0f} |",
              flush=True)
    mean = np.nanmean(np.array(rows), axis=0)
    print(f"| mean | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | |")


if __name__ == "__main__":
    main(*sys.argv[1:])
