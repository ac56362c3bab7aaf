"""Run records on disk: one folder per completed fold, written atomically.

Layout: ``RUNS/<cohort>/<backbone>/<model>/<protocol>-<config hash>/fold_<k>/{record.json, predictions.csv}``.
A fold is complete when its ``record.json`` exists; the folder appears in one ``os.replace``, so a killed run
leaves no half-written fold behind (only a ``.tmp-*`` folder that the next run removes).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch

from milbench import MilbenchError
from milbench.config import RunConfig


CHECKPOINT = "checkpoint.pt"


def run_dir(runs_dir: Path, cfg: RunConfig) -> Path:
    return Path(runs_dir) / cfg.cohort / cfg.backbone / cfg.model / f"{cfg.protocol}-{cfg.hash}"


def fold_dir(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}"


def is_complete(runs_dir: Path, cfg: RunConfig, fold: int) -> bool:
    return (fold_dir(runs_dir, cfg, fold) / "record.json").is_file()


def write_fold(runs_dir: Path, cfg: RunConfig, fold: int, record: dict[str, Any], predictions: pd.DataFrame,
               state_dict: dict[str, Any] | None = None) -> Path:
    """Write record, predictions (and the model's weights when given) into a temporary folder, then move it
    into place in one step."""
    final = fold_dir(runs_dir, cfg, fold)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-fold_{fold}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    predictions.to_csv(tmp / "predictions.csv", index=False)
    if state_dict is not None:
        torch.save(state_dict, tmp / CHECKPOINT)
    with open(tmp / "record.json", "w") as fh:
        json.dump(record, fh, indent=2, sort_keys=True, default=_jsonable)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():  # an incomplete leftover (no record.json): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def clean_stale(runs_dir: Path, cfg: RunConfig) -> None:
    """Remove temporary folders of folds that a killed run left behind."""
    parent = run_dir(runs_dir, cfg)
    if parent.is_dir():
        for tmp in parent.glob(".tmp-fold_*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


@dataclass
class StoredFold:
    """One completed fold read back from the store."""

    path: Path
    record: dict[str, Any]

    @property
    def predictions(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "predictions.csv", dtype={"case_id": str})

    def load_weights(self) -> dict[str, Any]:
        """The fold's model weights, stored when the run used --save-checkpoints."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            raise MilbenchError(f"{self.path} has no {CHECKPOINT}: rerun that fold with --save-checkpoints")
        return torch.load(path, map_location="cpu", weights_only=True)


def iter_folds(runs_dir: Path) -> Iterator[StoredFold]:
    """Every completed fold under ``runs_dir``, in a stable order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise MilbenchError(f"run store {runs_dir} does not exist: run `milbench run` first or pass --runs-dir")
    for rec in sorted(runs_dir.rglob("record.json")):
        if any(part.startswith(".tmp-") for part in rec.parts):
            continue
        try:
            record = json.loads(rec.read_text())
        except json.JSONDecodeError as err:
            raise MilbenchError(f"{rec} is not valid JSON ({err.msg}): delete that fold folder and rerun it") from None
        yield StoredFold(rec.parent, record)
