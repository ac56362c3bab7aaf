"""Contact sheet of one slide's plan: thumbnail, tissue mask, and the kept 5x (coarsest) grid over the thumbnail.

It lets a user check the segmentation and the grid by eye before trusting thousands of slides to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from milbench.extract.grid import SlidePlan


def contact_sheet(plan: SlidePlan, path: Path) -> Path:
    """Write the three-panel PNG to ``path`` and return it."""
    thumb, mask = plan.tissue.thumbnail, plan.tissue.mask
    dx, dy = plan.tissue.downsample
    height, width = mask.shape
    fig = Figure(figsize=(15, max(3.0, 5.0 * height / width) + 0.6), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(thumb)
    axes[0].set_title(f"{plan.name}: {plan.dims[0]}x{plan.dims[1]} px at {plan.base_mag:g}x "
                      f"({plan.base_mag_source})", fontsize=9)
    axes[1].imshow(mask, cmap="gray", interpolation="nearest")
    axes[1].set_title(f"tissue (saturation > {plan.tissue.threshold:g}): {plan.tissue.fraction:.1%} of the slide",
                      fontsize=9)
    axes[2].imshow(thumb)
    axes[2].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.25, interpolation="nearest")
    coarse = min(plan.coords)
    side = plan.reads[coarse].side0
    boxes = [Rectangle((x / dx - 0.5, y / dy - 0.5), side / dx, side / dy)  # imshow puts pixel edges at -0.5
             for x, y in plan.coords[coarse]]
    axes[2].add_collection(PatchCollection(boxes, facecolor="none", edgecolor="tab:blue", linewidth=0.6))
    counts = ", ".join(f"{len(plan.coords[m])} at {m}x" for m in sorted(plan.coords))
    axes[2].set_title(f"{coarse}x grid ({side} level-0 px); patches: {counts}", fontsize=9)
    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
