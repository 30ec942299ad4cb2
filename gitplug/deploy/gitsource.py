"""The git source: fetch plugin repositories into local mirrors and read them.

The fetch and resolve steps of the pipeline. Each repository URL gets one
bare *mirror* under ``mirrors_dir`` whose branches and tags equal the
remote's after every :meth:`GitSource.fetch` (a deleted branch disappears, a
force-pushed branch or moved tag follows). Everything else reads the mirror
only, so rollbacks and restarts work while the git server is down.

Transports (dulwich): a local path, ``file://``, ``http(s)://``, ``git://``,
``ssh://`` and scp-like ``user@host:path`` (through the ``ssh`` binary).

Timeouts: ``timeout`` bounds every HTTP connect and read (urllib3); for ssh
it is ``ConnectTimeout`` plus a keep-alive that drops a silent server (unless
``GIT_SSH_COMMAND`` is set). Local paths and ``git://`` have none in dulwich.

Fetches into one mirror are serialised (threads and processes) by ``flock``
on ``<mirror>.lock``; readers take no lock, as dulwich writes atomically.
Every failure is a FetchError or RefNotFound naming plugin, URL, ref, cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import urllib3
from dulwich import client as dulwich_client
from dulwich import errors as dulwich_errors
from dulwich.client import get_transport_and_path
from dulwich.objects import Commit, Tag, parse_tree
from dulwich.refs import check_ref_format
from dulwich.repo import Repo

from gitplug.errors import FetchError, RefNotFound, SourceError, redact_url

__all__ = ["CommitInfo", "GitSource", "ResolvedRef", "TreeEntry", "MODE_GITLINK", "MODE_LINK"]

logger = logging.getLogger(__name__)

MODE_TREE = 0o040000
MODE_LINK = 0o120000
MODE_GITLINK = 0o160000

_HINT = "Check that the repository exists and this host can reach it."
_EMPTY = "the repository {url} is empty (no branches or tags). Push a commit to it."
_HEX = re.compile(r"^[0-9a-f]+$")
_MIRRORED = (b"refs/heads/", b"refs/tags/")
_E = TypeVar("_E", bound=SourceError)

#: What dulwich, urllib3 and the OS raise for an unreachable or unreadable
#: repository. Kept explicit (no bare ``except Exception``) so programming
#: errors still surface as themselves.
_GIT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, urllib3.exceptions.HTTPError,
    dulwich_errors.GitProtocolError, dulwich_errors.NotGitRepository,
    dulwich_errors.ChecksumMismatch, dulwich_errors.FileFormatException,
    dulwich_errors.ObjectMissing, dulwich_errors.ApplyDeltaError,
    dulwich_errors.WrongObjectException, dulwich_errors.RefFormatError,
    dulwich_client.HTTPUnauthorized, dulwich_client.HTTPProxyUnauthorized,
    dulwich_client.StrangeHostname,
)
_CAUSES = ((dulwich_errors.NotGitRepository, "no git repository there"),
           (dulwich_errors.HangupException, "the remote end hung up"),
           (dulwich_client.HTTPUnauthorized, "authentication required (HTTP 401)"))


@dataclass(frozen=True)
class CommitInfo:
    """What the pipeline records about a commit; ``message`` is whole, minus the last newline."""

    sha: str
    tree: str
    author: str
    message: str
    committed_at: datetime  # UTC

    @property
    def summary(self) -> str:
        """The first line of the message."""
        return self.message.split("\n", 1)[0].strip()


@dataclass(frozen=True)
class ResolvedRef:
    """A ref as the user wrote it, and the commit it names right now."""

    ref: str
    commit: str
    kind: Literal["branch", "tag", "commit"]


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One non-tree entry of a commit's tree: path from the root, git mode, hex sha (bytes)."""

    path: bytes
    mode: int
    sha: bytes


