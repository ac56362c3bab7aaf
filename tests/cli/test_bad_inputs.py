"""Bad input and bad configuration, as a user meets them (issue 16, DESIGN.md "Errors and exit codes").

Every case breaks one thing in a fresh copy of a tiny valid cohort and runs ``milbench run`` against a store that
already holds a completed record. Each must: exit with code 2; print exactly one non-empty line on stderr that names
the culprit (the file, case or option; rich markup not interpreted, the line not wrapped); print no traceback on
stdout or stderr; leave every file already in the store byte-identical; and train nothing (no new record). The
inputs a header read can judge are checked before any fold starts; values found wrong while reading (NaN,
infinities, values beyond float16) stop the run just the same: the first fold reads every slide, so none completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from tests.cli.helpers import (ENCODER, TRIDENT_DIR, CohortFiles, cli_env, grid_coords, log_result, records,
                       run_milbench, snapshot, store_changes)

# A slide and a case that every requested fold reads (CASE-03 is held out in fold 3 and trained on elsewhere).
SLIDE = "CASE-03-S1"
CASE = "CASE-03"

Culprit = str | tuple[str, ...]  # a string that must appear, or alternatives of which one must


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[CohortFiles], None]
    culprit: tuple[Culprit, ...]
    layout: str = "clam"


def _feats(n: int = 6, width: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


# ---- feature files -----------------------------------------------------------------------------------------------

def missing_file(c: CohortFiles) -> None:
    c.feature_path(SLIDE).unlink()


def truncated(c: CohortFiles) -> None:
    path = c.feature_path(SLIDE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_hdf5(c: CohortFiles) -> None:
    c.feature_path(SLIDE).write_text("these are not features\n")


def without_features(c: CohortFiles) -> None:
    c.write_features(SLIDE, None, grid_coords(6))


def one_dimensional(c: CohortFiles) -> None:
    c.write_features(SLIDE, _feats()[:, 0], grid_coords(6))


def three_dimensional(c: CohortFiles) -> None:
    c.write_features(SLIDE, np.stack([_feats(), _feats(seed=2)]), grid_coords(6))


def text_dtype(c: CohortFiles) -> None:
    c.write_features(SLIDE, np.array([[f"v{i}{j}" for j in range(8)] for i in range(6)], dtype="S4"),
                     grid_coords(6))


def with_nan(c: CohortFiles) -> None:
    x = _feats()
    x[2, 3] = np.nan
    c.write_features(SLIDE, x, grid_coords(6))


def with_inf(c: CohortFiles) -> None:
    x = _feats()
    x[4, 0] = np.inf
    c.write_features(SLIDE, x, grid_coords(6))


def beyond_half(c: CohortFiles) -> None:
    x = _feats()
    x[1, 1] = 1e6  # finite in float32, infinite in the half precision features are stored in
    c.write_features(SLIDE, x, grid_coords(6))


def empty_bag(c: CohortFiles) -> None:
    c.write_features(SLIDE, np.zeros((0, 8), dtype=np.float32), np.zeros((0, 2), dtype=np.int64))


def other_width(c: CohortFiles) -> None:
    c.write_features(SLIDE, _feats(width=12), grid_coords(6))


def coords_too_short(c: CohortFiles) -> None:
    c.write_features(SLIDE, _feats(), grid_coords(5))


def bracketed_slide_missing(c: CohortFiles) -> None:
    """A slide whose name holds square brackets (rich markup if interpreted) has no feature file."""
    rows = [dict(r) for r in c.rows]
    for r in rows:
        if r["slide_id"] == SLIDE:
            r["slide_id"] = "CASE-03-[bold]S1"
    c.write_table(rows)
    c.feature_path(SLIDE).unlink()


# ---- .pt files (CLAM pt_files) ----------------------------------------------------------------------------------

def pt_dict_without_features(c: CohortFiles) -> None:
    c.write_features(SLIDE, {"feats": torch.from_numpy(_feats()), "coords": torch.from_numpy(grid_coords(6))})


def pt_one_dimensional(c: CohortFiles) -> None:
    c.write_features(SLIDE, torch.from_numpy(_feats()[:, 0]))


def pt_nan(c: CohortFiles) -> None:
    x = _feats()
    x[0, 0] = np.nan
    c.write_features(SLIDE, torch.from_numpy(x))


def pt_corrupt(c: CohortFiles) -> None:
    c.feature_path(SLIDE).write_bytes(b"\x80\x02not a torch file")


def pt_not_numbers(c: CohortFiles) -> None:
    c.write_features(SLIDE, ["a", "b", "c"])


# ---- TRIDENT layout ---------------------------------------------------------------------------------------------

def trident_batch_of_two(c: CohortFiles) -> None:
    c.write_features(SLIDE, np.stack([_feats(), _feats(seed=2)]), grid_coords(6))


def trident_two_encoders(c: CohortFiles) -> None:
    """Two encoders' features side by side and no --backbone: which one to train on is ambiguous."""
    other = c.features / TRIDENT_DIR / "features_conch_v15"
    other.mkdir(parents=True)
    for path in (c.features / TRIDENT_DIR / f"features_{ENCODER}").glob("*.h5"):
        (other / path.name).write_bytes(path.read_bytes())


