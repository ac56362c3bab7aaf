"""Claims: which process trains which fold, so two drivers on one store never train the same fold.

``<run dir>/fold_<k>.claim`` is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds the host,
process and time of the process training the fold; a heartbeat thread refreshes its mtime every ``HEARTBEAT_S``.
A claim is stale, and the next process taking the fold removes it, when its mtime is older than ``stale_after``
(any host; default ``CLAIM_STALE_S``), when its process is dead on this very node (same hostname, boot and PID
namespace), when it is still empty ``WRITE_GRACE_S`` after its creation, or when it belongs to an earlier attempt of
the same driver (which saw that attempt's worker crash). Should two processes still train one fold (clock skew
beyond the timeout), the one that finishes second finds the record and keeps it: records are moved into place in one
step.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from milbench.files import write_json
from milbench.runs.store import run_dir

if TYPE_CHECKING:
    from milbench.config.run import RunConfig

CLAIM_STALE_S = 600.0  # a claim whose heartbeat stopped this long ago is taken over
HEARTBEAT_S = 30.0
WRITE_GRACE_S = 60.0  # a claim file still empty after this long was left by a process killed while creating it


def claim_path(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}.claim"


def failure_path(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    return run_dir(runs_dir, cfg) / f"fold_{fold}.failed"


def resume_path(runs_dir: Path, cfg: RunConfig, fold: int) -> Path:
    """The fold's end-of-epoch checkpoint (:func:`milbench.training.fold.save_resume`), removed with its record."""
    return run_dir(runs_dir, cfg) / f"fold_{fold}.resume.pt"


def progress_path(claim: Path) -> Path:
    """Beside a claim: the epoch its holder has reached (``fold_<k>.progress``), removed with the claim."""
    return claim.with_name(claim.name.removesuffix(".claim") + ".progress")


def read_progress(claim: Path) -> dict | None:
    """``{"epoch", "epochs", "started", "time", "resumed_after"}`` written by the claim's holder, or None."""
    try:
        return json.loads(progress_path(claim).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process, from /proc; None where /proc is not there."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    rest = text.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return rest[0], rest[19]


@functools.cache
def node_id() -> str:
    """Hostname, boot and PID namespace: PIDs are comparable only between processes with the same node id."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id') or ''}/{pidns}"


def process_id(pid: int | None = None) -> str:
    """``host:pid`` of a process (this one by default), as shown to users."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when known) still runs here; zombies count as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)


@dataclass
class ClaimInfo:
    """A claim file as read back: who holds the fold, and how long ago it last showed a heartbeat."""

    path: Path
    inode: int
    age: float
    host: str = "?"
    node: str = ""
    pid: int = 0
    pid_start: str | None = None
    driver: str = ""
    attempt: int = 0
    token: str = ""

    @property
    def holder(self) -> str:
        return f"{self.host}:{self.pid}" if self.pid else "a process still writing its claim"

    def stale(self, stale_after: float) -> bool:
        """No heartbeat for ``stale_after`` seconds, or its process is dead on this node."""
        if self.age > stale_after or (not self.pid and self.age > WRITE_GRACE_S):
            return True
        return bool(self.pid) and self.node == node_id() and not _alive(self.pid, self.pid_start)


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``, or None when there is none; a claim still being written has no holder yet."""
    try:
        st = os.stat(path)
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    info = ClaimInfo(Path(path), st.st_ino, max(0.0, time.time() - st.st_mtime))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return info
    for key in ("host", "node", "pid", "pid_start", "driver", "attempt", "token"):
        if key in data:
            setattr(info, key, data[key])
    return info


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove the claim at ``path`` only if it is still the file judged stale (inode ``inode``)."""
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    if os.stat(grave).st_ino != inode:  # a fresh claim replaced the stale one meanwhile: put it back
        try:
            os.link(grave, path)
        except FileExistsError:
            pass
    os.unlink(grave)


class Claim:
    """This process's claim on one fold: refreshed by a heartbeat thread, removed on release."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token

    @classmethod
    def acquire(cls, path: Path, stale_after: float = CLAIM_STALE_S, driver: str = "",
                attempt: int = 0) -> Claim | ClaimInfo:
        """The claim, or the live holder's :class:`ClaimInfo` when another process holds the fold."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_claim(path)
                if info is None:
                    continue
                earlier_attempt = bool(driver) and info.driver == driver and info.attempt < attempt
                if not (info.stale(stale_after) or earlier_attempt):
                    return info
                _remove_if_same(path, info.inode)
                continue
            token = uuid.uuid4().hex
            pid = os.getpid()
            content = {"host": socket.gethostname(), "node": node_id(), "pid": pid,
                       "pid_start": (_proc_stat(pid) or (None, None))[1], "driver": driver, "attempt": attempt,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
            with os.fdopen(fd, "w") as fh:
                json.dump(content, fh)
                fh.flush()
                os.fsync(fh.fileno())
            return cls(path, token)
        return read_claim(path) or ClaimInfo(path, 0, 0.0)

    def owned(self) -> bool:
        info = read_claim(self.path)
        return info is not None and info.token == self.token

    def release(self) -> None:
        if self.owned():
            progress_path(self.path).unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def note_progress(self, epoch: int, epochs: int, started: float, resumed_after: int | None = None) -> None:
        """Record the epoch reached (atomically, beside the claim) for `milbench status` on any machine."""
        if self.owned():
            write_json(progress_path(self.path), {"epoch": epoch, "epochs": epochs, "started": started,
                                                  "time": time.time(), "resumed_after": resumed_after})

    @contextmanager
    def heartbeat(self, every: float = HEARTBEAT_S) -> Iterator[None]:
        """Refresh the claim's mtime every ``every`` seconds while the block runs, then release it."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                if self.owned():
                    os.utime(self.path)

        thread = threading.Thread(target=beat, name=f"claim {self.path.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release()
