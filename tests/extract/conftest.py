"""Session fixtures: five tiny slides on disk, and one extraction of them with the parameter-free test encoder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from milbench.extract.encoders import EncoderSpec
from milbench.extract.pipeline import ExtractOptions, ExtractResult, extract
from tests.extract.wsi import write_cohort_slides

ENCODER = "tests.extract.wsi:quadrant_means"
PATCH = 32  # output side; on the 40x slides: 20x = 64, 10x = 128, 5x = 256 level-0 px


@dataclass
class Extracted:
    slides: Path
    images: dict[str, np.ndarray]
    out: Path
    result: ExtractResult


def options(**kw) -> ExtractOptions:
    """The tests' options: 32-px patches, no worker processes, 20x for the slide that records no magnification."""
    return ExtractOptions(**{"patch": PATCH, "batch": 48, "workers": 0, "base_mag": 20, "device": "cpu", **kw})


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("wsi") / "slides"
    return folder, write_cohort_slides(folder)


@pytest.fixture(scope="session")
def extracted(slide_set, tmp_path_factory) -> Extracted:
    slides, images = slide_set
    out = tmp_path_factory.mktemp("features")
    result = extract(slides, out, EncoderSpec(ENCODER), options(), contact="slide_b")
    return Extracted(slides=slides, images=images, out=out, result=result)
