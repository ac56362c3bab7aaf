"""The critical-difference diagram renders as PNG and PDF, reproducibly, from a rank analysis."""

from __future__ import annotations

import numpy as np
import pytest

from milbench import MilbenchError
from milbench.report.cd_diagram import plot_cd_diagram
from milbench.survival.ranks import rank_analysis


def scores(models: int = 7, cohorts: int = 10) -> dict[str, list[float]]:
    """Per-cohort C-indices of models of rising skill."""
    rng = np.random.default_rng(0)
    return {f"model-{m}": list(0.6 + 0.015 * m + rng.normal(scale=0.03, size=cohorts)) for m in range(models)}


@pytest.mark.parametrize("posthoc", ["nemenyi", "wilcoxon-holm"])
def test_renders_png_and_pdf_reproducibly(tmp_path, posthoc):
    res = rank_analysis(scores(), posthoc=posthoc)
    cd = res.posthoc.cd if posthoc == "nemenyi" else None
    png, pdf = plot_cd_diagram(res.avg_ranks, cd, res.posthoc.cliques, tmp_path / "cd" / "c_index", "Harrell's C")
    assert (png.name, pdf.name) == ("c_index.png", "c_index.pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    first = (png.read_bytes(), pdf.read_bytes())
    plot_cd_diagram(res.avg_ranks, cd, res.posthoc.cliques, tmp_path / "cd" / "c_index", "Harrell's C")
    assert (png.read_bytes(), pdf.read_bytes()) == first  # byte for byte: leaderboards rebuild identically


def test_two_models_long_names_and_a_dotted_stem(tmp_path):
    png, pdf = plot_cd_diagram({"ABMIL": 1.4, "a much longer model name (variant)": 1.6}, 0.9,
                               [("ABMIL", "a much longer model name (variant)")], tmp_path / "tcga.brca", "")
    assert png.name == "tcga.brca.png" and png.stat().st_size > 1000 and pdf.exists()


@pytest.mark.parametrize("ranks, cd, cliques, match", [
    ({"a": 1.0}, 1.0, [], "at least two models"),
    ({"a": 1.0, "b": float("nan")}, 1.0, [], "no average rank for"),
    ({"a": 1.0, "b": 2.0}, 1.0, [("a", "z")], "have no average rank"),
    ({"a": 1.0, "b": 2.0}, -1.0, [], "critical difference"),
])
def test_bad_input_raises(tmp_path, ranks, cd, cliques, match):
    with pytest.raises(MilbenchError, match=match):
        plot_cd_diagram(ranks, cd, cliques, tmp_path / "x", "")
