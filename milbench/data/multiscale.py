"""Cross-scale index of a patient's patches (spec §2.2), built once per bag from CLAM level-0 coordinates.

A patch at magnification m covers a square of side ``s_m`` level-0 pixels; only the 4:2:1 ratio of the 5x:10x:20x
sides is assumed (any base magnification), and it is checked. The index links each 20x and 10x patch to the
lower-magnification patch that contains its centre (the same patch as full containment on aligned grids, the centre
rule otherwise; MuSTMIL, CS-MIL), and lists for each 5x patch its complete, ordered 2x2 10x and 4x4 20x sub-squares
(ZoomMIL), -1 where no patch was extracted. Links never cross slides.

Index contents (``build_index``):

* ``parent_10x_of_20x`` [N20], ``parent_5x_of_20x`` [N20], ``parent_5x_of_10x`` [N10]: parent row, -1 for orphans.
* ``children_10x_of_5x`` [N5, 4]: raster order (top-left, top-right, bottom-left, bottom-right).
* ``children_20x_of_5x`` [N5, 16]: depth-first: the 2x2 20x block of 10x child j (raster) is columns 4j..4j+3,
  itself in raster order, so the mid->high zoom step of ZoomMIL selects contiguous rows.
* ``patch_size``: level-0 side per scale and slide ({scale: [n_slides]}).
* ``counts``: ``orphans`` and ``centre_only`` (linked by the centre rule but not fully contained) per parent array,
  ``missing`` (child slots left at -1) and ``collisions`` (patches that lost a slot to an overlapping one) per scale.

Only the arrays whose scales are present are built. Grids must not overlap within a scale (CLAM's default step =
patch size); with overlapping extraction pass ``patch_size``, and a parent is then one of those containing the centre.
"""

from __future__ import annotations

import numpy as np
import torch

from milbench import MilbenchError

SIDE_RATIO = {"5x": 4, "10x": 2, "20x": 1}  # patch side in units of the 20x side
PARENT_LINKS = (("20x", "10x"), ("20x", "5x"), ("10x", "5x"))  # (child, parent)
_RATIO_TOL = 0.01


def build_index(
    coords: dict[str, torch.Tensor],
    slide_index: dict[str, torch.Tensor],
    patch_size: dict[str, int] | None = None,
) -> dict:
    """Cross-scale index of one bag from level-0 top-left ``coords`` [N, 2] per scale (see the module docstring).

    Patch sides come from ``patch_size`` (level-0 px per scale) or are inferred per slide from the most common
    grid step of each scale (see ``_grid_step``), which assumes non-overlapping patches.
    """
    scales = [s for s in SIDE_RATIO if s in coords]
    xy = {s: coords[s].detach().cpu().numpy().astype(np.float64).reshape(-1, 2) for s in scales}
    sl = {
        s: (slide_index[s].detach().cpu().numpy().astype(np.int64) if s in slide_index
            else np.zeros(len(xy[s]), dtype=np.int64))
        for s in scales
    }
    n_slides = max((int(v.max()) + 1 for v in sl.values() if len(v)), default=1)
    if not scales:  # no coordinates (pt features): nothing to link; models that need links say so
        unit = np.zeros(0)
    elif patch_size:
        unit = _unit_from_patch_size(patch_size, scales, n_slides)
    else:
        unit = _infer_unit(xy, sl, n_slides)
    side = {s: SIDE_RATIO[s] * unit for s in scales}  # [n_slides] float level-0 px

    index: dict = {"patch_size": {s: torch.from_numpy(np.rint(side[s]).astype(np.int64)) for s in scales}}
    counts: dict = {"orphans": {}, "centre_only": {}, "missing": {}, "collisions": {}}
    for child, parent in PARENT_LINKS:
        if child in xy and parent in xy:
            key = f"parent_{parent}_of_{child}"
            p, full = _find_parents(xy[child], sl[child], side[child], xy[parent], sl[parent], side[parent])
            index[key] = torch.from_numpy(p)
            counts["orphans"][key] = int((p < 0).sum())
            counts["centre_only"][key] = int(((p >= 0) & ~full).sum())
    if "5x" in xy:
        n5 = len(xy["5x"])
        for child, per_side in (("10x", 2), ("20x", 4)):
            if child not in xy:
                continue
            parent = index[f"parent_5x_of_{child}"].numpy()
            table, collisions = _child_slots(
                xy[child], sl[child], side[child], xy["5x"], side["5x"], parent, n5, per_side)
            index[f"children_{child}_of_5x"] = torch.from_numpy(table)
            counts["missing"][child] = int((table < 0).sum())
            counts["collisions"][child] = collisions
    index["counts"] = counts
    return index


