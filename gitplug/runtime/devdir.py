"""Releases from a plain directory: snapshots for ``load_directory`` and ``--dev``.

A directory a developer edits is never loaded in place: it is copied into an
immutable snapshot (``<data_dir>/dev/<plugin>/dir-<content hash>/``) first,
so a file saved half-way through a load cannot tear the release, and the
release id changes exactly when the content does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import typing as t
from pathlib import Path

__all__ = ["snapshot_directory", "DirectoryWatcher", "tree_signature"]

logger = logging.getLogger(__name__)

_IGNORED_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv", "venv", "node_modules"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".swx", "~")


def _walk(root: Path) -> t.Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS and not d.startswith(".#"))
        for filename in sorted(filenames):
            if filename.endswith(_IGNORED_SUFFIXES) or filename.startswith(".#"):
                continue
            yield Path(dirpath, filename)


def tree_signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """A cheap change detector: (path, size, mtime) of every file."""
    signature = []
    for path in _walk(root):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        signature.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def snapshot_directory(source: Path, dest_root: Path) -> tuple[str, Path]:
    """Copy ``source`` into ``dest_root/dir-<hash>``; return (release id, path).

    The hash covers the copied bytes, so the snapshot is exactly what it is
    named after even if the source changed during the copy.
    """
    source = Path(source).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest_root))
    digest = hashlib.sha256()
    try:
        for path in _walk(source):
            rel = path.relative_to(source)
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                continue  # a development snapshot never follows links out of the tree
            data = path.read_bytes()
            target.write_bytes(data)
            # Length-prefixed path and content digest: no two trees hash alike.
            name = str(rel).encode()
            digest.update(len(name).to_bytes(8, "big") + name + hashlib.sha256(data).digest())
        release_id = "dir-" + digest.hexdigest()[:16]
        final = dest_root / release_id
        if final.exists():
            shutil.rmtree(staging)
        else:
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():
                    raise
                # Another snapshot of the same content won the race: use it.
                shutil.rmtree(staging, ignore_errors=True)
        return release_id, final
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class DirectoryWatcher:
    """Polls a directory and calls ``on_change`` once it has been quiet.

    Polling (not inotify) keeps it dependency-free and works on every
    filesystem; ``interval`` bounds the latency.
    """

    def __init__(self, root: Path, on_change: t.Callable[[], None], *, interval: float = 0.4) -> None:
        self.root = Path(root)
        self.on_change = on_change
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gitplug-dev-watch:{root}", daemon=True)
        self._signature = tree_signature(self.root)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            signature = tree_signature(self.root)
            if signature == self._signature:
                continue
            # Wait for the editor to finish writing: one more quiet interval.
            while not self._stop.wait(self.interval):
                settled = tree_signature(self.root)
                if settled == signature:
                    break
                signature = settled
            self._signature = signature
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - the watcher keeps watching
                logger.exception("reloading %s failed", self.root)
