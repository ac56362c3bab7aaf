"""`milbench bench`: training-step time and peak memory per model and bag size (docs/performance.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from milbench.cli.app import app, console


@app.command()
def bench(
    model: list[str] = typer.Option([], "--model", "-m",
                                    help="Model to time; repeat for several (default crossfusion)."),
    bag: list[str] = typer.Option([], "--bag", help="avg | p90 | max | avg/16 (scaled down) | N20 | N5,N10,N20; "
                                  "repeat for several (default avg)."),
    in_dim: int = typer.Option(2048, help="Feature width."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 autocast (default: bf16 on CUDA, fp32 on CPU)."),
    steps: Optional[int] = typer.Option(None, help="Timed steps, median reported (default 10 on CUDA, 3 on CPU)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up steps (default 3 on CUDA, 1 on CPU)."),
    compile_: str = typer.Option("auto", "--compile", help="auto (blocks on CUDA, off on CPU) | off | blocks "
                                 "(torch.compile the models' hot blocks: the engine's fast path)."),
    pack: int = typer.Option(0, help="Training throughput, one bag per step against PACK bags per forward pass."),
    sdpa: str = typer.Option("default", help="Attention kernel preferred: default | cudnn | flash | efficient | math."),
    profile: bool = typer.Option(False, "--profile", help="Also profile one step: host vs device time, top kernels."),
    graphs: bool = typer.Option(True, "--graphs/--no-graphs",
                                help="CUDA: replay each training step from a CUDA graph, as training does (models "
                                     "that declare cuda_graphs)."),
    epoch: bool = typer.Option(False, "--epoch",
                               help="End-to-end epochs from disk: the reference's loading vs milbench."),
    patients: int = typer.Option(1000, help="--epoch: patients in milbench's cached epoch."),
    size: str = typer.Option("avg", help="--epoch: bag size of every synthetic patient."),
    disk_slides: int = typer.Option(64, help="--epoch: slides written to disk (float32 .pt and .h5)."),
    workers: int = typer.Option(8, help="--epoch: DataLoader workers of the reference path."),
    workdir: Optional[Path] = typer.Option(None, help="--epoch: folder for the synthetic cohort (default: temp)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    budget: Optional[float] = typer.Option(None, help="Seconds after which no further measurement starts."),
    json_: bool = typer.Option(False, "--json", help="Print the records as JSON instead of tables."),
    out: Optional[Path] = typer.Option(None, help="Also append the records to this JSON Lines file, one per line."),
    md: Optional[Path] = typer.Option(None, help="Also write the markdown tables to this file."),
) -> None:
    """Time training steps (forward + backward, median after warm-up) and peak memory per model and bag size."""
    import json

    import torch

    from milbench.bench.epoch import run_epoch
    from milbench.bench.report import markdown, one_line
    from milbench.bench.step import run as run_steps
    from milbench.training.device import resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    records: list[dict] = []

    def report(record: dict) -> None:  # files are written as records come, so a killed run keeps what it measured
        records.append(record)
        if out:
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if md:
            md.write_text(markdown(records))
        if not json_:
            console.print(one_line(record), highlight=False, soft_wrap=True)

    if epoch:
        report(run_epoch(model[0] if model else "crossfusion", patients, size, in_dim, dev, workdir, disk_slides,
                             workers, compile_, graphs))
    else:
        run_steps(model or ["crossfusion"], bag or ["avg"], in_dim, dev, dtype, steps, warmup, compile_, pack, budget,
                report, sdpa, profile, graphs)
    if json_:
        print(json.dumps(records, indent=1))
    else:
        console.print(markdown(records), highlight=False, soft_wrap=True)
