"""The git source: fetch plugin repositories into local mirrors and read them.

The fetch and resolve steps of the pipeline. Each repository URL gets one
bare *mirror* under ``mirrors_dir`` whose branches and tags equal the
remote's after every :meth:`GitSource.fetch` (a deleted branch disappears, a
force-pushed branch or moved tag follows). Everything else reads the mirror
only, so rollbacks and restarts work while the git server is down.

Transports (dulwich): a local path, ``file://``, ``http(s)://``, ``git://``,
``ssh://`` and scp-like ``user@host:path`` (through the ``ssh`` binary).

Deadlines: ``timeout`` bounds every network wait. HTTP: each connect and
each read (urllib3), never retried, so a silent server fails after
``timeout`` seconds, as the error says. ``git://``: each connect and each
read of the connection's socket (dulwich sets none). ssh: ``ConnectTimeout``
plus a keep-alive that drops a silent server. Local paths need none.

SSH runs ``$GIT_SSH_COMMAND`` (split like a shell would, never run by one),
else ``$GIT_SSH``, else ``ssh``, always with gitplug's own options appended:
``BatchMode=yes`` (no password or host-key prompt: an unknown host key fails
at once) and the deadlines above. ssh takes the first value given for an
option, so an option the command sets itself (its own ``ConnectTimeout``)
wins over gitplug's default. See :func:`ssh_command`.

Bounded memory: dulwich inflates whole objects in memory (a local fetch of a
600 MiB blob costs about twice that, a loose object over 512 MiB fails in
zlib). Where the ``git`` command is installed, local, HTTP(S) and (with a
``credentials:`` entry) SSH repositories are fetched with ``git fetch`` (a
child process with a deadline, an argument list and a scrubbed
environment; over HTTP a stall deadline too, and credentials through an
askpass helper, never in the arguments), after dulwich listed the refs.
Other network fetches (``git://``, SSH without an entry, a pushed commit
no ref names yet) keep dulwich's transport and deadlines but hand each
chunk of the pack to ``git index-pack --stdin --fix-thin`` as it arrives.
Blobs are sized with ``git cat-file
--batch-check`` and streamed with ``git cat-file --batch``, so the server
never holds a whole blob. Without ``git``, sizes come from the object
headers (loose objects: the first inflated bytes; packs: the entry header
and a delta's target size) and a blob is read whole only once its size is
known to be within the caller's limit.

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
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import types
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
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

from gitplug.errors import FetchError, RefNotFound, SourceError, StagingError, redact_url

from ..config import Credential
from . import credentials as creds

__all__ = ["CommitInfo", "GitSource", "ResolvedRef", "TagRef", "TreeEntry", "MODE_GITLINK", "MODE_LINK", "ssh_command"]

logger = logging.getLogger(__name__)

#: One tree object (one directory's listing) is parsed whole. Past this size, about
#: 200,000 entries with long names, it is refused from its header, before inflating:
#: a push of a few KiB can hold a tree that inflates to gigabytes.
MAX_TREE_OBJECT = 64 * 1024 * 1024
#: Directories nested deeper are refused (the deepest path a kernel opens is ~2,000
#: one-letter directories; git itself stops at core.maxTreeDepth, 2048 or 4096).
MAX_TREE_DEPTH = 1024

MODE_TREE = 0o040000
MODE_LINK = 0o120000
MODE_GITLINK = 0o160000

_HINT = "Check that the repository exists and this host can reach it."
_AUTH_HINT = ("Check the credentials gitplug sends for this URL (the `credentials:` entry "
              "whose prefix matches it, or the user and password in the URL) and that they "
              "may read the repository.")
_HTTP_STATUS = re.compile(r"unexpected http resp (\d{3})")
_EMPTY = "the repository {url} is empty (no branches or tags). Push a commit to it."
_HEX = re.compile(r"^[0-9a-f]+$")
_MIRRORED = (b"refs/heads/", b"refs/tags/")
#: Where ``git fetch`` puts what it fetched, before the mirror's refs are rewritten.
_GIT_FETCH_NS = b"refs/gitplug-fetch/"
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
    # A damaged or hostile object store: dulwich lets these through as they are.
    zlib.error, struct.error, EOFError, AssertionError, IndexError,
)
#: Bytes read from a blob in one go when streaming it.
CHUNK = 1024 * 1024
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
class TagRef:
    """A tag of the mirror: the object its ref names, and whether that is an annotated tag."""

    sha: str
    tag: bool  #: False: a lightweight tag (the ref names the commit: nothing signed)


@dataclass(frozen=True, slots=True)
class TreeEntry:
    """One non-tree entry of a commit's tree: path from the root, git mode, hex sha (bytes)."""

    path: bytes
    mode: int
    sha: bytes


