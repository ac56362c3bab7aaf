"""Per-process cache: each slide is read from disk once and kept in CPU memory as float16 (plus coords).

The same store keeps prepared patient bags (with their patch graph or cross-scale index), so that what a
model's card declares is built once per process, not once per epoch or per fold. With ``max_bytes`` the least
recently used entries are dropped first.

With a :class:`milbench.data.node_cache.NodeCache`, slides are read through it: this process keeps only tensors
memory-mapped from the node's cache (their pages are shared by every worker of the node and count for nothing in
``max_bytes``), so a worker's own memory holds only what it builds (bags of several slides, graphs, indexes).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

from milbench.data.node_cache import NodeCache
from milbench.data.readers import SlideFeatures, canonical_scale, read_slide, slide_stem

T = TypeVar("T")


class FeatureCache:
    """Slides keyed by (root, backbone, scale, slide) and prepared bags under caller keys; LRU under a byte budget."""

    _shared: FeatureCache | None = None

    def __init__(self, max_bytes: int | None = None, node_cache: NodeCache | None = None) -> None:
        self.max_bytes = max_bytes
        self.node_cache = node_cache
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @classmethod
    def shared(cls) -> FeatureCache:
        """The process-wide cache used when a dataset is given none."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def read(self, root: str | Path, scale: str, slide_id: str, backbone: str | None = None) -> SlideFeatures:
        """One slide's features at one scale, from memory when it was read before."""
        key = ("slide", os.path.abspath(root), backbone, canonical_scale(scale), slide_stem(slide_id))
        if self.node_cache is None:
            return self.get_or_build(key, lambda: read_slide(root, scale, slide_id, backbone), lambda s: s.nbytes)
        node = self.node_cache
        built = self.get_or_build(key, lambda: node.read_mapped(root, scale, slide_id, backbone),
                                  lambda pair: 0 if pair[1] else pair[0].nbytes)  # mapped pages are the node's
        return built[0]

    def get_or_build(self, key: Hashable, build: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """The value under ``key``; built (and stored, if it fits the budget) on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]  # type: ignore[return-value]
        self.misses += 1
        value = build()
        self._store(key, value, nbytes(value))
        return value

    def _store(self, key: Hashable, value: object, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.nbytes += size
        while self.max_bytes is not None and self.nbytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped

    def clear(self) -> None:
        """Drop everything (counters kept)."""
        self._items.clear()
        self.nbytes = 0
