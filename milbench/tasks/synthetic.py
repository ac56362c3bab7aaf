"""Synthetic multi-scale survival cohorts with a known (oracle) risk, written in the CLAM layout.

Every slide is a random tissue blob on a grid of 5x patches. Each 5x region has a coarse tissue type
(``TISSUE_TYPES``; spatially smooth, marginally drawn from the patient's Dirichlet(1) type mix) and each 20x patch
may carry a sparse fine event ("mitosis-like", at the patient's rate, one rate inside tumour and one outside, each
Uniform(0, 0.2)). Patches sit on nested grids as CLAM stores them: level-0 pixel coordinates at base magnification
20x, patch side 256 px at 20x, 512 at 10x and 1024 at 5x, so one 5x patch covers 2x2 10x and 4x4 20x patches; at
tissue borders a few 10x/20x children are missing, as after real tissue filtering.

Bag size: a slide has ``n5 = max(2, round(16 * size * u))`` 5x patches with ``u ~ Uniform(0.5, 1.5)``, so on
average ``16 * size`` 5x, about ``4 * 16 * size`` 10x and about ``16 * 16 * size`` 20x patches (minus a few percent
dropped at borders): the paper's 1:4:16 ratio. A quarter of the patients have two slides.

Features at a magnification are a fixed linear map (per magnification, orthonormal directions drawn from the seed,
shared by the cohort) of the patch's latent state (type one-hot, fraction of its 20x cells with an event), plus
N(0, 1) noise per dimension and a small per-slide offset (stain): 5x features show the coarse type clearly, 10x
show the coarse type and the events of its four 20x cells (a blur), 20x show the fine event clearly and the coarse
type weakly.

Risk (log-hazard) by scenario, from what is visible: ``coarse``: the fraction of necrosis among the 5x patches;
``fine``: the fraction of 20x patches with an event; ``cross-scale``: the fraction of 20x patches with an event
inside tumour (events elsewhere do not count); ``mixed``: a weighted sum of the three. Each is standardised with
constants measured on 20,000 simulated patients at size 1 and scaled to sd 1.25. Survival:
``T = 100 months * exp(-r) * E``, ``E ~ Exponential(1)``; independent censoring times ``C = s * U``,
``U ~ Uniform(0, 1)``, with ``s`` set so that ``round(censoring * n)`` patients are censored. The oracle C-index
(Harrell's, of ``r``) is then about 0.8 at 70% censoring, limited by the exponential noise and the censoring.
"""

from __future__ import annotations

# scipy and h5py load inside the functions that use them: `milbench cohorts` reads SCENARIOS without them.
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from milbench import MilbenchError, did_you_mean
from milbench.files import write_json

GENERATOR_VERSION = 1
SCENARIOS = ("coarse", "fine", "cross-scale", "mixed")
BUILTIN_COHORTS = {"synthetic": "mixed", **{f"synthetic_{s}": s for s in SCENARIOS}}
DEMO = {"patients": 150, "seed": 0, "size": 1.0, "in_dim": 64}

TISSUE_TYPES = ("tumour", "stroma", "necrosis", "normal")
TUMOUR, NECROSIS = TISSUE_TYPES.index("tumour"), TISSUE_TYPES.index("necrosis")
MAGS = ("5x", "10x", "20x")
SIDE = {"5x": 1024, "10x": 512, "20x": 256}  # level-0 patch side at base magnification 20x
CHILDREN = {"5x": 1, "10x": 2, "20x": 4}  # patches per 5x patch along one axis