class GitSource:
    """Mirrors of plugin repositories under ``mirrors_dir``; see the module docstring."""

    def __init__(self, mirrors_dir: Path, *, timeout: float = 60.0,
                 git_command: str | None | bool = True,
                 credentials: Callable[[], Iterable[Credential]] | None = None) -> None:
        """``git_command``: True finds ``git`` on PATH; a path uses it; None/False never does.

        ``credentials``: returns the ``credentials:`` entries, read at every
        network use (so a reload that rotates them applies to the next fetch).
        """
        self.mirrors_dir = Path(mirrors_dir)
        self.timeout = timeout
        self._credentials = credentials or (lambda: ())
        if git_command is True:
            git_command = shutil.which("git")
        self.git_command: str | None = git_command or None

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
                self._client(url, plugin) as (client, path):
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
                self._client(url, plugin) as (client, path):
            listing = client.get_refs(path)
            refs, symrefs = _branches_and_tags(listing.refs), listing.symrefs
            extra = [want.encode()] if want and want.encode() not in repo.object_store else []
            if extra or any(sha not in repo.object_store for sha in refs.values()):
                logger.info("plugin %s: fetching %s", plugin, redact_url(url))

                kind, location = classify_url(url)
                via_git = kind in ("local", "http") or (
                    kind == "ssh" and self.credential_for(url) is not None)
                if via_git and self.git_command and not extra:
                    # dulwich inflates every object it fetches in memory (a 600 MiB
                    # blob costs twice that); git streams it into a pack. (A ``want``
                    # comes from the push remote, bounded by push_max_size.)
                    self._git_fetch(plugin, url, location, repo, kind)
                    repo.object_store._update_pack_cache()  # see the new pack
                    fetched = {k: v for k, v in repo.get_refs().items()
                               if k.startswith(_GIT_FETCH_NS)}
                    refs = _branches_and_tags({b"refs/" + k[len(_GIT_FETCH_NS):]: v
                                               for k, v in fetched.items()})
                    for name in fetched:
                        repo.refs.remove_if_equals(name, None)
                else:
                    def wants(remote: Any, depth: Any = None) -> list[bytes]:
                        tips = set(_branches_and_tags(remote).values()) | set(extra)
                        return [sha for sha in tips if sha not in repo.object_store]

                    # git://, ssh without an entry, a pushed ``want``.
                    result = self._fetch_objects(plugin, url, client, path, repo, wants)
                    refs, symrefs = _branches_and_tags(result.refs), result.symrefs
            if not refs and not want:
                raise _error(FetchError, plugin, url, None, _EMPTY)
            absent = [r.decode() for r, sha in refs.items() if sha not in repo.object_store]
            if absent:
                raise _error(FetchError, plugin, url, None, "fetch of {url} left refs without "
                             f"their objects ({', '.join(absent[:5])}). Retry; if it persists, "
                             f"delete {self.mirror_path(url)} so it is fetched afresh.")
            self._write_refs(repo, refs, symrefs)

    def fetch_into(self, plugin: str, url: str, repo_path: Path, *, password: str | None = None
                   ) -> dict[bytes, bytes]:
        """Fetch into the bare repository ``repo_path`` what ``url``'s branches and tags name.

        Only objects it lacks are transferred (none when it has them all);
        its refs are left as they are. Returns ``url``'s branches and tags
        (``{b"refs/heads/main": sha}``). ``password`` is the HTTP password
        (the push remote of another host). Deadlines and errors as
        :meth:`fetch`: raises FetchError naming ``url`` without a password.
        """
        with self._wrap(plugin, url, None, "could not fetch"), \
                Repo(str(repo_path)) as repo, \
                self._client(url, plugin, password=password) as (client, path):
            def wants(remote: Any, depth: Any = None) -> list[bytes]:
                tips = set(_branches_and_tags(remote).values())
                return [sha for sha in tips if sha not in repo.object_store]

            result = self._fetch_objects(plugin, url, client, path, repo, wants)
            refs = _branches_and_tags(result.refs)
            absent = [r.decode() for r, sha in refs.items() if sha not in repo.object_store]
            if absent:
                raise _error(FetchError, plugin, url, None, "fetch of {url} left refs without "
                             f"their objects ({', '.join(absent[:5])}); fetch again")
            return refs

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

    def iter_tree(self, url: str, sha: str, *, plugin: str = "", tree: str | None = None
                  ) -> Iterator[TreeEntry]:
        """Every non-tree entry of commit ``sha``'s tree, recursively, in tree order.

        With ``tree`` (a tree id from :meth:`subtree`), that tree is walked
        instead and paths are relative to it. Entries are reported verbatim,
        even those git would refuse (``..``, duplicate names, a ``/`` inside a
        name): validating them is the stager's job. Submodules come with mode
        ``MODE_GITLINK``.
        """
        with self._open_mirror(plugin, url, sha) as repo:
            root = tree.encode() if tree else self._get_commit(repo, plugin, url, sha).tree
            yield from self._walk(repo, root, plugin=plugin, commit=sha)

    def subtree(self, url: str, sha: str, path: str, *, plugin: str = "") -> str | None:
        """The tree id of directory ``path`` (``a/b``, no ``.``/``..``) in commit ``sha``.

        None when the commit has no directory there (missing, or a file).
        Two commits whose subtree ids are equal hold the same files under
        ``path``: that is how a monorepo plugin knows a push did not touch it.
        """
        with self._open_mirror(plugin, url, sha) as repo:
            tree = self._get_commit(repo, plugin, url, sha).tree
            walked = b""
            for part in path.split("/"):
                listing = self._tree_raw(repo, tree, walked, plugin, sha)
                found = [(mode, child) for name, mode, child in parse_tree(listing, 20)
                         if name == os.fsencode(part)]
                if len(found) != 1 or found[0][0] != MODE_TREE:
                    return None
                tree = found[0][1]
                walked += os.fsencode(part) + b"/"
            return tree.decode()

    def entries(self, url: str, sha: str, path: str, *, plugin: str = "") -> dict[str, tuple[int, str]]:
        """``{name: (git mode, object id)}`` directly inside directory ``path`` ("" for the root).

        Empty when the commit has no directory there.
        """
        tree = self.subtree(url, sha, path, plugin=plugin) if path else None
        with self._open_mirror(plugin, url, sha) as repo:
            root = tree.encode() if tree else self._get_commit(repo, plugin, url, sha).tree
            if path and tree is None:
                return {}
            listing = self._tree_raw(repo, root, os.fsencode(path + "/") if path else b"", plugin, sha)
            return {os.fsdecode(name): (mode, child.decode()) for name, mode, child in parse_tree(listing, 20)}

    def directories(self, url: str, sha: str, path: str, *, plugin: str = "") -> list[str]:
        """The names of the directories directly inside ``path`` ("" for the root)."""
        return [name for name, (mode, _id) in self.entries(url, sha, path, plugin=plugin).items()
                if mode == MODE_TREE]

    def _walk(self, repo: Repo, root: bytes, *, plugin: str, commit: str) -> Iterator[TreeEntry]:
        """Depth first, in tree order, with an explicit stack: a hostile nesting cannot
        exhaust Python's recursion, and each tree object is sized from its header
        before it is inflated (it is parsed whole)."""
        # Errors surface through _open_mirror's wrapper as FetchError.
        # parse_tree keeps duplicate names; Tree.iteritems() would merge them.
        stack = [(b"", iter(parse_tree(self._tree_raw(repo, root, b"", plugin, commit), 20)))]
        while stack:
            prefix, listing = stack[-1]
            entry = next(listing, None)
            if entry is None:
                stack.pop()
                continue
            name, mode, child = entry
            if mode != MODE_TREE:
                yield TreeEntry(prefix + name, mode, child)
                continue
            path = prefix + name + b"/"
            if len(stack) >= MAX_TREE_DEPTH:
                raise StagingError(
                    f"plugin {plugin!r}: refusing to stage commit {commit}: directory "
                    f"{os.fsdecode(path)!r} is nested more than {MAX_TREE_DEPTH} levels deep. Flatten "
                    "it in the plugin's repository and push again.", plugin=plugin, commit=commit)
            stack.append((path, iter(parse_tree(self._tree_raw(repo, child, path, plugin, commit), 20))))

    @staticmethod
    def _tree_raw(repo: Repo, tree: bytes, path: bytes, plugin: str, commit: str) -> bytes:
        size = _object_size(repo, tree, 2)
        if size > MAX_TREE_OBJECT:
            where = repr(os.fsdecode(path)) if path else "the root directory"
            raise StagingError(
                f"plugin {plugin!r}: refusing to stage commit {commit}: the listing of {where} "
                f"(tree {tree.decode()}) is {size} bytes, over the limit of {MAX_TREE_OBJECT >> 20} "
                "MiB for one directory. Split that directory into several in the plugin's "
                "repository and push again.", plugin=plugin, commit=commit)
        return _raw(repo, tree, 2)

    def read_blob(self, url: str, blob_sha: bytes, *, plugin: str = "") -> bytes:
        """The contents of blob ``blob_sha`` (hex, as in :class:`TreeEntry`).

        Whole, in memory: for small blobs (symlink targets) whose size the
        caller checked with :meth:`blob_sizes`.
        """
        with self._open_mirror(plugin, url, None) as repo:
            return _raw(repo, blob_sha, 3)

    def blob_sizes(self, url: str, blob_shas: Iterable[bytes], *, plugin: str = ""
                   ) -> dict[bytes, int]:
        """The size of each blob in ``blob_shas``, read without inflating the blobs.

        Raises FetchError for a missing object or one that is not a blob.
        """
        shas = list(dict.fromkeys(blob_shas))
        if not shas:
            return {}
        if self.git_command:
            return self._git_sizes(plugin, url, shas)
        with self._open_mirror(plugin, url, None) as repo:
            return {sha: _object_size(repo, sha, 3) for sha in shas}

    def stream_blobs(self, url: str, blob_shas: Iterable[bytes], *, plugin: str = "",
                     max_size: int | None = None) -> Iterator[Iterator[bytes]]:
        """For each blob of ``blob_shas`` in order, an iterator of its contents in chunks.

        Consume each inner iterator to its end before taking the next one.
        With ``git`` the chunks come from ``git cat-file --batch`` and at most
        :data:`CHUNK` bytes are held at once; without it a blob is read whole
        (dulwich), after checking its size against ``max_size``. Raises
        FetchError for a missing object, one that is not a blob, or a size
        over ``max_size``.
        """
        if self.git_command:
            yield from self._git_stream(plugin, url, blob_shas, max_size)
            return
        with self._open_mirror(plugin, url, None) as repo:
            for sha in blob_shas:
                size = _object_size(repo, sha, 3)
                if max_size is not None and size > max_size:
                    raise _error(FetchError, plugin, url, None, f"blob {sha.decode()} of {{url}} "
                                 f"holds {size} bytes, over the limit of {max_size}.")
                data = _raw(repo, sha, 3)
                if len(data) != size:  # dulwich reads a truncated loose object silently
                    raise _error(FetchError, plugin, url, None, f"object {sha.decode()} in the "
                                 f"mirror of {{url}} is damaged ({len(data)} bytes where its "
                                 f"header says {size}). Delete {self.mirror_path(url)} so it "
                                 "is fetched afresh.")
                yield iter([data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""])
                del data

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

    def tags_naming(self, plugin: str, url: str, commit: str) -> dict[str, TagRef]:
        """``{tag name: TagRef}`` of the mirror's tags whose commit is ``commit`` (no network)."""
        found: dict[str, TagRef] = {}
        with self._open_mirror(plugin, url, None) as repo:
            for name, sha in repo.refs.as_dict(b"refs/tags").items():
                obj = repo.object_store[sha]
                if _peel(repo, sha).id.decode() == commit:
                    found[name.decode()] = TagRef(sha.decode(), isinstance(obj, Tag))
        return found

    def credential_for(self, url: str) -> Credential | None:
        """The ``credentials:`` entry used for ``url`` (longest prefix), or None."""
        kind, _location = classify_url(url)
        if kind not in ("http", "ssh"):
            return None
        return creds.match(self._credentials(), url)

    def command_env(self) -> dict[str, str]:
        """The environment gitplug runs the ``git`` command in: no user config, prompts or secrets."""
        return self._git_env()

    def has_commit(self, url: str, sha: str) -> bool:
        """Whether the mirror holds commit ``sha`` (full hex). Never raises."""
        if len(sha) != 40 or not _HEX.match(sha):
            return False
        try:
            with self._open_mirror("", url, sha) as repo:
                return isinstance(repo.object_store[sha.encode()], Commit)
        except FetchError:  # no mirror, or an unreadable one
            return False

    # -- the git command ------------------------------------------------------

    def _git_env(self) -> dict[str, str]:
        """An environment of its own for ``git``: no user config, no prompts, no secrets."""
        config = self.mirrors_dir / ".gitconfig"
        if not config.exists():
            # Global scope, the only one safe.directory is read from: the mirror and
            # a local repository may belong to another user.
            self.mirrors_dir.mkdir(parents=True, exist_ok=True)
            tmp = config.with_name(f".gitconfig.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text("[safe]\n\tdirectory = *\n[core]\n\tbigFileThreshold = 1m\n")
            os.replace(tmp, config)
        return {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": str(
            self.mirrors_dir), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(config),
            "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}

    def _git_fetch(self, plugin: str, url: str, location: str, repo: Repo,
                   kind: str = "local") -> None:
        """``git fetch`` every branch and tag of ``location`` (a path, an http(s) or ssh URL).

        HTTP: no password ever in the arguments (``ps`` shows them): the URL's
        own, else the ``credentials:`` entry's, reach git through the askpass
        helper (:func:`credentials.http_askpass_env`), for the URL's origin
        only; a transfer that stalls for ``timeout`` seconds is given up
        (``http.lowSpeedTime``); the whole fetch has a deadline.
        """
        assert self.git_command
        deadline = max(self.timeout, 1.0) * 10  # a copy of a big repository is slow
        env = self._git_env()
        options: list[str] = []
        if kind == "http":
            location, asked = creds.http_askpass_env(location, self.credential_for(url),
                                                     self.mirrors_dir)
            env.update(asked)
            env.update({k: v for k, v in os.environ.items() if k in creds.HTTP_ENV_PASSED})
            options = ["-c", "http.lowSpeedLimit=1",
                       "-c", f"http.lowSpeedTime={max(1, round(self.timeout))}"]
        elif kind == "ssh":
            # Only with a `credentials:` entry, whose ssh runs in a scrubbed
            # environment anyway (without one, ssh keeps the server's HOME and
            # agent, as dulwich runs it). git runs GIT_SSH_COMMAND through sh:
            # ssh_command's string is shell-quoted for that.
            entry = self.credential_for(url)
            assert entry is not None
            vendor = creds.CredentialSSHVendor(entry, self.mirrors_dir)
            env.update(vendor.environment())
            env["GIT_SSH_COMMAND"] = ssh_command(self.timeout, prepend=creds.ssh_options(entry))
            env["GIT_SSH_VARIANT"] = "ssh"
        argv = [self.git_command, *options, "--git-dir", str(repo.path), "fetch", "--quiet",
                "--no-tags", "--no-write-fetch-head", "--no-auto-gc", "--", location,
                f"+refs/heads/*:{_GIT_FETCH_NS.decode()}heads/*",
                f"+refs/tags/*:{_GIT_FETCH_NS.decode()}tags/*"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env,
                                start_new_session=True, close_fds=True)
        try:
            _, err = proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise _error(FetchError, plugin, url, None, f"could not fetch {{url}}: git fetch "
                         f"timed out after {deadline:g}s. {_HINT}") from None
        finally:
            _kill_group(proc)
        if proc.returncode != 0:
            lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines()
                     if line.strip()]
            # The first fatal line says why; the last is often "bad pack header".
            fatal = ([line for line in lines if line.startswith("remote: fatal:")]
                     or [line for line in lines if "fatal:" in line] or lines)
            cause = fatal[0].replace("fatal: ", "", 1) if fatal else ""
            hint = _HINT
            if cause.startswith("remote:"):
                hint = ("git refuses an object of that repository (a malformed or damaged "
                        "tree or blob): fix the repository, or push a commit without it.")
            raise _error(FetchError, plugin, url, None, f"could not fetch {{url}}: git fetch "
                         f"exited with status {proc.returncode}"
                         + (f" ({cause[:300]})" if cause else "") + f". {hint}")

    def _fetch_objects(self, plugin: str, url: str, client: Any, path: str, repo: Repo,
                       wants: Callable[..., list[bytes]]) -> Any:
        """dulwich's fetch of what ``wants`` asks into ``repo``; dulwich's FetchPackResult.

        Where git is installed and the remote is not a local path, dulwich
        speaks the protocol (its deadlines, its ssh) and git indexes the pack
        (:meth:`_fetch_pack_indexed_by_git`); else dulwich does both.
        """
        if self.git_command and classify_url(url)[0] != "local":
            result = self._fetch_pack_indexed_by_git(plugin, url, client, path, repo, wants)
            repo.object_store._update_pack_cache()  # see the new pack
            return result
        return client.fetch(path, repo, determine_wants=wants)

    def _fetch_pack_indexed_by_git(self, plugin: str, url: str, client: Any, path: str,
                                   repo: Repo, wants: Callable[..., list[bytes]]) -> Any:
        """Fetch a pack through dulwich's transport, indexed by ``git index-pack``.

        dulwich's own ``fetch`` keeps a thin pack in memory (spooled) and
        inflates each object whole to index it: a 300 MiB blob cost the
        server about 340 MiB. Here each chunk dulwich reads from the wire is
        written straight into ``git index-pack --stdin --fix-thin`` (a child
        with a scrubbed environment, its own process group and a deadline),
        which streams big objects; the network deadlines stay dulwich's.
        Returns dulwich's FetchPackResult (the remote's refs). On any
        failure the child is killed and its unfinished pack removed.
        """
        assert self.git_command
        pack_dir = Path(repo.path) / "objects" / "pack"
        pack_dir.mkdir(parents=True, exist_ok=True)
        deadline = max(self.timeout, 1.0) * 10
        proc: subprocess.Popen[bytes] | None = None
        with tempfile.TemporaryFile(dir=pack_dir, prefix="index-pack-err-") as err:
            def pack_data(chunk: bytes) -> int:
                nonlocal proc
                if proc is None:
                    proc = subprocess.Popen(
                        [str(self.git_command), "--git-dir", str(repo.path), "index-pack",
                         "--stdin", "--fix-thin"],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                        env=self._git_env(), start_new_session=True, close_fds=True)
                assert proc.stdin is not None
                try:
                    proc.stdin.write(chunk)
                except BrokenPipeError:
                    pass  # index-pack gave up: its status and message say why, below
                return len(chunk)

            ok = False
            try:
                result = client.fetch_pack(path, wants, repo.get_graph_walker(), pack_data)
                if proc is not None:
                    with contextlib.suppress(BrokenPipeError):
                        proc.stdin.close()  # type: ignore[union-attr]
                    try:
                        proc.wait(timeout=deadline)
                    except subprocess.TimeoutExpired:
                        raise _error(FetchError, plugin, url, None, "could not fetch {url}: "
                                     f"git index-pack took longer than {deadline:g}s. "
                                     f"{_HINT}") from None
                    if proc.returncode != 0:
                        err.seek(0)
                        lines = [line.strip() for line in
                                 err.read(8192).decode("utf-8", "replace").splitlines()
                                 if line.strip()]
                        cause = next((line for line in lines if "fatal:" in line),
                                     lines[0] if lines else "")
                        raise _error(FetchError, plugin, url, None, "could not fetch {url}: "
                                     f"git index-pack refused the pack (status "
                                     f"{proc.returncode}"
                                     + (f": {cause.replace('fatal: ', '', 1)[:300]}" if cause
                                        else "")
                                     + "). The repository holds a malformed object: fix it, "
                                     "or push a commit without it.")
                ok = True
                return result
            finally:
                if proc is not None:
                    _kill_group(proc)
                if not ok:
                    # We hold the mirror's lock: any unfinished pack is ours.
                    for partial in pack_dir.glob("tmp_pack_*"):
                        with contextlib.suppress(OSError):
                            partial.unlink()

    @contextlib.contextmanager
    def _cat_file(self, plugin: str, url: str, mode: str) -> Iterator[subprocess.Popen[bytes]]:
        """``git cat-file --<mode>`` on the mirror; killed on the way out."""
        assert self.git_command
        mirror = self.mirror_path(url)
        if not mirror.is_dir():
            raise _error(FetchError, plugin, url, None, "{url} has not been fetched yet (no "
                         f"mirror at {mirror}). Fetch it first.")
        try:
            proc = subprocess.Popen(
                [self.git_command, "--git-dir", str(mirror), "cat-file", f"--{mode}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=self._git_env(), start_new_session=True, close_fds=True)
        except OSError as exc:
            raise _error(FetchError, plugin, url, None, f"could not run {self.git_command} on "
                         f"the mirror of {{url}}: {exc}. Check the git installation.") from exc
        # A hung git must not hold the deploy lock forever.
        timer = threading.Timer(max(self.timeout, 1.0) * 10, _kill_group, (proc,))
        timer.daemon = True
        timer.start()
        try:
            yield proc
        except (OSError, ValueError) as exc:  # a broken pipe: git died
            raise _error(FetchError, plugin, url, None, f"reading the mirror of {{url}} with "
                         f"git cat-file failed: {exc}. Retry; if it persists, delete {mirror} "
                         "so it is fetched afresh.") from exc
        finally:
            timer.cancel()
            _kill_group(proc)

    @staticmethod
    def _feed(proc: subprocess.Popen[bytes], shas: list[bytes]) -> threading.Thread:
        """Write every sha to ``cat-file`` from a thread, so reading never waits on a round trip."""

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError, ValueError):  # git died: the reader reports it
                for sha in shas:
                    proc.stdin.write(sha + b"\n")
                proc.stdin.close()

        feeder = threading.Thread(target=feed, name="gitplug-cat-file-feed", daemon=True)
        feeder.start()
        return feeder

    def _git_header(self, plugin: str, url: str, proc: subprocess.Popen[bytes],
                    sha: bytes) -> int:
        """Read ``cat-file``'s header line for ``sha``; return the blob's size."""
        assert proc.stdout is not None
        line = _read_line(proc.stdout)
        parts = line.split()
        if len(parts) != 3 or parts[0] != sha:
            what = "is missing from" if line.endswith(b"missing") else "is unreadable in"
            raise _error(FetchError, plugin, url, None, f"object {sha.decode()} {what} the "
                         "mirror of {url}. Retry; if it persists, delete "
                         f"{self.mirror_path(url)} so it is fetched afresh.")
        if parts[1] != b"blob":
            raise _error(FetchError, plugin, url, None, f"object {sha.decode()} of {{url}} is "
                         f"a {parts[1].decode()}, not a blob.")
        return int(parts[2])

    def _git_sizes(self, plugin: str, url: str, shas: list[bytes]) -> dict[bytes, int]:
        with self._cat_file(plugin, url, "batch-check") as proc:
            self._feed(proc, shas)
            return {sha: self._git_header(plugin, url, proc, sha) for sha in shas}

    def _git_stream(self, plugin: str, url: str, blob_shas: Iterable[bytes],
                    max_size: int | None) -> Iterator[Iterator[bytes]]:
        shas = list(blob_shas)
        with self._cat_file(plugin, url, "batch") as proc:
            stdout = proc.stdout
            assert stdout is not None
            self._feed(proc, shas)
            for sha in shas:
                size = self._git_header(plugin, url, proc, sha)
                if max_size is not None and size > max_size:
                    raise _error(FetchError, plugin, url, None, f"blob {sha.decode()} of {{url}} "
                                 f"holds {size} bytes, over the limit of {max_size}.")
                chunks = _read_exactly(stdout, size)
                yield chunks
                for _rest in chunks:  # the caller stopped early: skip what is left
                    pass
                if _read_exactly_bytes(stdout, 1) != b"\n":
                    raise OSError("git cat-file output out of step")

    # -- internals ------------------------------------------------------------

    @contextlib.contextmanager
    def _wrap(self, plugin: str, url: str, ref: str | None, doing: str) -> Iterator[None]:
        """Turn dulwich/OS/HTTP errors raised in the block into FetchError."""
        try:
            yield
        except _GIT_ERRORS as exc:  # our own FetchError/RefNotFound are not among them
            at = f" (ref {ref!r})" if ref else ""
            cause = self._cause(exc)
            hint = self._credential_hint(url, exc, cause)
            if hint is None:
                hint = _AUTH_HINT if _refused_access(exc) else _HINT
            elif self.credential_for(url) is not None:
                # The hint says what to do about the entry: not GIT_SSH_COMMAND's advice.
                for generic in _SSH_HINTS.values():
                    cause = cause.replace(generic, "")
            raise _error(FetchError, plugin, url, ref, f"{doing} {{url}}{at}: {cause}. {hint}") from exc

    def _credential_hint(self, url: str, exc: BaseException, cause: str) -> str | None:
        """What to do about refused credentials or an unknown host key, naming the entry by prefix.

        None when the failure is not about credentials (the generic hints apply).
        """
        try:
            kind, _location = classify_url(url)
        except ValueError:
            return None
        if kind not in ("http", "ssh"):
            return None
        entry = self.credential_for(url)
        if kind == "http":
            if not _refused_access(exc) or (entry is None and urlsplit(url).password is not None):
                return None
            if entry is None:
                return (f"No `credentials:` entry matches this URL, so none was sent. Add one "
                        f"whose url is a prefix of it: - {creds.example_entry(url)}")
            return (f"The server refused the `credentials:` entry for {entry.url} (username "
                    f"{entry.username or 'git'}): check that its password (token) is current "
                    "and may read the repository.")
        refused = "Permission denied" in cause
        unknown = "Host key verification failed" in cause
        if entry is None:
            if refused or unknown:
                return (f"Or add a `credentials:` entry whose url is a prefix of this URL "
                        f"(none matches): - {creds.example_entry(url)}")
            return None
        if refused:
            return (f"The server refused the deploy key of the `credentials:` entry for "
                    f"{entry.url} ({entry.ssh_key}): add its public key to the repository's "
                    "deploy keys" + (", and check its passphrase" if entry.passphrase else "") + ".")
        if unknown:
            return (f"The server's host key is not in {entry.known_hosts} (the `credentials:` "
                    f"entry for {entry.url}); gitplug never accepts an unknown host key."
                    + creds.unknown_host_help(url, entry, self.timeout))
        return None

    def _cause(self, exc: BaseException) -> str:
        if isinstance(exc, dulwich_errors.HangupException) and exc.stderr_lines:
            # ssh's own words: "Host key verification failed.", "Permission denied (publickey)."
            said = " / ".join(line.decode("utf-8", "replace").strip()
                              for line in exc.stderr_lines if line.strip())[-400:]
            hint = _SSH_HINTS.get(next((k for k in _SSH_HINTS if k in said), ""), "")
            return f"the remote end hung up; ssh said: {said}{hint}"
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
        status = _HTTP_STATUS.search(str(exc))
        if status and status.group(1) == "403":
            return "access denied (HTTP 403)"
        if status:
            return f"the server answered HTTP {status.group(1)}"
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    @contextlib.contextmanager
    def _client(self, url: str, plugin: str = "", *, password: str | None = None
                ) -> Iterator[tuple[Any, str]]:
        """dulwich's client for ``url`` and the path to ask it for; closed on the way out.

        ``password`` (HTTP only) is sent instead of a ``credentials:`` entry's.
        """
        kind, location = classify_url(url)
        kwargs: dict[str, Any] = {}
        entry: Credential | None = None
        pool = None
        if kind == "http":
            pool = dulwich_client.default_urllib3_manager(None, base_url=location,
                                                          timeout=self.timeout)
            # No retry of a connect or a read: a silent server fails after `timeout`
            # seconds, the figure the error gives (the next poll is the retry).
            pool.connection_pool_kw["retries"] = urllib3.Retry(
                total=None, connect=0, read=0, status=0, other=0, redirect=5)
            kwargs["pool_manager"] = pool
            entry = self.credential_for(url)
            if password is not None:
                kwargs["username"], kwargs["password"] = "gitplug", password
            elif entry is not None and entry.password is not None and urlsplit(location).password is None:
                # dulwich sends these to the URL's own origin only, never after a redirect.
                kwargs["username"], kwargs["password"] = entry.username or "git", entry.password
        elif kind == "ssh":
            # dulwich's client ignores GIT_SSH_COMMAND (only its porcelain
            # reads it): always hand it the command, with our options.
            entry = self.credential_for(url)
            try:
                kwargs["ssh_command"] = ssh_command(
                    self.timeout, prepend=creds.ssh_options(entry) if entry is not None else ())
            except ValueError as exc:
                raise _error(FetchError, plugin, url, None, str(exc)) from exc
        if kind == "local":
            # dulwich would read a ':' in a path as scp-like ssh: a path is local here.
            client, path = dulwich_client.LocalGitClient(), location
        else:
            client, path = get_transport_and_path(location, **kwargs)
        if kind == "ssh" and entry is not None:
            client.ssh_vendor = creds.CredentialSSHVendor(entry, self.mirrors_dir)
        if kind == "git":
            _give_deadline(client, self.timeout)
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


#: What to do about the ssh failures an operator meets first, keyed by ssh's words.
_SSH_HINTS = {
    "Host key verification failed": (
        " (the server's host key is not in the known_hosts file ssh reads: add it, after"
        " checking its fingerprint, or point -o UserKnownHostsFile=... in GIT_SSH_COMMAND at"
        " a file that has it)"),
    "Permission denied": (
        " (the server refused every key offered: give the deploy key with -i KEY in"
        " GIT_SSH_COMMAND, or load it into ssh-agent)"),
}


def ssh_command(timeout: float, environ: Mapping[str, str] | None = None, *,
                prepend: Iterable[str] = ()) -> str:
    """The ssh command line gitplug hands dulwich, as one shell-quoted string.

    ``$GIT_SSH_COMMAND`` (split with :func:`shlex.split`) if set, else
    ``$GIT_SSH`` (a program, no arguments, as git reads it), else ``ssh``;
    then ``prepend`` (a ``credentials:`` entry's options: they win, as ssh
    keeps the first value of an option), then ``-o BatchMode=yes`` and
    deadlines from ``timeout`` are appended.
    Nothing is ever run through a shell. Raises ValueError for a
    ``GIT_SSH_COMMAND`` that cannot be split (an unclosed quote), with a message
    that says so.
    """
    env = os.environ if environ is None else environ
    if env.get("GIT_SSH_COMMAND", "").strip():
        try:
            args = shlex.split(env["GIT_SSH_COMMAND"])
        except ValueError as exc:
            raise ValueError(f"GIT_SSH_COMMAND cannot be split into arguments ({exc}): "
                             f"{env['GIT_SSH_COMMAND']!r}. Fix its quoting, or unset it to "
                             "use plain ssh.") from exc
    elif env.get("GIT_SSH", "").strip():
        args = [env["GIT_SSH"].strip()]
    else:
        args = ["ssh"]
    args += list(prepend)
    # No password or host-key prompts; give up on a silent server after about `timeout`.
    wait = max(1.0, timeout)
    args += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={wait:.0f}",
             "-o", f"ServerAliveInterval={max(1.0, wait / 3):.0f}", "-o", "ServerAliveCountMax=3"]
    return shlex.join(args)


