"""What a feature root holds for one cohort, read from file headers alone (no payload): the dry run's first answers.

Per cohort and backbone: the cohort's slides found at every magnification the benchmark's models need and those
missing (never an error here: a dry run reports them), files that cannot be read, the feature widths, the
magnifications present at all, and the bag sizes (patches per patient at each magnification, summed over the
patient's slides) of the patients whose slides are all there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.data.bag import SCALES
from milbench.data.headers import read_header
from milbench.data.readers import locate_feature_file
from milbench.tasks.cohort import Cohort, Folds, resolve_cohort


@dataclass
class Inventory:
    """One cohort at one backbone under one features root."""

    cohort: str
    backbone: str
    root: Path
    scales: tuple[str, ...]  # the magnifications the benchmark's models need
    slides: int
    patients: int
    folds: Folds
    missing: list[str] = field(default_factory=list)  # slides lacking a file at one of ``scales``
    missing_by_scale: dict[str, int] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (slide, the reader's one-line error)
    widths: Counter = field(default_factory=Counter)  # feature width -> files
    present: tuple[str, ...] = ()  # magnifications with at least one of the cohort's files
    bags: pd.DataFrame = field(default_factory=pd.DataFrame)  # case_id -> patches per scale (complete patients)

    @property
    def found(self) -> int:
        """Slides with a readable file at every needed magnification."""
        return self.slides - len(self.missing) - len({slide for slide, _ in self.unreadable})

    @property
    def width(self) -> int | None:
        """The most common feature width (None when nothing was read)."""
        return self.widths.most_common(1)[0][0] if self.widths else None

    def bag_summary(self, scale: str) -> dict[str, float]:
        """min, median, mean, p90 and max patches per complete patient at ``scale`` (empty when none)."""
        if self.bags.empty or scale not in self.bags:
            return {}
        x = self.bags[scale].to_numpy(float)
        return {"min": x.min(), "median": float(np.median(x)), "mean": x.mean(),
                "p90": float(np.percentile(x, 90)), "max": x.max()}


def take_inventory(cohort: Cohort, scales: Sequence[str], root: Path, backbone: str,
                   progress: Callable[[int, int], None] | None = None) -> Inventory:
    """Locate and read the header of each of the cohort's feature files at ``scales`` (and look for the other
    magnifications' files without reading them)."""
    table = cohort.table
    inv = Inventory(cohort.name, backbone, Path(root), tuple(scales), len(table), int(table.case_id.nunique()),
                    cohort.folds)
    bb = None if backbone == "default" else backbone
    patches: dict[str, dict[str, int]] = {s: {} for s in scales}
    missing: set[str] = set()
    bad: set[str] = set()
    present: set[str] = set()
    by_scale: Counter = Counter()
    for i, slide in enumerate(table.slide_id):
        if progress is not None:
            progress(i, len(table))
        for scale in SCALES:
            path = locate_feature_file(root, scale, slide, bb)
            if path is not None:
                present.add(scale)
            if scale not in scales:
                continue
            if path is None:
                missing.add(slide)
                by_scale[scale] += 1
                continue
            try:
                header = read_header(path)
            except MilbenchError as err:
                bad.add(slide)
                inv.unreadable.append((slide, str(err)))
                continue
            inv.widths[header.dim] += 1
            patches[scale][slide] = header.patches
    inv.missing = [s for s in table.slide_id if s in missing]
    inv.unreadable = [(slide, why) for slide, why in inv.unreadable if slide not in missing]
    inv.missing_by_scale = {s: by_scale[s] for s in scales}
    inv.present = tuple(s for s in SCALES if s in present)
    complete = table[~table.slide_id.isin(missing | bad)]
    whole = set(complete.case_id) - set(table.case_id[table.slide_id.isin(missing | bad)])
    rows = {c: {s: sum(patches[s][x] for x in slides) for s in scales}
            for c, slides in complete.groupby("case_id").slide_id if c in whole}
    inv.bags = pd.DataFrame.from_dict(rows, orient="index", columns=list(scales))
    return inv


def inventory(name: str, root: str | Path, backbone: str, scales: Sequence[str],
              progress: Callable[[int, int], None] | None = None) -> Inventory:
    """The inventory of a built-in or table cohort under ``root`` (no feature check, no error for missing files)."""
    cohort = resolve_cohort(name, features=root, backbone=None if backbone == "default" else backbone)
    return take_inventory(cohort, scales, Path(root), backbone, progress)
