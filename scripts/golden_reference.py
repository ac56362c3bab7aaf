"""Helpers for scripts/golden_outputs.py: run the authors' code on a CPU, in float64, on milbench's bags.

Nothing here holds the authors' code: their files are imported at run time from checkouts given on the command line
(see golden_outputs.py). What this module does to make their code run on a CPU, each change recorded in the fixture
it affects:

* ``reference_runtime``: ``.cuda()`` / ``.to("cuda")`` stay on the CPU; in float64 mode the default dtype is float64
  and the code's explicit float32 casts (``.float()``, ``.type(torch.FloatTensor)``) follow it, so the authors'
  arithmetic runs in float64 (the float32 run applies only the CPU change).
* ``import_repo``: each repository keeps its modules in a top-level ``models`` package (four of them do); the package
  is set up without running its ``__init__`` (which imports unrelated models with more dependencies) and removed
  from ``sys.modules`` afterwards, so the next repository's ``models`` is its own.
* ``stub_modules``: import-time dependencies the used code never calls (cuML, imgaug, torchvision) as empty modules.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

# --------------------------------------------------------------------------------------------- running their code


@contextlib.contextmanager
def reference_runtime(float64: bool):
    """CPU instead of CUDA; with ``float64`` also float64 arithmetic (see the module docstring)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("cuda", "to", "float", "type")}
    module_cuda = nn.Module.cuda
    old_dtype = torch.get_default_dtype()

    def no_cuda(self, *args, **kwargs):
        return self

    def to(self, *args, **kwargs):
        args = tuple(a for a in args if not _is_cuda(a))
        if _is_cuda(kwargs.get("device")):
            kwargs.pop("device")
        return saved["to"](self, *args, **kwargs) if (args or kwargs) else self

    def float_(self, *args, **kwargs):
        return saved["to"](self, torch.get_default_dtype()) if float64 else saved["float"](self, *args, **kwargs)

    def type_(self, dtype=None, *args, **kwargs):
        if float64 and dtype in (torch.FloatTensor, "torch.FloatTensor", torch.float32):
            return saved["to"](self, torch.get_default_dtype())
        return saved["type"](self, dtype, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = no_cuda, to
    torch.Tensor.float, torch.Tensor.type = float_, type_
    nn.Module.cuda = no_cuda
    if float64:
        torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        nn.Module.cuda = module_cuda
        torch.set_default_dtype(old_dtype)


def _is_cuda(a: Any) -> bool:
    if isinstance(a, str):
        return a.startswith("cuda")
    return isinstance(a, torch.device) and a.type == "cuda"


@contextlib.contextmanager
def contiguous_einsum():
    """``torch.einsum`` returning a contiguous tensor (ProtoSurv calls ``.view`` on an einsum output, which is not
    contiguous on current PyTorch: a crash, spec §9). The values are the same."""
    einsum = torch.einsum
    torch.einsum = lambda *a, **k: einsum(*a, **k).contiguous()
    try:
        yield
    finally:
        torch.einsum = einsum


def stub_modules(names: Iterable[str], **attrs: Any) -> None:
    """Empty modules for import-time dependencies the code we call never uses."""
    for name in names:
        if name in sys.modules:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[sub])
    for key, value in attrs.items():
        mod, _, attr = key.rpartition(".")
        setattr(sys.modules[mod], attr, value)


def import_repo(root: Path, module: str, packages: Iterable[str] = ("models",), extra_paths: Iterable[Path] = ()):
    """Import ``module`` (e.g. ``models.SCMIL``) from the checkout ``root``; see the module docstring."""
    root = Path(root).resolve()
    tops = {p.split(".")[0] for p in packages} | {module.split(".")[0]}
    for name in [m for m in sys.modules if m.split(".")[0] in tops]:
        del sys.modules[name]
    for pkg in packages:  # packages set up without executing their __init__
        parts = pkg.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in sys.modules:
                continue
            path = root.joinpath(*parts[:i])
            if not path.is_dir():
                raise FileNotFoundError(f"{path} is not a folder of the checkout {root}")
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            mod.__package__ = name
            sys.modules[name] = mod
    old_path = list(sys.path)
    sys.path[:0] = [str(root), *map(str, extra_paths)]
    try:
        return importlib.import_module(module)
    finally:
        sys.path[:] = old_path
        for name in [m for m in sys.modules if m.split(".")[0] in tops]:
            del sys.modules[name]


