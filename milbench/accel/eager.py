"""Functions that compiled blocks must call eagerly, without importing ``torch._dynamo`` until something compiles.

``@torch.compiler.disable`` imports the compiler stack (about 1.4 s) when the decorated module is imported, which
every command that trains pays, compiled or not. ``@eager`` instead records the function; :func:`activate`, called
by :func:`milbench.accel.compile.compile_blocks` before the first compilation, switches each recorded function to
its ``torch.compiler.disable`` form. Until then a call is a plain call (nothing is compiled, so nothing to exclude).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_EAGER: list[dict[str, Any]] = []


def eager(fn: Callable) -> Callable:
    """``fn``, kept out of compiled graphs once anything is compiled (see the module notes)."""
    state: dict[str, Any] = {"impl": fn, "fn": fn}
    _EAGER.append(state)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return state["impl"](*args, **kwargs)

    return call


def activate() -> None:
    """Switch every ``@eager`` function to ``torch.compiler.disable(fn)`` (imports the compiler stack once)."""
    import torch

    for state in _EAGER:
        if state["impl"] is state["fn"]:
            state["impl"] = torch.compiler.disable(state["fn"])
