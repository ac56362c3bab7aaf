"""Files written whole or not at all, and stable hashes: the one implementation every layer uses.

A write goes to a temporary file beside its target (same folder, so the same file system), is flushed to disk, and is
moved into place with one ``os.replace``: a reader sees the old file or the new one, and a killed writer leaves only
a ``.tmp`` file behind, never a half-written target.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_beside(path: Path) -> Path:
    """A fresh temporary name in ``path``'s folder (hidden, unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (by any library); it replaces ``path`` on success and
    is removed on failure."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` in one step (fsynced before the move)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_copy(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` in one step (concurrent copiers of one file are harmless)."""
    import shutil

    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def write_json(path: str | Path, obj: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None,
               sort_keys: bool = False, newline: bool = False) -> Path:
    """``obj`` as JSON at ``path``, atomically."""
    text = json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + ("\n" if newline else "")
    return atomic_write(path, text)


def stable_hash(obj: Any, length: int = 10) -> str:
    """Short SHA-256 of ``obj``'s canonical JSON (sorted keys, ``str`` for anything else): the same content always
    gets the same hash, on any machine (run configurations, variants, plans)."""
    blob = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
