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


# milbench model -> its row in Table 1 (the paper's names).
PAPER_ROWS = {"amil": "AMIL", "dsmil": "DSMIL", "transmil": "TransMIL", "deepgraphsurv": "DeepGraphSurv",
              "patchgcn": "PatchGCN", "scmil": "SCMIL", "protosurv": "ProtoSurv", "zoommil": "ZoomMIL",
              "mustmil": "MuSTMIL", "csmil": "CSMIL", "crossfusion_concat": "CrossFusion w/o CP",
              "crossfusion_single": "CrossFusion w/o F&C", "crossfusion": "CrossFusion"}
TABLE1_BACKBONE = "resnet50"  # every method of Table 1 uses ResNet-50 features


def _key(name: str) -> str:
    """Backbone names compared without case and punctuation: ``UNI2-h``, ``uni2_h`` and ``uni2h`` are one."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def paper_cohort(cohort: str) -> str:
    """``tcga_blca`` -> ``BLCA``, the column names of the published tables."""
    return cohort.removeprefix("tcga_").upper()


def backbone_width(backbone: str) -> int | None:
    """The feature width Table 2 gives for a backbone (``resnet50`` 2048, ``conch`` 512, ...), None if not listed."""
    frame = load("table2").frame
    hit = frame[frame.backbone.map(_key) == _key(backbone)]
    return int(hit.backbone_dim.iloc[0]) if len(hit) else None


def reported_c(model: str, cohort: str, backbone: str) -> tuple[float, float, str] | None:
    """The published C-index (mean, std, source table) of a milbench model on a TCGA cohort at a backbone, or
    None where the paper has no such figure: Table 1 at ResNet-50 for its thirteen models, Table 2 for
    CrossFusion at the other backbones."""
    column = paper_cohort(cohort)
    if not cohort.startswith("tcga_") or model not in PAPER_ROWS:
        return None
    if _key(backbone) == _key(TABLE1_BACKBONE):
        t1 = load("table1")
        row = t1.frame[t1.frame.model == PAPER_ROWS[model]]
        if column in t1.cohorts and len(row):
            return float(row[f"{column}_mean"].iloc[0]), float(row[f"{column}_std"].iloc[0]), "Table 1"
        return None
    if model != "crossfusion":
        return None
    t2 = load("table2")
    row = t2.frame[t2.frame.backbone.map(_key) == _key(backbone)]
    if column in t2.cohorts and len(row):
        return float(row[f"{column}_mean"].iloc[0]), float(row[f"{column}_std"].iloc[0]), "Table 2"
    return None


def reported_logrank(model: str, cohort: str, backbone: str) -> float | None:
    """The published log-rank p of CrossFusion's high/low risk groups (ResNet-50 only), or None."""
    if model != "crossfusion" or _key(backbone) != _key(TABLE1_BACKBONE):
        return None
    frame = load("pvalues").frame
    hit = frame[frame.cohort == paper_cohort(cohort)]
    return float(hit.p_value.iloc[0]) if len(hit) else None


def reported_backbone_mean(backbone: str) -> float | None:
    """Table 2's last column: CrossFusion's mean C-index over the six cohorts at a backbone, or None."""
    frame = load("table2").frame
    hit = frame[frame.backbone.map(_key) == _key(backbone)]
    return float(hit["mean"].iloc[0]) if len(hit) else None
