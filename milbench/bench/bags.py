"""Bag sizes and random bags for the benchmarks: the paper's presets (average, 90th percentile, largest bag) and
bags of any size with nested 5x / 10x / 20x coordinates, built on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.models.registry import get_card

PRESETS: dict[str, tuple[int, int, int]] = {
    "avg": (895, 3_449, 13_496),
    "p90": (2_500, 10_000, 40_000),
    "max": (8_625, 34_500, 137_990),
}
SCALES = ("5x", "10x", "20x")
PATCH_20X = 256  # level-0 side of a 20x patch (base magnification 20x); 10x = 512, 5x = 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# The authors' model code on one H100 at width 2048 (gpu_anchor_h100.md): (model, preset) -> (fp16 step ms,
# fp16 peak GiB, fp32 step ms, fp32 peak GiB). fp16 is the reference's own autocast setting.
ANCHOR_H100: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("amil", "avg"): (2.7, 0.349, 2.86, 0.352), ("amil", "p90"): (2.97, 0.876, 6.51, 0.894),
    ("amil", "max"): (4.29, 2.706, 19.6, 2.834),
    ("dsmil", "avg"): (3.68, 1.584, 2.6, 0.338), ("dsmil", "p90"): (3.16, 0.948, 3.42, 0.867),
    ("dsmil", "max"): (5.69, 3.107, 7.9, 2.83),
    ("transmil", "avg"): (24.99, 1.601, 33.93, 1.766), ("transmil", "p90"): (55.55, 4.403, 86.79, 4.727),
    ("transmil", "max"): (171.18, 14.809, 284.19, 15.884),
    ("crossfusion", "avg"): (36.72, 1.674, 60.12, 1.459), ("crossfusion", "p90"): (89.41, 3.131, 315.6, 3.753),
    ("crossfusion", "max"): (343.22, 9.985, 3114.39, 12.211),
    ("crossfusion_concat", "avg"): (30.22, 1.677, 61.95, 1.477),
    ("crossfusion_concat", "p90"): (62.94, 3.199, 312.85, 3.8),
    ("crossfusion_concat", "max"): (319.51, 10.209, 3103.75, 12.366),
    ("crossfusion_single", "avg"): (143.64, 1.619, 199.65, 1.976),
    ("crossfusion_single", "p90"): (176.46, 4.446, 1395.39, 5.465),
    ("crossfusion_single", "max"): (1557.4, 14.914, 15891.4, 18.233),
}
# The reference's end-to-end rate on the same H100 machine (per-slide .pt loading, 8 workers, cache dropped).
ANCHOR_EPOCH_SLIDES_PER_S = 10.3


@dataclass(frozen=True)
class BagSize:
    """Patches per magnification of a benchmark bag, and the name it was asked for by."""

    name: str
    n5: int
    n10: int
    n20: int

    def at(self, scale: str) -> int:
        return {"5x": self.n5, "10x": self.n10, "20x": self.n20}[scale]


def parse_bag(text: str) -> BagSize:
    """``avg``/``p90``/``max``, a preset scaled down as ``avg/16`` (each count divided, rounded up), ``N20`` (5x
    and 10x at the paper's 1:4:16 ratio) or ``N5,N10,N20``."""
    key = text.strip().lower()
    if key in PRESETS:
        return BagSize(key, *PRESETS[key])
    preset, _, divisor = key.partition("/")
    if preset in PRESETS and divisor.isdigit() and int(divisor) > 0:
        return BagSize(key, *(math.ceil(n / int(divisor)) for n in PRESETS[preset]))
    try:
        parts = [int(p) for p in key.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        n20 = parts[0]
        return BagSize(key, max(1, math.ceil(n20 / 16)), max(1, math.ceil(n20 / 4)), n20)
    if len(parts) == 3 and min(parts) > 0:
        n5, n10, n20 = parts
        if n10 > 4 * n5 or n20 > 16 * n5:
            raise MilbenchError(f"--bag {text}: a 5x patch holds at most 4 10x and 16 20x patches, so N10 <= 4*N5 and "
                                f"N20 <= 16*N5")
        return BagSize(key, n5, n10, n20)
    raise MilbenchError(f"--bag {text!r}: use avg, p90, max (or one scaled down, such as avg/16), a 20x patch count "
                        f"such as 13496, or N5,N10,N20 such as 895,3449,13496")


def nested_coords(size: BagSize) -> dict[str, torch.Tensor]:
    """Level-0 top-left corners on nested CLAM grids: N5 5x patches on a near-square grid, the first N10 of their
    10x and the first N20 of their 20x children in row-major order."""
    cols = max(1, math.ceil(math.sqrt(size.n5)))
    i = np.arange(size.n5)
    c5 = np.stack([(i % cols) * 4 * PATCH_20X, (i // cols) * 4 * PATCH_20X], 1)
    out = {"5x": c5}
    for scale, per, side in (("10x", 2, 2 * PATCH_20X), ("20x", 4, PATCH_20X)):
        dy, dx = np.divmod(np.arange(per * per), per)
        children = (c5[:, None, :] + np.stack([dx * side, dy * side], 1)[None]).reshape(-1, 2)
        order = np.lexsort((children[:, 0], children[:, 1]))  # CLAM's row-major order
        out[scale] = children[order][: size.at(scale)]
    return {s: torch.from_numpy(c.astype(np.int64)) for s, c in out.items()}


def random_bag(name: str, size: BagSize, in_dim: int, device: torch.device, seed: int = 0,
               case_id: str = "bench") -> Bag:
    """A bag for model ``name``: N(0, 1) features of width ``in_dim`` in half precision (as the feature cache holds
    them) on ``device``, at the card's scales, with nested-grid coordinates and the card's extras when it needs them."""
    card = get_card(name)
    gen = torch.Generator(device=device).manual_seed(seed)
    features = {s: torch.randn(size.at(s), in_dim, generator=gen, device=device, dtype=torch.float16)
                for s in card.scales}
    bag = Bag(case_id=case_id, features=features,
              slide_index={s: torch.zeros(size.at(s), dtype=torch.long, device=device) for s in card.scales})
    if card.needs:
        from milbench.training.prepare import prepare_bag

        coords = nested_coords(size)
        cpu = Bag(case_id, {s: f.cpu() for s, f in features.items()}, {s: v.cpu() for s, v in bag.slide_index.items()},
                  {s: coords[s] for s in card.scales})
        bag = prepare_bag(card, cpu).to(device)
    return bag
