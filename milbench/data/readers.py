"""Read one slide's patch features at one magnification from the CLAM or TRIDENT layout, validated at the boundary.

CLAM: ``ROOT[/BACKBONE]/x{5,10,20}/h5_files/<slide>.h5`` (``features`` [N, D], ``coords`` [N, 2]) and
``ROOT[/BACKBONE]/x{5,10,20}/pt_files/<slide>.pt`` (features only); h5 wins when both exist.
TRIDENT: ``ROOT/<mag>x_<ps>px_<ovl>px_overlap/features_<encoder>/<slide>.h5`` (features may be [1, N, D]).
Every bad file becomes a one-line :class:`milbench.MilbenchError` naming the file and the fix.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from milbench import MilbenchError
from milbench.data.bag import SCALES

# Whole-slide-image extensions a table's slide_id may carry; feature files are named without them.
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tiff", ".tif", ".scn", ".czi", ".bif", ".vms")
READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)
FIX = "re-extract it or remove the slide from the table"


@dataclass(frozen=True)
class SlideFeatures:
    """One slide at one magnification: half-precision features [N, D], level-0 coords [N, 2] (or None), source."""

    features: torch.Tensor
    coords: torch.Tensor | None
    path: Path

    @property
    def nbytes(self) -> int:
        """Memory held by the tensors (for the cache's budget)."""
        size = self.features.numel() * self.features.element_size()
        return size + (0 if self.coords is None else self.coords.numel() * self.coords.element_size())


def slide_stem(slide_id: str) -> str:
    """Slide ID as feature files name it: whitespace and a whole-slide-image extension such as ``.svs`` removed."""
    slide = str(slide_id).strip()
    lower = slide.lower()
    for suffix in WSI_SUFFIXES:
        if lower.endswith(suffix):
            return slide[: -len(suffix)]
    return slide


def canonical_scale(scale: str | int) -> str:
    """``"20x"``, ``"x20"``, ``"20"`` or ``20`` -> ``"20x"``; anything else is rejected."""
    text = str(scale).strip().lower().replace("x", "")
    name = f"{text}x"
    if name not in SCALES:
        raise MilbenchError(f"unknown magnification '{scale}': use one of {', '.join(SCALES)}")
    return name


def _trident_dirs(root: Path, mag: int, backbone: str | None) -> list[Path]:
    """TRIDENT feature folders for one magnification (one per patch-size/overlap setting present)."""
    found = []
    for setting in sorted(root.glob(f"{mag}x_*px_*px_overlap")):
        if backbone:
            found.append(setting / f"features_{backbone}")
            continue
        encoders = sorted(p for p in setting.glob("features_*") if p.is_dir())
        if len(encoders) > 1:
            names = ", ".join(p.name.removeprefix("features_") for p in encoders)
            raise MilbenchError(f"{setting} holds features of several encoders ({names}): pass --backbone to pick one")
        found += encoders
    return found


def candidate_paths(root: str | Path, scale: str | int, slide_id: str, backbone: str | None = None) -> list[Path]:
    """Every path where the slide's features may be, in order of preference."""
    root = Path(root)
    mag = int(canonical_scale(scale)[:-1])
    slide = slide_stem(slide_id)
    # ROOT/BACKBONE/x20 when that folder exists (or nothing does); ROOT/x20 when ROOT is the backbone's own folder
    plain = root / f"x{mag}"
    clam = root / backbone / f"x{mag}" if backbone and ((root / backbone).is_dir() or not plain.is_dir()) else plain
    paths = [clam / "h5_files" / f"{slide}.h5", clam / "pt_files" / f"{slide}.pt"]
    return paths + [d / f"{slide}.h5" for d in _trident_dirs(root, mag, backbone)]


def locate_feature_file(root: str | Path, scale: str | int, slide_id: str, backbone: str | None = None) -> Path | None:
    """The slide's feature file, or None when no candidate exists."""
    return next((p for p in candidate_paths(root, scale, slide_id, backbone) if p.is_file()), None)


def find_feature_file(root: str | Path, scale: str | int, slide_id: str, backbone: str | None = None) -> Path:
    """The slide's feature file; a missing one is an error naming the expected paths and the fix."""
    candidates = candidate_paths(root, scale, slide_id, backbone)
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        return found
    root = Path(root)
    if root.is_dir():
        held = sorted(p.name for p in root.iterdir())[:6]
        where = f" ({root} holds: {', '.join(held)})" if held else f" ({root} is empty)"
    else:
        where = f" ({root} does not exist)"
    raise MilbenchError(
        f"no features for slide {slide_stem(slide_id)} at {canonical_scale(scale)}: expected "
        f"{' or '.join(str(p) for p in candidates)}{where}; check --features/--backbone or run `milbench synth`"
    )


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__


def _load_h5(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("features"), h5py.Dataset):
                held = ", ".join(f.keys()) or "nothing"
                raise MilbenchError(f"{path} has no 'features' dataset (it has: {held}): {FIX}")
            coords = f["coords"][()] if isinstance(f.get("coords"), h5py.Dataset) else None
            return f["features"][()], coords
    except READ_ERRORS as err:
        raise MilbenchError(f"cannot read {path} ({one_line(err)}): {FIX}") from err


def load_pt(path: Path, mmap: bool = False) -> tuple[object, object | None]:
    """(features, coords or None) of a ``.pt`` file: a tensor, or a dict with ``features`` (and ``coords``);
    ``mmap`` reads only the tensors' metadata until their values are touched (the header check)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except READ_ERRORS as err:
        raise MilbenchError(f"cannot read {path} ({one_line(err)}): {FIX}") from err
    if isinstance(obj, dict):  # some extractors save {"features": ..., "coords": ...}
        if "features" not in obj:
            raise MilbenchError(f"{path} holds a dict without 'features' (keys: {', '.join(map(str, obj))}): {FIX}")
        return obj["features"], obj.get("coords")
    return obj, None


def _as_tensor(values: object, what: str, path: Path) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        array = np.asarray(values)
        if array.dtype.kind not in "fiu":
            raise MilbenchError(f"{what} in {path} are not numbers (dtype {array.dtype}): {FIX}")
        tensor = torch.from_numpy(array)
    while tensor.ndim == 3 and tensor.shape[0] == 1:  # TRIDENT and some pt files keep a batch axis
        tensor = tensor[0]
    return tensor


def check_shape(path: Path, features: tuple[int, ...], coords: tuple[int, ...] | None) -> None:
    """Features [patches, dim] with at least one patch, coords (when present) [patches, 2]: the shape checks that
    reading a slide and reading its header (:mod:`milbench.data.headers`) share."""
    if len(features) != 2:
        raise MilbenchError(f"features in {path} have shape {tuple(features)}, expected [patches, dim]: {FIX}")
    if features[0] == 0 or features[1] == 0:
        raise MilbenchError(f"{path} has zero patches (features shape {tuple(features)}): {FIX}")
    if coords is not None:
        if len(coords) != 2 or coords[1] != 2:
            raise MilbenchError(f"coords in {path} have shape {tuple(coords)}, expected [patches, 2]: {FIX}")
        if coords[0] != features[0]:
            raise MilbenchError(f"{path} has {coords[0]} coords but {features[0]} feature rows: {FIX}")


def _validate(features: object, coords: object | None, path: Path) -> SlideFeatures:
    feats = _as_tensor(features, "features", path)
    xy = None if coords is None else _as_tensor(coords, "coords", path)
    check_shape(path, tuple(feats.shape), None if xy is None else tuple(xy.shape))
    if feats.is_floating_point():
        bad = ~torch.isfinite(feats).all(dim=1)
        if bad.any():
            raise MilbenchError(f"{path} has NaN or infinite features in {int(bad.sum())} of {feats.shape[0]} "
                                f"patches: {FIX}")
    half = feats.to(torch.float16)
    if feats.dtype != torch.float16 and not torch.isfinite(half).all():
        raise MilbenchError(f"{path} has feature values beyond half precision (|x| > 65504): rescale them or {FIX}")
    if xy is not None:
        if xy.is_floating_point() and not torch.isfinite(xy).all():
            raise MilbenchError(f"{path} has NaN or infinite coords: {FIX}")
        xy = xy.round().long() if xy.is_floating_point() else xy.long()
    return SlideFeatures(features=half, coords=xy, path=path)


def read_slide(root: str | Path, scale: str | int, slide_id: str, backbone: str | None = None) -> SlideFeatures:
    """Read and validate one slide's features (float16 [N, D]) and coords (long [N, 2] or None) at one scale."""
    path = find_feature_file(root, scale, slide_id, backbone)
    features, coords = _load_h5(path) if path.suffix == ".h5" else load_pt(path)
    return _validate(features, coords, path)


def available_scales(root: str | Path, backbone: str | None = None) -> tuple[str, ...]:
    """The magnifications that have a feature folder under ``root`` (CLAM or TRIDENT layout)."""
    root = Path(root)
    clam = root / backbone if backbone and (root / backbone).is_dir() else root
    present = []
    for scale in SCALES:
        mag = int(scale[:-1])
        if (clam / f"x{mag}").is_dir() or any(d.is_dir() for d in _trident_dirs(root, mag, backbone)):
            present.append(scale)
    return tuple(present)
