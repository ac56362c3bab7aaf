"""Pictures from a run store: Kaplan-Meier curves of the pooled out-of-fold risk groups, and attention heatmaps.

Kaplan-Meier: every held-out patient of a run is high risk when its risk exceeds the median training-fold risk of
the fold that scored it (``train_median_risk`` in the predictions), the folds pooled, with the at-risk table and
the log-rank p. Heatmaps: the fold in which the case was held out is rebuilt from its checkpoint (runs made with
``--save-checkpoints``) and run on the case's bag with ``return_attention=True``; each named map is drawn at the
patch coordinates of its magnification, one panel per map (and per column of a two-dimensional map).
Figures are built without pyplot (``matplotlib.figure.Figure``), so nothing depends on a display.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from milbench import MilbenchError
from milbench.data.bag import Bag
from milbench.report.document import cohort_title, fmt_p
from milbench.runs.store import StoredFold, iter_folds
from milbench.survival.statistics import pooled_logrank_p

MAX_RASTER = 4_000_000  # cells of a heatmap raster; coarser steps beyond it


# ------------------------------------------------------------------------------------------- run selection


@dataclass
class StoredRun:
    """The stored folds of one run (one config hash)."""

    config_hash: str
    folds: list[StoredFold]

    @property
    def record(self) -> dict:
        return self.folds[0].record

    def describe(self) -> str:
        r = self.record
        return (f"{r['model']} on {r['cohort']} (backbone {r['backbone']}, protocol {r['protocol']}, "
                f"seed {r['config']['seed']}, run {self.config_hash}, folds "
                f"{','.join(str(f.record['fold']) for f in self.folds)})")


def _cohort_matches(stored: str, given: str) -> bool:
    given = given.strip()
    key = given.lower()
    return stored in (given, f"tcga_{key}", Path(given).stem) or (key == "synthetic" and stored == "synthetic_mixed")


def select_run(runs_dir: Path, model: str, cohort: str | None = None, backbone: str | None = None,
               protocol: str | None = None, seed: int | None = None, run: str | None = None) -> StoredRun:
    """The one run of the store that matches the filters; none or several is an error listing the choices."""
    runs: dict[str, list[StoredFold]] = {}
    for f in iter_folds(runs_dir):
        r = f.record
        if (r["model"] == model and (cohort is None or _cohort_matches(r["cohort"], cohort))
                and backbone in (None, r["backbone"]) and protocol in (None, r["protocol"])
                and seed in (None, r["config"]["seed"]) and (run is None or r["config_hash"].startswith(run))):
            runs.setdefault(r["config_hash"], []).append(f)
    found = [StoredRun(h, sorted(fs, key=lambda f: f.record["fold"])) for h, fs in sorted(runs.items())]
    if not found:
        where = f" on cohort {cohort}" if cohort else ""
        raise MilbenchError(f"no stored run of model '{model}'{where} matches under {runs_dir}: check --model, "
                            f"--cohort, --backbone, --protocol, --seed (`milbench leaderboard --runs-dir {runs_dir}` "
                            f"lists the runs)")
    if len(found) > 1:
        choices = "; ".join(r.describe() for r in found)
        raise MilbenchError(f"{len(found)} runs match: {choices}. Pick one with --backbone, --protocol, --seed or "
                            f"--run HASH")
    return found[0]


# -------------------------------------------------------------------------------------------- Kaplan-Meier


def pooled_predictions(run: StoredRun) -> pd.DataFrame:
    """Out-of-fold predictions of every fold of the run, with the high-risk flag of each patient."""
    pred = pd.concat([f.predictions for f in run.folds], ignore_index=True)
    if "train_median_risk" not in pred:
        raise MilbenchError(f"the predictions of run {run.config_hash} have no train_median_risk column (made by an "
                            f"older milbench): rerun it to get risk groups")
    return pred.assign(high_risk=pred.risk > pred.train_median_risk)


def km_figure(run: StoredRun, display: str | None = None) -> Figure:
    """Kaplan-Meier curves of the high- and low-risk groups (pooled folds), with the at-risk table and log-rank p."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    pred = pooled_predictions(run)
    rec = run.record
    p = pooled_logrank_p(pred.time, pred.event, pred.risk, pred.train_median_risk)
    fig = Figure(figsize=(7, 5.6))
    ax = fig.add_subplot(1, 1, 1)
    fitters = []
    for label, mask, color in (("low risk", ~pred.high_risk, "#1f77b4"), ("high risk", pred.high_risk, "#d62728")):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{label} (n={int(mask.sum())})")
            kmf.fit(pred.time[mask], pred.event[mask])
            kmf.plot_survival_function(ax=ax, color=color, ci_show=True, show_censors=True,
                                       censor_styles={"marker": "|", "ms": 6})
            fitters.append(kmf)
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("time (months)")
    ax.set_ylabel("survival probability")
    ax.text(0.02, 0.04, f"log-rank p = {fmt_p(p)}", transform=ax.transAxes, fontsize=10)
    ax.set_title(f"{display or rec['model']} on {cohort_title(rec['cohort'])}: pooled out-of-fold predictions "
                 f"({len(run.folds)} folds)\nprotocol {rec['protocol']}, backbone {rec['backbone']}, seed "
                 f"{rec['config']['seed']}; high risk = above its training fold's median risk", fontsize=9)
    add_at_risk_counts(*fitters, ax=ax, fig=fig, rows_to_show=["At risk"],
                       labels=[f.label.split(" (")[0] for f in fitters])
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- attention maps


