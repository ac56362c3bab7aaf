"""The document model every renderer reads (cells, table blocks, figures, sections) and the number formats: one
place decides how a figure prints, so no table shows "-0.000"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Cell:
    """One table cell: the figure, the folds x seeds behind it, its marks, and a numeric sort key."""

    text: str = ""
    value: float | None = None
    sub: str = ""
    marks: str = ""
    bold: bool = False
    underline: bool = False


@dataclass
class Block:
    """One table: ``groups[i]`` is the group heading of row i ("" for none)."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    groups: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """A picture written beside the leaderboard: ``stem``.png and ``stem``.pdf in the output folder."""

    key: str
    title: str
    stem: str
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    text: list[str]
    blocks: list[Block | Figure]


def cohort_title(cohort: str) -> str:
    """``tcga_blca`` -> ``BLCA`` (the paper's column names); other cohorts as stored."""
    return cohort.removeprefix("tcga_").upper() if cohort.startswith("tcga_") else cohort


def fmt_num(x: Any, digits: int = 3, signed: bool = False) -> str:
    """A number at ``digits`` decimals, "–" when missing; a value that rounds to zero prints without a sign
    ("0.000", never "-0.000"); ``signed`` puts "+" before positive values."""
    if x is None:
        return "–"
    x = float(x)
    if not np.isfinite(x):
        return "–" if np.isnan(x) else ("∞" if x > 0 else "-∞")
    text = f"{x:.{digits}f}"
    if float(text) == 0:
        return f"{0:.{digits}f}"
    return f"+{text}" if signed and x > 0 else text


def fmt_p(p: float | None) -> str:
    """p-values: three significant digits, scientific below 0.001."""
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3g}"


def num(x: Any) -> float | None:
    """A sort key: the float, or None when missing."""
    return float(x) if x is not None and np.isfinite(float(x)) else None
