"""Longest first: fold jobs ordered by an estimate of their cost before they are submitted, so that the grid's tail
is short folds, not the one CrossFusion fold that started last.

Cost of a fold = the model's relative step time x epochs x the bytes of its training patients' feature files at the
model's scales (a stand-in for patients x mean bag size, read with ``stat`` only, once per cohort). The step times are
the measured one-bag training steps at the paper's largest bag (137,990 20x patches, width 2048, bf16, H100,
docs/performance.md "Every model at the largest bag"); a plug-in model without a figure counts as the median model.
The estimate only orders the jobs: a wrong one costs time, never a result.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from milbench.data.readers import locate_feature_file
from milbench.models.registry import get_card
from milbench.runs.jobs import CohortSpec, FoldJob

STEP_MS = {  # one training step at the largest bag, ms (docs/performance.md)
    "amil": 5.25, "dsmil": 45.43, "transmil": 159.52, "deepgraphsurv": 33.28, "patchgcn": 85.18, "scmil": 427.18,
    "protosurv": 100.47, "zoommil": 18.43, "mustmil": 5.70, "csmil": 91.13, "crossfusion": 328.25,
    "crossfusion_concat": 298.78, "crossfusion_single": 1579.75,
}


def step_ms(model: str) -> float:
    return STEP_MS.get(model, statistics.median(STEP_MS.values()))


class _Sizes:
    """Bytes of feature files per (cohort spec, scale, case), read once; None where the cohort cannot be resolved."""

    def __init__(self) -> None:
        self._cohorts: dict[CohortSpec, object] = {}
        self._bytes: dict[tuple[CohortSpec, str, str], int] = {}

    def cohort(self, spec: CohortSpec):
        if spec not in self._cohorts:
            try:
                self._cohorts[spec] = spec.resolve()
            except Exception:  # the driver has resolved it already; an estimate never fails a run
                self._cohorts[spec] = None
        return self._cohorts[spec]

    def case_bytes(self, spec: CohortSpec, scale: str, case: str) -> int:
        key = (spec, scale, case)
        if key not in self._bytes:
            cohort = self.cohort(spec)
            total = 0
            root = getattr(cohort, "features_root", None)
            for slide in cohort.slides_of(case) if root is not None else []:
                path = locate_feature_file(root, scale, slide, cohort.backbone)
                total += os.stat(path).st_size if path is not None else 0
            self._bytes[key] = total
        return self._bytes[key]


def estimated_cost(job: FoldJob, sizes: _Sizes | None = None) -> float:
    """Relative cost of one fold (see the module notes); patients stand in for bytes where there are no files."""
    sizes = sizes or _Sizes()
    cohort = sizes.cohort(job.cohort)
    scales = get_card(job.cfg.model).scales
    if cohort is None or job.fold not in getattr(cohort, "folds", {}):
        volume = 1.0
    else:
        train = cohort.folds[job.fold][0]
        volume = float(sum(sizes.case_bytes(job.cohort, s, c) for c in train for s in scales)) or float(len(train))
    return step_ms(job.cfg.model) * job.cfg.epochs * volume


def longest_first(jobs: Sequence[FoldJob]) -> list[FoldJob]:
    """``jobs`` by estimated cost, largest first; the folds of one configuration stay together in their order (their
    costs differ by their training fold only), so a worker's feature cache stays warm."""
    sizes = _Sizes()
    groups: dict[tuple[CohortSpec, str], list[FoldJob]] = {}
    for job in jobs:
        groups.setdefault((job.cohort, job.cfg.hash), []).append(job)
    cost = {key: statistics.fmean(estimated_cost(j, sizes) for j in group) for key, group in groups.items()}
    order = sorted(groups, key=lambda key: -cost[key])  # stable: equal costs keep the builder's order
    return [job for key in order for job in groups[key]]
