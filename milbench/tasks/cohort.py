"""Cohorts: the per-slide survival table, the patient-level folds, where the features are, and name resolution.

A cohort is named three ways: a path to a CSV table (a custom cohort), ``synthetic[_<scenario>]`` (built by
:mod:`milbench.synthetic`), or a TCGA name (``tcga_blca`` or ``blca``; the table with its reference folds ships in
``milbench/splits``). Tables and splits are validated at this boundary, so later stages can trust them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from milbench import MilbenchError, did_you_mean
from milbench.data.readers import available_scales, candidate_paths, locate_feature_file, slide_stem

REQUIRED_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")
SCENARIOS = ("coarse", "fine", "cross-scale", "mixed")
TCGA_COHORTS = ("blca", "brca", "coad", "coadread", "gbmlgg", "luad", "ucec")
SHIPPED_SPLITS = Path(__file__).resolve().parents[1] / "splits"
_CSV_ERRORS = (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError)
_FEATURES_HELP = "pass --features ROOT (the folder holding x5/x10/x20 or TRIDENT feature folders)"

Folds = dict[int, tuple[list[str], list[str]]]


def _line(position: int) -> int:
    """CSV line of the data row at ``position`` (the header is line 1)."""
    return position + 2


def _read_csv(path: Path, what: str, **kwargs: object) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except _CSV_ERRORS as err:
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise MilbenchError(f"cannot read {what} {path} ({type(err).__name__}: {first}): "
                            f"save it as a CSV with a header row") from err


def _first_bad(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0])


def load_table(path: str | Path) -> pd.DataFrame:
    """Read and validate a per-slide survival table (CLAM columns; censorship 1 = censored); extra columns are kept."""
    path = Path(path)
    if not path.is_file():
        raise MilbenchError(f"cohort table {path} not found: pass a CSV with columns {', '.join(REQUIRED_COLUMNS)}")
    table = _read_csv(path, "cohort table", dtype={"case_id": str, "slide_id": str})
    table.columns = [str(c).strip() for c in table.columns]  # " case_id" as written by hand or by some exporters
    table = table.drop(columns=[c for c in table.columns if re.fullmatch(r"Unnamed: \d+(\.\d+)?", str(c))])
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise MilbenchError(f"{path} lacks column(s) {', '.join(missing)}: a cohort table needs "
                            f"{', '.join(REQUIRED_COLUMNS)} (censorship 1 = censored)")
    if table.empty:
        raise MilbenchError(f"{path} has no rows: add one row per slide")
    for col in ("case_id", "slide_id"):
        text = table[col].str.strip()
        empty = text.isna() | (text == "")
        if empty.any():
            raise MilbenchError(f"{path} line {_line(_first_bad(empty))}: empty {col}: fill it or remove the row")
        table[col] = text
    table["slide_id"] = table["slide_id"].map(slide_stem)

    months = _numeric_column(table, "survival_months", path)
    if (months < 0).any():
        i = _first_bad(months < 0)
        raise MilbenchError(f"{path} line {_line(i)} (slide {table.slide_id[i]}): survival_months {months[i]} "
                            f"is negative")
    table["survival_months"] = months.astype(float)

    censor = pd.to_numeric(table["censorship"], errors="coerce")
    bad = ~censor.isin([0, 1])
    if bad.any():
        i = _first_bad(bad)
        raise MilbenchError(f"{path} line {_line(i)} (slide {table.slide_id[i]}): censorship '{table.censorship[i]}' "
                            f"must be 0 (event observed) or 1 (censored)")
    table["censorship"] = censor.astype(int)

    dup = table["slide_id"].duplicated(keep=False)
    if dup.any():
        slide = table.slide_id[_first_bad(dup)]
        lines = [_line(i) for i in np.flatnonzero((table.slide_id == slide).to_numpy())]
        raise MilbenchError(f"{path}: slide {slide} appears on lines {', '.join(map(str, lines))}: "
                            f"keep one row per slide")

    for col in ("survival_months", "censorship"):
        _check_per_case(table, col, path, "survival value")
    if "oracle_risk" in table.columns:
        table["oracle_risk"] = _numeric_column(table, "oracle_risk", path)
        _check_per_case(table, "oracle_risk", path, "oracle_risk")
    if "fold" in table.columns:
        fold = _numeric_column(table, "fold", path, allow_empty=True)
        if (fold.notna() & (fold % 1 != 0)).any():
            i = _first_bad(fold.notna() & (fold % 1 != 0))
            raise MilbenchError(f"{path} line {_line(i)}: fold '{table.fold[i]}' is not a whole number")
        table["fold"] = fold.astype("Int64")
    return table.reset_index(drop=True)


def _numeric_column(table: pd.DataFrame, col: str, path: Path, allow_empty: bool = False) -> pd.Series:
    values = pd.to_numeric(table[col], errors="coerce")
    bad = (values.isna() & (table[col].notna() | (not allow_empty))) | (values.notna() & ~np.isfinite(values))
    if bad.any():
        i = _first_bad(bad)
        what = "is empty" if pd.isna(table[col][i]) else f"'{table[col][i]}' is not a number"
        raise MilbenchError(f"{path} line {_line(i)} (slide {table.slide_id[i]}): {col} {what}: "
                            f"fill it or remove the row")
    return values


def _check_per_case(table: pd.DataFrame, col: str, path: Path, what: str) -> None:
    counts = table.groupby("case_id", sort=False)[col].nunique(dropna=False)
    if (counts > 1).any():
        case = counts.index[_first_bad(counts > 1)]
        rows = table.index[table.case_id == case]
        values = ", ".join(f"{table.at[i, col]:g} (line {_line(i)})" for i in rows)
        raise MilbenchError(f"{path}: case {case} has conflicting {col} on its slides ({values}): "
                            f"give every slide of a patient the same {what}")


def _ids(column: pd.Series) -> list[str]:
    values = column.dropna().astype(str).str.strip()
    return values[values != ""].tolist()


def _read_split(path: Path) -> tuple[list[str], list[str]]:
    frame = _read_csv(path, "split file", dtype=str)
    missing = [c for c in ("train", "val") if c not in frame.columns]
    if missing:
        raise MilbenchError(f"{path} lacks column(s) {', '.join(missing)}: a split file has columns train and val "
                            f"(patient IDs; an unnamed index column first)")
    ids = {c: _ids(frame[c]) for c in ("train", "val", "test") if c in frame.columns}
    for col, values in ids.items():
        seen = pd.Series(values)
        if seen.duplicated().any():
            case = seen[seen.duplicated()].iloc[0]
            raise MilbenchError(f"{path}: case {case} appears twice in the {col} column: keep it once")
    if ids.get("test") and set(ids["test"]) != set(ids["val"]):
        raise MilbenchError(f"{path}: the test column differs from val: milbench holds out the val column of each "
                            f"fold; remove the test column or move its cases into val")
    return ids["train"], ids["val"]


def load_splits_folder(folder: str | Path) -> Folds:
    """Read CLAM/MCAT ``splits_{k}.csv`` files: fold k -> (train case IDs, held-out case IDs from ``val``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MilbenchError(f"splits folder {folder} not found: pass --splits DIR, a folder of splits_0.csv, "
                            f"splits_1.csv, ...")
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := re.fullmatch(r"splits_(\d+)\.csv", p.name))}
    if not files:
        raise MilbenchError(f"{folder} has no splits_<k>.csv files: pass the folder that holds splits_0.csv, "
                            f"splits_1.csv, ...")
    gaps = [k for k in range(max(files)) if k not in files]
    if gaps:
        raise MilbenchError(f"{folder} has no splits_{gaps[0]}.csv but has splits_{max(files)}.csv: add the missing "
                            f"fold file (or renumber the files from 0), so no fold is silently left out")
    return {k: _read_split(files[k]) for k in sorted(files)}


