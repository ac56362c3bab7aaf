"""``--compile``: torch.compile of the heavy, repeated blocks a model's card names (the same function, fewer kernels)."""

from __future__ import annotations

import torch
import torch.nn as nn

from milbench.accel.eager import activate
from milbench.models.registry import card_of


class _CompiledForward:
    """A module's forward through ``torch.compile`` (dynamic shapes) for plain calls; a call that asks for more (a
    keyword set to anything but None/False, such as an attention map, or a str/bool positional) runs the eager
    forward, so rarely used paths are never compiled."""

    def __init__(self, forward, backend: str) -> None:
        self.eager = forward
        self.compiled = torch.compile(forward, dynamic=True, backend=backend)

    def __call__(self, *args, **kwargs):
        plain = not any(isinstance(a, (str, bool)) for a in args)
        plain = plain and all(v is None or v is False for v in kwargs.values())
        return (self.compiled if plain else self.eager)(*args, **kwargs)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile in place every submodule whose class its card names in ``traits.compiled_blocks`` (a model's heavy,
    repeated blocks).

    Same function, fewer kernels: pointwise ops, casts and norms fuse around the matmuls and attention, and the
    Python/launch overhead of a step shrinks. Shapes are dynamic (one compilation serves every bag size and every
    instance of a block type); parameter names and the state dict are untouched. Blocks, not the whole forward: the
    square padding's side, ceil(sqrt(N)), is a symbolic size inductor cannot lower (PyTorch 2.11-2.13), so it stays
    in eager glue and reaches the compiled PPEG / Conv Processor as a plain integer. Returns the number of compiled
    blocks (blocks nested in a compiled block are traced with it).
    """
    activate()  # the functions that must stay eager inside compiled blocks
    card = card_of(model)
    names = set(card.traits.compiled_blocks) if card is not None else set()
    compiled: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(c + ".") for c in compiled)
        if type(module).__name__ in names and not inside and not isinstance(module.forward, _CompiledForward):
            module.forward = _CompiledForward(module.forward, backend)
            compiled.append(name)
    return len(compiled)