def _refused_access(exc: BaseException) -> bool:
    """Whether the server refused the credentials (HTTP 401 or 403), not the repository."""
    if isinstance(exc, dulwich_client.HTTPUnauthorized):
        return True
    status = _HTTP_STATUS.search(str(exc))
    return bool(status and status.group(1) in ("401", "403"))


class _SocketsWithTimeout:
    """The ``socket`` module, as one git:// client sees it: its sockets have a timeout.

    dulwich's ``TCPGitClient._connect`` creates its socket with ``socket.socket()``
    and never sets a timeout, so a server that accepts and never answers blocks
    a read forever. :func:`_give_deadline` runs that method with this object in
    place of the module (in a copy of the function's globals: nothing global
    changes), so the connect and every read of that one connection time out.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    def socket(self, *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.socket(*args, **kwargs)
        sock.settimeout(self._timeout)
        return sock

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


def _give_deadline(client: Any, timeout: float) -> None:
    """Make the git:// ``client``'s connection time out after ``timeout`` s per connect and read."""
    connect = getattr(type(client), "_connect", None)
    code = getattr(connect, "__code__", None)
    if code is None or code.co_freevars or "socket" not in code.co_names:
        # A dulwich whose _connect this cannot wrap: better no deadline than no fetch.
        logger.warning("git:// fetches have no deadline with this dulwich (%s)",
                       getattr(dulwich_client, "__name__", "?"))
        return
    scoped = dict(connect.__globals__, socket=_SocketsWithTimeout(timeout))
    with_deadline = types.FunctionType(code, scoped, connect.__name__, connect.__defaults__)
    with_deadline.__kwdefaults__ = connect.__kwdefaults__
    client._connect = types.MethodType(with_deadline, client)


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


