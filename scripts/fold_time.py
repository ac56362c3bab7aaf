"""One CrossFusion fold's training-step time at the paper's bag-size distribution, from measured step times.

The paper gives three statistics of the 20x patch count per slide: mean 13,496, 90th percentile 40,000, largest
137,990 (over its six cohorts, 3,964 slides). Attention is quadratic in the bag, so the mean step is not the step at
the mean bag. No log-normal has both that mean and that 90th percentile, so two distributions that keep two of the
three statistics bracket the answer: a log-normal with the mean and the largest bag at its 1 - 1/3,964 quantile,
and a gamma with the mean and the 90th percentile (its tail reaches past the largest bag; draws are clipped there).
Step times between the measured bag sizes are interpolated linearly in log-log (bags at the paper's 1:4:16 ratio;
below the smallest measured size the smallest size's time is used, an upper bound).

    python scripts/fold_time.py docs/bench/h200-2026-12-03-issue20/bench.jsonl \
        docs/bench/h200-2026-12-03-issue20/anchor.jsonl [--train-slides 350 --epochs 100]

A fold of the paper's recipe on BLCA: about 350 training slides (the folds hold 339-358), 100 epochs: 35,000 training
steps. Validation passes, optimizer steps and data loading are not counted.
"""

from __future__ import annotations

import argparse
import json
from math import exp, log, sqrt

import numpy as np
from scipy import optimize, stats

PRESET_N20 = {"avg": 13_496, "p90": 40_000, "max": 137_990}
MEAN, P90, LARGEST, SLIDES = 13_496, 40_000, 137_990, 3_964


def step_times(path: str, model: str) -> dict[int, float]:
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("model") == model and "step_ms" in r:
            n20 = r.get("n20") or PRESET_N20.get(r["bag"]) or int(r["bag"].split(",")[-1])
            out[int(n20)] = r["step_ms"]
    return out


def interpolate(table: dict[int, float]):
    xs = np.array(sorted(table), dtype=float)
    ys = np.array([table[int(x)] for x in xs])
    return lambda n: np.exp(np.interp(np.log(np.clip(n, xs[0], xs[-1])), np.log(xs), np.log(ys)))


def distributions() -> dict[str, stats.rv_continuous]:
    z = stats.norm.ppf(1 - 1 / SLIDES)
    s = z - sqrt(z * z - 2 * log(LARGEST / MEAN))
    lognormal = stats.lognorm(s, scale=exp(log(MEAN) - s * s / 2))
    k = optimize.brentq(lambda k: stats.gamma.ppf(0.9, k) / k - P90 / MEAN, 0.2, 0.6)
    return {"log-normal (mean, largest)": lognormal, "gamma (mean, p90)": stats.gamma(k, scale=MEAN / k)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ours", help="milbench bench records (JSON lines)")
    parser.add_argument("authors", help="scripts/anchor_h200.py records (JSON lines)")
    parser.add_argument("--model", default="crossfusion")
    parser.add_argument("--train-slides", type=int, default=350)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    ours, authors = interpolate(step_times(args.ours, args.model)), interpolate(step_times(args.authors, args.model))
    steps = args.train_slides * args.epochs
    rng = np.random.default_rng(0)
    print("| distribution | median | p90 | mean step ms, milbench | mean step ms, authors | speed-up "
          f"| fold ({steps:,} steps), milbench | fold, authors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dist in distributions().items():
        x = np.clip(dist.rvs(2_000_000, random_state=rng), 1, LARGEST)
        mo, ma = float(ours(x).mean()), float(authors(x).mean())
        print(f"| {name} | {np.median(x):,.0f} | {np.quantile(x, 0.9):,.0f} | {mo:.2f} | {ma:.2f} | {ma / mo:.1f}x "
              f"| {steps * mo / 60_000:.1f} min | {steps * ma / 60_000:.1f} min |")
    print(f"(step at the mean bag: milbench {float(ours(MEAN)):.2f} ms, authors {float(authors(MEAN)):.2f} ms)")


if __name__ == "__main__":
    main()