@dataclass
class Panel:
    """One attention map at one magnification, restricted to one slide."""

    title: str
    scale: str
    coords: np.ndarray  # [n, 2] level-0 pixels
    values: np.ndarray  # [n]


def scale_of(name: str, length: int, counts: dict[str, int]) -> str | None:
    """The magnification a map lives on: the one with as many patches, preferring the one its name says."""
    candidates = [s for s, n in counts.items() if n == length]
    named = [s for s in candidates if s in name]
    return (named or candidates or [None])[0]


def attention_panels(bag: Bag, maps: dict[str, torch.Tensor], slide: int = 0) -> tuple[list[Panel], list[str]]:
    """Panels of every map on slide ``slide`` of the bag, and the names of maps that match no scale's patches."""
    counts = {s: bag.n_patches(s) for s in bag.features}
    panels, skipped = [], []
    for name, tensor in maps.items():
        values = tensor.detach().float().cpu().numpy()
        scale = scale_of(name, len(values), counts) if values.ndim in (1, 2) else None
        if scale is None or scale not in bag.coords:
            skipped.append(name)
            continue
        index = bag.slide_index.get(scale)
        keep = (index == slide).cpu().numpy() if index is not None else np.ones(len(values), dtype=bool)
        coords = bag.coords[scale].cpu().numpy()[keep]
        columns = [values] if values.ndim == 1 else [values[:, j] for j in range(values.shape[1])]
        for j, col in enumerate(columns):
            title = name if len(columns) == 1 else f"{name}[{j}]"
            panels.append(Panel(title if title == scale else f"{title} ({scale})", scale, coords, col[keep]))
    return panels, skipped


def _raster(coords: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Values on the patch grid (NaN where there is no patch) and its extent in level-0 pixels."""
    xy = coords.astype(float)
    diffs = np.concatenate([np.diff(np.unique(xy[:, k])) for k in (0, 1)])
    step = float(diffs[diffs > 0].min()) if (diffs > 0).any() else 1.0
    origin = xy.min(axis=0)
    while True:
        idx = np.rint((xy - origin) / step).astype(int)
        w, h = idx.max(axis=0) + 1
        if w * h <= MAX_RASTER:
            break
        step *= 2
    img = np.full((h, w), np.nan)
    img[idx[:, 1], idx[:, 0]] = values
    return img, (origin[0], origin[0] + w * step, origin[1] + h * step, origin[1])


def _percentiles(values: np.ndarray) -> np.ndarray:
    """Rank of each value among the panel's patches, in [0, 1] (ties share their mean rank)."""
    return (pd.Series(values).rank(method="average").to_numpy() - 1) / max(1, len(values) - 1)


def heatmap_figure(panels: list[Panel], title: str, raw: bool = False) -> Figure:
    """One panel per map: patches coloured by attention percentile (or raw value) at their coordinates."""
    if not panels:
        raise MilbenchError("no attention map could be drawn: none matches the patches of a magnification")
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.4 * ncols, 4.2 * nrows + 0.6))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shown = panel.values if raw else _percentiles(panel.values)
        img, extent = _raster(panel.coords, shown)
        ax.set_facecolor("#eeeeee")
        im = ax.imshow(img, extent=extent, cmap="inferno", interpolation="nearest",
                       vmin=None if raw else 0.0, vmax=None if raw else 1.0)
        ax.set_title(f"{panel.title}, {len(panel.values)} patches", fontsize=9)
        ax.set_xlabel("x (level-0 px)", fontsize=8)
        ax.set_ylabel("y (level-0 px)", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="attention" if raw else "attention percentile")
    fig.suptitle(textwrap.fill(title, width=48 * ncols), fontsize=10)
    fig.tight_layout()
    return fig