def load_class_from_script(path: Path, class_name: str, namespace: dict[str, Any]) -> type:
    """Execute only the definition of ``class_name`` from a training script (its module level downloads weights and
    parses arguments) in ``namespace``, the module globals the class reads."""
    tree = ast.parse(Path(path).read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    if len(nodes) != 1:
        raise LookupError(f"{path} defines {len(nodes)} classes named {class_name}")
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 - the authors' class definition, from the checkout the user named
    return namespace[class_name]


def git_commit(root: Path) -> str:
    """The checkout's commit (git work tree), or what ``root/.golden_commit`` says for an exported tree."""
    marker = Path(root) / ".golden_commit"
    if marker.exists():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree; put the commit in .golden_commit)"


# --------------------------------------------------------------------------------------------- bags


def flat_bag(rng: np.random.Generator, n: int, in_dim: int, case_id: str) -> dict:
    """One slide of ``n`` 20x patches: features N(0, 1) and jittered level-0 coordinates (no distance ties)."""
    cols = math.ceil(math.sqrt(n))
    grid = np.array([[(i % cols) * 256, (i // cols) * 256] for i in range(n)])
    coords = grid + rng.integers(-96, 97, size=grid.shape)
    return {
        "case_id": case_id,
        "features": {"20x": torch.from_numpy(rng.normal(size=(n, in_dim)).astype(np.float32))},
        "coords": {"20x": torch.from_numpy(coords.astype(np.int64))},
        "slide_index": {"20x": torch.zeros(n, dtype=torch.long)},
        "extras": {},
    }


def nested_bag(rng: np.random.Generator, n5: int, in_dim: int, case_id: str,
               drop: dict[str, list[int]] | None = None) -> dict:
    """One slide: ``n5`` 5x patches on a grid with their 2x2 10x and 4x4 20x sub-squares (CLAM level-0 px, base
    20x: sides 1024 / 512 / 256), rows of every scale in a random order, ``drop[scale]`` = rows (in raster order)
    left out. The cross-scale index is computed here from the construction (not by milbench), in milbench's layout:
    parent_10x_of_20x, parent_5x_of_20x, parent_5x_of_10x, children_10x_of_5x [N5, 4] raster, children_20x_of_5x
    [N5, 16] depth-first (the 2x2 20x block of 10x child j is columns 4j..4j+3), -1 where missing."""
    drop = drop or {}
    cols = max(1, math.ceil(math.sqrt(n5)))
    c5 = [((i % cols) * 4, (i // cols) * 4) for i in range(n5)]  # in 20x units
    c10 = [(x + 2 * dx, y + 2 * dy) for (x, y) in c5 for dy in range(2) for dx in range(2)]
    c20 = [(x + dx, y + dy) for (x, y) in c5 for dy in range(4) for dx in range(4)]
    raster = {"5x": c5, "10x": c10, "20x": c20}
    kept = {s: [i for i in range(len(c)) if i not in set(drop.get(s, []))] for s, c in raster.items()}
    perm = {s: rng.permutation(len(kept[s])) for s in raster}  # stored row j = kept raster row kept[perm[j]]
    row_of = {s: {kept[s][p]: j for j, p in enumerate(perm[s])} for s in raster}  # raster index -> stored row
    cells = {s: {raster[s][r]: row_of[s][r] for r in kept[s]} for s in raster}
    side = {"5x": 4, "10x": 2, "20x": 1}

    def parent(child: str, par: str) -> torch.Tensor:
        out = []
        for j in range(len(kept[child])):
            x, y = raster[child][kept[child][perm[child][j]]]
            s = side[par]
            out.append(cells[par].get((x // s * s, y // s * s), -1))
        return torch.tensor(out, dtype=torch.long)

    kids10, kids20 = [], []
    for j in range(len(kept["5x"])):
        x, y = raster["5x"][kept["5x"][perm["5x"][j]]]
        kids10.append([cells["10x"].get((x + 2 * dx, y + 2 * dy), -1) for dy in range(2) for dx in range(2)])
        kids20.append([cells["20x"].get((x + 2 * mx + dx, y + 2 * my + dy), -1)
                       for my in range(2) for mx in range(2) for dy in range(2) for dx in range(2)])
    feats, coords = {}, {}
    for s in raster:
        n = len(kept[s])
        xy = np.array([raster[s][kept[s][p]] for p in perm[s]], dtype=np.int64).reshape(-1, 2) * 256
        coords[s] = torch.from_numpy(xy)
        feats[s] = torch.from_numpy(rng.normal(size=(n, in_dim)).astype(np.float32))
    hierarchy = {
        "parent_10x_of_20x": parent("20x", "10x"),
        "parent_5x_of_20x": parent("20x", "5x"),
        "parent_5x_of_10x": parent("10x", "5x"),
        "children_10x_of_5x": torch.tensor(kids10, dtype=torch.long).reshape(-1, 4),
        "children_20x_of_5x": torch.tensor(kids20, dtype=torch.long).reshape(-1, 16),
    }
    return {
        "case_id": case_id,
        "features": feats,
        "coords": coords,
        "slide_index": {s: torch.zeros(len(kept[s]), dtype=torch.long) for s in raster},
        "extras": {"hierarchy": hierarchy},
    }


def knn_edges(points: np.ndarray, k: int) -> torch.Tensor:
    """Directed edges node -> each of its k nearest other nodes (exact, L2), [2, N k] (Patch-GCN's pt2graph with
    radius k + 1, self dropped)."""
    pts = np.asarray(points, dtype=np.float64)
    d = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nbr = np.argsort(d, axis=1, kind="stable")[:, :k]
    src = np.repeat(np.arange(len(pts)), k)
    return torch.from_numpy(np.stack([src, nbr.reshape(-1)]).astype(np.int64))


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] with zero rows where ``rows`` is -1 (differentiable in x)."""
    present = (rows >= 0).unsqueeze(-1).to(x.dtype)
    return x[rows.clamp(min=0)] * present


def leaves(bag: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The bag's features per scale as leaf tensors of ``dtype`` that require grad."""
    return {s: f.detach().to(dtype).clone().requires_grad_(True) for s, f in bag["features"].items()}


def grads_of(output: torch.Tensor, cotangent: torch.Tensor, inputs: dict[str, torch.Tensor],
             retain_graph: bool = False) -> dict[str, torch.Tensor]:
    """d <output, cotangent> / d input, zeros for inputs the output does not depend on. Through ``backward``, not
    ``autograd.grad``: PyG's DeepGCNLayer checkpoints with use_reentrant=True, which only supports ``backward``."""
    for t in inputs.values():
        t.grad = None
    (output.reshape(1, -1) * cotangent.to(output.dtype)).sum().backward(retain_graph=retain_graph)
    out = {n: (torch.zeros_like(t) if t.grad is None else t.grad.detach().clone()) for n, t in inputs.items()}
    for t in inputs.values():
        t.grad = None
    return out


def capture_output(module: nn.Module) -> tuple[list[torch.Tensor], Any]:
    """A forward hook that keeps ``module``'s outputs (pre-sigmoid logits the authors' forward does not return)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    return seen, handle


# --------------------------------------------------------------------------------------------- weights


def rename_state_dict(state: dict[str, torch.Tensor], rules: list[tuple[str, str]],
                      drop: Iterable[str] = (),
                      transforms: dict[str, Callable] | None = None) -> dict[str, torch.Tensor]:
    """Map the authors' parameter names to milbench's: the first matching regex rule (``re.fullmatch``) rewrites a
    name; names matching a ``drop`` regex are left out (dead or duplicate weights); an unmatched name is an error.
    ``transforms[new_name]`` reshapes a tensor (1x1 convolutions to linear layers); a callable may also return a dict
    of several tensors (a fused qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    transforms = transforms or {}
    for name, tensor in state.items():
        if any(re.fullmatch(p, name) for p in drop):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, name):
                new = re.sub(f"^{pattern}$", repl, name)
                break
        else:
            raise KeyError(f"no rule maps the reference parameter {name!r}")
        value = tensor.detach().clone()
        fn = next((f for pat, f in transforms.items() if re.fullmatch(pat, new)), None)
        if fn is None:
            out[new] = value
        else:
            res = fn(new, value)
            out.update(res if isinstance(res, dict) else {new: res})
    return out


def n_params(model: nn.Module) -> int:
    """Parameters, counted once even when a module is registered twice (PyG's DeepGCNLayer keeps its conv and norm
    under two names)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def as_float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