def bag_index(bag, *keys: str) -> dict:
    """The bag's cross-scale index (cached in ``extras`` by the data layer, else built now and cached there),
    checked to hold ``keys``: they need level-0 coordinates at every scale they name."""
    if "hierarchy" not in bag.extras:
        bag.extras["hierarchy"] = build_index(bag.coords, bag.slide_index)
    index = bag.extras["hierarchy"]
    missing = [k for k in keys if k not in index]
    if missing:
        raise MilbenchError(
            f"case {bag.case_id}: the cross-scale index lacks {', '.join(missing)}: it needs features with level-0 "
            f"coordinates (CLAM or TRIDENT h5) at every magnification it links"
        )
    return index


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for any shape of ``rows``, with zero vectors where ``rows`` is -1 (missing children, spec §2.2)."""
    present = (rows >= 0).unsqueeze(-1).to(x.dtype)
    return x[rows.clamp(min=0)] * present


def _unit_from_patch_size(patch_size: dict[str, int], scales: list[str], n_slides: int) -> np.ndarray:
    """20x side implied by user-given sides, after checking they cover every scale and follow 4:2:1."""
    missing = [s for s in scales if s not in patch_size]
    if missing:
        raise MilbenchError(f"patch_size has no side for {', '.join(missing)}: give the level-0 side of every scale")
    units = {s: patch_size[s] / SIDE_RATIO[s] for s in scales}
    u = units[scales[-1]]
    if any(abs(v - u) > _RATIO_TOL * u for v in units.values()):
        raise MilbenchError(f"patch_size {patch_size} does not follow the 4:2:1 side ratio of 5x:10x:20x: fix it")
    return np.full(n_slides, float(u))


def _grid_step(xy: np.ndarray) -> float | None:
    """Most common positive gap between neighbouring patches of one row (or column); None without neighbours.

    The mode, not the minimum: CLAM starts a new grid at each tissue contour, so patches of different contours
    can sit a few pixels apart while the step between grid neighbours is by far the most frequent gap.
    """
    gaps = []
    for along, across in ((0, 1), (1, 0)):
        order = np.lexsort((xy[:, along], xy[:, across]))
        a, b = xy[order, along], xy[order, across]
        same_line = b[1:] == b[:-1]
        d = np.diff(a)[same_line]
        gaps.append(d[d > 0])
    d = np.concatenate(gaps)
    if not len(d):
        return None
    values, n = np.unique(d, return_counts=True)
    return float(values[np.argmax(n)])


def _infer_unit(xy: dict[str, np.ndarray], sl: dict[str, np.ndarray], n_slides: int) -> np.ndarray:
    """Side of a 20x patch per slide, from the grid steps of every scale, checking the 4:2:1 ratio."""
    unit = np.full(n_slides, np.nan)
    for slide in range(n_slides):
        steps = {s: _grid_step(xy[s][sl[s] == slide]) for s in xy}
        est = {s: st / SIDE_RATIO[s] for s, st in steps.items() if st is not None}
        if not est:
            continue
        u = min(est.values())  # a sparse scale's step can be a multiple of its side, never a fraction
        if any(abs(v / u - round(v / u)) > _RATIO_TOL * v / u for v in est.values()):
            raise MilbenchError(
                f"patch grids of slide {slide} do not follow the 4:2:1 side ratio of 5x:10x:20x (grid steps "
                f"{ {s: steps[s] for s in est} } level-0 px): pass patch_size to build_index"
            )
        unit[slide] = u
    known = unit[~np.isnan(unit)]
    if not len(known):
        raise MilbenchError("cannot infer patch sides: no two neighbouring patches at any scale; pass patch_size")
    unit[np.isnan(unit)] = np.median(known)  # slides too small to show a step: take the others' side
    return unit


def _cells(xy: np.ndarray, sl: np.ndarray, cell: np.ndarray, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """One int64 key per (slide, grid cell of side ``cell``) for hashing squares by their top-left corner."""
    gx = np.floor(xy[:, 0] / cell).astype(np.int64) - shift[0]
    gy = np.floor(xy[:, 1] / cell).astype(np.int64) - shift[1]
    return (sl << 42) + ((gx + (1 << 20)) << 21) + (gy + (1 << 20))


def _find_parents(
    cxy: np.ndarray, csl: np.ndarray, cside: np.ndarray, pxy: np.ndarray, psl: np.ndarray, pside: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Parent row of each child (the parent square containing its centre, same slide), and full containment flags.

    Parents are hashed by the cell of side s_p holding their top-left corner; a square containing point c has its
    corner in the cell of c or the cell left of / above it, so four look-ups per child suffice (O(N log N)).
    """
    n = len(cxy)
    best, best_score = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if not len(pxy) or not n:
        return best, np.zeros(n, dtype=bool)
    cs, ps = cside[csl][:, None], pside[psl][:, None]
    centre = cxy + cs / 2
    pkeys = _cells(pxy, psl, ps[:, 0])
    order = np.argsort(pkeys, kind="stable")
    keys = pkeys[order]
    cell = pside[csl]
    for shift in ((0, 0), (1, 0), (0, 1), (1, 1)):
        q = _cells(centre, csl, cell, shift)
        lo, hi = np.searchsorted(keys, q, "left"), np.searchsorted(keys, q, "right")
        for t in range(int((hi - lo).max(initial=0))):  # >1 candidate per cell only where parents overlap
            has = lo + t < hi
            cand = order[np.minimum(lo + t, len(order) - 1)]
            corner, pside_c = pxy[cand], ps[cand]
            in_centre = np.all((corner <= centre) & (centre < corner + pside_c), axis=1)
            in_full = np.all((corner <= cxy) & (cxy + cs <= corner + pside_c), axis=1)
            score = np.where(has & in_centre, 1 + in_full, 0)
            take = score > best_score
            best[take], best_score[take] = cand[take], score[take]
    return best, best_score == 2


