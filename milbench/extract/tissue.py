"""Tissue segmentation on a thumbnail by thresholding HSV saturation, as CLAM and the CrossFusion paper do.

Stained tissue is coloured, glass and background are grey or white: the saturation channel separates them.
The channel is median-blurred (CLAM's ``mthresh`` 7, removing dust and JPEG speckle), then thresholded by Otsu's
method (default; adapts to stain intensity) or a fixed value (CLAM's ``sthresh``, 8 by default there). Otsu's
threshold never goes below ``MIN_OTSU`` so a thumbnail of empty glass does not turn its noise into tissue.
Holes and small fragments are not filtered here: a patch is kept only when enough of it is tissue (see grid.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image
from scipy.ndimage import median_filter

from milbench import MilbenchError

MIN_OTSU = 8.0  # CLAM's fixed saturation threshold, the floor of Otsu's
MEDIAN_SIZE = 7  # CLAM's median blur kernel at its segmentation level


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask [h, w] of a thumbnail (kept for the contact sheet) and its scale in level-0 px."""

    mask: np.ndarray
    thumbnail: np.ndarray
    downsample: tuple[float, float]
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the slide's area that is tissue."""
        return float(self.mask.mean())

    def fraction_in(self, xy: np.ndarray, side: float) -> np.ndarray:
        """Tissue fraction [N] of the level-0 squares with top-left corners ``xy`` [N, 2] and side ``side``.

        Squares are snapped to mask pixels and counted with a summed-area table; parts outside the slide count
        as background.
        """
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), dtype=np.int64)
        table[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        dx, dy = self.downsample
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        x0 = np.clip(np.rint(xy[:, 0] / dx), 0, w).astype(np.int64)
        x1 = np.clip(np.rint((xy[:, 0] + side) / dx), 0, w).astype(np.int64)
        y0 = np.clip(np.rint(xy[:, 1] / dy), 0, h).astype(np.int64)
        y1 = np.clip(np.rint((xy[:, 1] + side) / dy), 0, h).astype(np.int64)
        count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        area = max(1.0, round(side / dx)) * max(1.0, round(side / dy))
        return count / area


def parse_threshold(text: str | float) -> str | float:
    """``"otsu"`` or a saturation value in [0, 255] (``--tissue-threshold``)."""
    if isinstance(text, str) and text.strip().lower() == "otsu":
        return "otsu"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 255:
        raise MilbenchError(f"--tissue-threshold '{text}' must be 'otsu' or a saturation value between 0 and 255")
    return value


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values``: the cut maximising the between-class variance (pixels > cut = class 1)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    mass0 = np.cumsum(hist * np.arange(256))
    mean0 = mass0 / np.maximum(weight0, 1)
    mean1 = (mass0[-1] - mass0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def segment(rgb: np.ndarray, threshold: str | float = "otsu") -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail [h, w, 3] uint8 and the saturation threshold used (pixels above it)."""
    saturation = np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]
    saturation = median_filter(saturation, size=MEDIAN_SIZE, mode="nearest")
    cut = max(otsu_threshold(saturation), MIN_OTSU) if threshold == "otsu" else float(threshold)
    return saturation > cut, cut


def tissue_mask(slide: openslide.OpenSlide, downsample: float, threshold: str | float = "otsu") -> TissueMask:
    """Segment the slide on a thumbnail about ``downsample`` level-0 px per pixel (OpenSlide picks the level)."""
    width, height = slide.dimensions
    size = (max(1, int(np.ceil(width / downsample))), max(1, int(np.ceil(height / downsample))))
    thumb = np.asarray(slide.get_thumbnail(size).convert("RGB"))
    mask, cut = segment(thumb, threshold)
    scale = (width / thumb.shape[1], height / thumb.shape[0])
    return TissueMask(mask=mask, thumbnail=thumb, downsample=scale, threshold=cut)
