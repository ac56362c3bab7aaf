"""`milbench extract`: a folder of whole-slide images -> CLAM-layout features at 5x/10x/20x on nested grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from milbench import MilbenchError

console = Console()


def _triple(text: Optional[str], flag: str) -> Optional[tuple[float, float, float]]:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise MilbenchError(f"{flag} '{text}' must be three comma-separated numbers (R,G,B), e.g. 0.485,0.456,0.406")
    return values


def extract(
    slides: Path = typer.Option(..., help="Folder of whole-slide images (.svs .tif .ndpi ...), or one slide."),
    out: Path = typer.Option(..., help="Feature root: features go to OUT/<encoder>/x{5,10,20}/{h5,pt}_files/."),
    encoder: str = typer.Option(..., help="resnet50_trunc (CLAM, 1024-d) | resnet50 (2048-d) | "
                                          "package.module:factory | model.pt (TorchScript)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights: a torchvision ResNet50 state_dict for the "
                                                      "ResNets, or passed to the factory as weights=PATH."),
    random_init: bool = typer.Option(False, help="Random ResNet weights (seed 0), for smoke tests; recorded in "
                                                 "every file."),
    name: Optional[str] = typer.Option(None, help="Backbone folder name (default: the encoder's name)."),
    mags: str = typer.Option("5,10,20", help="Magnifications, among 5,10,20."),
    patch: int = typer.Option(256, help="Patch side in pixels at every magnification."),
    batch: int = typer.Option(128, help="Patches per encoder batch (and per decoding chunk)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (bf16 autocast on CUDA)."),
    workers: int = typer.Option(4, help="Slide-reading worker processes (0: read in this process)."),
    executor: str = typer.Option("local", help="local | ray (one Ray task per slide; needs the ray extra)."),
    base_mag: Optional[float] = typer.Option(None, help="Base magnification for slides whose metadata lacks it."),
    min_tissue: float = typer.Option(0.25, help="Tissue fraction a finest-magnification patch needs to be kept."),
    tissue_threshold: str = typer.Option("otsu", help="Saturation threshold: otsu or a value in 0-255 (CLAM: 8)."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean R,G,B (default: ImageNet)."),
    std: Optional[str] = typer.Option(None, help="Normalisation std R,G,B (default: ImageNet)."),
    input_size: Optional[int] = typer.Option(None, help="Resize patches to this side before the encoder."),
    contact: Optional[str] = typer.Option(None, help="Slide name: write OUT/<encoder>/contact_<slide>.png "
                                                     "(thumbnail, tissue mask, 5x grid)."),
) -> None:
    """Extract patch features at 5x, 10x and 20x on nested grids, resumable per slide, with a per-slide report."""
    from milbench.extract.encoders import EncoderSpec
    from milbench.extract.grid import parse_mags
    from milbench.extract.pipeline import ExtractOptions
    from milbench.extract.pipeline import extract as run_extraction
    from milbench.extract.tissue import parse_threshold

    if name is not None and (not name.strip() or Path(name).name != name):
        raise MilbenchError(f"--name '{name}' must be a plain folder name (no slashes)")
    spec = EncoderSpec(encoder, weights=weights, random_init=random_init, label=name, mean=_triple(mean, "--mean"),
                       std=_triple(std, "--std"), input_size=input_size)
    opts = ExtractOptions(mags=parse_mags(mags), patch=patch, batch=batch, device=device, workers=workers,
                          executor=executor, base_mag=base_mag, min_tissue=min_tissue,
                          threshold=parse_threshold(tissue_threshold))
    result = run_extraction(slides, out, spec, opts, console=console, contact=contact)
    rate = f", {result.patches / result.seconds:.0f} patches/s" if result.patches and result.seconds else ""
    console.print(f"{len(result.extracted)} slide(s) extracted ({result.patches} patches{rate} on {result.device}), "
                  f"{len(result.skipped)} already done, {len(result.failed)} failed; report: {result.report_path}")
    if result.contact is not None:
        console.print(f"contact sheet: {result.contact}")
    if result.failed:
        first, error = next(iter(result.failed.items()))
        raise MilbenchError(f"{len(result.failed)} slide(s) failed, e.g. {first}: {error}; see {result.report_path} "
                            f"and rerun (finished slides are kept)")
    console.print(f"next: milbench run --model crossfusion --cohort TABLE.csv --splits DIR --features {out} "
                  f"--backbone {spec.folder}")
