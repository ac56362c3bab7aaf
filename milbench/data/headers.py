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
from milbench.data.readers import FIX, READ_ERRORS, check_shape, load_pt, one_line


@dataclass(frozen=True)
class FileHeader:
    """One feature file: its size in bytes, its patches and width, and its coordinates' length (None: no coords)."""

    path: Path
    size: int
    patches: int
    dim: int
    coords: int | None


def _numeric(kind: str, what: str, path: Path) -> None:
    if kind not in "fiu":
        raise MilbenchError(f"{what} in {path} are not numbers (dtype kind '{kind}'): {FIX}")


def _unbatched(shape: tuple[int, ...]) -> tuple[int, ...]:
    """TRIDENT and some pt files keep a batch axis of one: [1, N, D] -> [N, D]."""
    while len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    return tuple(int(n) for n in shape)


def _h5_header(path: Path) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            feats = f.get("features")
            if not isinstance(feats, h5py.Dataset):
                held = ", ".join(f.keys()) or "nothing"
                raise MilbenchError(f"{path} has no 'features' dataset (it has: {held}): {FIX}")
            _numeric(feats.dtype.kind, "features", path)
            coords = f.get("coords")
            xy = None
            if isinstance(coords, h5py.Dataset):
                _numeric(coords.dtype.kind, "coords", path)
                xy = _unbatched(coords.shape)
            if feats.id.get_storage_size() == 0 and feats.size:
                raise MilbenchError(f"{path} has an empty 'features' payload: {FIX}")
            return _unbatched(feats.shape), xy
    except READ_ERRORS as err:
        raise MilbenchError(f"cannot read {path} ({one_line(err)}): {FIX}") from err


def _pt_header(path: Path) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    import torch

    feats, coords = load_pt(path, mmap=True)
    if not isinstance(feats, torch.Tensor):
        raise MilbenchError(f"{path} holds a {type(feats).__name__}, not a features tensor: {FIX}")
    _numeric("f" if feats.is_floating_point() else ("b" if feats.dtype == torch.bool else "i"), "features", path)
    xy = _unbatched(tuple(coords.shape)) if isinstance(coords, torch.Tensor) else None
    return _unbatched(tuple(feats.shape)), xy


def read_header(path: Path) -> FileHeader:
    """The header of one feature file, checked: 2-D numeric features with at least one patch, coords as long as the
    features when present. Every problem is a one-line error naming the file."""
    path = Path(path)
    features, coords = _h5_header(path) if path.suffix == ".h5" else _pt_header(path)
    check_shape(path, features, coords)
    return FileHeader(path, path.stat().st_size, features[0], features[1], None if coords is None else coords[0])