# latents each scenario's risk reads: necrosis fraction at 5x, event density at 20x, tumour-event density at 20x
LATENTS = ("necrosis_fraction", "event_density", "tumour_event_density")
# (mean, sd) of each latent, measured on 20,000 simulated patients at size 1 (seed 0)
_LATENT_MOMENTS = {
    "necrosis_fraction": (0.250, 0.298),
    "event_density": (0.1004, 0.0550),
    "tumour_event_density": (0.0251, 0.0388),
}
# weights on the standardised latents; mixed's are scaled so its sum has sd 1 too (the latents correlate)
_RISK_WEIGHTS = {
    "coarse": {"necrosis_fraction": 1.0},
    "fine": {"event_density": 1.0},
    "cross-scale": {"tumour_event_density": 1.0},
    "mixed": {"necrosis_fraction": 0.65, "event_density": 0.44, "tumour_event_density": 0.65},
}
_RISK_SD = 1.25  # sd of the log-hazard: oracle C-index about 0.8 at 70% censoring
_BASE_MONTHS = 100.0
_TWO_SLIDES = 0.25  # fraction of patients with a second slide
_MAX_RATE = 0.2  # per-patient fine-event rates (in and outside tumour) are Uniform(0, _MAX_RATE) per 20x patch
_DROP = {"10x": 0.05, "20x": 0.1}  # chance a child patch on a border side is missing
_TYPE_AMP = {"5x": 5.0, "10x": 3.0, "20x": 1.5}  # how clearly each magnification shows the coarse type
_EVENT_AMP = {"5x": 1.0, "10x": 4.0, "20x": 4.0}  # ... and the fine events (their fraction in the patch)
_STAIN_SD = 0.05


@dataclass
class SlideLatent:
    """One slide's patches and latent states; per magnification arrays are in CLAM's row-major patch order.

    ``coords[mag]`` [N, 2] int64 level-0 top-left corners; ``tissue[mag]`` [N] coarse type of the enclosing 5x
    region; ``events[mag]`` [N] fraction of the patch's 20x cells carrying a fine event (0/1 at 20x).
    """

    slide_id: str
    coords: dict[str, np.ndarray]
    tissue: dict[str, np.ndarray]
    events: dict[str, np.ndarray]


@dataclass
class PatientLatent:
    """One patient: its slides, latent summaries (``LATENTS``), oracle risk and observed survival."""

    case_id: str
    slides: list[SlideLatent]
    latents: dict[str, float]
    risk: float
    time: float = 0.0
    censored: bool = False


@dataclass
class Simulation:
    """A simulated cohort without features: the patients, the cohort table and the oracle C-index."""

    scenario: str
    seed: int
    patients: list[PatientLatent]
    table: pd.DataFrame
    oracle_c_index: float


def latent_summary(slides: list[SlideLatent]) -> dict[str, float]:
    """What the scenarios' risks read, over all slides of a patient, from what is visible (patches that exist)."""
    t5 = np.concatenate([s.tissue["5x"] for s in slides])
    t20 = np.concatenate([s.tissue["20x"] for s in slides])
    e20 = np.concatenate([s.events["20x"] for s in slides])
    return {
        "necrosis_fraction": float(np.mean(t5 == NECROSIS)),
        "event_density": float(np.mean(e20)),
        "tumour_event_density": float(np.mean(e20 * (t20 == TUMOUR))),
    }


def oracle_risk(scenario: str, latents: dict[str, float]) -> float:
    """The scenario's log-hazard: a weighted sum of standardised latents, scaled to sd ``_RISK_SD``."""
    weights = _RISK_WEIGHTS[_check_scenario(scenario)]
    z = sum(w * (latents[k] - _LATENT_MOMENTS[k][0]) / _LATENT_MOMENTS[k][1] for k, w in weights.items())
    return float(_RISK_SD * z)


