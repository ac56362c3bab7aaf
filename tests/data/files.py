"""Tiny feature files and cohort tables written to a test's tmp_path, in the layouts milbench reads."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch


def grid(n: int) -> np.ndarray:
    """Level-0 top-left corners of n 256-px patches on a row."""
    return np.stack([np.arange(n) * 256, np.zeros(n, dtype=np.int64)], axis=1).astype(np.int64)


def clam_h5(root: Path, scale: str, slide: str, features: np.ndarray, coords: np.ndarray | None = None,
            backbone: str | None = None) -> Path:
    """Write ``ROOT[/BACKBONE]/x<mag>/h5_files/<slide>.h5``."""
    folder = (root / backbone if backbone else root) / f"x{scale[:-1]}" / "h5_files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slide}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if coords is not None:
            c = f.create_dataset("coords", data=coords)
            c.attrs["patch_level"], c.attrs["patch_size"] = 0, 256
    return path


def clam_pt(root: Path, scale: str, slide: str, features: torch.Tensor, backbone: str | None = None) -> Path:
    """Write ``ROOT[/BACKBONE]/x<mag>/pt_files/<slide>.pt`` (features only)."""
    folder = (root / backbone if backbone else root) / f"x{scale[:-1]}" / "pt_files"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(features, folder / f"{slide}.pt")
    return folder / f"{slide}.pt"


def trident_h5(root: Path, scale: str, slide: str, features: np.ndarray, coords: np.ndarray,
               encoder: str = "uni_v1") -> Path:
    """Write ``ROOT/<mag>x_256px_0px_overlap/features_<encoder>/<slide>.h5`` with a leading batch axis."""
    folder = root / f"{scale[:-1]}x_256px_0px_overlap" / f"features_{encoder}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slide}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features[None])
        f.create_dataset("coords", data=coords)
    return path


def random_features(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def table_csv(path: Path, rows: list[dict], index: bool = True) -> Path:
    """Write a cohort table (CLAM style: unnamed index column first when ``index``)."""
    pd.DataFrame(rows).to_csv(path, index=index)
    return path


def splits_folder(folder: Path, folds: list[tuple[list[str], list[str]]]) -> Path:
    """Write CLAM/MCAT ``splits_{k}.csv`` files with ragged train/val columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (train, val) in enumerate(folds):
        frame = pd.DataFrame({"train": pd.Series(train, dtype=object), "val": pd.Series(val, dtype=object)})
        frame.to_csv(folder / f"splits_{k}.csv")
    return folder
