"""Feature-file headers, read without the payload: what `run`, `grid` and `benchmark` check for every slide before
the first fold trains, and what a run's feature fingerprint is made of.

An h5 file's header is its datasets' shapes and dtypes; a ``.pt`` file is memory-mapped (``torch.load(mmap=True)``),
so only the tensor's metadata is read. Values (NaN, beyond float16, a truncated payload) are checked when a slide is
read (:func:`milbench.data.readers.read_slide`); those errors are input errors too, and stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from milbench import MilbenchError
from milbench.data.readers import FIX, READ_ERRORS, one_line


@dataclass(frozen=True)
class FileHeader:
    """One feature file: its size in bytes, its patches and width, and its coordinates' length (None: no coords)."""

    path: Path
    size: int
    patches: int
    dim: int
    coords: int | None


def _shape_2d(shape: tuple[int, ...], kind: str, what: str, path: Path) -> tuple[int, int]:
    while len(shape) == 3 and shape[0] == 1:  # TRIDENT and some pt files keep a batch axis
        shape = shape[1:]
    if kind not in "fiu":
        raise MilbenchError(f"{what} in {path} are not numbers (dtype kind '{kind}'): {FIX}")
    if len(shape) != 2:
        raise MilbenchError(f"{what} in {path} have shape {tuple(shape)}, expected [patches, dim]: {FIX}")
    return int(shape[0]), int(shape[1])


def _h5_header(path: Path) -> tuple[tuple[int, int], int | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            feats = f.get("features")
            if not isinstance(feats, h5py.Dataset):
                held = ", ".join(f.keys()) or "nothing"
                raise MilbenchError(f"{path} has no 'features' dataset (it has: {held}): {FIX}")
            shape = _shape_2d(feats.shape, feats.dtype.kind, "features", path)
            coords = f.get("coords")
            n_coords = None
            if isinstance(coords, h5py.Dataset):
                n, width = _shape_2d(coords.shape, coords.dtype.kind, "coords", path)
                if width != 2:
                    raise MilbenchError(f"coords in {path} have shape {coords.shape}, expected [patches, 2]: {FIX}")
                n_coords = n
            if feats.id.get_storage_size() == 0 and shape[0] * shape[1]:
                raise MilbenchError(f"{path} has an empty 'features' payload: {FIX}")
            return shape, n_coords
    except READ_ERRORS as err:
        raise MilbenchError(f"cannot read {path} ({one_line(err)}): {FIX}") from err


def _pt_header(path: Path) -> tuple[tuple[int, int], int | None]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except READ_ERRORS as err:
        raise MilbenchError(f"cannot read {path} ({one_line(err)}): {FIX}") from err
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise MilbenchError(f"{path} holds a dict without 'features' (keys: {', '.join(map(str, obj))}): {FIX}")
        obj, coords = obj["features"], obj.get("coords")
    if not isinstance(obj, torch.Tensor):
        raise MilbenchError(f"{path} holds a {type(obj).__name__}, not a features tensor: {FIX}")
    kind = "f" if obj.is_floating_point() else ("b" if obj.dtype == torch.bool else "i")
    shape = _shape_2d(tuple(obj.shape), kind, "features", path)
    n_coords = None
    if isinstance(coords, torch.Tensor):
        n_coords, width = _shape_2d(tuple(coords.shape), "i", "coords", path)
        if width != 2:
            raise MilbenchError(f"coords in {path} have shape {tuple(coords.shape)}, expected [patches, 2]: {FIX}")
    return shape, n_coords


def read_header(path: Path) -> FileHeader:
    """The header of one feature file, checked: 2-D numeric features with at least one patch, coords as long as the
    features when present. Every problem is a one-line error naming the file."""
    path = Path(path)
    (patches, dim), coords = _h5_header(path) if path.suffix == ".h5" else _pt_header(path)
    if patches == 0 or dim == 0:
        raise MilbenchError(f"{path} has zero patches (features shape ({patches}, {dim})): {FIX}")
    if coords is not None and coords != patches:
        raise MilbenchError(f"{path} has {coords} coords but {patches} feature rows: {FIX}")
    return FileHeader(path, path.stat().st_size, patches, dim, coords)