def _check_scenario(scenario: str) -> str:
    if scenario not in SCENARIOS:
        raise MilbenchError(f"unknown synthetic scenario '{scenario}': {did_you_mean(scenario, SCENARIOS)}choose one of {', '.join(SCENARIOS)}")
    return scenario


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Spatially correlated standard-normal noise on a grid."""
    from scipy import ndimage

    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return (f - f.mean()) / (f.std() + 1e-12)


def _tissue_blob(rng: np.random.Generator, n5: int) -> np.ndarray:
    """An irregular tissue mask of exactly ``n5`` cells: the top cells of a smooth random field pulled to the centre."""
    side = int(np.ceil(2 * np.sqrt(n5))) + 2
    yy, xx = np.mgrid[:side, :side]
    centre = ((yy - side / 2 + 0.5) ** 2 + (xx - side / 2 + 0.5) ** 2) / side**2
    blob = _smooth_field(rng, (side, side), max(1.0, side / 5)) - 4.0 * centre
    mask = np.zeros(side * side, bool)
    mask[np.argsort(-blob.ravel(), kind="stable")[:n5]] = True
    return mask.reshape(side, side)


def _border_keep(rng: np.random.Generator, mask: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> dict[str, np.ndarray]:
    """Which 10x/20x children of each 5x cell exist: those on a side facing no tissue may be missing."""
    padded = np.pad(mask, 1)
    keep = {m: np.ones((len(gy), CHILDREN[m], CHILDREN[m]), bool) for m in ("10x", "20x")}
    for (dy, dx), edge in (((-1, 0), (0, slice(None))), ((1, 0), (-1, slice(None))),
                           ((0, -1), (slice(None), 0)), ((0, 1), (slice(None), -1))):
        border = ~padded[gy + 1 + dy, gx + 1 + dx]
        for m, k in keep.items():
            on_side = np.zeros_like(k)
            on_side[(border, *edge)] = True
            k &= ~(on_side & (rng.uniform(size=k.shape) < _DROP[m]))
    return keep


def _simulate_slide(rng: np.random.Generator, slide_id: str, size: float, p_type: np.ndarray,
                    rates: np.ndarray) -> SlideLatent:
    """Tissue blob, coarse types (spatially smooth, marginally ~ p_type), fine events, border drops, coords."""
    mask = _tissue_blob(rng, max(2, int(round(16 * size * rng.uniform(0.5, 1.5)))))
    gy, gx = np.nonzero(mask)
    # coarse type: argmax(log p + smooth Gumbel noise) -> categorical(p) per cell, contiguous regions
    fields = np.stack([_smooth_field(rng, mask.shape, max(1.0, mask.shape[0] / 5)) for _ in p_type])
    from scipy import special

    tissue5 = np.argmax(np.log(p_type)[:, None, None] - np.log(-np.log(special.ndtr(fields))), axis=0)[gy, gx]
    # fine events on every latent 20x cell of the 5x region, at the patient's rate for that tissue type
    events = rng.uniform(size=(len(gy), 4, 4)) < rates[tissue5][:, None, None]
    keep = _border_keep(rng, mask, gy, gx)
    origin = rng.integers(1, 8, size=2) * SIDE["5x"]
    coords, tissue, ev = {}, {}, {}
    for m in MAGS:
        c = CHILDREN[m]
        idx, cy, cx = np.nonzero(keep.get(m, np.ones((len(gy), 1, 1), bool)))
        x = origin[0] + gx[idx] * SIDE["5x"] + cx * SIDE[m]
        y = origin[1] + gy[idx] * SIDE["5x"] + cy * SIDE[m]
        frac = events.reshape(len(gy), c, 4 // c, c, 4 // c).mean(axis=(2, 4))[idx, cy, cx]
        order = np.lexsort((x, y))  # CLAM's row-major order
        coords[m] = np.stack([x, y], 1)[order].astype(np.int64)
        tissue[m] = tissue5[idx][order]
        ev[m] = frac[order]
    return SlideLatent(slide_id, coords, tissue, ev)


def _simulate_patient(seed: int, i: int, scenario: str, size: float) -> PatientLatent:
    """Patient ``i``'s slides and risk from its own stream, so a cohort's first patients do not depend on its size."""
    rng = np.random.default_rng([seed, 1, i])
    case_id = f"SYN-{i + 1:04d}"
    p_type = rng.dirichlet(np.ones(len(TISSUE_TYPES)))
    rates = np.full(len(TISSUE_TYPES), rng.uniform(0, _MAX_RATE))  # fine-event rate outside tumour ...
    rates[TUMOUR] = rng.uniform(0, _MAX_RATE)  # ... and, independently, inside it
    n_slides = 2 if rng.uniform() < _TWO_SLIDES else 1
    slides = [_simulate_slide(rng, f"{case_id}-{j + 1:02d}", size, p_type, rates) for j in range(n_slides)]
    latents = latent_summary(slides)
    return PatientLatent(case_id, slides, latents, oracle_risk(scenario, latents))


def _survival(seed: int, risks: np.ndarray, censoring: float) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with hazard exp(r) / 100 months; uniform censoring of round(censoring * n) patients."""
    rng = np.random.default_rng([seed, 2])
    n = len(risks)
    t = _BASE_MONTHS * np.exp(-risks) * rng.exponential(size=n)
    u = rng.uniform(size=n)
    k = min(int(round(censoring * n)), n - 2)
    if k <= 0:
        return np.maximum(np.round(t, 2), 0.01), np.zeros(n, bool)
    # censored iff s * u < t iff s < t / u: choose s between the k-th and (k+1)-th largest ratio
    ratio = np.sort(t / u)[::-1]
    s = np.sqrt(ratio[k - 1] * ratio[k])
    c = s * u
    censored = c < t
    return np.maximum(np.round(np.minimum(t, c), 2), 0.01), censored