def _object_size(repo: Repo, sha: bytes, type_num: int) -> int:
    """The size of object ``sha`` read from its header, without inflating its contents.

    Loose objects: the first inflated bytes (``blob <size>\\0``). Packed
    objects: the entry header, and for a delta the target size at the start
    of the delta data. ValueError for a type other than ``type_num``,
    KeyError for a missing object.
    """
    hexsha = sha.decode()
    loose = Path(repo.object_store.path) / hexsha[:2] / hexsha[2:]
    if loose.is_file():
        inflater = zlib.decompressobj()
        head = b""
        with loose.open("rb") as handle:
            while b"\0" not in head and len(head) < 64:
                raw = handle.read(256)
                if not raw:
                    break
                head += inflater.decompress(raw, 64 - len(head))
        kind, _, rest = head.partition(b" ")
        size = rest.split(b"\0", 1)[0]
        if kind not in _TYPE_NAMES or not size.isdigit():
            raise ValueError(f"loose object {hexsha} has a malformed header")
        if _TYPE_NAMES[kind] != type_num:
            raise ValueError(f"object {hexsha} has type {_TYPE_NAMES[kind]}, expected {type_num}")
        return int(size)
    binary = bytes.fromhex(hexsha)
    for pack in repo.object_store.packs:
        try:
            offset = pack.index.object_offset(binary)
        except KeyError:
            continue
        return _packed_size(repo, pack, offset, type_num, hexsha)
    raise KeyError(hexsha)


