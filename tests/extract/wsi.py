"""Tiny pyramidal whole-slide images written with tifffile, a tiny encoder, and a cohort table over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
from PIL import Image
from torch import nn

BACKGROUND = (236, 236, 232)  # glass: nearly grey, saturation ~4/255
STAIN = (196, 104, 168)  # H&E-like pink: saturation ~120/255


def tissue_image(width: int, height: int, shapes: list[tuple], seed: int = 0) -> np.ndarray:
    """RGB level-0 image: glass with textured stain inside ``("rect", x0, y0, x1, y1)`` and
    ``("ellipse", cx, cy, rx, ry)`` shapes (level-0 px)."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[0:height, 0:width]
    inside = np.zeros((height, width), dtype=bool)
    for kind, *p in shapes:
        if kind == "rect":
            inside |= (xx >= p[0]) & (xx < p[2]) & (yy >= p[1]) & (yy < p[3])
        else:
            inside |= ((xx - p[0]) / p[2]) ** 2 + ((yy - p[1]) / p[3]) ** 2 <= 1
    texture = rng.integers(-40, 41, size=(height, width, 1))
    stained = np.clip(np.array(STAIN) + texture, 0, 255).astype(np.uint8)
    img[inside] = stained[inside]
    return img


def write_slide(path: Path, image: np.ndarray, base_mag: float | None = 40, downsamples: tuple[int, ...] = (1, 4, 16),
                tile: int = 64) -> Path:
    """Tiled pyramidal TIFF. With ``base_mag``: Aperio-style (an ``AppMag`` in the ImageDescription, which
    OpenSlide reports as ``aperio.AppMag`` and ``openslide.objective-power``); without: a generic TIFF."""
    height, width = image.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for d in downsamples:
            level = np.asarray(Image.fromarray(image).resize((width // d, height // d), Image.Resampling.BOX))
            desc = None
            if base_mag is not None:
                desc = (f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                        f"RAW|AppMag = {base_mag:g}|MPP = {10 / base_mag:g}")
            tif.write(level, tile=(tile, tile), photometric="rgb", compression=None, description=desc,
                      metadata=None)
    return path


# A 40x slide of 1024x768 level-0 px with 32 px patches: 20x side 64, 10x 128, 5x 256 (a 4x3 5x grid).
SHAPES = {
    "slide_a": [("rect", 256, 256, 768, 512)],  # two whole 5x cells, fully tissue
    "slide_b": [("ellipse", 500, 380, 300, 220)],
    "slide_c": [("rect", 40, 40, 300, 700), ("ellipse", 760, 300, 180, 160)],
    "slide_d": [("ellipse", 300, 300, 200, 150), ("rect", 600, 500, 1000, 740)],
}


def write_cohort_slides(folder: Path) -> dict[str, np.ndarray]:
    """Four Aperio 40x slides and one generic 20x TIFF (no magnification recorded); returns level-0 images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, (name, shapes) in enumerate(SHAPES.items()):
        images[name] = tissue_image(1024, 768, shapes, seed=i)
        write_slide(folder / f"{name}.svs", images[name])
    images["slide_e"] = tissue_image(512, 384, [("ellipse", 256, 192, 200, 150)], seed=9)
    write_slide(folder / "slide_e.tif", images["slide_e"], base_mag=None, downsamples=(1, 4))
    return images


def write_table(folder: Path, slides: list[str]) -> tuple[Path, Path]:
    """A cohort table (one patient per slide, all events, distinct times) and one CLAM split (fold 0)."""
    cases = [f"case_{s}" for s in slides]
    table = pd.DataFrame({"case_id": cases, "slide_id": [f"{s}.svs" for s in slides],
                          "survival_months": [6.0 * (i + 1) for i in range(len(slides))], "censorship": 0})
    table.to_csv(folder / "table.csv", index=False)
    splits = folder / "splits"
    splits.mkdir(exist_ok=True)
    held = len(cases) // 2
    pd.DataFrame({"train": pd.Series(cases[held:]), "val": pd.Series(cases[:held])}).to_csv(splits / "splits_0.csv")
    return folder / "table.csv", splits


class QuadrantMeans(nn.Module):
    """A parameter-free encoder: the mean of each normalised channel over the 2x2 quadrants -> 12-d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def quadrant_means(weights: str | None = None) -> nn.Module:
    """Factory for ``--encoder tests.extract.wsi:quadrant_means`` (``weights`` unused, recorded)."""
    return QuadrantMeans()
