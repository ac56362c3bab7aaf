"""Shared test fixtures: tiny synthetic bags on nested CLAM-style grids (level-0 pixels, base magnification 20x)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milbench.data.bag import Bag

PATCH_20X = 256  # level-0 side of a 20x patch at base magnification 20x; 10x = 512, 5x = 1024


def nested_bag(n5: int = 4, in_dim: int = 32, seed: int = 0, signal: np.ndarray | None = None,
               case_id: str = "case") -> Bag:
    """A one-slide bag with n5 5x patches on a row-major grid and all their 2x2 10x and 4x4 20x children.

    ``signal`` (length n5, 0/1) marks 5x regions whose patches at every scale carry feature direction 0.
    """
    rng = np.random.default_rng(seed)
    cols = max(1, int(np.ceil(np.sqrt(n5))))
    c5 = np.array([[(i % cols) * 4 * PATCH_20X, (i // cols) * 4 * PATCH_20X] for i in range(n5)])
    c10 = np.array([c + [dx * 2 * PATCH_20X, dy * 2 * PATCH_20X] for c in c5 for dy in range(2) for dx in range(2)])
    c20 = np.array([c + [dx * PATCH_20X, dy * PATCH_20X] for c in c5 for dy in range(4) for dx in range(4)])
    feats, coords = {}, {}
    for scale, c, per in (("5x", c5, 1), ("10x", c10, 4), ("20x", c20, 16)):
        x = rng.normal(size=(len(c), in_dim)).astype(np.float32)
        if signal is not None:
            x[:, 0] += 3.0 * np.repeat(signal, per)
        feats[scale] = torch.from_numpy(x)
        coords[scale] = torch.from_numpy(c.astype(np.int64))
    slide_index = {s: torch.zeros(len(coords[s]), dtype=torch.long) for s in coords}
    return Bag(case_id=case_id, features=feats, slide_index=slide_index, coords=coords)


@pytest.fixture
def tiny_bag() -> Bag:
    return nested_bag(n5=4, in_dim=32)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic cohort on disk in the CLAM layout (20 patients, tiny bags, width 16)."""
    from milbench.tasks.synthetic import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("synth"), "coarse", patients=20, seed=0, size=0.25, in_dim=16)


@pytest.fixture
def synth_cohort(synth_dir):
    from milbench.tasks.cohort import resolve_cohort

    return resolve_cohort(str(synth_dir / "cohort.csv"), splits=synth_dir / "splits", features=synth_dir / "features")


def pytest_configure(config):
    """One torch thread per test process: tiny bags gain nothing from threads, and 2 shared cores thrash."""
    torch.set_num_threads(1)
