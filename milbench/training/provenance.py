"""What a run ran on: package versions, the git commit, the device's name, the process's peak memory."""

from __future__ import annotations

import platform
import resource
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def peak_memory(dev: torch.device) -> int:
    """Peak device memory on CUDA, the process's peak resident memory elsewhere (bytes)."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the torch threads in use (what a timing ran on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def environment(dev: torch.device) -> dict[str, Any]:
    """Versions, commit and device, so every record says what produced it."""
    versions = {}
    for pkg in ("milbench", "torch", "torch-geometric", "numpy", "pandas", "scikit-survival", "lifelines"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "device": str(dev), "device_name": device_name(dev),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
