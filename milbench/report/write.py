"""Writing a leaderboard: the asked formats (md, tex, html, csv) into one folder, with the critical-difference
diagrams (PNG and PDF) beside them."""

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
from milbench.report.paper import extend_leaderboard
from milbench.report.ranking import write_cd_diagrams


def parse_formats(text: str) -> list[str]:
    """``md,tex,html,csv`` -> a checked list of formats."""
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise MilbenchError(f"--format takes a comma-separated subset of {','.join(FORMATS)}, got '{text}'")
    return formats


def write(lb: Leaderboard | None, out: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the leaderboard (``None``: the reported block alone) in the asked formats, and its critical-difference
    diagrams; returns the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title, sections = document(lb)
    stem = "leaderboard" if lb is not None else "reported"
    paths = write_cd_diagrams(lb.ranks, out, lb.metric) if lb is not None else []
    if lb is not None:  # the CrossFusion paper beside ours, submitted runs labelled, Kaplan-Meier plots (issue 21)
        paths += extend_leaderboard(sections, Path(lb.source), out)
    for fmt in formats:
        if fmt == "csv":
            paths += _write_csv(lb, out)
            continue
        if fmt == "html":
            text = render_html(title, sections, out)
        else:
            text = {"md": render_markdown, "tex": render_latex}[fmt](title, sections)
        path = out / f"{stem}.{fmt}"
        path.write_text(text)
        paths.append(path)
    return paths


def _ranks_frame(lb: Leaderboard) -> pd.DataFrame:
    """One row per ranked model and analysis: average rank, the Friedman test and the post-hoc verdict."""
    rows = []
    for r in lb.ranks:
        f, post = r.analysis.friedman, r.analysis.posthoc
        for label in r.labels:
            rows.append({"protocol": r.protocol, "backbone": r.backbone, "model": label,
                         "avg_rank": r.analysis.avg_ranks[label], "cohorts": len(r.cohorts),
                         "friedman_chi2": f.statistic, "friedman_p": f.p, "iman_davenport_f": f.iman_davenport,
                         "iman_davenport_p": f.p_iman_davenport, "posthoc": post.method, "cd": post.cd,
                         "clique": " | ".join(", ".join(c) for c in post.cliques if label in c)})
    return pd.DataFrame(rows, columns=["protocol", "backbone", "model", "avg_rank", "cohorts", "friedman_chi2",
                                       "friedman_p", "iman_davenport_f", "iman_davenport_p", "posthoc", "cd", "clique"])


def _write_csv(lb: Leaderboard | None, out: Path) -> list[Path]:
    frames: dict[str, pd.DataFrame] = {}
    if lb is not None:
        tests = pd.DataFrame([vars(t) for t in lb.tests.values()]) if lb.tests else pd.DataFrame()
        frames |= {"leaderboard": lb.cells, "folds": lb.folds, "pooled": lb.pooled, "comparisons": lb.comparisons,
                   "pairs": tests.sort_values(["a", "b"]) if len(tests) else tests, "ranks": _ranks_frame(lb),
                   "runs": lb.runs}
    for name in published.TABLES:
        frames[f"reported_{name}"] = published.load(name).frame
    paths = []
    for name, frame in frames.items():
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False, float_format="%.6g")
        paths.append(path)
    return paths
