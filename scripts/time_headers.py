"""How long the checks before work take: every feature file's header of a cohort, as `milbench run` reads them.

    milbench synth --out /tmp/syn1000 --patients 800 --size 0.25 --in-dim 16   # about 1,000 slides
    python scripts/time_headers.py /tmp/syn1000
"""
import sys, time
from milbench.tasks.cohort import resolve_cohort
from milbench.tasks.inputs import inspect_inputs
root = sys.argv[1]
cohort = resolve_cohort(f"{root}/cohort.csv", splits=f"{root}/splits", features=f"{root}/features")
for scales in (("20x",), ("5x", "10x", "20x")):
    t = time.perf_counter()
    inputs = inspect_inputs(cohort, scales)
    dt = time.perf_counter() - t
    print(f"{len(cohort.table)} slides, scales {','.join(scales)}: {len(inputs.headers)} headers in {dt:.2f} s "
          f"({1000 * dt / len(inputs.headers):.2f} ms per file)")
