"""Real git repositories for tests, built with dulwich in a temporary directory.

Every test that needs a plugin repository uses this module instead of
shelling out to ``git``::

    from gitrepo import GitRepo, serve_http     # tests/ is on sys.path under pytest

    repo = GitRepo(tmp_path / "hello")          # non-bare, default branch "main"
    repo.write("hello/__init__.py", "plugin = ...\\n")
    repo.write("run.sh", "#!/bin/sh\\n", executable=True)
    repo.symlink("latest", "hello")
    first = repo.commit("first")                # stages everything, returns the hex sha
    repo.tag("v1", annotated=True, message="release 1")
    repo.branch("dev")
    repo.set_ref("refs/heads/main", first)      # force-move (a force-push, seen from a fetcher)

    with serve_http(tmp_path) as base:          # dulwich's smart-HTTP server on 127.0.0.1
        url = f"{base}/hello"                   # the repository at tmp_path/"hello"

Contract:

- ``commit()`` snapshots the work tree exactly as it is on disk (files,
  executable bits, symlinks; additions and removals) into a new commit on the
  current branch. It builds tree objects directly, so the index is not
  maintained: do not mix this helper with ``dulwich.porcelain`` on one repo.
- ``commit_tree_raw()`` builds trees that git itself would refuse
  (``../x``, ``.git/config``, absolute paths, a name containing ``/``,
  duplicate names) so tests can check that such trees are refused.
- Commit and tag times default to the current time; pass ``timestamp`` for
  reproducible shas.
- Each call opens and closes the dulwich ``Repo``: no file handles are kept.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from dulwich.objects import Blob, Commit, Tag, Tree
from dulwich.repo import Repo
from dulwich.server import FileSystemBackend
from dulwich.web import WSGIRequestHandlerLogger, make_wsgi_chain

__all__ = ["GitRepo", "serve_http", "MODE_FILE", "MODE_EXEC", "MODE_LINK", "MODE_TREE",
           "MODE_GITLINK"]

MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODE_LINK = 0o120000
MODE_TREE = 0o040000
MODE_GITLINK = 0o160000

DEFAULT_AUTHOR = "Ada <ada@example.com>"


class GitRepo:
    """A non-bare git repository with a work tree at ``path``.

    Opens the repository if ``path/.git`` already exists, else creates it with
    ``branch`` as the default branch.
    """

    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / ".git").exists():
            Repo.init(str(self.path), default_branch=branch.encode()).close()

    def __repr__(self) -> str:
        return f"GitRepo({str(self.path)!r})"

    # -- locations ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The repository as a ``file://`` URL."""
        return self.path.resolve().as_uri()

    @contextlib.contextmanager
    def open(self) -> Iterator[Repo]:
        """The underlying dulwich ``Repo``, closed when the block ends."""
        repo = Repo(str(self.path))
        try:
            yield repo
        finally:
            repo.close()

    # -- work tree ---------------------------------------------------------

    def write(self, relpath: str, content: str | bytes, *, executable: bool = False) -> None:
        """Write a file in the work tree (parents created, a symlink there replaced)."""
        target = self._work_path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(0o755 if executable else 0o644)

    def symlink(self, relpath: str, target: str) -> None:
        """Create (or replace) a symlink at ``relpath`` pointing to ``target`` verbatim."""
        link = self._work_path(relpath)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        os.symlink(target, link)

    def remove(self, relpath: str) -> None:
        """Delete a file, symlink or directory from the work tree."""
        target = self._work_path(relpath)
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)

    def copy_tree(self, src_dir: Path) -> None:
        """Copy a directory's contents into the work tree (symlinks kept as links).

        ``.git``, ``__pycache__`` and ``*.pyc`` are skipped.
        """
        shutil.copytree(
            src_dir,
            self.path,
            symlinks=True,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"),
        )

    # -- history -----------------------------------------------------------

    @property
    def head(self) -> str | None:
        """The sha of the current branch's tip, or None before the first commit."""
        with self.open() as repo:
            try:
                return repo.refs[b"HEAD"].decode()
            except KeyError:
                return None

    @property
    def current_branch(self) -> str:
        """The branch HEAD points to (``main`` by default)."""
        with self.open() as repo:
            target = repo.refs.read_ref(b"HEAD") or b""
        return target.removeprefix(b"ref: ").decode().removeprefix("refs/heads/")

    def commit(
        self,
        message: str,
        *,
        author: str = DEFAULT_AUTHOR,
        timestamp: int | None = None,
    ) -> str:
        """Snapshot the whole work tree as a commit on the current branch; return its sha."""
        with self.open() as repo:
            tree_id = self._store_dir(repo, self.path, top=True) or self._empty_tree(repo)
            return self._make_commit(repo, tree_id, message, author, timestamp)

    def commit_tree_raw(
        self,
        entries: dict[bytes, tuple[int, bytes]],
        message: str,
        *,
        literal_names: bool = False,
        author: str = DEFAULT_AUTHOR,
        timestamp: int | None = None,
    ) -> str:
        """Commit a tree built verbatim from ``{path: (mode, content)}``; return its sha.

        Paths are split on ``/`` into nested trees, with no checks at all:
        ``b"../x"`` makes a tree named ``..``, ``b"/abs"`` a tree with an empty
        name, and ``{b"a": (MODE_LINK, b"t"), b"a/b": (MODE_FILE, b"")}`` a
        root with two entries named ``a``. With ``literal_names=True`` every
        key is one entry name in the root tree, ``/`` included. ``content`` is
        the blob (for a symlink, its target); for ``MODE_GITLINK`` it is the
        40-hex sha of the submodule commit. The work tree is not touched.
        """
        with self.open() as repo:
            root: dict[bytes, Any] = {}
            for path, (mode, content) in entries.items():
                parts = [path] if literal_names else path.split(b"/")
                node = root
                for part in parts[:-1]:
                    node = node.setdefault((part, MODE_TREE), {})
                if mode == MODE_GITLINK:
                    sha = content
                else:
                    blob = Blob.from_string(content)
                    repo.object_store.add_object(blob)
                    sha = blob.id
                node[(parts[-1], mode)] = sha
            tree_id = self._store_raw_tree(repo, root)
            return self._make_commit(repo, tree_id, message, author, timestamp)

    def tag(
        self,
        name: str,
        *,
        annotated: bool = False,
        message: str = "",
        commit: str | None = None,
        tagger: str = DEFAULT_AUTHOR,
        timestamp: int | None = None,
    ) -> None:
        """Create or move tag ``name`` to ``commit`` (default: HEAD)."""
        with self.open() as repo:
            target = commit.encode() if commit else repo.refs[b"HEAD"]
            ref_value = target
            if annotated:
                tag = Tag()
                tag.name = name.encode()
                tag.object = (Commit, target)
                tag.tagger = tagger.encode()
                tag.tag_time = int(time.time()) if timestamp is None else timestamp
                tag.tag_timezone = 0
                tag.message = (message or name).encode() + b"\n"
                repo.object_store.add_object(tag)
                ref_value = tag.id
            repo.refs[b"refs/tags/" + name.encode()] = ref_value

    def branch(self, name: str, commit: str | None = None) -> None:
        """Create branch ``name`` at ``commit`` (default: HEAD). Refuses an existing one."""
        ref = b"refs/heads/" + name.encode()
        with self.open() as repo:
            if ref in repo.refs:
                raise ValueError(f"branch {name!r} already exists; use set_ref to move it")
            repo.refs[ref] = commit.encode() if commit else repo.refs[b"HEAD"]

    def checkout(self, name: str) -> None:
        """Point HEAD at branch ``name`` and rewrite the work tree from its tip."""
        ref = b"refs/heads/" + name.encode()
        with self.open() as repo:
            tip = repo.refs[ref]
            repo.refs.set_symbolic_ref(b"HEAD", ref)
            for child in self.path.iterdir():
                if child.name != ".git":
                    self.remove(child.name)
            self._write_tree(repo, repo[tip].tree, self.path)

    def delete_branch(self, name: str) -> None:
        """Delete branch ``name``."""
        with self.open() as repo:
            del repo.refs[b"refs/heads/" + name.encode()]

    def set_ref(self, ref: str, sha: str) -> None:
        """Force ``ref`` to ``sha``; a name without ``refs/`` is taken as a branch."""
        full = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
        with self.open() as repo:
            repo.refs[full.encode()] = sha.encode()

    def refs(self) -> dict[str, str]:
        """Every ref (``HEAD`` included) with its sha, tags unpeeled."""
        with self.open() as repo:
            return {k.decode(): v.decode() for k, v in repo.get_refs().items()}

    # -- internals ---------------------------------------------------------

    def _work_path(self, relpath: str) -> Path:
        return self.path / relpath

    @staticmethod
    def _empty_tree(repo: Repo) -> bytes:
        tree = Tree()
        repo.object_store.add_object(tree)
        return tree.id

    def _store_dir(self, repo: Repo, directory: Path, *, top: bool = False) -> bytes | None:
        """Store ``directory`` as a tree; None if it holds no file (git has no empty dirs)."""
        tree = Tree()
        for child in sorted(directory.iterdir()):
            if top and child.name == ".git":  # nested .git dirs are kept, on purpose
                continue
            name = os.fsencode(child.name)
            st = child.lstat()
            if stat.S_ISLNK(st.st_mode):
                blob = Blob.from_string(os.fsencode(os.readlink(child)))
                mode = MODE_LINK
            elif stat.S_ISDIR(st.st_mode):
                sub = self._store_dir(repo, child)
                if sub is not None:
                    tree.add(name, MODE_TREE, sub)
                continue
            else:
                blob = Blob.from_string(child.read_bytes())
                mode = MODE_EXEC if st.st_mode & 0o100 else MODE_FILE
            repo.object_store.add_object(blob)
            tree.add(name, mode, blob.id)
        if not len(tree):
            return None
        repo.object_store.add_object(tree)
        return tree.id

    def _store_raw_tree(self, repo: Repo, node: dict[tuple[bytes, int], Any]) -> bytes:
        # Serialise by hand: dulwich's Tree is a dict keyed by name and would
        # merge duplicate names, which are exactly what some tests need.
        items: list[tuple[bytes, int, bytes]] = []
        for (name, mode), value in node.items():
            sha = self._store_raw_tree(repo, value) if mode == MODE_TREE else value
            items.append((name, mode, sha))
        items.sort(key=lambda item: item[0] + (b"/" if item[1] == MODE_TREE else b""))
        raw = b"".join(
            b"%o %s\0%s" % (mode, name, binascii.unhexlify(sha)) for name, mode, sha in items
        )
        tree = Tree.from_raw_string(Tree.type_num, raw)
        repo.object_store.add_object(tree)
        return tree.id

    def _make_commit(
        self, repo: Repo, tree_id: bytes, message: str, author: str, timestamp: int | None
    ) -> str:
        commit = Commit()
        commit.tree = tree_id
        try:
            commit.parents = [repo.refs[b"HEAD"]]
        except KeyError:
            commit.parents = []
        commit.author = commit.committer = author.encode()
        commit.author_time = commit.commit_time = (
            int(time.time()) if timestamp is None else timestamp
        )
        commit.author_timezone = commit.commit_timezone = 0
        commit.encoding = b"UTF-8"
        commit.message = message.encode() if message.endswith("\n") else (message + "\n").encode()
        repo.object_store.add_object(commit)
        # Writing through HEAD updates the branch it points to (or creates it).
        repo.refs[b"HEAD"] = commit.id
        return commit.id.decode()

    def _write_tree(self, repo: Repo, tree_id: bytes, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for entry in repo[tree_id].iteritems():
            target = directory / os.fsdecode(entry.path)
            if entry.mode == MODE_TREE:
                self._write_tree(repo, entry.sha, target)
            elif entry.mode == MODE_LINK:
                os.symlink(os.fsdecode(repo[entry.sha].data), target)
            elif entry.mode != MODE_GITLINK:
                target.write_bytes(repo[entry.sha].data)
                target.chmod(0o755 if entry.mode & 0o100 else 0o644)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _RootBackend(FileSystemBackend):
    """Serve the repositories under ``root``; URL path ``/x`` is ``root/x``."""

    def open_repository(self, path: Any) -> Any:
        # FileSystemBackend joins the absolute URL path onto the root, which
        # escapes it; strip the leading slash so "/hello" means root/hello.
        return super().open_repository(os.fsdecode(path).lstrip("/"))


@contextlib.contextmanager
def serve_http(repo_root: Path, *, delay: float = 0.0, log: list[str] | None = None,
               auth: tuple[str, str] | None = None) -> Iterator[str]:
    """Serve every repository under ``repo_root`` over git smart HTTP on 127.0.0.1.

    Yields the base URL (``http://127.0.0.1:<port>``); the repository at
    ``repo_root/name`` is ``<base>/name``. ``delay`` seconds are slept before
    every response, to test client timeouts. ``log`` gets ``"GET /name/info/refs"``
    for every request, to count fetches. With ``auth`` (user, password), as a
    forge does: no credentials is 401 with a Basic challenge, wrong ones 403.
    The server stops when the block ends.
    """
    git_app = make_wsgi_chain(_RootBackend(str(repo_root)))
    expected = ("Basic " + base64.b64encode(":".join(auth).encode()).decode()) if auth else None

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if log is not None:
            log.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}")
        if delay:
            time.sleep(delay)
        if expected is not None:
            given = environ.get("HTTP_AUTHORIZATION")
            if given != expected:
                status = "401 Unauthorized" if given is None else "403 Forbidden"
                start_response(status, [("Content-Type", "text/plain"),
                                        ("WWW-Authenticate", 'Basic realm="git"')])
                return [status.encode()]
        return git_app(environ, start_response)

    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
        handler_class=WSGIRequestHandlerLogger,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="git-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