#: Loose object type names; pack entries use the numbers.
_TYPE_NAMES = {b"commit": 1, b"tree": 2, b"blob": 3, b"tag": 4}
_OFS_DELTA, _REF_DELTA = 6, 7


def _packed_size(repo: Repo, pack: Any, offset: int, type_num: int, hexsha: str) -> int:
    """The size of the pack entry at ``offset`` once resolved (a delta's target size)."""
    with open(pack._data_path, "rb") as handle:  # dulwich keeps no public full path
        kind, size, pos, base_offset = _pack_entry(handle, pack, offset)
        if base_offset is None:
            if kind != type_num:
                raise ValueError(f"object {hexsha} has type {kind}, expected {type_num}")
            return size
        # A delta: its data starts with the base's size, then the target's.
        handle.seek(offset + pos)
        inflater = zlib.decompressobj()
        delta = b""
        while len(delta) < 20 and not inflater.eof:
            raw = handle.read(256)
            if not raw:
                break
            delta += inflater.decompress(raw, 20 - len(delta))
        _base, at = _varint(delta, 0)
        target, _ = _varint(delta, at)
        for _hop in range(10000):  # the type is the base's, at the end of the chain
            kind, _size, _pos, next_offset = _pack_entry(handle, pack, base_offset)
            if next_offset is None:
                break
            base_offset = next_offset
        if kind != type_num:
            raise ValueError(f"object {hexsha} has type {kind}, expected {type_num}")
        return target


