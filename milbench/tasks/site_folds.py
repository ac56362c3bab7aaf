"""Site-preserved folds: whole tissue-source sites (or patients) go to one held-out fold, balancing patients and events.

In TCGA the tissue-source site (second field of the barcode, ``TCGA-XX-...``) leaves a signature in the slides
(staining, scanner, cohort mix), so folds that put one site in both training and held-out sets inflate the
C-index. milbench's own algorithm, seeded and deterministic:

1. Group the patients (by site, or each patient alone with ``by="patient"``); a group has a patient count n and
   an event count e (censorship 0).
2. Cost of an assignment: sum over folds of ((n_f - N/K) / (N/K))^2 + ((e_f - E/K) / (E/K))^2, the squared
   relative deviations of each fold's patients and events from an equal share (the event term is dropped when
   the cohort has no event).
3. Greedy start: groups in order of decreasing n, then decreasing e, then a seeded random rank (later starts:
   a seeded random order); each goes to the fold where it raises the cost least (ties: a seeded random choice).
4. Local search: apply the single best move of one group to another fold, or swap of two groups between folds,
   while it lowers the cost (no fold may become empty). This undoes the greedy's early mistakes.
5. Keep the cheapest of ``RESTARTS`` such starts (the largest-first one and seeded random orders; the earliest
   wins a tie). On the TCGA cohorts, the sorted fold sizes of seeds 0-3 differ by at most one patient.
6. Folds are numbered by their alphabetically first group, so the labels do not depend on the search order.

A site with more than N/K patients makes its fold larger than the others whatever the algorithm (COAD: site
AA, 145 of 416 patients); the cost then balances the remaining folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from milbench import MilbenchError
from milbench.tasks import tcga
from milbench.tasks.audit import TCGA_CASE

GROUPINGS = ("site", "patient")
SUFFIX = "_sitefolds"  # tcga_<x>_sitefolds: the shipped site-preserved folds of tcga_<x>
SHIPPED_SEED, SHIPPED_FOLDS = 0, 5
_IMPROVEMENT = 1e-12  # smaller cost changes are rounding, not progress
RESTARTS = 50  # greedy starts per assignment; 200 random starts lowered no TCGA cohort's cost by 1e-4


def tissue_source_site(case_id: str) -> str:
    """The tissue-source site of a TCGA patient barcode: ``TCGA-XX-XXXX`` -> ``XX``."""
    if not TCGA_CASE.match(str(case_id)):
        raise MilbenchError(f"case {case_id} is not a TCGA patient barcode (TCGA-XX-XXXX): site folds need one per "
                            f"case_id; use --by patient for other IDs")
    return str(case_id).split("-")[1]


def group_of(case_ids: pd.Series, by: str) -> pd.Series:
    """The group each case belongs to: its tissue-source site (``site``) or itself (``patient``)."""
    if by not in GROUPINGS:
        raise MilbenchError(f"--by {by} is not a grouping: use one of {', '.join(GROUPINGS)}")
    return case_ids.map(tissue_source_site) if by == "site" else case_ids.astype(str)


def _cost_terms(load: np.ndarray, target: float) -> np.ndarray:
    return ((load - target) / target) ** 2 if target > 0 else np.zeros_like(load, dtype=float)


def _cost(sizes: np.ndarray, events: np.ndarray, fold: np.ndarray, n_folds: int) -> float:
    n = np.bincount(fold, weights=sizes, minlength=n_folds)
    e = np.bincount(fold, weights=events, minlength=n_folds)
    return float(_cost_terms(n, sizes.sum() / n_folds).sum() + _cost_terms(e, events.sum() / n_folds).sum())


def _greedy(sizes: np.ndarray, events: np.ndarray, n_folds: int, order: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Groups in the given order, each to the fold where it raises the cost least; seeded ties."""
    tn, te = sizes.sum() / n_folds, events.sum() / n_folds
    fold = np.full(len(sizes), -1)
    n, e = np.zeros(n_folds), np.zeros(n_folds)
    for g in order:
        rise = (_cost_terms(n + sizes[g], tn) - _cost_terms(n, tn)) + (_cost_terms(e + events[g], te)
                                                                         - _cost_terms(e, te))
        f = int(rng.choice(np.flatnonzero(rise == rise.min())))
        fold[g] = f
        n[f] += sizes[g]
        e[f] += events[g]
    return fold


