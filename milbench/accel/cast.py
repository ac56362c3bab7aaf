"""The bag's features in the autocast dtype, cast in one vectorised pass.

PyTorch's copy between two half-precision types runs element by element: casting an average bag's largest
magnification (137,990 x 2,048 float16 at the paper's largest bag) to bfloat16 took 0.76 ms on an H200, 1.5 TB/s
of the 4.8 the memory allows (issue 20's profile). The same conversion compiled (one Triton kernel, dynamic shapes,
so one compilation for every bag size) moves the same bytes with wide loads and stores. Same values: float16 to
bfloat16 rounds to nearest even either way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

MIN_ELEMENTS = 1 << 22  # smaller tensors: PyTorch's own copy (a compiled call's guards cost more than it saves)


@functools.cache
def _compiled_cast(dtype: torch.dtype):
    return torch.compile(lambda x: x.to(dtype), dynamic=True)


def cast_features(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``; for a large CUDA tensor outside autograd through the compiled cast (PyTorch's copy if that
    cannot compile)."""
    if x.dtype == dtype or not x.is_cuda or x.requires_grad or x.numel() < MIN_ELEMENTS:
        return x.to(dtype)
    try:
        return _compiled_cast(dtype)(x)
    except Exception:  # no compiler on this machine: the plain copy computes the same values
        return x.to(dtype)


def autocast_dtype_for(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would give ``x`` in a matrix product here, None when autocast is off."""
    kind = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def linear_cast_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` for the bag's features: under autocast they are cast once, in one pass, to the dtype the
    product would cast them to anyway."""
    dtype = autocast_dtype_for(x)
    if dtype is not None and x.dtype != dtype:
        x = cast_features(x, dtype)
    return F.linear(x, self.weight, self.bias)