def _child_slots(
    cxy: np.ndarray, csl: np.ndarray, cside: np.ndarray, pxy: np.ndarray, pside: np.ndarray,
    parent: np.ndarray, n5: int, per_side: int,
) -> tuple[np.ndarray, int]:
    """[N5, per_side^2] table of the child filling each sub-square of each 5x patch, -1 when none, and collisions.

    A child's slot is the sub-square holding its centre. For the 4x4 20x block, slots are numbered depth-first
    (10x quadrant first, then the 2x2 position inside it).
    """
    table = np.full((n5, per_side * per_side), -1, dtype=np.int64)
    rows = np.nonzero(parent >= 0)[0]
    if not len(rows):
        return table, 0
    p = parent[rows]
    sub = (pside[csl[rows]] / per_side)[:, None]
    centre = cxy[rows] + cside[csl[rows]][:, None] / 2
    g = np.clip(np.floor((centre - pxy[p]) / sub).astype(np.int64), 0, per_side - 1)
    gx, gy = g[:, 0], g[:, 1]
    if per_side == 2:
        slot = gy * 2 + gx
    else:  # depth-first: quadrant (10x child) then position in the quadrant
        slot = ((gy // 2) * 2 + gx // 2) * 4 + (gy % 2) * 2 + gx % 2
    flat = p * per_side * per_side + slot
    table.reshape(-1)[flat] = rows
    return table, int(len(rows) - len(np.unique(flat)))