def _pack_entry(handle: Any, pack: Any, offset: int) -> tuple[int, int, int, int | None]:
    """``(type, size, header length, base offset or None)`` of the pack entry at ``offset``."""
    handle.seek(offset)
    head = handle.read(64)
    byte = head[0]
    kind, size, shift, pos = (byte >> 4) & 7, byte & 15, 4, 1
    while byte & 0x80:
        byte, pos = head[pos], pos + 1
        size |= (byte & 0x7F) << shift
        shift += 7
    if kind == _OFS_DELTA:
        byte, pos = head[pos], pos + 1
        back = byte & 0x7F
        while byte & 0x80:
            byte, pos = head[pos], pos + 1
            back = ((back + 1) << 7) | (byte & 0x7F)
        return kind, size, pos, offset - back
    if kind == _REF_DELTA:
        return kind, size, pos + 20, pack.index.object_offset(head[pos:pos + 20])
    return kind, size, pos, None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A git delta header's little-endian base-128 number at ``pos``; (value, next pos)."""
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _read_line(stream: Any) -> bytes:
    """One line of ``git cat-file`` output, without its newline; OSError at EOF."""
    line = stream.readline(4097)
    if not line.endswith(b"\n"):
        raise OSError("git cat-file exited early" if len(line) < 4097 else
                      "git cat-file printed an overlong line")
    return bytes(line[:-1])


def _read_exactly_bytes(stream: Any, size: int) -> bytes:
    return b"".join(_read_exactly(stream, size))


def _read_exactly(stream: Any, size: int) -> Iterator[bytes]:
    """Up to :data:`CHUNK` bytes at a time, ``size`` in all; OSError if the stream ends first."""
    left = size
    while left > 0:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            raise OSError("git cat-file output ended early")
        left -= len(chunk)
        yield chunk


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it leads one) unless it has exited; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    proc.wait()


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
    # A path that exists here is local whatever it holds (``a:b`` is not ssh then).
    if url.startswith(("/", ".", "~")) or not _SCP.match(url) or os.path.exists(url):
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
