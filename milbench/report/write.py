"""Writing a leaderboard: the asked formats (md, tex, html, csv) into one folder."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from milbench import MilbenchError
from milbench.report import published
from milbench.report.aggregate import FORMATS, Leaderboard
from milbench.report.document import document
from milbench.report.html import render_html
from milbench.report.latex import render_latex
from milbench.report.markdown import render_markdown


def parse_formats(text: str) -> list[str]:
    """``md,tex,html,csv`` -> a checked list of formats."""
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise MilbenchError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got '{text}'")
    return formats


def write(lb: Leaderboard | None, out: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the leaderboard (``None``: the reported block alone) in the asked formats; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title, sections = document(lb)
    stem = "leaderboard" if lb is not None else "reported"
    paths = []
    for fmt in formats:
        if fmt == "csv":
            paths += _write_csv(lb, out)
            continue
        text = {"md": render_markdown, "tex": render_latex, "html": render_html}[fmt](title, sections)
        path = out / f"{stem}.{fmt}"
        path.write_text(text)
        paths.append(path)
    return paths


def _write_csv(lb: Leaderboard | None, out: Path) -> list[Path]:
    frames: dict[str, pd.DataFrame] = {}
    if lb is not None:
        frames |= {"leaderboard": lb.cells, "folds": lb.folds, "pooled": lb.pooled, "comparisons": lb.comparisons,
                   "runs": lb.runs}
    for name in published.TABLES:
        frames[f"reported_{name}"] = published.load(name).frame
    paths = []
    for name, frame in frames.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6g")
        paths.append(path)
    return paths