class GitSource:
    """Mirrors of plugin repositories under ``mirrors_dir``; see the module docstring."""

    def __init__(self, mirrors_dir: Path, *, timeout: float = 60.0) -> None:
        self.mirrors_dir = Path(mirrors_dir)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"GitSource({str(self.mirrors_dir)!r}, timeout={self.timeout:g})"

    def mirror_path(self, url: str) -> Path:
        """The bare mirror's directory for ``url``: a readable slug plus a short hash.

        Equal for spellings of one URL (a path and its ``file://`` URL, a
        trailing slash, the host's case); never contains a password.
        """
        key = normalise_url(url)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", key.split("://", 1)[-1]).strip("-.")[-48:]
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.mirrors_dir / f"{slug.strip('-.') or 'repo'}-{digest}.git"

    def remote_refs(self, plugin: str, url: str) -> dict[str, str]:
        """List the remote's branches, tags and HEAD (``git ls-remote``).

        Annotated tags map to their commit (peeled) as the server reports it,
        which every smart server does; a local repository is peeled directly.
        Raises FetchError, also for an empty repository.
        """
        with self._wrap(plugin, url, None, "could not list the refs of"), \
                self._client(url) as (client, path):
            raw = {k: v for k, v in client.get_refs(path).refs.items() if v is not None}
            kept = _branches_and_tags(raw)
            if not kept:
                raise _error(FetchError, plugin, url, None, _EMPTY)
            kept.update({b"HEAD": raw[b"HEAD"]} if b"HEAD" in raw else {})
            refs = {name.decode(): raw.get(name + b"^{}", sha).decode()
                    for name, sha in kept.items()}
            kind, location = classify_url(url)
            if kind == "local":
                with Repo(location) as repo:
                    refs = {k: _peel(repo, v.encode()).id.decode() for k, v in refs.items()}
        return refs

    def fetch(self, plugin: str, url: str, *, want: str | None = None) -> None:
        """Bring the mirror of ``url`` up to date with the remote's branches and tags.

        Creates the mirror on first use. Asks the remote for its refs first
        and transfers objects only if some ref names an object the mirror
        lacks; the mirror's refs are then rewritten to equal the remote's
        (stale ones removed). Raises FetchError, also for an empty repository.

        ``want`` (a full hex sha) is fetched too although no ref names it
        yet: the push remote deploys a pushed commit before its branch moves.
        The repository may then be otherwise empty (the first push).
        """
        with self._wrap(plugin, url, None, "could not fetch"), self._mirror_lock(plugin, url), \
                self._open_or_init_mirror(self.mirror_path(url)) as repo, \
                self._client(url) as (client, path):
            listing = client.get_refs(path)
            refs, symrefs = _branches_and_tags(listing.refs), listing.symrefs
            extra = [want.encode()] if want and want.encode() not in repo.object_store else []
            if extra or any(sha not in repo.object_store for sha in refs.values()):
                logger.info("plugin %s: fetching %s", plugin, redact_url(url))

                def wants(remote: Any, depth: Any = None) -> list[bytes]:
                    tips = set(_branches_and_tags(remote).values()) | set(extra)
                    return [sha for sha in tips if sha not in repo.object_store]

                result = client.fetch(path, repo, determine_wants=wants)
                refs, symrefs = _branches_and_tags(result.refs), result.symrefs
            if not refs and not want:
                raise _error(FetchError, plugin, url, None, _EMPTY)
            absent = [r.decode() for r, sha in refs.items() if sha not in repo.object_store]
            if absent:
                raise _error(FetchError, plugin, url, None, "fetch of {url} left refs without "
                             f"their objects ({', '.join(absent[:5])}). Retry; if it persists, "
                             f"delete {self.mirror_path(url)} so it is fetched afresh.")
            self._write_refs(repo, refs, symrefs)

    def resolve(self, plugin: str, url: str, ref: str) -> ResolvedRef:
        """Resolve ``ref`` to a commit against the mirror only (no network).

        Tried in order: a full sha; a full ref name (``refs/heads/x``); ``HEAD``;
        ``refs/heads/<ref>``; ``refs/tags/<ref>`` (annotated tags peeled); an
        abbreviated sha of at least 7 hex digits naming exactly one commit.
        Raises RefNotFound naming plugin, URL and ref with some of the
        available branches and tags; FetchError if the mirror does not exist.
        """
        ref = ref.strip()
        with self._open_mirror(plugin, url, ref) as repo:
            refs = {k: v for k, v in repo.get_refs().items() if k.startswith(_MIRRORED)}
            lowered = ref.lower()
            if len(ref) == 40 and _HEX.match(lowered) and lowered.encode() in repo.object_store:
                commit = self._commit_of(repo, plugin, url, ref, lowered.encode())
                return ResolvedRef(ref, commit, "commit")
            if not refs:
                raise _error(RefNotFound, plugin, url, ref, f"ref {ref!r} not found: {_EMPTY}")
            if ref == "HEAD" or ref.startswith("refs/"):
                kind: Literal["branch", "tag"] = "tag" if ref.startswith("refs/tags/") else "branch"
                names = [(ref.encode(), kind)]
            else:
                names = [(b"refs/heads/" + ref.encode(), "branch"),
                         (b"refs/tags/" + ref.encode(), "tag")]
            # Validated first: a name like "refs/../config" must never reach the disk.
            found = [(name, kind) for name, kind in names
                     if (name == b"HEAD" or check_ref_format(name)) and name in repo.refs]
            if len(found) == 2:
                logger.warning("plugin %s: %r is both a branch and a tag in %s; using the branch",
                               plugin, ref, redact_url(url))
            if found:
                commit = self._commit_of(repo, plugin, url, ref, repo.refs[found[0][0]])
                return ResolvedRef(ref, commit, found[0][1])
            if 7 <= len(ref) < 40 and _HEX.match(lowered):
                return ResolvedRef(ref, self._by_prefix(repo, plugin, url, ref), "commit")
            raise self._not_found(repo, plugin, url, ref)

    def commit_info(self, url: str, sha: str, *, plugin: str = "") -> CommitInfo:
        """Author, message, tree and time of commit ``sha``. Raises RefNotFound if absent."""
        with self._open_mirror(plugin, url, sha) as repo:
            commit = self._get_commit(repo, plugin, url, sha)
            return CommitInfo(commit.id.decode(), commit.tree.decode(),
                              commit.author.decode("utf-8", "replace"),
                              commit.message.decode("utf-8", "replace").rstrip("\n"),
                              datetime.fromtimestamp(commit.commit_time, tz=timezone.utc))

    def iter_tree(self, url: str, sha: str, *, plugin: str = "") -> Iterator[TreeEntry]:
        """Every non-tree entry of commit ``sha``'s tree, recursively, in tree order.

        Entries are reported verbatim, even those git would refuse (``..``,
        duplicate names, a ``/`` inside a name): validating them is the
        stager's job. Submodules come with mode ``MODE_GITLINK``.
        """
        with self._open_mirror(plugin, url, sha) as repo:
            yield from self._walk(repo, b"", self._get_commit(repo, plugin, url, sha).tree)

    def _walk(self, repo: Repo, prefix: bytes, tree_sha: bytes) -> Iterator[TreeEntry]:
        # Errors surface through _open_mirror's wrapper as FetchError.
        # parse_tree keeps duplicate names; Tree.iteritems() would merge them.
        for name, mode, child in parse_tree(_raw(repo, tree_sha, 2), 20):
            if mode == MODE_TREE:
                yield from self._walk(repo, prefix + name + b"/", child)
            else:
                yield TreeEntry(prefix + name, mode, child)

    def read_blob(self, url: str, blob_sha: bytes, *, plugin: str = "") -> bytes:
        """The contents of blob ``blob_sha`` (hex, as in :class:`TreeEntry`)."""
        with contextlib.closing(self.read_blobs(url, [blob_sha], plugin=plugin)) as blobs:
            return next(blobs)

    def read_blobs(self, url: str, blob_shas: Iterable[bytes], *, plugin: str = ""
                   ) -> Iterator[bytes]:
        """The contents of each blob in ``blob_shas``, in order, opening the mirror once."""
        with self._open_mirror(plugin, url, None) as repo:
            for blob_sha in blob_shas:
                yield _raw(repo, blob_sha, 3)

    def tags(self, plugin: str, url: str) -> list[tuple[str, str, int]]:
        """``(tag, commit sha, commit time)`` of the mirror's tags, newest commit first.

        Reads the local mirror only; FetchError before the first fetch.
        """
        found = []
        with self._open_mirror(plugin, url, None) as repo:
            for name, sha in repo.refs.as_dict(b"refs/tags").items():
                obj = _peel(repo, sha)
                if isinstance(obj, Commit):
                    found.append((name.decode(), obj.id.decode(), obj.commit_time))
        return sorted(found, key=lambda tag: tag[2], reverse=True)

    def has_commit(self, url: str, sha: str) -> bool:
        """Whether the mirror holds commit ``sha`` (full hex). Never raises."""
        if len(sha) != 40 or not _HEX.match(sha):
            return False
        try:
            with self._open_mirror("", url, sha) as repo:
                return isinstance(repo.object_store[sha.encode()], Commit)
        except FetchError:  # no mirror, or an unreadable one
            return False

    # -- internals ------------------------------------------------------------

    @contextlib.contextmanager
    def _wrap(self, plugin: str, url: str, ref: str | None, doing: str) -> Iterator[None]:
        """Turn dulwich/OS/HTTP errors raised in the block into FetchError."""
        try:
            yield
        except _GIT_ERRORS as exc:  # our own FetchError/RefNotFound are not among them
            at = f" (ref {ref!r})" if ref else ""
            raise _error(FetchError, plugin, url, ref,
                         f"{doing} {{url}}{at}: {self._cause(exc)}. {_HINT}") from exc

    def _cause(self, exc: BaseException) -> str:
        chain: BaseException | None = exc
        while chain is not None:  # urllib3 errors arrive wrapped in GitProtocolError
            reason = getattr(chain, "reason", None) or chain
            if isinstance(reason, urllib3.exceptions.NewConnectionError):
                return f"could not connect ({str(reason).rsplit(': ', 1)[-1]})"
            if isinstance(reason, TimeoutError | urllib3.exceptions.TimeoutError):
                return f"timed out after {self.timeout:g}s"
            chain = chain.__cause__ or chain.__context__
        for cls, cause in _CAUSES:
            if isinstance(exc, cls):
                return cause
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    @contextlib.contextmanager
    def _client(self, url: str) -> Iterator[tuple[Any, str]]:
        kind, location = classify_url(url)
        kwargs: dict[str, Any] = {}
        pool = None
        if kind == "http":
            pool = dulwich_client.default_urllib3_manager(None, base_url=location,
                                                          timeout=self.timeout)
            # One retry at most, so a dead server fails within ~2x the timeout.
            pool.connection_pool_kw["retries"] = urllib3.Retry(total=1, redirect=5)
            kwargs["pool_manager"] = pool
        elif kind == "ssh" and not os.environ.get("GIT_SSH_COMMAND"):
            # No password prompts; give up on a silent server after about `timeout`.
            wait = max(1.0, self.timeout)
            kwargs["ssh_command"] = (f"ssh -o BatchMode=yes -o ConnectTimeout={wait:.0f} -o "
                                     f"ServerAliveInterval={max(1.0, wait / 3):.0f} -o "
                                     "ServerAliveCountMax=3")
        client, path = get_transport_and_path(location, **kwargs)
        try:
            yield client, path
        finally:
            client.close()
            if pool is not None:
                pool.clear()

    @contextlib.contextmanager
    def _mirror_lock(self, plugin: str, url: str) -> Iterator[None]:
        self.mirrors_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.mirror_path(url).with_suffix(".lock")
        deadline = time.monotonic() + self.timeout * 2  # a fetch may take a while
        with open(lock_path, "a+b") as handle:  # closing it releases the lock
            while True:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                if time.monotonic() > deadline:
                    raise _error(FetchError, plugin, url, None, "another fetch of {url} into "
                                 f"{lock_path.with_suffix('.git')} is still running. Retry "
                                 "later.")
                time.sleep(0.05)
            yield

    @staticmethod
    def _open_or_init_mirror(mirror: Path) -> Repo:
        if mirror.is_dir():
            try:
                return Repo(str(mirror))
            except dulwich_errors.NotGitRepository:
                # A crash during init; nothing of value can be in it.
                logger.warning("mirror %s is not a git repository; recreating it", mirror)
                shutil.rmtree(mirror)
        return Repo.init_bare(str(mirror), mkdir=True)

    @contextlib.contextmanager
    def _open_mirror(self, plugin: str, url: str, ref: str | None) -> Iterator[Repo]:
        with self._wrap(plugin, url, ref, "could not read the mirror of"):
            mirror = self.mirror_path(url)
            if not mirror.is_dir():
                raise _error(FetchError, plugin, url, ref, "{url} has not been fetched yet (no "
                             f"mirror at {mirror}). Fetch it first.")
            with Repo(str(mirror)) as repo:
                yield repo

    def _write_refs(self, repo: Repo, refs: dict[bytes, bytes], symrefs: dict[bytes, bytes]
                    ) -> None:
        current = {k: v for k, v in repo.get_refs().items() if k.startswith(_MIRRORED)}
        for name, sha in refs.items():
            if current.get(name) != sha:
                repo.refs[name] = sha
        for name in current.keys() - refs.keys():
            repo.refs.remove_if_equals(name, None)
        head = symrefs.get(b"HEAD")
        if head is not None and head in refs:
            repo.refs.set_symbolic_ref(b"HEAD", head)

    def _commit_of(self, repo: Repo, plugin: str, url: str, ref: str, sha: bytes) -> str:
        obj = _peel(repo, sha)
        if not isinstance(obj, Commit):
            raise _error(RefNotFound, plugin, url, ref, f"ref {ref!r} of {{url}} names a "
                         f"{obj.type_name.decode()}, not a commit. Use a branch, a tag of a "
                         "commit or a commit sha.")
        return obj.id.decode()

    def _by_prefix(self, repo: Repo, plugin: str, url: str, ref: str) -> str:
        prefix = ref.lower().encode()
        # Only commits count, as in ``git rev-parse <prefix>^{commit}``.
        commits = sorted(sha.decode() for sha in repo.object_store if sha.startswith(prefix)
                         and isinstance(repo.object_store[sha], Commit))
        if len(commits) == 1:
            return commits[0]
        if commits:
            raise _error(RefNotFound, plugin, url, ref, f"ref {ref!r} is ambiguous in {{url}}: "
                         f"it abbreviates {len(commits)} commits ({', '.join(commits[:5])}). "
                         "Give more hex digits of the sha.")
        raise self._not_found(repo, plugin, url, ref)

    def _not_found(self, repo: Repo, plugin: str, url: str, ref: str) -> RefNotFound:
        return _error(RefNotFound, plugin, url, ref, f"ref {ref!r} names no branch, tag or "
                      f"commit in {{url}}. {_available(repo.get_refs())} Use a branch, a tag "
                      "or a commit sha (at least 7 hex digits).")

    def _get_commit(self, repo: Repo, plugin: str, url: str, sha: str) -> Commit:
        obj = None  # dulwich asserts on a malformed sha, so check its shape first
        if len(sha) == 40 and _HEX.match(sha) and sha.encode() in repo.object_store:
            obj = repo.object_store[sha.encode()]
        if not isinstance(obj, Commit):
            raise _error(RefNotFound, plugin, url, sha, f"commit {sha!r} is not in the mirror "
                         "of {url}. Fetch the repository, then resolve the ref again.")
        return obj


