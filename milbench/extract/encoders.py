"""Patch encoders: a registry of ResNet50 variants defined here, and a hook for any module or TorchScript file.

Registry (weights from a local torchvision-style ResNet50 state_dict; this project downloads nothing):

* ``resnet50_trunc``: CLAM's ResNet50 cut after layer3, adaptive average pooling -> 1024-d.
* ``resnet50``: the full ResNet50 without its classifier, as the CrossFusion paper -> 2048-d.

Hook: ``--encoder package.module:factory`` calls ``factory()`` (``factory(weights=PATH)`` with ``--weights``) and
takes the ``torch.nn.Module`` it returns; ``--encoder model.pt`` loads a TorchScript file. Foundation models (UNI,
CONCH, ...) come in this way from their local weights, with their own ``--mean``/``--std``/``--input-size``.
Every encoder maps normalised images [B, 3, S, S] to features [B, D] (trailing singleton axes are flattened).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from milbench import MilbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_STAGES = {"resnet50_trunc": 3, "resnet50": 4}  # residual stages kept
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")
RANDOM_INIT = "random-init (seed 0)"
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, KeyError)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand (x4), identity or projected shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class ResNet50(nn.Module):
    """ResNet50 trunk (torchvision parameter names) with ``stages`` residual stages and global average pooling.

    ``stages=3`` is CLAM's truncated network (1024-d), ``stages=4`` the full one without ``fc`` (2048-d).
    """

    blocks = (3, 4, 6, 3)
    widths = (64, 128, 256, 512)

    def __init__(self, stages: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i in range(stages):
            layers = []
            for j in range(self.blocks[i]):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(Bottleneck(in_ch, self.widths[i], stride))
                in_ch = self.widths[i] * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.stages = stages
        self.out_dim = in_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> pooled features [B, out_dim]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.avgpool(x).flatten(1)


@dataclass(frozen=True)
class EncoderSpec:
    """What the user asked for (picklable, so each process can build its own encoder).

    ``name`` is a registry name, ``module:factory`` or a TorchScript path; ``label`` names the backbone folder.
    """

    name: str
    weights: Path | None = None
    random_init: bool = False
    label: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: int | None = None

    @property
    def folder(self) -> str:
        """Backbone folder name under the feature root."""
        if self.label:
            return self.label
        if ":" in self.name and not Path(self.name).exists():
            return self.name.rsplit(":", 1)[1].rsplit(".", 1)[-1]
        return Path(self.name).stem if Path(self.name).suffix in TORCHSCRIPT_SUFFIXES else self.name


@dataclass
class Encoder:
    """A ready encoder: module in eval mode on ``device``, output width, preprocessing and provenance."""

    spec: EncoderSpec
    module: nn.Module
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int | None
    weights: str
    device: torch.device

    def attrs(self) -> dict[str, object]:
        """Provenance written into every feature file (random initialisation included, so it cannot be missed)."""
        return {"encoder": self.spec.folder, "encoder_source": self.spec.name, "encoder_weights": self.weights,
                "feature_dim": self.dim, "mean": list(self.mean), "std": list(self.std),
                "input_size": self.input_size or 0}

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """RGB patches [B, H, W, 3] uint8 -> float32 features [B, dim]; bf16 autocast on CUDA."""
        x = torch.from_numpy(patches).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(len(patches), -1).float().cpu().numpy()


def default_weights_path() -> Path:
    """Default ResNet50 weights file: ``resnet50.pth`` in ``$MILBENCH_WEIGHTS`` or ~/.cache/milbench/weights."""
    root = os.environ.get("MILBENCH_WEIGHTS") or Path.home() / ".cache" / "milbench" / "weights"
    return Path(root).expanduser() / "resnet50.pth"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MilbenchError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    if not (device == "cpu" or device.startswith("cuda")):
        raise MilbenchError(f"--device '{device}' must be auto, cpu or cuda")
    return torch.device(device)


def load_encoder(spec: EncoderSpec, device: str = "auto", patch: int = 256) -> Encoder:
    """Build the encoder ``spec`` names on ``device``; its width is measured on a ``patch``-sized dummy batch."""
    dev = resolve_device(device)
    if spec.random_init and spec.name not in RESNET_STAGES:
        raise MilbenchError(f"--random-init applies to {', '.join(RESNET_STAGES)}; encoder {spec.name} brings its "
                            f"own weights")
    if spec.name in RESNET_STAGES:
        module, weights = _resnet(spec)
    elif ":" in spec.name and not Path(spec.name).exists():
        module, weights = _from_factory(spec)
    elif Path(spec.name).suffix in TORCHSCRIPT_SUFFIXES or Path(spec.name).is_file():
        module, weights = _from_torchscript(spec)
    else:
        raise MilbenchError(f"unknown encoder '{spec.name}': use {', '.join(RESNET_STAGES)}, package.module:factory "
                            f"(a function returning a torch.nn.Module) or a TorchScript file (.pt)")
    module = module.eval().to(dev)
    if dev.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    encoder = Encoder(spec=spec, module=module, dim=0, mean=spec.mean or IMAGENET_MEAN, std=spec.std or IMAGENET_STD,
                      input_size=spec.input_size, weights=weights, device=dev)
    encoder.dim = int(encoder(np.zeros((1, patch, patch, 3), dtype=np.uint8)).shape[1])
    return encoder


def _resnet(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """A registry ResNet50 with weights from a local state_dict, or seeded random weights with ``--random-init``."""
    if spec.random_init:
        if spec.weights is not None:
            raise MilbenchError("--random-init and --weights exclude each other: pass one")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random encoder in every process and on every resumed run
            return ResNet50(RESNET_STAGES[spec.name]), RANDOM_INIT
    path = Path(spec.weights) if spec.weights is not None else default_weights_path()
    if not path.is_file():
        raise MilbenchError(
            f"no weights for encoder {spec.name} at {path}: milbench downloads nothing; put torchvision's ImageNet "
            f"ResNet50 state_dict (resnet50-19c8e357.pth, CLAM's choice; a dict of tensors saved with torch.save) "
            f"at {default_weights_path()} or pass --weights PATH (--random-init for smoke tests only)")
    model = ResNet50(RESNET_STAGES[spec.name])
    model.load_state_dict(_trunk_state(path, model))
    return model, str(path.resolve())


def _trunk_state(path: Path, model: ResNet50) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that belong to ``model``: the classifier and stages beyond it are dropped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as err:
        raise MilbenchError(f"cannot read weights {path} ({type(err).__name__}): save a torchvision-style "
                            f"ResNet50 state_dict with torch.save") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise MilbenchError(f"{path} holds a {type(state).__name__}, not a state_dict: save model.state_dict()")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    wanted = model.state_dict()
    dropped = ("fc.",) + tuple(f"layer{i}." for i in range(model.stages + 1, 5))
    kept = {k: v for k, v in state.items() if not k.startswith(dropped)}
    missing = sorted(set(wanted) - set(kept))
    unexpected = sorted(set(kept) - set(wanted))
    wrong = sorted(k for k in set(kept) & set(wanted) if kept[k].shape != wanted[k].shape)
    if missing or unexpected or wrong:
        first = (missing + unexpected + wrong)[0]
        raise MilbenchError(f"{path} is not a torchvision ResNet50 state_dict ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors, e.g. '{first}'): "
                            f"pass the ImageNet resnet50-19c8e357.pth or an equivalent")
    return kept


def _from_factory(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """``package.module:factory`` -> ``factory()`` or ``factory(weights=PATH)``, which must return a module."""
    module_name, _, attr = spec.name.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise MilbenchError(f"cannot load encoder factory '{spec.name}' ({type(err).__name__}: {err}): give "
                            f"package.module:function, importable from the current environment") from err
    model = target(weights=str(spec.weights)) if spec.weights is not None else target()
    if not isinstance(model, nn.Module):
        raise MilbenchError(f"encoder factory '{spec.name}' returned a {type(model).__name__}: it must return a "
                            f"torch.nn.Module mapping images [B, 3, S, S] to features [B, D]")
    return model, str(spec.weights.resolve()) if spec.weights is not None else f"set by {spec.name}"


def _from_torchscript(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """A TorchScript file carrying its own weights."""
    path = Path(spec.name)
    if spec.weights is not None:
        raise MilbenchError(f"{path} is a TorchScript file and carries its weights: drop --weights")
    if not path.is_file():
        raise MilbenchError(f"encoder file {path} not found: pass a TorchScript file saved with torch.jit.save")
    try:
        return torch.jit.load(str(path), map_location="cpu"), str(path.resolve())
    except _LOAD_ERRORS as err:
        raise MilbenchError(f"cannot load {path} as TorchScript ({type(err).__name__}): save it with "
                            f"torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, x), path)") from err
