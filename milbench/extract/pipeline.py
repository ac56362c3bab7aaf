"""Resumable extraction of a folder of slides into a CLAM feature root (``milbench extract``).

Per run: list the slides; skip those already done (their h5 file at every magnification exists and validates
through :func:`milbench.data.readers.read_slide`); plan the others in worker processes (base magnification,
tissue mask, nested grids) a few slides ahead; decode each patch once per magnification in the workers, in
chunks of ``batch`` with a bounded number in flight; embed each chunk in the main process (bf16 autocast on
CUDA); write h5 + pt per magnification as soon as a slide is complete; merge a per-slide report CSV.

``ROOT/<encoder>/extract_settings.json`` records what defines the features (encoder, weights, magnifications,
patch size, tissue settings): a rerun with different settings into the same folder is refused instead of mixing
features. A failed slide (unreadable file, no tissue) is reported and never written; the others go on.

Longer than 400 lines because the run's stages (listing, planning workers, decoding, embedding, writing) share one
bounded pipeline state; split, each stage would pass that state around.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from milbench import MilbenchError, __version__
from milbench.data.readers import WSI_SUFFIXES, read_slide, slide_stem
from milbench.extract.encoders import RESNET_STAGES, Encoder, EncoderSpec, load_encoder
from milbench.extract.grid import SlidePlan, parse_mags, plan_slide
from milbench.extract.slides import read_patches
from milbench.extract.tissue import parse_threshold
from milbench.extract.writer import feature_paths, write_features
from milbench.files import atomic_path, write_json

SETTINGS_FILE = "extract_settings.json"
REPORT_FILE = "extract_report.csv"
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract: magnifications, output patch size, batch, device, worker processes, tissue settings."""

    mags: tuple[int, ...] = (5, 10, 20)
    patch: int = 256
    batch: int = 128
    device: str = "auto"
    workers: int = 4
    executor: str = "local"
    base_mag: float | None = None
    min_tissue: float = 0.25
    threshold: str | float = "otsu"

    def defining(self) -> dict[str, object]:
        """The options that change the features (recorded in the settings file; batch and workers do not)."""
        return {"mags": list(self.mags), "patch": self.patch, "base_mag": self.base_mag,
                "min_tissue": self.min_tissue, "threshold": self.threshold}


@dataclass
class ExtractResult:
    """Outcome of one run: the backbone folder, the merged report, slides extracted / skipped / failed, throughput."""

    root: Path
    report_path: Path
    report: pd.DataFrame
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    patches: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    contact: Path | None = None


def list_slides(slides: Path) -> dict[str, Path]:
    """Slide name (file name without its extension) -> path, for a slide file or a folder of them (not recursive)."""
    slides = Path(slides)
    if slides.is_file():
        return {slide_stem(slides.name): slides}
    if not slides.is_dir():
        raise MilbenchError(f"--slides {slides} does not exist: pass a folder of whole-slide images or one slide")
    found: dict[str, Path] = {}
    for path in sorted(p for p in slides.iterdir() if p.is_file() and p.suffix.lower() in WSI_SUFFIXES):
        name = slide_stem(path.name)
        if name in found:
            raise MilbenchError(f"{found[name].name} and {path.name} in {slides} give the same slide name '{name}': "
                                f"keep one of them")
        found[name] = path
    if not found:
        raise MilbenchError(f"{slides} holds no whole-slide images ({', '.join(WSI_SUFFIXES)}): check --slides")
    return found


def slide_done(root: Path, folder: str, name: str, mags: tuple[int, ...], dim: int) -> bool:
    """True when the slide's h5 file exists at every magnification and reads back valid, with coords, ``dim`` wide."""
    for mag in mags:
        h5_path, pt_path = feature_paths(root, folder, mag, name)
        if not (h5_path.is_file() and pt_path.is_file()):
            return False
        try:
            found = read_slide(root, f"{mag}x", name, backbone=folder)
        except MilbenchError:
            return False
        if found.path != h5_path or found.coords is None or found.features.shape[1] != dim:
            return False
    return True


def check_settings(enc_root: Path, settings: dict[str, object]) -> None:
    """Record the defining settings on first use; refuse a run whose settings differ from those recorded."""
    path = enc_root / SETTINGS_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        if changed:
            key = changed[0]
            raise MilbenchError(f"{enc_root} holds features extracted with other settings ({key}: "
                                f"{recorded.get(key)!r} there, {settings.get(key)!r} now): pass another --out or "
                                f"--name, or delete {enc_root} to start over")
        return
    enc_root.mkdir(parents=True, exist_ok=True)
    write_json(path, settings, newline=True)