def folds_from_column(table: pd.DataFrame, path: str | Path) -> Folds:
    """Folds from a ``fold`` column (each patient's held-out fold): train of k = every patient whose fold is not k.

    An empty fold means the patient is never held out and trains in every fold (the reference COAD folds do this
    for four patients; see the ``fold_semantics`` of the shipped sidecars).
    """
    per_case = table.groupby("case_id", sort=False)["fold"]
    counts = per_case.nunique(dropna=False)
    if (counts > 1).any():
        case = counts.index[_first_bad(counts > 1)]
        found = ", ".join("none" if pd.isna(f) else str(f) for f in table.fold[table.case_id == case].unique())
        raise MilbenchError(f"{path}: patient {case} has slides in different folds ({found}): "
                            f"give every slide of a patient the same fold")
    case_fold = per_case.first()
    assigned = case_fold[case_fold.notna()]
    if assigned.empty:
        raise MilbenchError(f"{path}: the fold column is empty: give each slide its held-out fold number")
    return {int(k): (case_fold.index[(case_fold != k).fillna(True).astype(bool)].tolist(), assigned.index[assigned == k].tolist())
            for k in sorted(assigned.unique())}


@dataclass
class Cohort:
    """One row per slide in ``table``; ``folds[k] = (train case IDs, held-out case IDs)``; where features live."""

    name: str
    table: pd.DataFrame
    folds: Folds
    features_root: Path | None = None
    backbone: str | None = None
    oracle_risk: pd.Series | None = None
    protocol_note: str = ""
    excluded: list[str] = field(default_factory=list)
    table_path: Path | None = None
    splits_dir: Path | None = None
    features_help: str = _FEATURES_HELP

    def __post_init__(self) -> None:
        if self.features_root is not None:
            self.features_root = Path(self.features_root)
        known = set(self.table["case_id"])
        table = self.table_path or f"of cohort '{self.name}'"
        for k, (train, heldout) in self.folds.items():
            split_file = f"splits_{k}.csv" if self.splits_dir else f"fold {k}"
            where = str(self.splits_dir / split_file) if self.splits_dir else f"fold {k} of cohort '{self.name}'"
            unknown = next((c for c in [*train, *heldout] if c not in known), None)
            if unknown is not None:
                raise MilbenchError(f"{where}: case {unknown} is not in the table {table}: "
                                    f"add it to the table or remove it from {split_file}")
            train_set = set(train)
            both = next((c for c in heldout if c in train_set), None)
            if both is not None:
                raise MilbenchError(f"{where}: patient {both} is in both the train and held-out sets of fold {k}: "
                                    f"remove it from one of them")
            if not heldout:
                raise MilbenchError(f"{where}: fold {k} has no held-out patients: list them in the val column")

    @cached_property
    def patients(self) -> pd.DataFrame:
        """One row per case (table order): ``time`` (months), ``event`` (1 = observed), ``slide_ids`` (list)."""
        grouped = self.table.groupby("case_id", sort=False)
        frame = pd.DataFrame({
            "time": grouped["survival_months"].first().astype(float),
            "event": 1 - grouped["censorship"].first().astype(int),
            "slide_ids": grouped["slide_id"].agg(list),
        })
        frame.index.name = "case_id"
        return frame

    def _check_cases(self, case_ids: Iterable[str]) -> list[str]:
        ids = list(case_ids)
        unknown = [c for c in ids if c not in self.patients.index]
        if unknown:
            raise MilbenchError(f"case {unknown[0]} is not in cohort '{self.name}' ({len(unknown)} unknown): "
                                f"use case IDs from the cohort table")
        return ids

    def slides_of(self, case_id: str) -> list[str]:
        """The case's slide IDs in table order."""
        return list(self.patients.at[self._check_cases([case_id])[0], "slide_ids"])

    def labels(self, case_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Survival time (months, float) and event indicator (1 = observed, int) of the given cases, in order."""
        rows = self.patients.loc[self._check_cases(case_ids)]
        return rows["time"].to_numpy(dtype=float), rows["event"].to_numpy(dtype=np.int64)

    def require_features_root(self) -> Path:
        """The feature folder; its absence is an error saying how to give one."""
        if self.features_root is None:
            raise MilbenchError(f"cohort '{self.name}' has no feature folder: {self.features_help}")
        return self.features_root

    def missing_features(self, scales: Sequence[str]) -> list[tuple[str, str, Path]]:
        """(slide, scale, expected path) for every slide whose feature file is absent at one of ``scales``."""
        root = self.require_features_root()
        return [(slide, scale, candidate_paths(root, scale, slide, self.backbone)[0])
                for slide in self.table["slide_id"] for scale in scales
                if locate_feature_file(root, scale, slide, self.backbone) is None]

    def check_features(self, scales: Sequence[str]) -> None:
        """Fail up front, with the first missing paths and the count, when any feature file is absent."""
        missing = self.missing_features(scales)
        if missing:
            shown = ", ".join(str(p) for _, _, p in missing[:3])
            raise MilbenchError(f"{len(missing)} feature file(s) of cohort '{self.name}' are missing (e.g. {shown}): "
                                f"check --features/--backbone, or exclude those slides with --exclude-missing")

    def without_missing(self, scales: Sequence[str]) -> Cohort:
        """A copy without the slides whose features are absent at any of ``scales``; they are listed in ``excluded``."""
        drop = {slide for slide, _, _ in self.missing_features(scales)}
        if not drop:
            return self
        table = self.table[~self.table.slide_id.isin(drop)].reset_index(drop=True)
        if table.empty:
            raise MilbenchError(f"no slide of cohort '{self.name}' has features under {self.features_root} at "
                                f"{', '.join(scales)}: check --features/--backbone")
        kept = set(table.case_id)
        folds = {k: ([c for c in tr if c in kept], [c for c in ho if c in kept]) for k, (tr, ho) in self.folds.items()}
        oracle = None if self.oracle_risk is None else self.oracle_risk[self.oracle_risk.index.isin(kept)]
        dropped = [s for s in self.table.slide_id if s in drop]
        return replace(self, table=table, folds=folds, oracle_risk=oracle, excluded=[*self.excluded, *dropped])


def _oracle(table: pd.DataFrame) -> pd.Series | None:
    if "oracle_risk" not in table.columns:
        return None
    return table.groupby("case_id", sort=False)["oracle_risk"].first().astype(float).rename("oracle_risk")


def _from_table(name: str, table_path: Path, splits: str | Path | None, features: str | Path | None,
                backbone: str | None, note: str, features_help: str = _FEATURES_HELP) -> Cohort:
    table = load_table(table_path)
    if splits is not None:
        folds, splits_dir = load_splits_folder(splits), Path(splits)
        note = f"{note}; folds from {splits_dir}"
    elif "fold" in table.columns:
        folds, splits_dir = folds_from_column(table, table_path), None
    else:
        raise MilbenchError(f"{table_path} has no fold column: pass --splits DIR (a folder of splits_0.csv, ...) "
                            f"or add a fold column (each slide's held-out fold)")
    return Cohort(name=name, table=table, folds=folds, features_root=Path(features) if features else None,
                  backbone=backbone, oracle_risk=_oracle(table), protocol_note=note, table_path=table_path,
                  splits_dir=splits_dir, features_help=features_help)


def cohort_names() -> list[str]:
    """Every built-in cohort name (a path to a CSV table is accepted too)."""
    return ["synthetic", *(f"synthetic_{s}" for s in SCENARIOS), *(f"tcga_{c}" for c in TCGA_COHORTS), *TCGA_COHORTS,
            *(f"tcga_{c}_sitefolds" for c in TCGA_COHORTS)]


def _synthetic(key: str, splits: str | Path | None, features: str | Path | None, backbone: str | None) -> Cohort:
    scenario = key.removeprefix("synthetic").lstrip("_-").replace("_", "-") or "mixed"
    if scenario not in SCENARIOS:
        raise MilbenchError(f"unknown synthetic scenario '{scenario}': {did_you_mean(scenario, SCENARIOS)}use one of "
                            f"{', '.join(SCENARIOS)}")
    from milbench.tasks.synthetic import builtin_cohort

    name = f"synthetic_{scenario}"
    folder = Path(builtin_cohort(name))
    return _from_table(name, folder / "cohort.csv", splits if splits is not None else folder / "splits",
                       features if features is not None else folder / "features", backbone,
                       note=f"synthetic cohort, scenario {scenario}, known oracle risk")


def _tcga(short: str, splits: str | Path | None, features: str | Path | None, backbone: str | None) -> Cohort:
    name = f"tcga_{short}"
    table_path = SHIPPED_SPLITS / f"{name}.csv"
    if not table_path.is_file():
        raise MilbenchError(f"the shipped table {table_path} is missing: reinstall milbench, or pass your own table "
                            f"(a CSV path) instead of the name")
    base = short.removesuffix("_sitefolds")
    family = ("site-preserved 5-fold splits (milbench.tasks.site_folds, seed 0)" if base != short
              else "reference 5-fold splits (MCAT / Patch-GCN / CrossFusion)")
    return _from_table(name, table_path, splits, features, backbone, note=f"TCGA-{base.upper()}, {family}",
                       features_help="TCGA features are not shipped: pass --features ROOT")


def _resolve(name_or_table: str | Path, splits: str | Path | None, features: str | Path | None,
             backbone: str | None) -> Cohort:
    text = str(name_or_table).strip()
    key = text.lower()
    if isinstance(name_or_table, Path) or key.endswith(".csv") or "/" in text:
        path = Path(text)
        return _from_table(path.stem, path, splits, features, backbone, note=f"custom table {path}")
    if key.startswith("synthetic"):
        return _synthetic(key, splits, features, backbone)
    short = key.removeprefix("tcga_").removeprefix("tcga-")
    if short in TCGA_COHORTS or short.removesuffix("_sitefolds") in TCGA_COHORTS:
        return _tcga(short, splits, features, backbone)
    raise MilbenchError(f"unknown cohort '{text}': {did_you_mean(key, cohort_names())}use one of "
                        f"{', '.join(cohort_names())}, or a path to a CSV table")


def resolve_cohort(name_or_table: str | Path, splits: str | Path | None = None, features: str | Path | None = None,
                   backbone: str | None = None, exclude_missing: bool = False,
                   scales: Sequence[str] | None = None) -> Cohort:
    """Build a cohort from a name or table path; with ``exclude_missing`` drop (and list) slides lacking features.

    Exclusion looks at ``scales``, by default every magnification present under the feature folder, so that all
    models run on a cohort see the same patients.
    """
    cohort = _resolve(name_or_table, splits, features, backbone)
    if exclude_missing:
        root = cohort.require_features_root()
        wanted = tuple(scales) if scales else available_scales(root, backbone)
        if not wanted:
            raise MilbenchError(f"no feature folders (x5/x10/x20 or TRIDENT) under {root}: check --features/--backbone")
        cohort = cohort.without_missing(wanted)
    return cohort