@dataclass
class CaseAttention:
    """A case's bag, the attention maps of the fold that held it out, and the risk the checkpoint gives now."""

    bag: Bag
    maps: dict[str, torch.Tensor]
    fold: StoredFold
    slides: list[str]  # the case's slide IDs, in the order of bag.slide_index
    risk: float
    stored_risk: float


def case_attention(run: StoredRun, case_id: str, cohort: str | None = None, features: Path | None = None,
                   splits: Path | None = None) -> CaseAttention:
    """Rebuild the model of the fold that held ``case_id`` out from its checkpoint and run it on the case's bag."""
    from milbench.models.registry import create_model, get_card
    from milbench.survival.losses import hazards_to_survival
    from milbench.tasks.cohort import resolve_cohort
    from milbench.training.datasets import BagDataset

    fold = next((f for f in run.folds if (f.predictions.case_id == case_id).any()), None)
    if fold is None:
        raise MilbenchError(f"case {case_id} is not held out in any stored fold of run {run.config_hash}: use a "
                            f"case_id from its predictions.csv")
    rec, cfg = fold.record, fold.record["config"]
    weights = fold.load_weights()
    backbone = None if rec["backbone"] == "default" else rec["backbone"]
    try:
        the_cohort = resolve_cohort(cohort or rec["cohort"], splits=splits, features=features, backbone=backbone)
    except MilbenchError as err:
        raise MilbenchError(f"{err} (the run's cohort is '{rec['cohort']}': pass --cohort TABLE.csv and --features "
                            f"ROOT for a custom cohort)") from None
    card = get_card(cfg["model"])
    n_bins = int(cfg.get("n_bins") or len(rec["bin_edges"]) - 1)
    model = create_model(cfg["model"], rec["in_dim"], n_bins, **(cfg.get("model_options") or {}))
    model.load_state_dict(weights)
    model.eval()
    bag = BagDataset(the_cohort, [case_id], card.scales, card=card)[0]
    if bag.in_dim != rec["in_dim"]:
        raise MilbenchError(f"case {case_id}: the features have width {bag.in_dim} but run {run.config_hash} was "
                            f"trained on width {rec['in_dim']}: pass the run's --features and --backbone")
    with torch.no_grad():
        out = model(bag.to("cpu", dtype=torch.float32), return_attention=True)
    if not out.attention:
        raise MilbenchError(f"model '{cfg['model']}' returns no attention maps: it has nothing to draw")
    risk = float(-hazards_to_survival(out.logits.float()).sum())
    stored = float(fold.predictions.set_index("case_id").at[case_id, "risk"])
    return CaseAttention(bag, out.attention, fold, the_cohort.slides_of(case_id), risk, stored)


def slide_number(case_id: str, slides: list[str], slide: str | None) -> int:
    """Index of ``slide`` (an ID or a 0-based number) among the case's slides; the first when None."""
    if slide is None:
        return 0
    if slide in slides:
        return slides.index(slide)
    if slide.isdigit() and int(slide) < len(slides):
        return int(slide)
    raise MilbenchError(f"case {case_id} has slides {', '.join(slides)}: pass --slide as one of them or 0.."
                        f"{len(slides) - 1}")


# ------------------------------------------------------------------------------------------------- saving


def save_figure(fig: Figure, out: Path) -> list[Path]:
    """Write the figure as PNG and PDF next to each other (``out`` with either suffix, or none)."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_name(base.name + ".png"), base.with_name(base.name + ".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths
