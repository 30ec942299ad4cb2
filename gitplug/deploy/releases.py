"""Releases: immutable, atomically staged checkouts of one commit of one plugin.

The *stage* step of the pipeline. Staging writes into a temp dir, syncs
the finished tree once (``syncfs``), writes the metadata last and renames the
directory into place, so a directory under a final name is always complete
(README "Guarantees"). A tree that would write outside its release, or that
is over the limits (``max_files``, ``max_file_size``, ``max_release_size``),
is refused before anything is written: sizes come from the object headers,
never from inflating a blob, and blobs are streamed to disk in chunks.
Files are read-only (0o444, 0o555 if executable), directories 0o555 except
``.gitplug/`` (the test verdict is written there later); a manifest of every
entry (git blob id, size, inode and ctime) lets the loader refuse a release
that changed on disk.

Incremental: only blobs no earlier release of the plugin holds are written
(small ones by a few threads while git streams the next); every other file
is a hard link of an earlier release's, used only once the ledger
(:class:`_Shared`) vouches that it is intact (README "Data directory and
state"). A file at the file system's link limit (65,000 links on ext4) is
copied once, and the copy is its blob's link source from then on, in this
release and later ones (:class:`_Linker`). Staging, pruning and removing
take the plugin's lock, a ``flock`` on ``releases/<plugin>/``. Layout::

    releases/hello/.tmp-<sha>-<rand>(.lock)  being staged; the stager holds the lock
    releases/hello/<sha>/                    a complete release
    releases/hello/<sha>/.gitplug/           release.json (metadata), manifest.json, test.json
    releases/hello/.ledger.json              the shared inodes: blob, known-good ctime, holder
"""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gitplug.deploy.gitsource import (
    CHUNK,
    MODE_GITLINK,
    MODE_LINK,
    GitSource,
    TreeEntry,
    redact_url,
)
from gitplug.errors import FetchError, StagingError, UnsafeTree
from gitplug.runtime.manifest import MANIFEST_NAME, git_blob_id, manifest_of, read_ledger

__all__ = ["Release", "ReleaseStore", "TestRecord", "MiB", "LEDGER_NAME"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
METADATA_DIR = ".gitplug"
_FORMAT = 2  # 2: with manifest.json
#: Beside a plugin's releases: the files they share (:class:`_Shared`).
LEDGER_NAME = ".ledger.json"
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_PLUGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Code points HFS+ ignores in names, so ".g\u200cit" would be ".git" there.
_IGNORABLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]")
_MAX_LINK = 4095
_MAX_HOPS = 40


@dataclass(frozen=True)
class TestRecord:
    """The outcome of the test gate for one release (``.gitplug/test.json``)."""

    __test__ = False  # not a pytest test class

    passed: bool
    returncode: int | None
    timed_out: bool
    duration_s: float
    log_path: str | None
    ran_at: str  # ISO 8601, UTC

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestRecord:
        """Build from the JSON form; raises KeyError/TypeError/ValueError if malformed."""
        code, log = data["returncode"], data["log_path"]
        return cls(bool(data["passed"]), None if code is None else int(code),
                   bool(data["timed_out"]), float(data["duration_s"]),
                   None if log is None else str(log), str(data["ran_at"]))


@dataclass(frozen=True)
class Release:
    """A complete release on disk, as its metadata describes it."""

    plugin: str
    commit: str
    path: Path
    ref: str  # the ref it was first staged for
    tree: str
    author: str
    message: str
    staged_at: str  # ISO 8601, UTC
    test: TestRecord | None  # None until the test gate recorded a result
    source_path: str | None = None  # the repository directory staged (``path:``); None: the root
    subtree: str = ""  # the tree id staged: ``tree`` for the root, else the directory's


class ReleaseStore:
    """The releases of every plugin under ``releases_dir``."""

    def __init__(self, releases_dir: Path) -> None:
        self.releases_dir = Path(releases_dir)

    def __repr__(self) -> str:
        return f"ReleaseStore({str(self.releases_dir)!r})"

    def path_for(self, plugin: str, commit: str) -> Path:
        """``releases_dir/<plugin>/<commit>``; ValueError for a malformed name or sha."""
        if not _PLUGIN.match(plugin):
            raise ValueError(f"invalid plugin name {plugin!r}")
        if not _SHA.match(commit):
            raise ValueError(f"invalid commit sha {commit!r} (expected full lowercase hex)")
        return self.releases_dir / plugin / commit

    def get(self, plugin: str, commit: str) -> Release | None:
        """The release of ``commit``, or None if absent or incomplete (no valid metadata)."""
        path = self.path_for(plugin, commit)
        try:
            meta = json.loads((path / METADATA_DIR / "release.json").read_text("utf-8"))
            if meta["plugin"] != plugin or meta["commit"] != commit:
                return None
            return Release(plugin, commit, path, str(meta["ref"]), str(meta["tree"]),
                           str(meta["author"]), str(meta["message"]), str(meta["staged_at"]),
                           _read_test_record(path / METADATA_DIR / "test.json"),
                           meta.get("path") or None, str(meta.get("subtree") or meta["tree"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if path.exists():
                logger.warning("plugin %s: release %s has no valid metadata (%s)", plugin,
                               commit, exc)
            return None

    def list(self, plugin: str) -> list[Release]:
        """Every complete release of ``plugin``, most recently staged first."""
        plugin_dir = self.path_for(plugin, "0" * 40).parent  # validates the name
        try:
            names = [p.name for p in plugin_dir.iterdir() if _SHA.match(p.name)]
        except FileNotFoundError:
            return []
        releases = [r for r in (self.get(plugin, n) for n in names) if r is not None]
        return sorted(releases, key=lambda r: (r.staged_at, r.commit), reverse=True)

    def stage(
        self,
        plugin: str,
        source: GitSource,
        url: str,
        commit: str,
        ref: str,
        *,
        max_file_bytes: int = 100 * MiB,
        max_total_bytes: int = 1024 * MiB,
        max_files: int = 50_000,
        path: str | None = None,
    ) -> Release:
        """Write the checkout of ``commit`` as a release and return it.

        With ``path`` (a monorepo's ``plugins/shop``), the release holds that
        directory's tree only, as if it were the repository's root.
        Idempotent: an existing complete release is returned untouched. The
        commit must be in ``source``'s mirror of ``url``. Raises UnsafeTree
        (naming the path) for a tree that could write outside the release,
        StagingError for a limit (checked from the tree and the object
        headers before anything is written or inflated) or a disk error; in
        every failure case nothing is left under the plugin's releases
        directory. Memory stays bounded: blobs are streamed in chunks.
        """
        final = self.path_for(plugin, commit)
        existing = self.get(plugin, commit)
        if existing is not None:
            if existing.source_path != path:
                raise StagingError(
                    f"plugin {plugin!r}: the release of {commit} on disk holds "
                    f"{existing.source_path or 'the repository root'!r}, but path is now "
                    f"{path or 'the repository root'!r}. Push a new commit to deploy the new path "
                    f"(or remove {final} if it is not live).", plugin=plugin, commit=commit)
            return existing
        info = source.commit_info(url, commit, plugin=plugin)
        tree = info.tree
        if path:
            # Resolve the directory first and stage its tree: the rest is unchanged.
            found = source.subtree(url, commit, path, plugin=plugin)
            if found is None:
                raise StagingError(
                    f"plugin {plugin!r}: commit {commit} has no directory {path!r} (the plugin's "
                    "path). Fix path in the configuration, or push a commit that has it.",
                    plugin=plugin, commit=commit)
            tree = found

        entries: list[TreeEntry] = []
        for entry in source.iter_tree(url, commit, plugin=plugin, tree=tree):
            entries.append(entry)
            if len(entries) > max_files:
                raise StagingError(
                    f"plugin {plugin!r}: commit {commit} has more than {max_files} files "
                    "(limits.max_files); nothing was written. Remove generated or vendored "
                    "files from the repository, or raise `limits: {max_files: N}` in "
                    "deploy.yaml (README \"Configuration\").", plugin=plugin, commit=commit)
        checked = _check_paths(plugin, commit, entries)
        # The plugin's lock keeps a concurrent stager or pruner out until the
        # ledger of shared files says what this staging left behind.
        with self._disk_errors(plugin, commit, final.parent), self._shared(plugin) as shared:
            assert shared is not None  # waited for the lock
            release = self.get(plugin, commit)  # staged meanwhile by another stager?
            if release is None:
                release = self._stage_locked(plugin, source, url, commit, ref, checked, shared,
                                             info=info, tree=tree, path=path,
                                             max_file_bytes=max_file_bytes,
                                             max_total_bytes=max_total_bytes)
        if release is None:
            raise StagingError(f"plugin {plugin!r}: release {commit} vanished from {final} "
                               "right after staging. Is another process pruning it?",
                               plugin=plugin, commit=commit)
        return release

    def _stage_locked(self, plugin: str, source: GitSource, url: str, commit: str, ref: str,
                      checked: dict[str, TreeEntry], shared: _Shared, *,
                      info: Any, tree: str, path: str | None, max_file_bytes: int,
                      max_total_bytes: int) -> Release | None:
        """The body of :meth:`stage`, holding the plugin's lock and its ledger."""
        final = self.path_for(plugin, commit)
        sizes: dict[bytes, int] = {}

        def sizes_of(shas: builtins.list[bytes]) -> dict[bytes, int]:
            # An intact earlier file's size is its blob's: git is asked only for the rest.
            for entry in checked.values():
                if entry.mode != MODE_LINK and entry.sha not in sizes:
                    found = shared.check(entry.sha, bool(entry.mode & 0o111))
                    if found is not None:
                        sizes[entry.sha] = found[1].st_size
            missing = [sha for sha in shas if sha not in sizes]
            with _source_errors(plugin, commit):
                sizes.update(source.blob_sizes(url, missing, plugin=plugin))
            return sizes

        with _source_errors(plugin, commit):
            plan = _plan(plugin, commit, checked, sizes_of,
                         lambda sha: source.read_blob(url, sha, plugin=plugin))

        def too_large(what: str, limit: int, at: str, size: int, total: int) -> StagingError:
            return StagingError(
                f"plugin {plugin!r}: commit {commit} is too large to stage: {what} size limit "
                f"of {limit} bytes exceeded at {at!r} ({size} bytes, {total} in total). Remove "
                "large files from the repository (releases hold code, templates and small "
                "assets), or raise `limits:` in deploy.yaml (README \"Configuration\").",
                plugin=plugin, commit=commit)

        total = 0
        files = [(rel, entry.sha, bool(entry.mode & 0o111)) for rel, entry, link in plan
                 if link is None]
        links = {rel: link for rel, _entry, link in plan if link is not None}
        for rel, sha, _x in files:
            size = sizes[sha]
            total += size
            if size > max_file_bytes:
                raise too_large("file", max_file_bytes, rel, size, total)
            if total > max_total_bytes:
                raise too_large("release", max_total_bytes, rel, size, total)
        # Each (blob, mode) is written once: linked from an earlier release if
        # one holds it intact, else streamed from git into its first path;
        # every other path of it is a hard link (README "Data directory and state").
        origins: dict[tuple[bytes, bool], str] = {}
        stream: builtins.list[bytes] = []
        for _rel, sha, executable in files:
            key = (sha, executable)
            if key not in origins:
                found = shared.check(sha, executable)
                origins[key] = found[0] if found is not None else ""
                if found is None:
                    stream.append(sha)
        meta = {
            "format": _FORMAT, "plugin": plugin, "commit": commit, "ref": ref,
            "url": redact_url(url), "tree": info.tree, "path": path, "subtree": tree,
            "author": info.author,
            "message": info.message, "committed_at": info.committed_at.isoformat(),
            "staged_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "files": len(plan), "bytes": total,
        }
        #: (blob, mode) -> the path in this release of its first file, for those written here.
        written: dict[tuple[bytes, bool], str] = {}
        linker = _Linker()
        try:
            with self._temp_dir(final) as tmp, contextlib.ExitStack() as stack:
                root = str(tmp)
                made: set[str] = {root}
                for directory in sorted({rel.rpartition("/")[0] for rel in checked}):
                    if directory:
                        _make_parents(f"{root}/{directory}", made)
                blobs = stack.enter_context(contextlib.closing(source.stream_blobs(
                    url, stream, plugin=plugin, max_size=max_file_bytes)))
                shared.stale = True  # links and unlinks move the shared inodes' ctimes
                with concurrent.futures.ThreadPoolExecutor(
                        _WORKERS, thread_name_prefix="gitplug-stage") as pool:
                    # 1. The first path of each blob no earlier release holds, from git.
                    #    Small files are written by the pool while git streams the next
                    #    ones (creating files is most of the time, and it waits on the
                    #    file system, not the CPU); at most three batches are in memory.
                    batches: collections.deque[concurrent.futures.Future[Any]] = \
                        collections.deque()
                    batch: builtins.list[tuple[str, bytes, bool]] = []
                    batch_bytes = 0

                    def flush() -> None:
                        nonlocal batch, batch_bytes
                        if batch:
                            while len(batches) >= 2:
                                batches.popleft().result()
                            batches.append(pool.submit(_write_batch, batch))
                            batch, batch_bytes = [], 0

                    with _source_errors(plugin, commit):
                        for rel, sha, executable in files:
                            key = (sha, executable)
                            if origins[key] or key in written:
                                continue
                            target = f"{root}/{rel}"
                            chunks: Iterable[bytes] = next(blobs)
                            if sizes[sha] < _SMALL:  # whole, to tell a pointer; by the pool
                                data = b"".join(chunks)
                                _refuse_lfs_pointer(plugin, commit, rel, data)
                                size = len(data)
                                batch.append((target, data, executable))
                                batch_bytes += size
                                if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
                                    flush()
                            else:
                                size = _write_file(target, chunks, executable=executable)
                            if size != sizes[sha]:
                                raise StagingError(
                                    f"plugin {plugin!r}: blob {sha.decode()} of {commit} at "
                                    f"{rel!r} holds {size} bytes, not the {sizes[sha]} its "
                                    f"header says. Delete the mirror {source.mirror_path(url)} "
                                    "so it is fetched afresh.", plugin=plugin, commit=commit)
                            written[key] = rel
                        flush()
                        for future in batches:
                            future.result()
                    for key, rel in written.items():
                        origins[key] = f"{root}/{rel}"
                    # 2. Every other path: a hard link, made by the pool in slices.
                    todo = [(origins[(sha, executable)], f"{root}/{rel}", executable)
                            for rel, sha, executable in files
                            if written.get((sha, executable)) != rel]
                    slices = [todo[i:i + _BATCH_FILES] for i in range(0, len(todo), _BATCH_FILES)]
                    for _done in pool.map(linker.link_batch, slices):
                        pass
                # A blob whose origin was at the file system's link limit is in two inodes
                # (or more): the origin's links made before, and the copy's.
                key_of = {origin: key for key, origin in origins.items()}
                mixed = {key_of[origin] for origin in linker.copies}
                # Symlinks last: no file is ever written while a link exists in the tree.
                for rel, link in links.items():
                    os.symlink(link, f"{root}/{rel}")
                # The ctime each inode has after the last link to it: the manifest's.
                current = shared.renew()
                for key, rel in written.items():
                    current[key] = os.lstat(f"{root}/{rel}")
                stats = {rel: (current[(sha, executable)] if (sha, executable) not in mixed
                               else os.lstat(f"{root}/{rel}"), sha.decode())
                         for rel, sha, executable in files}
                os.mkdir(f"{root}/{METADATA_DIR}")
                manifest = manifest_of(stats, links, ledger=f"../{LEDGER_NAME}")
                _write_file(f"{root}/{METADATA_DIR}/{MANIFEST_NAME}",
                            [json.dumps(manifest, separators=(",", ":")).encode()],
                            executable=False)
                _write_file(f"{root}/{METADATA_DIR}/release.json",
                            [json.dumps(meta, indent=2).encode()], executable=False)
                # Read-only from here: only .gitplug/ (the test verdict) stays writable.
                for directory in sorted(made, key=lambda d: d.count("/"), reverse=True):
                    os.chmod(directory, 0o555)
                _sync_tree(tmp)
                published = self._publish(plugin, commit, tmp, final)
        except BaseException:
            shared.stale = True  # the temp dir's links are gone again
            raise
        if published:
            # Later stagings link from this release: it is the newest holder of each inode
            # it has. A copy made at the link limit is recorded last, so it is its blob's
            # source from now on, not the inode at the limit.
            held: dict[int, tuple[tuple[bytes, bool], str]] = {}
            for rel, sha, executable in files:
                held.setdefault(stats[rel][0].st_ino, ((sha, executable), rel))
            copies = {stats[copy[len(root) + 1:]][0].st_ino for copy in linker.copies.values()}
            for _ino, (key, rel) in sorted(held.items(), key=lambda item: item[0] in copies):
                shared.record(key, f"{commit}/{rel}", stats[rel][0])
            logger.info("plugin %s: staged release %s (%s) at %s: %d files, %d blobs written, "
                        "the rest linked", plugin, commit, ref, final, len(files), len(written))
        return self.get(plugin, commit)

    def record_test_result(self, plugin: str, commit: str, record: TestRecord) -> Release:
        """Store the test gate's verdict in the release (atomic replace); return the release."""
        release = self.get(plugin, commit)
        if release is None:
            raise StagingError(
                f"plugin {plugin!r}: cannot record a test result: no complete release of "
                f"{commit} under {self.releases_dir / plugin}. Stage it first.",
                plugin=plugin, commit=commit)
        target = release.path / METADATA_DIR / "test.json"
        with self._disk_errors(plugin, commit, target.parent):
            tmp = target.with_name(f".test.json.{secrets.token_hex(4)}")
            try:
                _write_file(tmp, [json.dumps(asdict(record), indent=2).encode()],
                            executable=False, sync=True)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(target.parent)
        return self.get(plugin, commit) or release

    def prune(self, plugin: str, keep: int, protect: Iterable[str]) -> builtins.list[str]:
        """Delete releases beyond the ``keep`` most recent, never a protected commit.

        ``protect`` holds full shas (live, pinned, previous, being deployed).
        Returns the removed shas, newest first.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        protected = set(protect)
        doomed = [r for r in self.list(plugin)[keep:] if r.commit not in protected]
        if not doomed:
            return []
        with self._disk_errors(plugin, doomed[0].commit, doomed[0].path.parent):
            self._remove_releases(plugin, [release.path for release in doomed])
        for release in doomed:
            logger.info("plugin %s: pruned release %s", plugin, release.commit)
        return [release.commit for release in doomed]

    def remove(self, plugin: str, commit: str) -> bool:
        """Delete the release of ``commit`` (renamed away first); False if there was none."""
        path = self.path_for(plugin, commit)
        if not path.exists():
            return False
        self._remove_releases(plugin, [path])
        logger.warning("plugin %s: removed release %s", plugin, commit)
        return True

    def cleanup_incomplete(self) -> builtins.list[Path]:
        """Remove what a crash can leave: temp dirs and release dirs without metadata.

        Call at startup. A temp dir whose stager is still running (its lock
        is held) is left alone. Returns the removed paths.
        """
        removed: builtins.list[Path] = []
        if not self.releases_dir.is_dir():
            return removed
        for plugin_dir in sorted(self.releases_dir.iterdir()):
            if plugin_dir.is_symlink() or not plugin_dir.is_dir() \
                    or not _PLUGIN.match(plugin_dir.name):
                continue
            # A stager or pruner at work holds the plugin's lock: it cleans up after itself.
            with self._shared(plugin_dir.name, wait=False) as shared:
                if shared is None:
                    continue
                shared.vouch_all()
                for child in sorted(plugin_dir.iterdir()):
                    if child.name.startswith(".tmp-"):  # a temp dir, or its lock file
                        tmp = child.with_name(child.name.removesuffix(".lock"))
                        lock = tmp.with_name(tmp.name + ".lock")
                        with _try_lock(lock) as free:
                            if free and tmp.is_dir():
                                _remove_tree(tmp)
                                removed.append(tmp)
                            if free:
                                lock.unlink(missing_ok=True)
                    elif _SHA.match(child.name) and self.get(plugin_dir.name, child.name) is None:
                        _remove_tree(child)
                        removed.append(child)
                shared.forget_missing()
        for path in removed:
            logger.warning("removed incomplete release directory %s", path)
        return removed

    # -- internals ------------------------------------------------------------

    @contextlib.contextmanager
    def _temp_dir(self, final: Path) -> Iterator[Path]:
        """A locked temp dir beside ``final``; removed unless it was renamed into place."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}-{secrets.token_hex(4)}")
        lock = tmp.with_name(tmp.name + ".lock")
        with open(lock, "xb") as handle:  # before the dir: cleanup sees who is alive
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                tmp.mkdir(mode=0o755)
                yield tmp
            finally:
                if tmp.exists():
                    _remove_tree(tmp)
                lock.unlink(missing_ok=True)

    def _publish(self, plugin: str, commit: str, tmp: Path, final: Path) -> bool:
        """Rename ``tmp`` to ``final``; False if a concurrent stager got there first.

        The caller holds the plugin's lock (:meth:`_objects`), so two stagers
        never both clear a squatter.
        """
        for _attempt in range(3):
            try:
                os.rename(tmp, final)
                _fsync_dir(final.parent)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if self.get(plugin, commit) is not None:
                logger.debug("plugin %s: release %s staged concurrently", plugin, commit)
                return False
            # A directory without metadata squats the final name: clear it.
            logger.warning("plugin %s: replacing incomplete release dir %s", plugin, final)
            with contextlib.suppress(FileNotFoundError):
                _remove_tree(final)
        raise StagingError(f"plugin {plugin!r}: could not move the release of {commit} into "
                           f"{final}. Remove that directory.", plugin=plugin, commit=commit)

    @contextlib.contextmanager
    def _shared(self, plugin: str, *, wait: bool = True) -> Iterator[_Shared | None]:
        """Hold ``plugin``'s lock (a ``flock`` on its releases directory) and its ledger.

        Staging, pruning and removing take it, so none of them sees another's
        half-done links. ``wait=False`` yields None at once if someone holds it.
        On the way out the ledger is brought up to date.
        """
        plugin_dir = self.path_for(plugin, "0" * 40).parent
        plugin_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(plugin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
            shared = _Shared(plugin_dir)
            try:
                yield shared
            finally:
                shared.close()
        finally:
            os.close(fd)

    def _remove_releases(self, plugin: str, paths: Iterable[Path]) -> None:
        """Remove release trees; the files they shared stay in the other releases.

        Unlinking a shared file moves its inode's ``ctime``: what the ledger
        vouched for before is vouched for after (found in another release),
        so the other releases still verify without hashing.
        """
        with self._shared(plugin) as shared:
            assert shared is not None
            shared.vouch_all()
            for path in paths:
                _remove_tree(path)
            shared.forget_missing()

    @contextlib.contextmanager
    def _disk_errors(self, plugin: str, commit: str, directory: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            at = f" ({exc.filename})" if exc.filename else ""
            hint = ("Free some disk space." if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
                    f"Check that {directory} is a directory writable by this user (fix its "
                    "permissions, or point data_dir elsewhere).")
            raise StagingError(f"plugin {plugin!r}: could not write the release of {commit} "
                               f"under {directory}: {exc.strerror or exc}{at}. {hint}",
                               plugin=plugin, commit=commit) from exc


def _read_test_record(path: Path) -> TestRecord | None:
    """The recorded verdict, or None; a damaged file is logged, never fatal to the release."""
    try:
        return TestRecord.from_dict(json.loads(path.read_text("utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable test result %s: %s", path, exc)
        return None


def _unsafe(plugin: str, commit: str, path: str, why: str) -> UnsafeTree:
    return UnsafeTree(
        f"plugin {plugin!r}: refusing to stage commit {commit}: tree entry {path!r} "
        f"{why}. Remove it from the repository and push a new commit.",
        plugin=plugin, commit=commit, path=path)


def _check_paths(plugin: str, commit: str, entries: Iterable[TreeEntry],
                 ) -> dict[str, TreeEntry]:
    """Validate every path of the tree; return ``{path: entry}`` in tree order.

    Runs before any blob is sized or read: a malformed tree (duplicate
    names) may lack the blobs of its shadowed entries.
    """

    def unsafe(path: str, why: str) -> UnsafeTree:
        return _unsafe(plugin, commit, path, why)

    plan: dict[str, TreeEntry] = {}
    for entry in entries:
        path = os.fsdecode(entry.path)
        parts = path.split("/")
        if entry.mode == MODE_GITLINK:
            raise unsafe(path, "is a submodule; submodules cannot be staged")
        if entry.mode != MODE_LINK and entry.mode & 0o170000 != 0o100000:
            raise unsafe(path, f"has an unsupported mode {entry.mode:o}")
        if path.startswith("/"):
            raise unsafe(path, "is an absolute path")
        if "" in parts:
            raise unsafe(path, "has an empty path component")
        if "." in parts or ".." in parts:
            raise unsafe(path, "has a '.' or '..' component and could write outside the release")
        # As git does: what Windows/macOS would read as ".git" is ".git" (CVE-2014-9390).
        # Only a name holding "git" can fold to one (ASCII; others are folded anyway).
        if not path.isascii() or "git" in path.lower():
            if any(_fold(part) in (".git", "git~1") for part in parts):
                raise unsafe(path, "has a .git component")
            if _fold(parts[0]) == METADATA_DIR:
                raise unsafe(path, f"is inside {METADATA_DIR}/, which is reserved for gitplug")
        if path in plan:
            raise unsafe(path, "appears twice in the tree")
        plan[path] = entry
    # Every directory the tree needs, each found once; then none may be an entry.
    directories: set[str] = set()
    for path in plan:
        directory = path.rpartition("/")[0]
        while directory and directory not in directories:
            directories.add(directory)
            directory = directory.rpartition("/")[0]
    if not directories.isdisjoint(plan):
        for path in plan:
            parts = path.split("/")
            for i in range(1, len(parts)):
                above = plan.get("/".join(parts[:i]))
                if above is not None:
                    kind = "symlink" if above.mode == MODE_LINK else "file"
                    raise unsafe(path,
                                 f"would be written through the {kind} {'/'.join(parts[:i])!r}")
    return plan


def _plan(plugin: str, commit: str, plan: dict[str, TreeEntry],
          sizes_of: Callable[[builtins.list[bytes]], dict[bytes, int]],
          read_link: Callable[[bytes], bytes],
          ) -> builtins.list[tuple[str, TreeEntry, str | None]]:
    """Size the checked tree; return sorted (path, entry, link target).

    Every blob is sized (``sizes_of``, from the object store or the object
    headers) and only symlink targets within the size a link may have are
    read; a link that leaves the release is refused.
    """

    def unsafe(path: str, why: str) -> UnsafeTree:
        return _unsafe(plugin, commit, path, why)

    sizes = sizes_of([entry.sha for entry in plan.values()])
    targets: dict[tuple[str, ...], str] = {}
    for path, entry in plan.items():
        if entry.mode == MODE_LINK:
            if not 0 < sizes[entry.sha] <= _MAX_LINK:
                raise unsafe(path, "is a symlink with an empty or invalid target")
            raw = read_link(entry.sha)
            if not raw or b"\0" in raw or len(raw) > _MAX_LINK:
                raise unsafe(path, "is a symlink with an empty or invalid target")
            targets[tuple(path.split("/"))] = os.fsdecode(raw)
    for parts, target in targets.items():
        problem = _link_escapes(parts, target, targets)
        if problem:
            raise unsafe("/".join(parts), f"is a symlink to {target!r}, which {problem}")
    links = {"/".join(parts): target for parts, target in targets.items()}
    return [(path, entry, links.get(path)) for path, entry in sorted(plan.items())]


#: The first line of a Git LFS pointer file: git-lfs's spec v1, and "hawser", its name before 1.0.
_LFS_VERSIONS = (b"version https://git-lfs.github.com/spec/v1\n",
                 b"version https://hawser.github.com/spec/v1\n")
#: git-lfs's spec: a pointer file is smaller than 1024 bytes.
_LFS_POINTER_MAX = 1024


def _refuse_lfs_pointer(plugin: str, commit: str, path: str, data: bytes) -> None:
    """Raise StagingError if ``data`` is a Git LFS pointer rather than the file it stands for.

    gitplug fetches git objects only, never LFS objects: a path that
    ``.gitattributes`` sends through ``filter=lfs`` holds a small pointer text in
    git, and serving it would serve that text in place of the image or archive.
    Recognised by the pointer format itself (git-lfs's spec: under 1024 bytes, the
    version line first, an ``oid sha256:`` line), so a file committed without LFS
    under a ``filter=lfs`` pattern (real content) still stages.
    """
    if len(data) >= _LFS_POINTER_MAX or not data.startswith(_LFS_VERSIONS):
        return
    if b"\noid sha256:" not in data:
        return
    raise StagingError(
        f"plugin {plugin!r}: commit {commit} holds {path!r} as a Git LFS pointer, and gitplug "
        "does not fetch LFS objects, so it would serve the pointer text instead of the file. "
        f"Keep it in git itself (`git lfs untrack '{path}'`, `git rm --cached '{path}'`, then "
        "`git add` and commit it again), or serve it from elsewhere.", plugin=plugin, commit=commit)


def _fold(name: str) -> str:
    return _IGNORABLE.sub("", name).rstrip(" .").lower()


def _link_escapes(link: tuple[str, ...], target: str,
                  targets: dict[tuple[str, ...], str]) -> str | None:
    """Why the symlink ``link -> target`` leaves the release, or None if it stays inside.

    Resolves like the kernel, following the tree's other symlinks, so a chain
    such as ``s -> .`` and ``t -> s/..`` is caught although each looks harmless.
    """
    if target.startswith("/"):
        return "is an absolute path"
    stack = list(link[:-1])
    pending = target.split("/")
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return "resolves outside the release"
            stack.pop()
            continue
        stack.append(part)
        next_target = targets.get(tuple(stack))
        if next_target is not None:
            hops += 1
            if hops > _MAX_HOPS:
                return "is a symlink loop"
            if next_target.startswith("/"):
                return "goes through a symlink to an absolute path"
            stack.pop()
            pending = next_target.split("/") + pending
    return None


def _write_file(path: Path | str, chunks: Iterable[bytes], *, executable: bool,
                sync: bool = False) -> int:
    """Create ``path`` (never through a symlink, never over a file), make it read-only.

    Returns the bytes written. No fsync unless ``sync``: staging syncs the
    finished tree once (:func:`_sync_tree`).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    written = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            written += len(view)
            while view:
                view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
        os.fchmod(fd, 0o555 if executable else 0o444)
    finally:
        os.close(fd)
    return written


def _make_parents(directory: str, made: set[str]) -> None:
    """``mkdir -p`` that remembers what exists, so a big tree costs one mkdir per directory."""
    if directory in made:
        return
    _make_parents(os.path.dirname(directory), made)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o755)
    made.add(directory)


#: Threads that create a release's files: file creation waits on the file system.
_WORKERS = 4
#: Blobs under this size are read whole and written by the pool.
_SMALL = 1024 * 1024
_BATCH_BYTES = 16 * MiB
_BATCH_FILES = 256


def _write_batch(batch: builtins.list[tuple[str, bytes, bool]]) -> None:
    for target, data, executable in batch:
        # No writeback started per file (sync_file_range): each one queued a
        # small I/O beside the next file creations (a first staging of 5,000
        # files took 0.34-0.61 s with it, 0.25 s without, alternating in one
        # process). The release's one syncfs writes the tree back (25-40 ms).
        _write_file(target, [data], executable=executable)


class _Linker:
    """Makes a release's hard links, a batch at a time, from several threads.

    Each ``(origin, target)`` is a link of ``origin``. Where ``origin`` has
    as many links as the file system allows (65,000 on ext4: an empty
    ``__init__.py`` shared by thousands of files across releases), the target
    is a copy of it instead, and that copy stands in for ``origin`` from then
    on: every later target of ``origin``, in any batch, links the copy, and the
    stager records the copy in the ledger as its blob's source for later
    releases. So a blob at the limit costs one copy, not one per file. The
    copy is made under a lock, so batches that hit the limit together make one
    (one more per 65,000 links, if a release alone fills the copy too).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: origin -> the copy standing in for it (the newest, if a copy reached the limit too)
        self.copies: dict[str, str] = {}

    def link_batch(self, batch: builtins.list[tuple[str, str, bool]]) -> None:
        """Link (or, at the limit, copy) each ``(origin, target, executable)``."""
        for origin, target, executable in batch:
            while True:
                source = self.copies.get(origin, origin)
                if _link(source, target):
                    break
                with self._lock:
                    if self.copies.get(origin, origin) == source:
                        with open(source, "rb") as handle:
                            _write_file(target, iter(lambda h=handle: h.read(CHUNK), b""),
                                        executable=executable)
                        self.copies[origin] = target
                        break
                # Another batch copied it meanwhile: link that copy.


def _link(source: str, target: str) -> bool:
    """Hard-link ``source`` (never through a symlink) as ``target``.

    False if ``source`` already has as many links as the file system allows
    (EMLINK): :class:`_Linker` then copies it, once.
    """
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EMLINK:
            return False
        raise
    return True


class _Shared:
    """The files one plugin's releases share, used under the plugin's lock.

    A release links every file whose blob (in the same mode) an earlier
    release of the plugin holds intact, and writes only the others. The
    ledger, ``releases/<plugin>/.ledger.json``, maps each shared inode to
    ``[blob id, ctime_ns, kind, path]``: the blob it holds, the ``ctime`` it
    had when last known to hold it, ``f`` or ``x``, and where to find it
    (``<commit>/<path>``, in the newest release holding it).

    Sharing inodes means a write to one link is a write to all, so nothing
    is linked on trust: a file is linked only if its inode and ``ctime`` are
    the ledger's (no write, chmod or rename since), else it is hashed, and
    one that does not hash to its blob is never linked again (every release
    holding it fails its manifest check). Linking and unlinking move an
    inode's ``ctime`` too: :meth:`renew` records the ``ctime`` each file
    vouched for in this session has after them, and the manifest check
    (:func:`gitplug.runtime.manifest.verify_release`) trusts the ledger's.

    Writes that race a session are out of reach of any check short of
    hashing every file, as for releases themselves (README "Security
    model"): the test gate's containment keeps tests from writing here.
    """

    def __init__(self, plugin_dir: Path) -> None:
        self._dir = str(plugin_dir)
        self.ledger = read_ledger(plugin_dir / LEDGER_NAME)
        self._loaded = {ino: list(entry) for ino, entry in self.ledger.items()}
        #: (blob, executable) -> inode, the newest entry of each
        self._by_key: dict[tuple[bytes, bool], str] = {}
        if not self.ledger:
            self._seed()
        for ino, entry in self.ledger.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                blob, _ctime, kind, _path = entry
                self._by_key[(blob.encode(), kind == "x")] = ino
        self._checked: dict[tuple[bytes, bool], tuple[str, os.stat_result] | None] = {}
        #: inode -> its entry: intact; its ctime is renewed
        self._vouched: dict[str, builtins.list[Any]] = {}
        #: True while links were made or removed since the last :meth:`renew`.
        self.stale = False

    def _seed(self) -> None:
        """No ledger (lost in a crash, releases staged before there was one): read manifests.

        Their files are candidates with an unknown ``ctime``, so each is
        hashed before it is linked, once; the ledger then vouches for it.
        """
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for release in sorted(os.listdir(self._dir)):
                if not _SHA.match(release):
                    continue
                try:
                    with open(f"{self._dir}/{release}/{METADATA_DIR}/{MANIFEST_NAME}",
                              "rb") as handle:
                        entries = json.loads(handle.read())["entries"]
                    for rel, (kind, _size, blob, ino, _ctime) in entries.items():
                        if kind in ("f", "x"):
                            self.ledger.setdefault(str(ino), [blob, -1, kind, f"{release}/{rel}"])
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    continue

    def check(self, sha: bytes, executable: bool) -> tuple[str, os.stat_result] | None:
        """``(path, lstat)`` of an intact earlier file of ``sha`` in that mode, or None."""
        key = (sha, executable)
        if key not in self._checked:
            self._checked[key] = self._check(key)
        return self._checked[key]

    def _check(self, key: tuple[bytes, bool]) -> tuple[str, os.stat_result] | None:
        ino = self._by_key.get(key)
        if ino is None:
            return None
        entry = self.ledger[ino]
        blob, ctime, _kind, rel = entry
        parts = str(rel).split("/")
        if not _SHA.match(parts[0]) or len(parts) < 2 or {"", ".", ".."} & set(parts):
            del self.ledger[ino]  # not a path inside a release: never followed
            return None
        path = f"{self._dir}/{rel}"
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            info = None
        if info is None or str(info.st_ino) != ino:
            # Its release is gone (or was replaced): another release may still hold it.
            return None
        intact = stat.S_ISREG(info.st_mode) and \
            stat.S_IMODE(info.st_mode) == (0o555 if key[1] else 0o444)
        if intact and info.st_ctime_ns != ctime:
            # Changed since the ledger saw it (a crash, a copied data_dir, a write): hash it.
            intact = git_blob_id(path) == blob
        if not intact:
            logger.warning("plugin releases %s: %s was modified on disk; no new release links "
                           "it, and the releases holding it fail their manifest check (README "
                           "\"Security model\")", self._dir, rel)
            del self.ledger[ino]
            return None
        self._vouched[ino] = entry
        return path, info

    def record(self, key: tuple[bytes, bool], rel: str, info: os.stat_result) -> None:
        """Note that ``rel`` (``<commit>/<path>``, ``lstat`` ``info``) holds ``key``'s blob.

        The inode recorded last for a blob is the one later stagings link.
        """
        ino = str(info.st_ino)
        entry = [key[0].decode(), info.st_ctime_ns, "x" if key[1] else "f", rel]
        # Moved to the end: the ledger's last entry of a blob is the one a new session links.
        self.ledger.pop(ino, None)
        self.ledger[ino] = self._vouched[ino] = entry
        self._by_key[key] = ino

    def renew(self) -> dict[tuple[bytes, bool], os.stat_result]:
        """Record the ``ctime`` each vouched file has now; return their ``lstat`` by key."""
        found: dict[tuple[bytes, bool], os.stat_result] = {}
        for ino, entry in list(self._vouched.items()):
            try:
                info = os.lstat(f"{self._dir}/{entry[3]}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            if str(info.st_ino) != ino:
                continue
            entry[1] = info.st_ctime_ns
            self.ledger[ino] = entry
            found[(entry[0].encode(), entry[2] == "x")] = info
        self.stale = False
        return found

    def vouch_all(self) -> None:
        """Vouch for every file the ledger vouches for (before unlinking releases)."""
        for ino, entry in self.ledger.items():
            try:
                info = os.lstat(f"{self._dir}/{entry[3]}")
            except (OSError, TypeError, IndexError):
                continue
            if str(info.st_ino) == ino and info.st_ctime_ns == entry[1]:
                self._vouched[ino] = entry
        self.stale = True

    def forget_missing(self) -> None:
        """After releases were removed: point entries at a release still holding the file.

        Another release's manifest says where it holds each inode; an inode
        no release holds any more leaves the ledger.
        """
        lost = {}
        for ino, entry in self.ledger.items():
            try:
                info = os.lstat(f"{self._dir}/{entry[3]}")
                if str(info.st_ino) == ino:
                    continue
            except (OSError, TypeError, IndexError):
                pass
            lost[ino] = entry
        if lost:
            found: dict[str, str] = {}
            with contextlib.suppress(FileNotFoundError):
                for release in sorted(os.listdir(self._dir)):
                    if not _SHA.match(release):
                        continue
                    try:
                        with open(f"{self._dir}/{release}/{METADATA_DIR}/{MANIFEST_NAME}",
                                  "rb") as handle:
                            entries = json.loads(handle.read())["entries"]
                    except (OSError, ValueError, KeyError, TypeError):
                        continue
                    for rel, item in entries.items():
                        if isinstance(item, list) and len(item) == 5 and str(item[3]) in lost:
                            found.setdefault(str(item[3]), f"{release}/{rel}")
            for ino, entry in lost.items():
                if ino in found:
                    entry[3] = found[ino]
                else:
                    del self.ledger[ino]
                    self._vouched.pop(ino, None)
        self.stale = True

    def close(self) -> None:
        """Renew what links moved since, and write the ledger if it changed."""
        if self.stale:
            self.renew()
        if self.ledger == self._loaded:
            return
        tmp = f"{self._dir}/.ledger-{secrets.token_hex(4)}"
        try:
            # No fsync: a ledger lost in a crash costs hashing, never safety.
            _write_file(tmp, [json.dumps({"format": 1, "inodes": self.ledger},
                                         separators=(",", ":")).encode()], executable=False)
            os.replace(tmp, f"{self._dir}/{LEDGER_NAME}")
        except OSError as exc:
            logger.warning("plugin releases %s: could not write the ledger (%s); shared "
                           "files will be hashed when checked", self._dir, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_LIBC: Any = None


def _sync_tree(root: Path) -> None:
    """Make everything under ``root`` durable in one call: ``syncfs`` where there is one.

    Elsewhere every file and directory is fsynced in one pass at the end
    (still far cheaper than an fsync after each write).
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    syncfs = getattr(_LIBC, "syncfs", None)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs is not None and syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                file_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(file_fd)
                finally:
                    os.close(file_fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete a release (read-only files, maybe read-only dirs): rename away, then rmtree.

    The rename first means a half-deleted release never sits under its name.
    """
    doomed = path
    if not path.name.startswith(".tmp-"):
        doomed = path.with_name(f".tmp-delete-{path.name}-{secrets.token_hex(4)}")
        os.rename(path, doomed)

    # Files need no chmod (unlink depends on the directory), but a directory
    # someone made read-only does: open every one up, top-down, first.
    os.chmod(doomed, 0o755)
    for root, dirs, _files in os.walk(doomed):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(doomed)


@contextlib.contextmanager
def _source_errors(plugin: str, commit: str) -> Iterator[None]:
    """A mirror that cannot be read while staging is a StagingError that says what to do."""
    try:
        yield
    except FetchError as exc:
        cause = str(exc).removeprefix(f"plugin {plugin!r}: ")
        raise StagingError(f"plugin {plugin!r}: could not stage {commit}: {cause}",
                           plugin=plugin, commit=commit) from exc


@contextlib.contextmanager
def _try_lock(lock: Path) -> Iterator[bool]:
    """Yield True if nobody holds ``lock`` (or it does not exist), holding it meanwhile."""
    try:
        handle = open(lock, "rb")
    except FileNotFoundError:
        yield True
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