def simulate(scenario: str, patients: int, seed: int, size: float = 1.0, censoring: float = 0.7) -> Simulation:
    """Simulate a cohort's latent states, risks and survival without writing features (cheap)."""
    _check_scenario(scenario)
    if patients < 10:
        raise MilbenchError(f"a synthetic cohort needs at least 10 patients, not {patients}")
    if not size > 0:
        raise MilbenchError(f"synthetic bag size must be > 0, not {size}")
    if not 0 <= censoring <= 0.95:
        raise MilbenchError(f"synthetic censoring must be a fraction in [0, 0.95], not {censoring}")
    people = [_simulate_patient(seed, i, scenario, size) for i in range(patients)]
    risks = np.array([p.risk for p in people])
    time, censored = _survival(seed, risks, censoring)
    rows = []
    for p, t, c in zip(people, time, censored):
        p.time, p.censored = float(t), bool(c)
        rows += [(p.case_id, s.slide_id, p.time, int(c), p.risk) for s in p.slides]
    table = pd.DataFrame(rows, columns=["case_id", "slide_id", "survival_months", "censorship", "oracle_risk"])
    from sksurv.metrics import concordance_index_censored  # scikit-survival takes a second to import

    c_index = concordance_index_censored(~censored, time, risks)[0]
    return Simulation(scenario, seed, people, table, float(c_index))


def feature_maps(seed: int, in_dim: int) -> dict[str, np.ndarray]:
    """Per magnification, the fixed map [len(TISSUE_TYPES) + 1, in_dim] from (type one-hot, event) to features."""
    rng = np.random.default_rng([seed, 3])
    maps = {}
    for m in MAGS:
        q, _ = np.linalg.qr(rng.normal(size=(in_dim, len(TISSUE_TYPES) + 1)))  # orthonormal: states do not mix
        maps[m] = q.T * np.array([_TYPE_AMP[m]] * len(TISSUE_TYPES) + [_EVENT_AMP[m]])[:, None]
    return maps


