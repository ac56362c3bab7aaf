"""Critical-difference diagram (Demsar 2006, figure 1): models on an average-rank axis (1 = best, at the left), the
better half labelled on the left and the rest on the right, a bar of length CD above the axis (Nemenyi), and a thick
bar under each clique of models the post-hoc test cannot tell apart. Written as PNG and PDF, byte-reproducible.

matplotlib is imported inside the function (object-oriented API, no pyplot state, the Agg canvas): importing the
report layer stays cheap and never selects a GUI backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from milbench import MilbenchError

AXIS = 4.2  # inches of rank axis; the label columns beside it grow with the longest name
CHAR = 0.075  # inches per character at FONT points (a generous average, so labels are not clipped)
ROW = 0.28  # inches between label rows
FONT = 9


def _check(avg_ranks: Mapping[str, float], cd: float | None, cliques: Sequence[Sequence[str]]) -> list[str]:
    """Models in rank order; names a rank that is not finite, a clique member without a rank, or a bad CD."""
    if len(avg_ranks) < 2:
        raise MilbenchError(f"plot_cd_diagram: need at least two models, got {list(avg_ranks)}")
    bad = [m for m, r in avg_ranks.items() if not np.isfinite(r)]
    if bad:
        raise MilbenchError(f"plot_cd_diagram: no average rank for {bad}; leave them out or rank them on the "
                            "complete cohorts")
    unknown = sorted({m for c in cliques for m in c} - set(avg_ranks))
    if unknown:
        raise MilbenchError(f"plot_cd_diagram: clique members {unknown} have no average rank")
    if cd is not None and not (np.isfinite(cd) and cd > 0):
        raise MilbenchError(f"plot_cd_diagram: the critical difference must be a positive number or None, got {cd}")
    return sorted(avg_ranks, key=lambda m: (avg_ranks[m], str(m)))


def plot_cd_diagram(avg_ranks: Mapping[str, float], cd: float | None, cliques: Sequence[Sequence[str]],
                    out_stem: Path, title: str = "") -> tuple[Path, Path]:
    """Draw a Demsar critical-difference diagram to ``out_stem``.png and .pdf; ``cd`` None (e.g. Wilcoxon-Holm
    cliques) draws no CD bar. Returns the two paths."""
    from matplotlib.figure import Figure

    order = _check(avg_ranks, cd, cliques)
    k = len(order)
    lo, hi = 1.0, float(max(k, np.ceil(max(avg_ranks.values()))))
    left_half = order[: (k + 1) // 2]
    right_half = order[(k + 1) // 2:][::-1]  # worst first, so label lines do not cross
    rows = max(len(left_half), len(right_half))
    drawn = [c for c in cliques if len(c) > 1]

    labels = {m: f"{m} ({avg_ranks[m]:.2f})" for m in left_half} | {m: f"({avg_ranks[m]:.2f}) {m}" for m in right_half}
    left_in = max(1.1, 0.35 + CHAR * max(len(labels[m]) for m in left_half))
    right_in = max(1.1, 0.35 + CHAR * max((len(labels[m]) for m in right_half), default=0))
    width = left_in + AXIS + right_in
    top_in = 0.55 + (0.3 if title else 0.0) + (0.35 if cd is not None else 0.0)
    clique_in = 0.12 * len(drawn)
    height = top_in + 0.25 + clique_in + ROW * rows + 0.15
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(-height, 0)  # y in inches below the top edge
    ax.set_axis_off()

    def x_of(rank: float) -> float:
        """Horizontal position (inches) of an average rank."""
        return left_in + AXIS * (rank - lo) / (hi - lo)

    y_axis = -top_in
    if title:
        ax.text(width / 2, -0.22, title, ha="center", va="center", fontsize=FONT + 1)
    if cd is not None:
        y_cd = y_axis + 0.42
        x0 = x_of(lo)
        x1 = x_of(lo + cd)
        ax.plot([x0, x1], [y_cd, y_cd], color="black", lw=1.2)
        for x in (x0, x1):
            ax.plot([x, x], [y_cd - 0.05, y_cd + 0.05], color="black", lw=1.2)
        ax.text((x0 + x1) / 2, y_cd + 0.08, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=FONT)

    ax.plot([x_of(lo), x_of(hi)], [y_axis, y_axis], color="black", lw=1.2)
    for r in range(int(lo), int(hi) + 1):
        ax.plot([x_of(r), x_of(r)], [y_axis, y_axis + 0.08], color="black", lw=1.0)
        ax.text(x_of(r), y_axis + 0.12, str(r), ha="center", va="bottom", fontsize=FONT)
        if r < hi:
            ax.plot([x_of(r + 0.5)] * 2, [y_axis, y_axis + 0.04], color="black", lw=0.6)
    ax.text(x_of(lo) - 0.12, y_axis, "average rank\n(1 = best)", ha="right", va="center", fontsize=FONT - 1,
            color="0.35")

    for level, clique in enumerate(drawn):
        ranks = [avg_ranks[m] for m in clique]
        y = y_axis - 0.12 - 0.12 * level
        ax.plot([x_of(min(ranks)) - 0.04, x_of(max(ranks)) + 0.04], [y, y], color="black", lw=3.0,
                solid_capstyle="butt")

    y_first = y_axis - 0.25 - clique_in
    for side, names in (("left", left_half), ("right", right_half)):
        for i, m in enumerate(names):
            y = y_first - ROW * i
            x = x_of(avg_ranks[m])
            edge = left_in - 0.15 if side == "left" else left_in + AXIS + 0.15
            ax.plot([x, x, edge], [y_axis, y, y], color="black", lw=0.8)
            ax.text(edge + (-0.05 if side == "left" else 0.05), y, labels[m], va="center", fontsize=FONT,
                    ha="right" if side == "left" else "left")

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = out_stem.with_name(out_stem.name + ".png"), out_stem.with_name(out_stem.name + ".pdf")
    fig.savefig(png, dpi=200, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return png, pdf
