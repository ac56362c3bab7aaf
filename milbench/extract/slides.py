"""Whole-slide images through OpenSlide: open, find the base magnification, read square patches at any size.

No torch here: worker processes import this module to decode patches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from milbench import MilbenchError

# Metadata keys holding the scanner's objective power, in order of trust (OpenSlide's normalised key first).
MAGNIFICATION_KEYS = ("openslide.objective-power", "aperio.AppMag")
_OPEN_ERRORS = (openslide.OpenSlideError, OSError, ValueError)
_HANDLES: OrderedDict[str, openslide.OpenSlide] = OrderedDict()  # per process: slides stay open between chunks
_MAX_HANDLES = 4


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """The slide at ``path``, opened once per process (a small LRU of handles); unreadable files are user errors."""
    key = str(path)
    if key in _HANDLES:
        _HANDLES.move_to_end(key)
        return _HANDLES[key]
    try:
        slide = openslide.OpenSlide(key)
    except _OPEN_ERRORS as err:
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise MilbenchError(f"cannot open {path} with OpenSlide ({type(err).__name__}: {first}): is it a "
                            f"whole-slide image? move it out of --slides") from err
    _HANDLES[key] = slide
    if len(_HANDLES) > _MAX_HANDLES:
        _HANDLES.popitem(last=False)[1].close()
    return slide


def base_magnification(slide: openslide.OpenSlide, path: str | Path,
                       override: float | None = None) -> tuple[float, str]:
    """Objective power of level 0 and where it came from: the metadata, else ``override`` (``--base-mag``).

    The metadata wins when both exist: ``--base-mag`` fills in for formats (generic TIFF, some scanners) that do
    not record it, so one value can serve a folder of mixed slides.
    """
    for key in MAGNIFICATION_KEYS:
        try:
            value = float(slide.properties.get(key, "nan"))
        except ValueError:
            continue
        if np.isfinite(value) and value > 0:
            return value, key
    if override is not None:
        return float(override), "--base-mag"
    raise MilbenchError(f"{path} records no base magnification ({' or '.join(MAGNIFICATION_KEYS)}): pass "
                        f"--base-mag 40 (or 20) with the objective power the slide was scanned at")


@dataclass(frozen=True)
class ReadSpec:
    """How one magnification's patches are decoded: ``size`` px read at pyramid ``level``, resized to ``out`` px.

    ``side0`` is the patch side in level-0 px, ``downsample`` the level's downsample factor.
    """

    level: int
    size: int
    side0: int
    out: int
    downsample: float


def read_spec(slide: openslide.OpenSlide, side0: int, out: int) -> ReadSpec:
    """Read at the coarsest pyramid level that is still at least as fine as needed (downsample <= side0 / out).

    Never reading coarser than the target keeps patches from being upsampled; the remaining factor (e.g. 2 for a
    20x patch of a 40x slide without a 2x level) is done by an antialiased resize.
    """
    wanted = side0 / out
    downsamples = [float(d) for d in slide.level_downsamples]
    level = max((i for i, d in enumerate(downsamples) if d <= wanted * (1 + 1e-3)), default=0)
    size = max(1, int(round(side0 / downsamples[level])))
    return ReadSpec(level=level, size=size, side0=side0, out=out, downsample=downsamples[level])


def read_patches(path: str | Path, coords: np.ndarray, spec: ReadSpec) -> np.ndarray:
    """RGB patches [N, out, out, 3] uint8 whose level-0 top-left corners are ``coords`` [N, 2] (x, y).

    Transparent pixels (outside the scanned area) become white, the colour of glass.
    """
    slide = open_slide(path)
    patches = np.empty((len(coords), spec.out, spec.out, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(np.asarray(coords, dtype=np.int64)):
        region = slide.read_region((int(x), int(y)), spec.level, (spec.size, spec.size))
        patches[i] = np.asarray(_to_rgb(region, spec.out))
    return patches


def _to_rgb(region: Image.Image, out: int) -> Image.Image:
    """RGBA region -> RGB on white, resized to ``out`` px when the level did not give that size."""
    if region.getextrema()[3][0] < 255:
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        region = Image.alpha_composite(white, region)
    rgb = region.convert("RGB")
    if rgb.size != (out, out):
        rgb = rgb.resize((out, out), Image.Resampling.BILINEAR)
    return rgb