def _error(cls: type[_E], plugin: str, url: str, ref: str | None, text: str) -> _E:
    """``cls`` with a message that starts with the plugin and shows the URL password-free."""
    who = f"plugin {plugin!r}: " if plugin else ""
    return cls(who + text.replace("{url}", redact_url(url), 1), plugin=plugin, url=url, ref=ref)


def _raw(repo: Repo, sha: bytes, type_num: int) -> bytes:
    """The raw contents of object ``sha``, which must be of type ``type_num`` (2 tree, 3 blob)."""
    actual, data = repo.object_store.get_raw(sha)
    if actual != type_num:
        raise ValueError(f"object {sha.decode()} has type {actual}, expected {type_num}")
    return data


def _peel(repo: Repo, sha: bytes) -> Any:
    """The object ``sha`` names, with annotated tags (also tags of tags) peeled off."""
    obj = repo.object_store[sha]
    while isinstance(obj, Tag):  # the object graph is a DAG: this ends
        obj = repo.object_store[obj.object[1]]
    return obj


def _branches_and_tags(refs: Any) -> dict[bytes, bytes]:
    """The refs a mirror keeps: valid branch and tag names, no peeled ``^{}`` entries."""
    return {name: sha for name, sha in refs.items()
            if sha is not None and name.startswith(_MIRRORED) and check_ref_format(name)}