def slide_features(slide: SlideLatent, maps: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Features per magnification: the map of the patch's (type one-hot, event fraction), a stain offset, noise."""
    out = {}
    for m in MAGS:
        n, d = len(slide.tissue[m]), maps[m].shape[1]
        state = np.concatenate([np.eye(len(TISSUE_TYPES))[slide.tissue[m]], slide.events[m][:, None]], axis=1)
        stain = rng.normal(scale=_STAIN_SD, size=d)
        out[m] = (state @ maps[m] + stain + rng.normal(size=(n, d))).astype(np.float32)
    return out


def _fold_splits(sim: Simulation, folds: int) -> list[tuple[list[str], list[str]]]:
    """Patient-level folds stratified by event: events and censored patients dealt round-robin after a shuffle."""
    rng = np.random.default_rng([sim.seed, 4])
    fold_of: dict[str, int] = {}
    for group in (True, False):
        ids = [p.case_id for p in sim.patients if p.censored == group]
        for j, case in enumerate(rng.permutation(ids)):
            fold_of[str(case)] = j % folds
    ids = [p.case_id for p in sim.patients]
    return [([c for c in ids if fold_of[c] != k], [c for c in ids if fold_of[c] == k]) for k in range(folds)]


def generate_cohort(out: Path, scenario: str, patients: int, seed: int, size: float = 1.0, in_dim: int = 64,
                    censoring: float = 0.7, folds: int = 5,
                    progress: Callable[[int, int], None] | None = None, table: str = "cohort.csv") -> Path:
    """Write a synthetic cohort to ``out`` (``table``, splits/, features/x{5,10,20}/h5_files/, synthetic.json).

    A cohort read from a table is named after the table's stem, so ``table`` names the cohort in the run store.

    ``synthetic.json`` is removed first and written last, so a folder without it is an interrupted generation.
    ``progress(done, total)`` is called after each patient's slides are written.
    """
    sim = simulate(scenario, patients, seed, size, censoring)
    if in_dim < len(TISSUE_TYPES) + 1:
        raise MilbenchError(f"synthetic feature width in_dim must be >= {len(TISSUE_TYPES) + 1} (one direction per "
                            f"latent state), not {in_dim}")
    if not 2 <= folds <= patients:
        raise MilbenchError(f"synthetic folds must be between 2 and the number of patients ({patients}), not {folds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic.json").unlink(missing_ok=True)
    for stale in (*out.glob("features/x*/h5_files/SYN-*.h5"), *out.glob("splits/splits_*.csv")):
        stale.unlink()
    h5_dirs = {m: out / "features" / f"x{m[:-1]}" / "h5_files" for m in MAGS}
    for d in h5_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    maps = feature_maps(seed, in_dim)
    for i, p in enumerate(sim.patients):
        for j, slide in enumerate(p.slides):
            feats = slide_features(slide, maps, np.random.default_rng([seed, 5, i, j]))
            for m in MAGS:
                _write_h5(h5_dirs[m] / f"{slide.slide_id}.h5", feats[m], slide.coords[m], m)
        if progress is not None:
            progress(i + 1, patients)
    sim.table.to_csv(out / table, index=False)
    (out / "splits").mkdir(exist_ok=True)
    for k, (train, val) in enumerate(_fold_splits(sim, folds)):
        pd.DataFrame({"train": pd.Series(train, dtype=object), "val": pd.Series(val, dtype=object)}).to_csv(
            out / "splits" / f"splits_{k}.csv")
    meta = {
        "scenario": scenario, "patients": patients, "seed": seed, "size": size, "in_dim": in_dim,
        "censoring": censoring, "folds": folds, "generator_version": GENERATOR_VERSION, "table": table,
        "oracle_c_index": sim.oracle_c_index, "slides": len(sim.table),
        "censored_fraction": float(np.mean([p.censored for p in sim.patients])),
        "patches": {m: int(sum(len(s.tissue[m]) for p in sim.patients for s in p.slides)) for m in MAGS},
        "risk_weights": dict(_RISK_WEIGHTS[scenario]),
    }
    write_json(out / "synthetic.json", meta, newline=True)
    return out


def _write_h5(path: Path, features: np.ndarray, coords: np.ndarray, mag: str) -> None:
    """A CLAM h5: ``features`` float32 [N, D], ``coords`` int64 [N, 2] with CLAM's attributes."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=coords)
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 0
        c.attrs["magnification"] = int(mag[:-1])
        c.attrs["level0_patch_size"] = SIDE[mag]


def cache_dir() -> Path:
    """Where built-in cohorts live: ``$MILBENCH_CACHE`` or ``~/.cache/milbench``."""
    return Path(os.environ.get("MILBENCH_CACHE") or Path.home() / ".cache" / "milbench").expanduser()


def builtin_cohort(name: str) -> Path:
    """The folder of a built-in synthetic cohort (``BUILTIN_COHORTS``), generated on first use with ``DEMO``.

    Generation goes to a temporary sibling folder that is renamed into place, so concurrent callers (parallel
    fold workers) never see a half-written cohort; a folder without ``synthetic.json`` is regenerated.
    """
    if name not in BUILTIN_COHORTS:
        raise MilbenchError(f"unknown built-in cohort '{name}': choose one of {', '.join(BUILTIN_COHORTS)}")
    final = cache_dir() / "synthetic" / f"{name}-v{GENERATOR_VERSION}"
    if (final / "synthetic.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        generate_cohort(tmp, BUILTIN_COHORTS[name], **DEMO)
        if final.exists() and not (final / "synthetic.json").exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / "synthetic.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
