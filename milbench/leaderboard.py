"""Leaderboards recomputed from stored per-patient predictions (never from numbers cached in records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.store import iter_folds
from milbench.survival.metrics import harrell_c

KEYS = ["protocol", "cohort", "backbone", "model"]


def fold_table(runs_dir: Path) -> pd.DataFrame:
    """One row per stored fold with its C-index recomputed from ``predictions.csv``."""
    rows = []
    for stored in iter_folds(runs_dir):
        rec, pred = stored.record, stored.predictions
        row = {k: rec[k] for k in KEYS} | {"config_hash": rec["config_hash"], "fold": rec["fold"],
                                           "seed": rec["config"]["seed"], "n_test": len(pred)}
        row["c_index"] = harrell_c(pred["time"].to_numpy(), pred["event"].to_numpy(), pred["risk"].to_numpy())
        if "oracle_c_index" in rec.get("metrics", {}):
            row["oracle_c_index"] = rec["metrics"]["oracle_c_index"]
        rows.append(row)
    if not rows:
        raise MilbenchError(f"no completed folds under {runs_dir}: run `milbench run` first or pass --runs-dir")
    return pd.DataFrame(rows)


def summary(folds: pd.DataFrame, metric: str = "c_index") -> pd.DataFrame:
    """Mean and std over folds per protocol x cohort x backbone x model, with the number of folds and seeds."""
    agg = folds.groupby(KEYS, sort=True).agg(
        mean=(metric, "mean"), std=(metric, lambda s: float(np.std(s, ddof=1)) if len(s) > 1 else float("nan")),
        folds=("fold", "nunique"), seeds=("seed", "nunique"))
    if "oracle_c_index" in folds:
        agg["oracle"] = folds.groupby(KEYS)["oracle_c_index"].mean()
    return agg.reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    """One markdown table per protocol (runs of different protocols are never ranked together)."""
    out = []
    for protocol, part in table.groupby("protocol", sort=True):
        out.append(f"### protocol: {protocol}\n")
        cols = ["cohort", "backbone", "model", "C-index", "folds", "seeds"] + (["oracle C"] if "oracle" in part else [])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for _, r in part.iterrows():
            cells = [r.cohort, r.backbone, r.model, f"{r['mean']:.3f} ± {r['std']:.3f}", str(r.folds), str(r.seeds)]
            if "oracle" in part:
                cells.append("" if pd.isna(r.oracle) else f"{r.oracle:.3f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write(table: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "leaderboard.md", out / "leaderboard.csv"]
    paths[0].write_text(to_markdown(table))
    table.to_csv(paths[1], index=False, float_format="%.6g")
    return paths
