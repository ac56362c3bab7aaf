"""Nested patch grids per magnification in level-0 coordinates, and the per-slide extraction plan.

All grids start at the level-0 origin. The patch side of magnification m is ``patch * base / m`` level-0 px
(on a 40x slide with 256 px patches: 20x 512, 10x 1024, 5x 2048), computed from the finest magnification so the
sides are exact multiples: a 5x patch covers exactly 2x2 10x and 4x4 20x grid cells.

Which cells are kept: a cell of the finest magnification when at least ``min_tissue`` of it is tissue; a cell of a
coarser magnification when any of the finest cells it covers is kept. So every kept patch has its parent at every
coarser magnification, no tissue seen at 20x is lost at 5x, and tissue-free children of an edge patch are skipped
(the cross-scale index marks their slots missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milbench import MilbenchError
from milbench.extract.slides import ReadSpec, base_magnification, open_slide, read_spec
from milbench.extract.tissue import TissueMask, tissue_mask

MAGNIFICATIONS = (5, 10, 20)
MASK_PX_PER_PATCH = 8  # thumbnail resolution: the finest patch spans this many mask pixels (CLAM: 512 px / 64)
MAX_THUMBNAIL = 8192  # longest thumbnail side, whatever the patch size


def parse_mags(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"5,10,20"`` (or a sequence) -> sorted unique magnifications, each one of 5, 10, 20."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        mags = sorted({int(float(str(m).strip().lower().removesuffix("x"))) for m in items if str(m).strip()})
    except ValueError:
        mags = []
    if not mags or any(m not in MAGNIFICATIONS for m in mags):
        raise MilbenchError(f"--mags '{text}' must list magnifications among 5, 10, 20 (e.g. 5,10,20)")
    return tuple(mags)


def level0_sides(base_mag: float, mags: tuple[int, ...], patch: int) -> dict[int, int]:
    """Patch side in level-0 px per magnification, exact powers of two apart (finest first, then doubled)."""
    finest = max(mags)
    if finest > base_mag * 1.001:
        raise MilbenchError(f"a {finest}x patch needs a slide scanned at {finest}x or more, this one is {base_mag:g}x: "
                            f"drop {finest} from --mags or check --base-mag")
    side = int(round(patch * base_mag / finest))
    return {m: side * (finest // m) for m in mags}


def nested_grid(dims: tuple[int, int], sides: dict[int, int], mask: TissueMask,
                min_tissue: float) -> dict[int, np.ndarray]:
    """Kept top-left corners [N, 2] (x, y; row-major order) per magnification.

    The coarsest grid covers the slide (cells reaching past its edge included); finer grids subdivide it.
    """
    coarse, finest = min(sides), max(sides)
    big, small = sides[coarse], sides[finest]
    per = big // small
    rows, cols = int(np.ceil(dims[1] / big)) * per, int(np.ceil(dims[0] / big)) * per
    gy, gx = np.mgrid[0:rows, 0:cols]
    corners = np.stack([gx.ravel(), gy.ravel()], axis=1) * small
    fraction = mask.fraction_in(corners, small).reshape(rows, cols)
    keep_fine = fraction >= min_tissue
    coords = {}
    for mag, side in sides.items():
        k = side // small
        keep = keep_fine.reshape(rows // k, k, cols // k, k).any(axis=(1, 3))
        coords[mag] = np.argwhere(keep)[:, ::-1].astype(np.int64) * side
    return coords


@dataclass(frozen=True)
class SlidePlan:
    """Everything decided before decoding a slide: magnification, tissue, kept patches and how to read them."""

    path: Path
    name: str
    dims: tuple[int, int]
    base_mag: float
    base_mag_source: str
    tissue: TissueMask
    coords: dict[int, np.ndarray]
    reads: dict[int, ReadSpec]

    @property
    def n_patches(self) -> int:
        """Patches to decode over all magnifications."""
        return sum(len(c) for c in self.coords.values())


def plan_slide(path: Path, name: str, mags: tuple[int, ...], patch: int, min_tissue: float,
               threshold: str | float = "otsu", base_mag: float | None = None) -> SlidePlan:
    """Open the slide, find its base magnification, segment tissue and lay out the nested grids."""
    slide = open_slide(path)
    base, source = base_magnification(slide, path, base_mag)
    sides = level0_sides(base, mags, patch)
    finest = sides[max(mags)]
    downsample = max(finest / MASK_PX_PER_PATCH, max(slide.dimensions) / MAX_THUMBNAIL, 1.0)
    mask = tissue_mask(slide, downsample, threshold)
    coords = nested_grid(slide.dimensions, sides, mask, min_tissue)
    reads = {m: read_spec(slide, side, patch) for m, side in sides.items()}
    return SlidePlan(path=Path(path), name=name, dims=tuple(slide.dimensions), base_mag=base,
                     base_mag_source=source, tissue=mask, coords=coords, reads=reads)