def _available(refs: Any, limit: int = 8) -> str:
    """A short "available branches/tags" sentence for RefNotFound messages."""
    parts = []
    for prefix, label in ((b"refs/heads/", "branches"), (b"refs/tags/", "tags")):
        names = sorted(n[len(prefix):].decode() for n in refs if n.startswith(prefix))
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        parts += [f"{label}: {', '.join(names[:limit])}{more}"] if names else []
    return f"Available {'; '.join(parts)}." if parts else "It has no branches or tags."


# -- URLs ----------------------------------------------------------------------

_SCP = re.compile(r"^(?:[^@/]+@)?[^:/]+:")
_SCHEMES: dict[str, Literal["local", "http", "ssh", "git"]] = {
    "file": "local", "http": "http", "https": "http", "ssh": "ssh", "git+ssh": "ssh", "git": "git"}


def classify_url(url: str) -> tuple[Literal["local", "http", "ssh", "git"], str]:
    """``(kind, location)``: the transport for ``url`` and what to hand dulwich.

    Paths and ``file://`` become absolute paths; ``host:path`` with no slash
    before the colon is scp-like ssh, as in git. ValueError for other schemes.
    """
    url = url.strip()
    if not url:
        raise ValueError("the repository URL is empty")
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        kind = _SCHEMES.get(scheme)
        if kind is None:
            raise ValueError(f"unsupported URL scheme {scheme!r} (use a path, file://, "
                             "http(s)://, ssh:// or user@host:path)")
        if kind == "local":
            return kind, os.path.abspath(os.path.expanduser(unquote(urlsplit(url).path)))
        return kind, url
    if url.startswith(("/", ".", "~")) or not _SCP.match(url):
        return "local", os.path.abspath(os.path.expanduser(url))
    return "ssh", url


def normalise_url(url: str) -> str:
    """One spelling per repository, without any password: the mirror's identity."""
    kind, location = classify_url(url)
    if kind == "local":
        return "file://" + location.rstrip("/")
    if "://" not in location:  # scp form
        return location.rstrip("/")
    parts = urlsplit(location)
    host = (parts.hostname or "").lower()
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, ""))
