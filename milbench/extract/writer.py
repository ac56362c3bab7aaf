"""Feature files in the CLAM layout: ``ROOT/<encoder>/x<mag>/h5_files/<slide>.h5`` and ``pt_files/<slide>.pt``.

Each file is written under a temporary name in its final folder and renamed into place, so a killed extraction
never leaves a truncated file under the real name. The pt file is written first: an h5 file implies its pt twin.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from milbench.files import atomic_path


def feature_paths(root: Path, encoder: str, mag: int, slide: str) -> tuple[Path, Path]:
    """(h5, pt) paths of one slide at one magnification."""
    folder = Path(root) / encoder / f"x{mag}"
    return folder / "h5_files" / f"{slide}.h5", folder / "pt_files" / f"{slide}.pt"


def write_features(root: Path, encoder: str, mag: int, slide: str, features: np.ndarray, coords: np.ndarray,
                   coord_attrs: dict[str, object], file_attrs: dict[str, object]) -> Path:
    """Write ``features`` float32 [N, D] and ``coords`` int64 [N, 2] (level-0 top-left) atomically; returns the h5.

    ``coord_attrs`` go on ``coords`` (CLAM's ``patch_level`` and ``patch_size``, plus milbench's extras),
    ``file_attrs`` on the file (encoder provenance).
    """
    h5_path, pt_path = feature_paths(root, encoder, mag, slide)
    for path in (h5_path, pt_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    feats = np.ascontiguousarray(features, dtype=np.float32)
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(feats), tmp)
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in coord_attrs.items():
            c.attrs[key] = value
        for key, value in file_attrs.items():
            f.attrs[key] = value
    return h5_path
