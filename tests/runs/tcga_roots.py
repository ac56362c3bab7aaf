"""Tiny TCGA feature roots for the benchmark tests: the real slide IDs of the shipped tables
(milbench/splits/tcga_*.csv), a few patches per slide and magnification, a small width, CLAM h5 layout.

Only a subset of each cohort's patients is written (``per_fold`` patients of every held-out fold, events first, so
each fold can be scored); the others are missing, as on a feature root that is still being extracted.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from milbench.tasks.tcga import shipped_table

SCALES = {"5x": 1, "10x": 2, "20x": 4}  # patches per slide at each magnification (nested, 1:2:4 here)


def chosen_patients(cohort: str, per_fold: int) -> list[str]:
    """``per_fold`` held-out patients of every fold, events first (so every fold has some), in a stable order."""
    table = shipped_table(cohort)
    patients = table.groupby("case_id").agg(fold=("fold", "first"), censorship=("censorship", "first"))
    patients = patients[patients.fold.notna()].sort_values(["fold", "censorship"], kind="stable")
    return [c for _, part in patients.groupby("fold") for c in part.index[:per_fold]]


def write_root(root: Path, cohort: str, per_fold: int = 4, width: int = 8, seed: int = 0,
               patients: list[str] | None = None) -> list[str]:
    """Write ``root/x{5,10,20}/h5_files/<slide>.h5`` for every slide of the chosen patients; their slide IDs."""
    table = shipped_table(cohort)
    wanted = set(patients if patients is not None else chosen_patients(cohort, per_fold))
    slides = table.slide_id[table.case_id.isin(wanted)].tolist()
    rng = np.random.default_rng(seed)
    for scale, n in SCALES.items():
        folder = Path(root) / f"x{scale[:-1]}" / "h5_files"
        folder.mkdir(parents=True, exist_ok=True)
        side = 256 * 4 // n
        for slide in slides:
            with h5py.File(folder / f"{slide}.h5", "w") as f:
                f["features"] = rng.normal(size=(n, width)).astype(np.float32)
                f["coords"] = np.array([[i * side, 0] for i in range(n)], dtype=np.int64)
    return slides


def all_slides(cohort: str) -> pd.Series:
    return shipped_table(cohort).slide_id