def _local_search(sizes: np.ndarray, events: np.ndarray, fold: np.ndarray, n_folds: int) -> np.ndarray:
    """Best single move or pairwise swap while it lowers the cost; folds stay non-empty."""
    fold = fold.copy()
    tn, te = sizes.sum() / n_folds, events.sum() / n_folds
    while True:
        n = np.bincount(fold, weights=sizes, minlength=n_folds)
        e = np.bincount(fold, weights=events, minlength=n_folds)
        members = np.bincount(fold, minlength=n_folds)
        # groups alike in fold, patients and events are interchangeable: weigh one of each (patients: a handful)
        reps = np.unique(np.stack([fold, sizes, events], axis=1), axis=0, return_index=True)[1]
        size, event, own = sizes[reps][:, None], events[reps][:, None], fold[reps]
        here_n, here_e = n[own][:, None], e[own][:, None]  # [R, 1]: the load of each group's own fold
        # move group g to fold f: its fold loses it, f gains it
        move = (_cost_terms(here_n - size, tn) - _cost_terms(here_n, tn)
                + _cost_terms(n[None] + size, tn) - _cost_terms(n[None], tn)
                + _cost_terms(here_e - event, te) - _cost_terms(here_e, te)
                + _cost_terms(e[None] + event, te) - _cost_terms(e[None], te))
        move[np.arange(len(reps)), own] = np.inf
        move[members[own] == 1] = np.inf
        # swap groups g and h: g's fold gains d = size_h - size_g, h's fold loses it
        dn, de = size.T - size, event.T - event
        other_n, other_e = here_n.T, here_e.T
        swap = (_cost_terms(here_n + dn, tn) - _cost_terms(here_n, tn)
                + _cost_terms(other_n - dn, tn) - _cost_terms(other_n, tn)
                + _cost_terms(here_e + de, te) - _cost_terms(here_e, te)
                + _cost_terms(other_e - de, te) - _cost_terms(other_e, te))
        swap[own[:, None] == own[None]] = np.inf
        swap[np.tril_indices(len(reps))] = np.inf
        if min(move.min(), swap.min()) >= -_IMPROVEMENT:
            return fold
        if move.min() <= swap.min():
            i, f = np.unravel_index(int(np.argmin(move)), move.shape)
            fold[reps[i]] = f
        else:
            i, j = np.unravel_index(int(np.argmin(swap)), swap.shape)
            g, h = reps[i], reps[j]
            fold[g], fold[h] = fold[h], fold[g]


def _search(sizes: np.ndarray, events: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """The cheapest local optimum over the largest-first greedy start and seeded random-order starts."""
    best, best_cost = None, np.inf
    for start in range(RESTARTS):
        order = (np.lexsort((rng.permutation(len(sizes)), -events, -sizes)) if start == 0
                 else rng.permutation(len(sizes)))
        fold = _local_search(sizes, events, _greedy(sizes, events, n_folds, order, rng), n_folds)
        cost = _cost(sizes, events, fold, n_folds)
        if cost < best_cost - _IMPROVEMENT:
            best, best_cost = fold, cost
        if best_cost <= _IMPROVEMENT:  # perfectly balanced: no start can do better
            break
    return best


def assign_folds(names: list[str], sizes: np.ndarray, events: np.ndarray, n_folds: int = 5,
                 seed: int = 0) -> dict[str, int]:
    """Held-out fold of each group (named, with its patient and event counts): seeded greedy + local search."""
    sizes, events = np.asarray(sizes, dtype=float), np.asarray(events, dtype=float)
    if n_folds < 2:
        raise MilbenchError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    if len(names) < n_folds:
        shown = ", ".join(sorted(names)[:10]) + (", ..." if len(names) > 10 else "")
        raise MilbenchError(f"only {len(names)} group(s) ({shown}) for {n_folds} folds: use --folds "
                            f"{max(len(names), 2)} or fewer, or --by patient")
    ranked = np.argsort(names, kind="stable")  # the result must not depend on the input order
    names, sizes, events = [names[i] for i in ranked], sizes[ranked], events[ranked]
    fold = _search(sizes, events, n_folds, np.random.default_rng(seed))
    first = {f: min(np.flatnonzero(fold == f)) for f in range(n_folds)}  # names are sorted: the first name
    relabel = {f: k for k, f in enumerate(sorted(first, key=first.get))}
    return {name: relabel[int(f)] for name, f in zip(names, fold)}


def make_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 0, by: str = "site") -> pd.DataFrame:
    """The table (one row per slide, rows in order) with a ``fold`` column: each group is held out in one fold."""
    patients = table.groupby("case_id", sort=True)["censorship"].first().rename("censorship").reset_index()
    patients["group"] = group_of(patients["case_id"], by).to_numpy()
    per = patients.groupby("group", sort=True).agg(n=("case_id", "size"), e=("censorship", lambda c: (c == 0).sum()))
    fold_of = assign_folds(per.index.tolist(), per["n"].to_numpy(), per["e"].to_numpy(), n_folds, seed)
    case_fold = dict(zip(patients["case_id"], patients["group"].map(fold_of)))
    out = table.drop(columns=["fold"], errors="ignore")
    out["fold"] = out["case_id"].map(case_fold).astype("Int64")
    return out


def fold_balance(table: pd.DataFrame, by: str = "site") -> pd.DataFrame:
    """Per held-out fold: patients, events, slides and groups, with each fold's share of the cohort's patients."""
    patients = table.groupby("case_id", sort=True)[["censorship", "fold"]].first().reset_index()
    patients["group"] = group_of(patients["case_id"], by).to_numpy()
    rows = []
    for k in sorted(int(f) for f in patients["fold"].dropna().unique()):
        held = patients[patients["fold"] == k]
        rows.append({"fold": k, "patients": len(held), "events": int((held["censorship"] == 0).sum()),
                     "slides": int((table["fold"] == k).sum()), "groups": held["group"].nunique(),
                     "share": len(held) / len(patients)})
    return pd.DataFrame(rows)


def is_site_folds_name(text: str) -> bool:
    """Whether a cohort name asks for shipped site-preserved folds (``tcga_blca_sitefolds`` or ``blca_sitefolds``)."""
    return str(text).strip().lower().endswith(SUFFIX)


def site_folds_name(text: str) -> str:
    """Canonical name of a TCGA cohort's site-preserved folds: 'blca' or 'blca_sitefolds' -> 'tcga_blca_sitefolds'."""
    return tcga.cohort_name(str(text).strip().lower().removesuffix(SUFFIX)) + SUFFIX


def site_folds_path(text: str) -> Path:
    """Path of a TCGA cohort's shipped site-preserved folds."""
    return tcga.SPLITS_DIR / f"{site_folds_name(text)}.csv"
