"""Published numbers shipped as package data: Tables 1 and 2 and the log-rank p-values of the CrossFusion paper.

They are reported figures, never recomputed: leaderboards show them in a block labelled as such, with the
protocol the paper used (the epoch picked on the held-out fold itself, milbench's ``best-val``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from milbench import MilbenchError

HERE = Path(__file__).resolve().parent / "published"
SOURCE = "Soraki et al., CrossFusion, MIDL 2026 (PMLR 315:2906-2921)"
PROTOCOL = "best-val"
PROTOCOL_NOTE = "best validation-epoch C-index per fold: the epoch is picked on the fold that is then reported"
TABLES = {"table1": "crossfusion_midl2026_table1.csv", "table2": "crossfusion_midl2026_table2.csv",
          "pvalues": "crossfusion_midl2026_pvalues.csv"}


@dataclass(frozen=True)
class ReportedTable:
    """One published table: its header comment (what it is, from where) and its figures."""

    name: str
    comment: str
    frame: pd.DataFrame

    @property
    def cohorts(self) -> list[str]:
        """Cohort columns in the paper's order (``BLCA`` for ``BLCA_mean`` / ``BLCA_std``)."""
        return [c.removesuffix("_mean") for c in self.frame.columns if c.endswith("_mean")]


def load(name: str) -> ReportedTable:
    """Read a shipped table (``table1``, ``table2`` or ``pvalues``); ``#`` lines at the top are its comment."""
    if name not in TABLES:
        raise MilbenchError(f"no reported table '{name}': use one of {', '.join(TABLES)}")
    path = HERE / TABLES[name]
    if not path.is_file():
        raise MilbenchError(f"the shipped file {path} is missing: reinstall milbench")
    lines = path.read_text().splitlines()
    comment = " ".join(line.lstrip("#").strip() for line in lines if line.startswith("#"))
    frame = pd.read_csv(io.StringIO("\n".join(line for line in lines if not line.startswith("#"))))
    return ReportedTable(name, comment, frame)
