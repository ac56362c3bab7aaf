"""One cache of float16 slide features per node, on local disk, shared by every worker process of the node.

The first worker that needs a slide reads it with :func:`milbench.data.readers.read_slide` (so every check still
happens) and writes it here as plain arrays; every worker, the writer included, then memory-maps those files. The
pages of a memory-mapped file are the kernel's page cache, one copy per node whatever the number of processes that map
it: eight workers training folds of one cohort hold its features once, not eight times.

Layout under the folder (``--node-cache``)::

    slides/<key>.features.npy   float16 [N, D] (np.save)
    slides/<key>.coords.npy     int64 [N, 2]; absent when the slide has no coordinates
    slides/<key>.json           source path, shape, whether coords exist: written last, so an entry exists iff it does
    .lock                       flock held while an entry is written or removed (writes and eviction)
    locks/<00..ff>.lock         flock per key stripe, held while one slide is read from its source and written

``key`` hashes the resolved source file with its size and modification time (and the scale and backbone): a
re-extracted file is a new entry, and the stale one ages out. Recency is the ``.json`` file's modification time, set
at every use. Before an entry is written, the least recently used entries are removed until the cache's files plus
the new entry fit ``max_bytes``; a slide larger than the whole limit is returned as read, not cached. Writes and
removals happen only under ``.lock``, so a file being written is never removed, and any temporary file found under
the lock belongs to a writer that died (it is removed, with any entry whose ``.json`` never came).

An entry removed while a worker still maps it stays readable by that worker (the kernel keeps an unlinked file's pages
until the last mapping goes), so eviction never breaks a running fold; its disk space returns when the worker drops it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from milbench import MilbenchError
from milbench.data.readers import SlideFeatures, canonical_scale, find_feature_file, read_slide
from milbench.files import atomic_path, atomic_write

STRIPES = 256
HEADER_BOUND = 4096  # an upper bound on one .npy header (128 bytes for 2-D arrays in practice)
PARTS = (".features.npy", ".coords.npy", ".json")


class NodeCache:
    """Slides as memory-mapped files in ``folder`` (node-local disk), at most ``max_bytes`` on disk, LRU evicted."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise MilbenchError(f"--node-cache-gb must be positive, not {max_bytes / 2**30:g}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.slides = self.folder / "slides"
        try:
            self.slides.mkdir(parents=True, exist_ok=True)
            (self.folder / "locks").mkdir(exist_ok=True)
        except OSError as err:
            raise MilbenchError(f"cannot use {self.folder} as the node cache ({type(err).__name__}: {err}): pass "
                                f"--node-cache a writable folder on node-local disk") from err
        self.hits = self.writes = self.direct = self.evicted = 0

    def __repr__(self) -> str:
        return f"NodeCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def __reduce__(self):  # a cache travels to worker processes as its folder and limit, counters reset
        return (NodeCache, (str(self.folder), self.max_bytes))

    # -- reading ------------------------------------------------------------------------------------------------

    @staticmethod
    def key(source: Path, scale: str, backbone: str | None) -> str:
        """The entry name of one feature file at one scale (changes when the file does)."""
        st = source.stat()
        ident = [str(source.resolve()), st.st_size, st.st_mtime_ns, canonical_scale(scale), backbone]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]

    def read(self, root: str | Path, scale: str, slide_id: str, backbone: str | None = None) -> SlideFeatures:
        """The slide as :func:`read_slide` gives it, memory-mapped from this cache (written first when missing)."""
        return self.read_mapped(root, scale, slide_id, backbone)[0]

    def read_mapped(self, root: str | Path, scale: str, slide_id: str,
                    backbone: str | None = None) -> tuple[SlideFeatures, bool]:
        """The slide, and whether its tensors are memory-mapped from this cache (False: read directly, too large)."""
        source = find_feature_file(root, scale, slide_id, backbone)  # a missing file: the reader's own error
        key = self.key(source, scale, backbone)
        mapped = self._load(key)
        if mapped is not None:
            self.hits += 1
            return mapped, True
        with _flock(self.folder / "locks" / f"{int(key[:2], 16) % STRIPES:02x}.lock"):
            mapped = self._load(key)  # another worker wrote it while this one waited
            if mapped is not None:
                self.hits += 1
                return mapped, True
            slide = read_slide(root, scale, slide_id, backbone)
            needed = _entry_bytes(slide)
            if needed > self.max_bytes:
                self.direct += 1
                return slide, False
            with _flock(self.folder / ".lock"):
                self._clean()
                self._make_room(needed)
                self._write(key, slide)
            self.writes += 1
        mapped = self._load(key)
        return (mapped, True) if mapped is not None else (slide, False)

    def _load(self, key: str) -> SlideFeatures | None:
        """The entry memory-mapped and marked used, or None when there is none (or it went while being opened)."""
        meta_path = self.slides / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
            feats = np.load(self.slides / f"{key}.features.npy", mmap_mode="r")
            coords = np.load(self.slides / f"{key}.coords.npy", mmap_mode="r") if meta["coords"] else None
            _touch(meta_path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as err:  # a damaged entry (a disk that filled up): read it again
            warnings.warn(f"node cache entry {key} is damaged ({type(err).__name__}); reading the slide again",
                          stacklevel=2)
            with _flock(self.folder / ".lock"):
                self._remove(key)
            return None
        shape = [meta["patches"], meta["dim"]]
        wrong_coords = coords is not None and coords.shape != (shape[0], 2)
        if list(feats.shape) != shape or feats.dtype != np.float16 or wrong_coords:
            with _flock(self.folder / ".lock"):
                self._remove(key)
            return None
        with warnings.catch_warnings():  # read-only on purpose: the pages are shared with the node's other workers
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            features = torch.from_numpy(feats)
            xy = None if coords is None else torch.from_numpy(coords)
        return SlideFeatures(features=features, coords=xy, path=Path(meta["source"]))

    # -- writing and eviction (under the folder's lock) ---------------------------------------------------------

    def _write(self, key: str, slide: SlideFeatures) -> None:
        """The entry's arrays, then its ``.json`` (the commit), each written whole or not at all."""
        _save(self.slides / f"{key}.features.npy", slide.features.numpy())
        if slide.coords is not None:
            _save(self.slides / f"{key}.coords.npy", slide.coords.to(torch.int64).numpy())
        n, d = slide.features.shape
        meta = {"source": str(slide.path), "patches": int(n), "dim": int(d), "coords": slide.coords is not None}
        _touch(atomic_write(self.slides / f"{key}.json", json.dumps(meta)))

    def _clean(self) -> None:
        """Remove what dead writers left: temporary files, and arrays whose entry was never committed."""
        committed = {p.name[: -len(".json")] for p in self.slides.glob("*.json")}
        for path in self.slides.iterdir():
            if path.name.endswith(".tmp") or _key_of(path.name) not in committed:
                path.unlink(missing_ok=True)

    def entries(self) -> list[tuple[int, str, int]]:
        """(last use in ns, key, bytes on disk) of every committed entry, least recently used first."""
        sizes: dict[str, int] = {}
        for path in self.slides.iterdir():
            key = _key_of(path.name)
            if key is not None:
                sizes[key] = sizes.get(key, 0) + _size(path)
        found = []
        for key, size in sizes.items():
            try:
                found.append(((self.slides / f"{key}.json").stat().st_mtime_ns, key, size))
            except FileNotFoundError:
                continue
        return sorted(found)

    def used_bytes(self) -> int:
        """Bytes of every file in the cache."""
        return sum(_size(p) for p in self.slides.iterdir())

    def _make_room(self, needed: int) -> None:
        used = self.used_bytes()
        for _, key, size in self.entries():
            if used + needed <= self.max_bytes:
                break
            self._remove(key)
            used -= size
            self.evicted += 1

    def _remove(self, key: str) -> None:
        for part in PARTS[::-1]:  # the .json first: a reader then sees no entry rather than a partial one
            (self.slides / f"{key}{part}").unlink(missing_ok=True)


def _entry_bytes(slide: SlideFeatures) -> int:
    """Disk bytes an entry of ``slide`` may take (its arrays, their headers, its .json), bounded from above."""
    coords = 0 if slide.coords is None else slide.coords.numel() * 8 + HEADER_BOUND
    return slide.features.numel() * 2 + HEADER_BOUND + coords + HEADER_BOUND


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _key_of(name: str) -> str | None:
    for part in PARTS:
        if name.endswith(part) and not name.startswith("."):
            return name[: -len(part)]
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _touch(path: Path) -> None:
    """Mark ``path`` used now (nanoseconds: the file system's own clock ticks too coarsely to order uses)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        pass


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created when missing), released when the block ends or the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
