"""What a run is trained on, checked before any work and fingerprinted for the run's identity.

:func:`inspect_inputs` opens the header of every feature file the requested folds will read (exists, readable,
2-D numeric features, one common width, coords as long as the features), checks the folds (present, each held-out
fold with an event), and returns the fingerprints that go into the run configuration's hash: the cohort rows
(case, slide, time, censorship), the fold assignment, and the feature files at each magnification (name, size,
shape; not their folder, so the same files under another path are the same inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from milbench import MilbenchError
from milbench.data.headers import FileHeader, read_header
from milbench.data.readers import locate_feature_file
from milbench.files import stable_hash
from milbench.tasks.cohort import Cohort


@dataclass
class Inputs:
    """The checked inputs of one cohort: feature width, every file's header per (slide, scale), fingerprints."""

    cohort: Cohort
    folds: list[int]
    dim: int | None = None
    headers: dict[tuple[str, str], FileHeader] = field(default_factory=dict)

    def fingerprints(self, scales: Sequence[str]) -> dict[str, str]:
        """Rows, folds and features (at ``scales``) as short hashes: a run's ``inputs``."""
        table = self.cohort.table
        rows = table[["case_id", "slide_id", "survival_months", "censorship"]].astype(str)
        rows = sorted(map(tuple, rows.to_numpy().tolist()))
        folds = {str(k): [sorted(train), sorted(held)] for k, (train, held) in sorted(self.cohort.folds.items())}
        files = sorted((scale, slide, h.path.name, h.size, h.patches, h.dim)
                       for (slide, scale), h in self.headers.items() if scale in scales)
        return {"rows": stable_hash(rows), "folds": stable_hash(folds), "features": stable_hash(files)}


def check_folds(cohort: Cohort, folds: Sequence[int] | None) -> list[int]:
    """The requested folds (all by default), each present and with at least one event among its held-out patients."""
    wanted = sorted(cohort.folds) if folds is None else list(folds)
    missing = [f for f in wanted if f not in cohort.folds]
    if missing:
        where = f" ({cohort.splits_dir} has no splits_{missing[0]}.csv)" if cohort.splits_dir else ""
        raise MilbenchError(f"cohort '{cohort.name}' has folds {sorted(cohort.folds)}; fold {missing[0]} was asked "
                            f"for{where}: pick --folds among those")
    for k in wanted:
        _, event = cohort.labels(cohort.folds[k][1])
        if not event.any():
            raise MilbenchError(f"fold {k} of cohort '{cohort.name}' has no event among its {len(event)} held-out "
                                f"patients: its C-index is undefined; rebalance the folds (milbench splits make) or "
                                f"leave it out with --folds")
    return wanted


def inspect_inputs(cohort: Cohort, scales: Sequence[str], folds: Sequence[int] | None = None) -> Inputs:
    """Check every feature file of the slides the requested folds read, at ``scales``, by its header alone."""
    inputs = Inputs(cohort, check_folds(cohort, folds))
    cohort.check_features(scales)  # every absent file, counted and named, before any header is read
    cases = {c for k in inputs.folds for part in cohort.folds[k] for c in part}
    root = cohort.require_features_root()
    first: FileHeader | None = None
    for slide, case in zip(cohort.table["slide_id"], cohort.table["case_id"]):
        if case not in cases:
            continue
        for scale in scales:
            path = locate_feature_file(root, scale, slide, cohort.backbone)
            header = read_header(path)
            if first is None:
                first = header
            elif header.dim != first.dim:
                raise MilbenchError(f"{path} has {header.dim} features per patch but {first.path} has {first.dim}: "
                                    f"every slide must come from the same encoder; re-extract it or remove the slide")
            inputs.headers[(slide, scale)] = header
    inputs.dim = None if first is None else first.dim
    return inputs
