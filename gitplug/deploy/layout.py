"""Where gitplug keeps things under ``data_dir`` (documented in the README)::

    <data_dir>/
      mirrors/<slug>/            bare git mirror per repository
      releases/<plugin>/<sha>/   immutable releases (checkout + .gitplug/ metadata)
      logs/<plugin>/<id>.log     test gate output per deploy
      locks/<plugin>.lock        per-plugin deploy lock (fcntl), controller.lock
      hosted/<plugin>.git        bare repository of a ``repo: push`` plugin (the push remote)
      dev/<plugin>/dir-<hash>/   snapshots of directories loaded with --dev
      state.db                   SQLite state store (the default ``state:``)
      served.json                what this host last served, per plugin (used when the
                                 state database cannot be reached at startup)
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import typing as t
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..state import Lease

__all__ = ["DataLayout", "FileLock", "PluginLock"]


@dataclass(frozen=True)
class DataLayout:
    """The paths under one data directory."""

    root: Path

    @property
    def mirrors(self) -> Path:
        return self.root / "mirrors"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def hosted(self) -> Path:
        return self.root / "hosted"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    @property
    def served_file(self) -> Path:
        return self.root / "served.json"

    def deploy_log(self, plugin: str, deploy_id: int) -> Path:
        return self.logs / plugin / f"{deploy_id}.log"

    def lock_file(self, name: str) -> Path:
        return self.locks / f"{name}.lock"


class FileLock:
    """An exclusive ``fcntl`` lock on a file, also exclusive between threads.

    The kernel drops the lock when its holder dies, so a crashed deploy
    never leaves a plugin locked. The thread that holds it may take it again
    (each :meth:`acquire` is matched by a :meth:`release`): the push remote
    holds a plugin's lock from its deploy until the branch has moved.
    """

    #: Seconds between attempts while waiting with a timeout for another process.
    poll_interval = 0.05

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False when ``blocking`` is off or ``timeout`` seconds passed first."""
        if self._owner == threading.get_ident():
            self._depth += 1
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._thread_lock.acquire(blocking, -1 if timeout is None else timeout):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            wait = blocking and deadline is None
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    # Another process holds it: flock cannot time out, so poll.
                    if not blocking or deadline is None or time.monotonic() >= deadline:
                        os.close(fd)
                        self._thread_lock.release()
                        return False
                    time.sleep(self.poll_interval)
            self._fd = fd
            self._owner, self._depth = threading.get_ident(), 1
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return True
        except BaseException:
            if self._fd is None and self._thread_lock.locked():
                self._thread_lock.release()
            raise

    def try_local(self) -> bool:
        """Take only the in-process part of the lock, without blocking.

        True means no thread of this process holds the lock; release with
        :meth:`release_local`. Other processes are not consulted.
        """
        return self._thread_lock.acquire(blocking=False)

    def release_local(self) -> None:
        self._thread_lock.release()

    @property
    def depth(self) -> int:
        """How many times the calling thread holds the lock (0: it does not)."""
        return self._depth if self._owner == threading.get_ident() else 0

    def release(self) -> None:
        if self._depth > 1 and self._owner == threading.get_ident():
            self._depth -= 1
            return
        fd, self._fd = self._fd, None
        self._owner, self._depth = None, 0
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread_lock.release()

    def __enter__(self) -> FileLock:
        """``with lock:`` holds it (blocking) for the block."""
        self.acquire()
        return self

    def __exit__(self, *exc: t.Any) -> None:
        self.release()


class PluginLock:
    """A plugin's deploy lock: this host's :class:`FileLock`, then the fleet's lease.

    On one host (``take`` None) it is the file lock. In a fleet the
    outermost :meth:`acquire` of a thread also takes the plugin's fleet-wide
    lease (``take(wait_s)``, see :meth:`gitplug.state.StateStore.acquire_lease`),
    so every decision about a plugin (deploy, rollback, resume, stop, start),
    whichever host makes it, runs alone and reads the state the decision
    before it wrote: two operators on two hosts are served one after the
    other, and the later one's decision is the fleet's. Same interface as
    :class:`FileLock`; :meth:`try_local` takes only the in-process part.
    """

    def __init__(self, local: FileLock, take: Callable[[float | None], Lease | None] | None = None) -> None:
        self.local = local
        self._take = take
        self._lease: Lease | None = None

    @property
    def path(self) -> Path:
        return self.local.path

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take both parts; False (holding neither) when ``blocking`` is off or ``timeout`` passed."""
        started = time.monotonic()
        if not self.local.acquire(blocking=blocking, timeout=timeout):
            return False
        if self._take is None or self.local.depth > 1:
            return True
        if not blocking:
            wait: float | None = 0.0
        elif timeout is None:
            wait = None
        else:
            wait = max(timeout - (time.monotonic() - started), 0.0)
        try:
            lease = self._take(wait)
        except BaseException:
            self.local.release()
            raise
        if lease is None:
            self.local.release()
            return False
        self._lease = lease
        return True

    def release(self) -> None:
        if self.local.depth == 1:
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release()
        self.local.release()

    def try_local(self) -> bool:
        return self.local.try_local()

    def release_local(self) -> None:
        self.local.release_local()

    def __enter__(self) -> PluginLock:
        """``with lock:`` holds it (blocking) for the block."""
        self.acquire()
        return self

    def __exit__(self, *exc: t.Any) -> None:
        self.release()
