"""Segment operations: reductions over the rows of each bag when several bags are packed into one tensor.

Each goes through a [segments, N] membership mask (one matrix product or masked reduction), not scatter/index_add:
thousands of rows adding into a few dozen segments serialise GPU atomics.
"""

from __future__ import annotations

import torch


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Softmax of ``scores`` [N] (or [N, K]: K softmaxes) over the rows of each segment (bag); one segment when
    ``segment`` is None.

    Used to pack several bags into one forward pass: numerically the same as one softmax per bag. The per-segment
    maxima and sums go through a [segments, N] membership mask (:func:`segment_max`, :func:`segment_sum`), not
    scatter/index_add: thousands of rows adding into a few dozen segments serialise GPU atomics.
    """
    if segment is None:
        return torch.softmax(scores, dim=0)
    e = torch.exp(scores - segment_max(scores, segment, n_segments)[segment])
    return e / segment_sum(e, segment, n_segments)[segment]


def _members(segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments, N] bool: row j belongs to segment i."""
    return torch.arange(n_segments, device=segment.device).unsqueeze(1) == segment.unsqueeze(0)


def segment_sum(values: torch.Tensor, segment: torch.Tensor | None, n_segments: int = 1) -> torch.Tensor:
    """Sum rows of ``values`` [N] or [N, d] per segment -> [n_segments] or [n_segments, d]: one matrix product with
    the membership mask (float32 accumulation, no atomics)."""
    if segment is None:
        return values.sum(dim=0, keepdim=True)
    flat = values.reshape(values.shape[0], -1)
    return (_members(segment, n_segments).to(flat.dtype) @ flat).view(n_segments, *values.shape[1:])


def _masked_rows(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments, N, ...]: ``values`` where the row belongs to the segment, -inf elsewhere."""
    members = _members(segment, n_segments).view(n_segments, -1, *([1] * (values.dim() - 1)))
    return torch.where(members, values.unsqueeze(0), torch.tensor(float("-inf"), dtype=values.dtype,
                                                                   device=values.device))


def segment_max(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Maximum of ``values`` [N] or [N, K] over each segment's rows -> [n_segments] or [n_segments, K]."""
    return _masked_rows(values, segment, n_segments).amax(dim=1)


def segment_argmax(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Row index (into ``values`` [N, K]) of each segment's maximum per column -> [n_segments, K]; the first row on
    ties, as ``argmax`` picks. No host synchronisation (packed DSMIL's critical instances)."""
    return _masked_rows(values, segment, n_segments).argmax(dim=1)