class _Now:
    """Stand-in for ``multiprocessing`` results when ``--workers 0``: the call runs at submission."""

    def __init__(self, fn, args: tuple) -> None:
        self.value, self.error = None, None
        try:
            self.value = fn(*args)
        except Exception as err:  # kept for get(), as a worker's exception would be
            self.error = err

    def get(self):
        """The call's result, or its exception raised again."""
        if self.error is not None:
            raise self.error
        return self.value


class _InlinePool(contextlib.nullcontext):
    """A pool of no processes: everything runs in the caller (tests, debugging, --workers 0)."""

    def apply_async(self, fn, args: tuple) -> _Now:
        return _Now(fn, args)


@dataclass
class _InFlight:
    """A slide whose chunks are being decoded and embedded."""

    plan: SlidePlan
    chunks_left: int
    features: dict[int, list[np.ndarray]]
    error: str | None = None


class _LocalRun:
    """Plan, decode (worker processes) and embed (this process) the slides of ``todo``, writing each when complete."""

    def __init__(self, todo: dict[str, Path], out: Path, encoder: Encoder, opts: ExtractOptions,
                 progress: Progress | None) -> None:
        self.todo, self.out, self.encoder, self.opts, self.progress = todo, out, encoder, opts, progress
        self.rows: list[dict] = []
        self.clock = time.perf_counter()
        self.shown: str | None = None
        if progress is not None:
            self.overall = progress.add_task("slides", total=len(todo))
            self.current = progress.add_task("", total=1)

    def run(self) -> list[dict]:
        """Extract every slide of ``todo``; returns one report row per slide."""
        pool = (multiprocessing.get_context("spawn").Pool(self.opts.workers) if self.opts.workers > 0
                else _InlinePool())
        depth = max(2, 2 * self.opts.workers)
        with pool:
            inflight: deque = deque()
            for slide, mag, part in self._tasks(pool):
                decoded = pool.apply_async(read_patches, (slide.plan.path, part, slide.plan.reads[mag]))
                inflight.append(((slide, mag, part), decoded))
                if len(inflight) >= depth:
                    self._embed(*inflight.popleft())
            while inflight:
                self._embed(*inflight.popleft())
        return self.rows

    def _plans(self, pool) -> Iterator[tuple[str, SlidePlan | Exception]]:
        """Plans in slide order, computed by the workers up to ``workers + 1`` slides ahead."""
        names = iter(self.todo)
        pending: deque = deque()
        o = self.opts

        def submit() -> None:
            name = next(names, None)
            if name is not None:
                args = (self.todo[name], name, o.mags, o.patch, o.min_tissue, o.threshold, o.base_mag)
                pending.append((name, pool.apply_async(plan_slide, args)))

        for _ in range(o.workers + 1):
            submit()
        while pending:
            name, result = pending.popleft()
            submit()
            try:
                plan = result.get()
            except Exception as err:  # any failure of one slide is reported, the others go on
                plan = err
            yield name, plan

    def _tasks(self, pool) -> Iterator[tuple[_InFlight, int, np.ndarray]]:
        """(slide, magnification, coords chunk) to decode, slide after slide; failed or empty plans are reported."""
        for name, plan in self._plans(pool):
            if isinstance(plan, Exception):
                self._report_failure(name, plan)
                continue
            if plan.n_patches == 0:
                self._report_failure(name, MilbenchError(
                    f"no tissue found (tissue fraction {plan.tissue.fraction:.3f}, saturation threshold "
                    f"{plan.tissue.threshold:g}): check its contact sheet (--contact {name}), lower --min-tissue "
                    f"or set --tissue-threshold"))
                continue
            chunks = {m: [c[i:i + self.opts.batch] for i in range(0, len(c), self.opts.batch)]
                      for m, c in plan.coords.items()}
            slide = _InFlight(plan, sum(map(len, chunks.values())), {m: [] for m in plan.coords})
            for mag, parts in chunks.items():
                for part in parts:
                    yield slide, mag, part

    def _embed(self, task: tuple[_InFlight, int, np.ndarray], result) -> None:
        """Embed one decoded chunk; write the slide when it was its last."""
        slide, mag, part = task
        if slide.error is None:
            try:
                patches = result.get()
                slide.features[mag].append(self.encoder(patches))
            except Exception as err:
                slide.error = _one_line(err)
        slide.chunks_left -= 1
        self._show(slide, len(part))
        if slide.chunks_left == 0:
            if slide.error is None:
                self._write(slide.plan, {m: np.concatenate(f) for m, f in slide.features.items()})
            else:
                self._report_failure(slide.plan.name, slide.error)

    def _show(self, slide: _InFlight, n: int) -> None:
        if self.progress is None:
            return
        if self.shown != slide.plan.name:
            self.shown = slide.plan.name
            self.progress.reset(self.current, total=slide.plan.n_patches, description=slide.plan.name)
        self.progress.advance(self.current, n)

    def _tick(self) -> float:
        """A slide finished: advance the overall bar; seconds since the previous one finished (slides overlap)."""
        now = time.perf_counter()
        elapsed, self.clock = now - self.clock, now
        if self.progress is not None:
            self.progress.advance(self.overall)
        return round(elapsed, 3)

    def _write(self, plan: SlidePlan, features: dict[int, np.ndarray]) -> None:
        file_attrs = {**self.encoder.attrs(), "slide": plan.name, "source": str(plan.path),
                      "milbench_version": __version__, "min_tissue": self.opts.min_tissue,
                      "tissue_threshold": plan.tissue.threshold}
        for mag, feats in features.items():
            spec = plan.reads[mag]
            coord_attrs = {"patch_level": spec.level, "patch_size": spec.size, "level0_patch_size": spec.side0,
                           "magnification": mag, "base_magnification": plan.base_mag, "output_size": spec.out,
                           "downsample": spec.downsample}
            write_features(self.out, self.encoder.spec.folder, mag, plan.name, feats, plan.coords[mag],
                           coord_attrs, file_attrs)
        row = {"slide": plan.name, "status": "extracted", "base_mag": plan.base_mag,
               "base_mag_source": plan.base_mag_source, "width": plan.dims[0], "height": plan.dims[1],
               "tissue_fraction": round(plan.tissue.fraction, 4), "tissue_threshold": plan.tissue.threshold}
        row.update({f"patches_{m}x": len(plan.coords[m]) for m in plan.coords})
        row.update({f"level_{m}x": plan.reads[m].level for m in plan.coords})
        self.rows.append({**row, "seconds": self._tick(), "error": ""})

    def _report_failure(self, name: str, error: Exception | str) -> None:
        message = error if isinstance(error, str) else _one_line(error)
        self.rows.append({"slide": name, "status": "failed", "seconds": self._tick(), "error": message})


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if isinstance(err, MilbenchError) and text else f"{type(err).__name__}: {text[0] if text else ''}"


