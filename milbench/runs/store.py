"""Run records on disk: one folder per completed fold, written atomically, read back as typed :class:`RunRecord`s
through :func:`read_record` (the leaderboard, the grid status and the plots all read records through it).

Layout: ``RUNS/<cohort>/<backbone>/<model>/<protocol>-<config hash>/fold_<k>/{record.json, predictions.csv}``.
A fold is complete when its ``record.json`` exists; the folder appears in one ``os.replace``, so a killed run
leaves no half-written fold behind (only a ``.tmp-*`` folder that the next run removes).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

import pandas as pd

from milbench import MilbenchError

if TYPE_CHECKING:
    from milbench.config.run import RunConfig


CHECKPOINT = "checkpoint.pt"
RECORD = "record.json"


class RunRecord(Mapping):
    """A completed fold's record: the JSON written by :func:`milbench.training.fold.fit_fold`, with typed access to
    the fields every reader needs (and mapping access to the rest, as stored)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def cohort(self) -> str:
        return self._data["cohort"]

    @property
    def model(self) -> str:
        return self._data["model"]

    @property
    def backbone(self) -> str:
        return self._data["backbone"]

    @property
    def protocol(self) -> str:
        return self._data["protocol"]

    @property
    def fold(self) -> int:
        return int(self._data["fold"])

    @property
    def config(self) -> dict[str, Any]:
        return self._data["config"]

    @property
    def config_hash(self) -> str:
        return self._data["config_hash"]

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._data.get("metrics", {}).items()}

    @property
    def total_seconds(self) -> float:
        return float((self._data.get("timings") or {}).get("total_s", 0.0))


def read_record(path: Path) -> RunRecord:
    """The record at ``path`` (a ``record.json``); a damaged file is a one-line error naming it."""
    try:
        return RunRecord(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as err:
        raise MilbenchError(f"{path} is not valid JSON ({err.msg}): delete that fold folder and rerun it") from None


def run_dir(runs_dir: Path, cfg: RunConfig) -> Path:
    return Path(runs_dir) / cfg.cohort / cfg.backbone / cfg.model / f"{cfg.protocol}-{cfg.hash}"


def fold_dir(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}"


def is_complete(runs_dir: Path, cfg: RunConfig, fold: int) -> bool:
    return (fold_dir(runs_dir, cfg, fold) / RECORD).is_file()


def find_record(runs_dir: Path, cfg: RunConfig, fold: int) -> Path | None:
    """The record of this experiment's fold: in its own folder, or, for a configuration with input fingerprints,
    under another cohort name (the same table, splits and features renamed are the same experiment)."""
    own = fold_dir(runs_dir, cfg, fold) / RECORD
    if own.is_file():
        return own
    if cfg.inputs:
        pattern = f"*/{cfg.backbone}/{cfg.model}/{cfg.protocol}-{cfg.hash}/fold_{fold}/{RECORD}"
        return next(iter(sorted(Path(runs_dir).glob(pattern))), None)
    return None


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
        import torch

        torch.save(state_dict, tmp / CHECKPOINT)
    with open(tmp / RECORD, "w") as fh:
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
    record: RunRecord

    @property
    def predictions(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "predictions.csv", dtype={"case_id": str})

    def load_weights(self) -> dict[str, Any]:
        """The fold's model weights, stored when the run used --save-checkpoints."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            raise MilbenchError(f"{self.path} has no {CHECKPOINT}: rerun that fold with --save-checkpoints")
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)


def iter_folds(runs_dir: Path) -> Iterator[StoredFold]:
    """Every completed fold under ``runs_dir``, in a stable order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise MilbenchError(f"run store {runs_dir} does not exist: run `milbench run` first or pass --runs-dir")
    for rec in sorted(runs_dir.rglob(RECORD)):
        if any(part.startswith(".tmp-") for part in rec.parts):
            continue
        yield StoredFold(rec.parent, read_record(rec))