# ---- cohort table -----------------------------------------------------------------------------------------------

def _edit_table(c: CohortFiles, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    edit(pd.DataFrame(c.rows)).to_csv(c.table, index=False)


def table_missing(c: CohortFiles) -> None:
    c.opts["--cohort"] = c.root / "no_such_table.csv"


def _set(slide: str, column: str, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t[column] = t[column].astype(object)
        t.loc[t.slide_id == slide, column] = value
        return t
    return edit


def table_without(column: str) -> Callable[[CohortFiles], None]:
    return lambda c: _edit_table(c, lambda t: t.drop(columns=[column]))


def table_value(slide: str, column: str, value: object) -> Callable[[CohortFiles], None]:
    return lambda c: _edit_table(c, _set(slide, column, value))


def table_duplicate_row(c: CohortFiles) -> None:
    _edit_table(c, lambda t: pd.concat([t, t[t.slide_id == SLIDE]], ignore_index=True))


def table_no_rows(c: CohortFiles) -> None:
    _edit_table(c, lambda t: t.iloc[:0])


def table_binary(c: CohortFiles) -> None:
    c.table.write_bytes(bytes(range(256)) * 4)


def table_conflicting_times(c: CohortFiles) -> None:
    _edit_table(c, _set("CASE-00-S2", "survival_months", 99.0))  # CASE-00's other slide says 5.5


# ---- splits -----------------------------------------------------------------------------------------------------

def _edit_folds(c: CohortFiles, edit: Callable[[list[tuple[list[str], list[str]]]], None]) -> None:
    folds = [(list(t), list(v)) for t, v in c.folds]
    edit(folds)
    c.write_splits(folds)


def case_not_in_table(c: CohortFiles) -> None:
    _edit_folds(c, lambda f: f[1][1].append("CASE-99"))


def patient_in_train_and_test(c: CohortFiles) -> None:
    _edit_folds(c, lambda f: f[1][1].append(CASE))  # CASE-03 trains in fold 1, now also held out there


def missing_split_file(c: CohortFiles) -> None:
    c.split_file(2).unlink()  # splits_0, 1 and 3 remain: not a three-fold cross-validation


def splits_folder_missing(c: CohortFiles) -> None:
    c.opts["--splits"] = c.root / "no_such_splits"


def split_without_val(c: CohortFiles) -> None:
    frame = pd.read_csv(c.split_file(1), index_col=0)
    frame.drop(columns=["val"]).to_csv(c.split_file(1))


def split_empty_heldout(c: CohortFiles) -> None:
    _edit_folds(c, lambda f: f[3][1].clear())


def heldout_without_events(c: CohortFiles) -> None:
    """Every patient held out in fold 1 is censored: its C-index cannot be computed; say so before training."""
    held = set(c.folds[1][1])
    rows = [dict(r, censorship=1) if r["case_id"] in held else dict(r) for r in c.rows]
    c.write_table(rows)


# ---- options and configuration ----------------------------------------------------------------------------------

def opt(**opts: object) -> Callable[[CohortFiles], None]:
    def mutate(c: CohortFiles) -> None:
        for key, value in opts.items():
            c.opts[f"--{key.replace('_', '-')}"] = value
    return mutate


def extra(*args: str) -> Callable[[CohortFiles], None]:
    return lambda c: c.extra.extend(args)


def without_epochs_and(*args: str) -> Callable[[CohortFiles], None]:
    def mutate(c: CohortFiles) -> None:
        c.opts["--epochs"] = None
        c.extra.extend(args)
    return mutate


def cuda_without_gpu(c: CohortFiles) -> None:
    c.opts["--device"] = "cuda"
    c.env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU visible, as on a laptop


def features_root_missing(c: CohortFiles) -> None:
    c.opts["--features"] = c.root / "no_such_features"


CASES = [
    # feature files, CLAM h5
    Case("h5-missing", missing_file, (SLIDE,)),
    Case("h5-missing-bracketed-name", bracketed_slide_missing, ("CASE-03-[bold]S1",)),
    Case("h5-truncated", truncated, (SLIDE,)),
    Case("h5-not-hdf5", not_hdf5, (SLIDE,)),
    Case("h5-without-features", without_features, (SLIDE, "features")),
    Case("h5-features-1d", one_dimensional, (SLIDE,)),
    Case("h5-features-3d", three_dimensional, (SLIDE,)),
    Case("h5-text-dtype", text_dtype, (SLIDE,)),
    Case("h5-nan", with_nan, (SLIDE, ("NaN", "nan"))),
    Case("h5-inf", with_inf, (SLIDE, ("inf", "Inf"))),
    Case("h5-beyond-float16", beyond_half, (SLIDE,)),
    Case("h5-empty-bag", empty_bag, (SLIDE,)),
    Case("h5-width-differs", other_width, (SLIDE, "12")),
    Case("h5-coords-length-differs", coords_too_short, (SLIDE, "coords")),
    # feature files, CLAM pt
    Case("pt-missing", missing_file, (SLIDE,), layout="pt"),
    Case("pt-dict-without-features", pt_dict_without_features, (SLIDE, "features"), layout="pt"),
    Case("pt-no-coords-for-a-graph-model", opt(model="patchgcn"), ("patchgcn", "no coordinates", ".pt"), layout="pt"),
    Case("pt-features-1d", pt_one_dimensional, (SLIDE,), layout="pt"),
    Case("pt-nan", pt_nan, (SLIDE,), layout="pt"),
    Case("pt-corrupt", pt_corrupt, (SLIDE,), layout="pt"),
    Case("pt-not-numbers", pt_not_numbers, (SLIDE,), layout="pt"),
    # feature files, TRIDENT
    Case("trident-missing", missing_file, (SLIDE,), layout="trident"),
    Case("trident-without-features", without_features, (SLIDE, "features"), layout="trident"),
    Case("trident-batch-of-two", trident_batch_of_two, (SLIDE,), layout="trident"),
    Case("trident-width-differs", other_width, (SLIDE, "12"), layout="trident"),
    Case("trident-coords-length-differs", coords_too_short, (SLIDE, "coords"), layout="trident"),
    Case("trident-two-encoders-no-backbone", trident_two_encoders, ("--backbone",), layout="trident"),
    Case("trident-encoder-not-there", opt(backbone="conch_v15"), ("conch_v15",), layout="trident"),
    # cohort table
    Case("table-missing", table_missing, ("no_such_table.csv",)),
    Case("table-without-censorship", table_without("censorship"), ("cohort.csv", "censorship")),
    Case("table-without-survival-months", table_without("survival_months"), ("cohort.csv", "survival_months")),
    Case("table-censorship-2", table_value(SLIDE, "censorship", 2), ("cohort.csv", CASE, "censorship")),
    Case("table-censorship-text", table_value(SLIDE, "censorship", "yes"), ("cohort.csv", CASE, "censorship")),
    Case("table-negative-time", table_value(SLIDE, "survival_months", -3.0), ("cohort.csv", CASE)),
    Case("table-time-not-a-number", table_value(SLIDE, "survival_months", "soon"), ("cohort.csv", CASE)),
    Case("table-duplicate-slide-row", table_duplicate_row, ("cohort.csv", SLIDE)),
    Case("table-no-rows", table_no_rows, ("cohort.csv",)),
    Case("table-not-csv", table_binary, ("cohort.csv",)),
    Case("table-conflicting-times-of-a-case", table_conflicting_times, ("cohort.csv", "CASE-00")),
    # splits
    Case("splits-case-not-in-table", case_not_in_table, ("CASE-99",)),
    Case("splits-patient-in-train-and-test", patient_in_train_and_test, (CASE,)),
    Case("splits-missing-splits_2", missing_split_file, ("splits_2",)),
    Case("splits-folder-missing", splits_folder_missing, ("no_such_splits",)),
    Case("splits-file-without-val", split_without_val, ("splits_1.csv", "val")),
    Case("splits-empty-heldout", split_empty_heldout, ("splits_3",)),
    Case("splits-heldout-fold-without-events", heldout_without_events, (("fold 1", "splits_1"), "event")),
    Case("folds-not-integers", opt(folds="zero,one"), ("--folds",)),
    Case("folds-not-in-splits", opt(folds="0,7"), (("--folds", "splits_7"), "7")),
    # configuration
    Case("set-lr-fast", extra("--set", "lr=fast"), ("lr", "fast")),
    Case("set-epochs-many", without_epochs_and("--set", "epochs=many"), ("epochs", "many")),
    Case("set-epochs-zero", without_epochs_and("--set", "epochs=0"), ("epochs",)),
    Case("set-lr-negative", extra("--set", "lr=-0.1"), ("lr",)),
    Case("set-grad-accum-fraction", extra("--set", "grad_accum=2.5"), ("grad_accum",)),
    Case("set-unknown-key", extra("--set", "nosuch=1"), ("nosuch",)),
    Case("set-option-typo-did-you-mean", extra("--set", "dropuot=0.1"), ("dropuot", "dropout", "did you mean")),
    Case("set-targeted-unknown-option", extra("--set", "amil.nosuch=1"), ("nosuch",)),
    Case("set-dropout-out-of-range", extra("--set", "dropout=1.5"), ("dropout",)),
    Case("set-variant-unknown", extra("--set", "variant=bogus"), ("variant", "bogus")),
    Case("set-loss-cannot-train-head", extra("--set", "loss=mdn"), ("loss", "mdn")),
    Case("model-typo-did-you-mean", opt(model="amill"), ("amill", "did you mean")),
    Case("cohort-unknown-did-you-mean", opt(cohort="tcga_brcaa", splits=None, features=None),
         ("tcga_brcaa", "tcga_brca", "did you mean")),
    Case("scenario-unknown-did-you-mean", opt(cohort="synthetic_corse", splits=None, features=None),
         ("corse", "coarse", "did you mean")),
    Case("device-cuda-without-gpu", cuda_without_gpu, ("cuda",)),
    Case("protocol-unknown", opt(protocol="best-test"), ("best-test",)),
    Case("features-root-missing", features_root_missing, ("no_such_features",)),
    Case("epochs-flag-not-a-number", opt(epochs="many"), ("--epochs",)),
    Case("unknown-flag", extra("--epoch", "3"), ("--epoch",)),
]


def _culprit_missing(line: str, culprit: tuple[Culprit, ...]) -> list[str]:
    missing = []
    for token in culprit:
        alternatives = (token,) if isinstance(token, str) else token
        if not any(alt.lower() in line.lower() for alt in alternatives):
            missing.append(" or ".join(repr(a) for a in alternatives))
    return missing


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, make_cohort, runs_dir):
    cohort = make_cohort(case.layout)
    case.mutate(cohort)
    before = snapshot(runs_dir)
    assert len(records(runs_dir)) == 1

    res = run_milbench(*cohort.run_args(runs_dir), env=cli_env(**cohort.env), timeout=300)

    problems = []
    if res.returncode != 2:
        problems.append(f"exit code {res.returncode}, expected 2")
    if "Traceback" in res.stdout + res.stderr:
        problems.append("a traceback was printed")
    lines = res.stderr_lines
    if len(lines) != 1:
        problems.append(f"{len(lines)} non-empty stderr lines, expected exactly 1")
    if lines:
        missing = _culprit_missing("\n".join(lines) if len(lines) > 1 else lines[0], case.culprit)
        if missing:
            problems.append(f"stderr does not name {', '.join(missing)}")
    problems += store_changes(before, runs_dir)
    log_result(case.name, res, problems)
    assert not problems, "; ".join(problems) + "\n" + res.describe()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