def _extract_slides(todo: dict[str, Path], out: Path, spec: EncoderSpec, opts: ExtractOptions) -> list[dict]:
    """One executor task: build the encoder here and extract ``todo`` without worker processes."""
    encoder = load_encoder(spec, opts.device, opts.patch)
    return _LocalRun(todo, out, encoder, replace(opts, workers=0), None).run()


def _run_ray(todo: dict[str, Path], out: Path, spec: EncoderSpec, opts: ExtractOptions, device: str,
             progress: Progress | None) -> list[dict]:
    """One Ray task per slide (a GPU each when extracting on CUDA); rows come back as slides finish."""
    try:
        import ray
    except ImportError:
        raise MilbenchError("--executor ray needs ray: pip install 'milbench[ray]', or use --executor local") from None
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_gpus=1 if device.startswith("cuda") else 0)(_extract_slides)
    pending = [task.remote({name: path}, out, spec, opts) for name, path in todo.items()]
    overall = progress.add_task("slides", total=len(todo)) if progress is not None else None
    rows: list[dict] = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        rows += ray.get(done[0])
        if progress is not None:
            progress.advance(overall)
    return rows


def _write_report(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Merge this run's rows into the report (a slide's newest row wins), sorted by slide, written atomically."""
    frame = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path, dtype={"slide": str}, keep_default_na=False)
        frame = pd.concat([old[~old["slide"].isin(frame.get("slide", []))], frame], ignore_index=True)
    if frame.empty:
        return frame
    frame = frame.sort_values("slide", kind="stable").reset_index(drop=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _progress(console: Console | None) -> Progress | None:
    if console is None:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def extract(slides: Path, out: Path, spec: EncoderSpec, opts: ExtractOptions = ExtractOptions(),
            console: Console | None = None, contact: str | None = None, limit: int | None = None) -> ExtractResult:
    """Extract features of every slide in ``slides`` into ``out/<encoder>/x{mag}/``; finished slides are skipped.

    ``console`` shows progress bars (none without it); ``contact`` names a slide whose contact sheet is written
    to ``out/<encoder>/contact_<slide>.png``; ``limit`` takes only the first slides (benchmarks).
    """
    opts = replace(opts, mags=parse_mags(opts.mags), threshold=parse_threshold(opts.threshold))
    if opts.executor not in EXECUTORS:
        raise MilbenchError(f"--executor '{opts.executor}' must be one of {', '.join(EXECUTORS)}")
    if opts.patch < 8 or opts.batch < 1 or opts.workers < 0 or not 0 <= opts.min_tissue <= 1:
        raise MilbenchError("--patch must be >= 8, --batch >= 1, --workers >= 0, --min-tissue within [0, 1]")
    out = Path(out)
    listed = list_slides(slides)
    if limit is not None:
        listed = dict(list(listed.items())[:limit])
    encoder = load_encoder(spec, opts.device, opts.patch)
    enc_root = out / spec.folder
    check_settings(enc_root, {"encoder": spec.name, "weights": encoder.weights, "feature_dim": encoder.dim,
                              "mean": list(encoder.mean), "std": list(encoder.std),
                              "input_size": encoder.input_size, **opts.defining()})
    result = ExtractResult(root=enc_root, report_path=enc_root / REPORT_FILE, report=pd.DataFrame(),
                           device=str(encoder.device))
    if contact is not None:
        result.contact = _contact(listed, contact, enc_root, opts)
    todo = {}
    for name, path in listed.items():
        if slide_done(out, spec.folder, name, opts.mags, encoder.dim):
            result.skipped.append(name)
        else:
            todo[name] = path
    start = time.perf_counter()
    progress = _progress(console) if todo else None
    with progress if progress is not None else contextlib.nullcontext():
        if opts.executor == "ray" and todo:
            rows = _run_ray(todo, out, spec, opts, result.device, progress)
        else:
            rows = _LocalRun(todo, out, encoder, opts, progress).run()
    result.seconds = time.perf_counter() - start
    result.report = _write_report(result.report_path, rows)
    for row in rows:
        if row["status"] == "extracted":
            result.extracted.append(row["slide"])
            result.patches += sum(int(v) for k, v in row.items() if k.startswith("patches_"))
        else:
            result.failed[row["slide"]] = row["error"]
    return result


def _contact(listed: dict[str, Path], name: str, enc_root: Path, opts: ExtractOptions) -> Path:
    """Plan one slide here and draw its contact sheet."""
    from milbench.extract.contact import contact_sheet  # matplotlib loads only when asked

    name = slide_stem(name)
    if name not in listed:
        raise MilbenchError(f"--contact {name}: no such slide in --slides (slides: {', '.join(list(listed)[:5])}, ...)")
    plan = plan_slide(listed[name], name, opts.mags, opts.patch, opts.min_tissue, opts.threshold, opts.base_mag)
    return contact_sheet(plan, enc_root / f"contact_{name}.png")


def bench_extract(slides_dir: Path, encoder: str = "resnet50_trunc", weights: Path | None = None,
                  mags: tuple[int, ...] = (5, 10, 20), patch: int = 256, batch: int = 128, device: str = "auto",
                  workers: int = 4, base_mag: float | None = None, max_slides: int | None = None) -> dict:
    """Extraction throughput on real slides into a temporary root (``milbench bench --extract``).

    Registry ResNets without ``weights`` run randomly initialised: the speed is the same. ``patches_per_second``
    counts patches of all magnifications over the wall time of decoding, embedding and writing (worker start-up
    included, encoder loading excluded).
    """
    spec = EncoderSpec(encoder, weights=Path(weights) if weights else None,
                       random_init=weights is None and encoder in RESNET_STAGES)
    opts = ExtractOptions(mags=tuple(mags), patch=patch, batch=batch, device=device, workers=workers,
                          base_mag=base_mag)
    with tempfile.TemporaryDirectory(prefix="milbench-bench-extract-") as tmp:
        result = extract(Path(slides_dir), Path(tmp), spec, opts, limit=max_slides)
    return {"patches_per_second": result.patches / max(result.seconds, 1e-9), "patches": result.patches,
            "slides": len(result.extracted), "failed": len(result.failed), "seconds": result.seconds,
            "device": result.device, "encoder": spec.folder, "workers": workers, "batch": batch,
            "options": asdict(opts)}
