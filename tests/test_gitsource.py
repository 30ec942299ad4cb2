"""Tests of gitplug.deploy.gitsource against real repositories (file://, path, HTTP on 127.0.0.1)."""

from __future__ import annotations

import fcntl
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from dulwich.objects import Blob, Commit, Tree

from gitplug.deploy import gitsource
from gitplug.deploy.gitsource import (
    CommitInfo,
    GitSource,
    ResolvedRef,
    TreeEntry,
    classify_url,
    normalise_url,
    redact_url,
)
from gitplug.errors import FetchError, RefNotFound, SourceError, StagingError
from gitrepo import MODE_EXEC, MODE_FILE, MODE_GITLINK, MODE_LINK, GitRepo, serve_http

T0 = 1_700_000_000


@pytest.fixture()
def origin(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "srv" / "hello")
    repo.write("hello/__init__.py", "plugin = None\n")
    repo.write("run.sh", "#!/bin/sh\necho hi\n", executable=True)
    repo.symlink("current", "hello")
    repo.commit("first commit\n\nwith a body", timestamp=T0)
    repo.tag("v1", annotated=True, message="release 1")
    repo.tag("light")
    repo.branch("dev")
    return repo


@pytest.fixture()
def source(tmp_path: Path) -> GitSource:
    return GitSource(tmp_path / "mirrors", timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pack_files(source: GitSource, url: str) -> set[str]:
    objects = source.mirror_path(url) / "objects"
    return {str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file()}


# -- resolve -----------------------------------------------------------------


def test_resolve_branches_tags_and_shas(origin: GitRepo, source: GitSource) -> None:
    head = origin.head
    assert head is not None
    source.fetch("hello", origin.url)
    annotated_tag_object = origin.refs()["refs/tags/v1"]
    assert annotated_tag_object != head

    def resolve(ref: str) -> ResolvedRef:
        return source.resolve("hello", origin.url, ref)

    assert resolve("main") == ResolvedRef("main", head, "branch")
    assert resolve("dev") == ResolvedRef("dev", head, "branch")
    assert resolve("light") == ResolvedRef("light", head, "tag")
    assert resolve("v1") == ResolvedRef("v1", head, "tag")  # peeled to the commit
    assert resolve("refs/tags/v1") == ResolvedRef("refs/tags/v1", head, "tag")
    assert resolve("refs/heads/main").commit == head
    assert resolve(head) == ResolvedRef(head, head, "commit")
    assert resolve(head[:7]) == ResolvedRef(head[:7], head, "commit")
    assert resolve(head.upper()[:10]).commit == head
    assert resolve("HEAD").commit == head


def test_unknown_ref_names_plugin_url_and_available_refs(origin: GitRepo,
                                                         source: GitSource) -> None:
    source.fetch("hello", origin.url)
    with pytest.raises(RefNotFound, match=r"plugin 'hello': ref 'nope' names no branch, tag or "
                       r"commit in file://.*hello\. Available branches: dev, main; tags: light, "
                       r"v1\.") as info:
        source.resolve("hello", origin.url, "nope")
    assert (info.value.plugin, info.value.url, info.value.ref) == ("hello", origin.url, "nope")
    head = origin.head
    assert head is not None
    with pytest.raises(RefNotFound, match="at least 7 hex digits"):
        source.resolve("hello", origin.url, head[:6])
    with pytest.raises(RefNotFound, match="'0000000' names no branch"):
        source.resolve("hello", origin.url, "0000000")


def _colliding_commits() -> tuple[Commit, Commit]:
    """Two commits whose shas share their first 7 hex digits (birthday search, ~0.4 s)."""
    seen: dict[bytes, Commit] = {}
    for n in range(200_000):
        commit = Commit()
        commit.tree = Tree().id
        commit.author = commit.committer = b"Ada <ada@example.com>"
        commit.author_time = commit.commit_time = T0
        commit.author_timezone = commit.commit_timezone = 0
        commit.message = b"%d\n" % n
        other = seen.setdefault(commit.id[:7], commit)
        if other is not commit:
            return other, commit
    raise AssertionError("no collision found")


def test_ambiguous_abbreviated_sha(origin: GitRepo, source: GitSource) -> None:
    first, second = _colliding_commits()
    with origin.open() as repo:
        repo.object_store.add_object(Tree())
        for commit in (first, second):
            repo.object_store.add_object(commit)
    origin.branch("c1", first.id.decode())
    origin.branch("c2", second.id.decode())
    source.fetch("hello", origin.url)
    prefix = first.id[:7].decode()
    with pytest.raises(RefNotFound, match=rf"ref '{prefix}' is ambiguous .* abbreviates 2 commits"):
        source.resolve("hello", origin.url, prefix)
    longer = first.id[:12].decode()
    if longer != second.id[:12].decode():
        assert source.resolve("hello", origin.url, longer).commit == first.id.decode()


@pytest.mark.parametrize("ref", ["../config", "refs/heads/../../config", "a b", "main.lock",
                                 "refs/../HEAD", ""])
def test_malformed_ref_names_are_not_found(origin: GitRepo, source: GitSource,
                                           ref: str) -> None:
    source.fetch("hello", origin.url)
    with pytest.raises(RefNotFound, match=f"ref {re.escape(repr(ref))} names no branch"):
        source.resolve("hello", origin.url, ref)


def test_tag_of_a_tree_is_not_a_commit(origin: GitRepo, source: GitSource) -> None:
    with origin.open() as repo:
        tree = repo[repo.refs[b"HEAD"]].tree
    origin.set_ref("refs/tags/a-tree", tree.decode())
    source.fetch("hello", origin.url)
    with pytest.raises(RefNotFound, match="ref 'a-tree' of .* names a tree, not a commit"):
        source.resolve("hello", origin.url, "a-tree")


def test_resolve_before_fetch_is_a_fetch_error(origin: GitRepo, source: GitSource) -> None:
    with pytest.raises(FetchError, match="has not been fetched yet"):
        source.resolve("hello", origin.url, "main")


# -- fetch -------------------------------------------------------------------


def test_fetch_by_local_path_shares_the_file_url_mirror(origin: GitRepo,
                                                        source: GitSource) -> None:
    path = str(origin.path)
    assert source.mirror_path(path) == source.mirror_path(origin.url)
    assert source.mirror_path(path + "/") == source.mirror_path(origin.url)
    source.fetch("hello", path)
    assert source.resolve("hello", origin.url, "main").commit == origin.head


def test_fetch_over_http(origin: GitRepo, source: GitSource, tmp_path: Path) -> None:
    head = origin.head
    with serve_http(tmp_path / "srv") as base:
        url = f"{base}/hello"
        refs = source.remote_refs("hello", url)
        assert refs["refs/heads/main"] == head
        assert refs["refs/tags/v1"] == head  # peeled
        assert not any(name.endswith("^{}") for name in refs)
        source.fetch("hello", url)
    assert source.resolve("hello", url, "v1") == ResolvedRef("v1", head, "tag")  # type: ignore
    assert source.has_commit(url, head)  # type: ignore[arg-type]


def test_remote_refs_of_a_local_repository_are_peeled(origin: GitRepo,
                                                      source: GitSource) -> None:
    refs = source.remote_refs("hello", origin.url)
    assert refs["refs/tags/v1"] == origin.head
    assert set(refs) == {"HEAD", "refs/heads/main", "refs/heads/dev", "refs/tags/v1",
                         "refs/tags/light"}


def test_second_fetch_mirrors_deleted_branch_force_push_and_moved_tag(
        origin: GitRepo, source: GitSource) -> None:
    old = origin.head
    source.fetch("hello", origin.url)
    origin.delete_branch("dev")
    origin.write("hello/__init__.py", "plugin = 2\n")
    new = origin.commit("second")
    origin.set_ref("main", old)  # a force-push back...
    origin.branch("feature", new)  # ...while the new commit lives elsewhere
    origin.tag("v1", annotated=True, message="moved", commit=new)
    source.fetch("hello", origin.url)
    with pytest.raises(RefNotFound, match="'dev' names no branch.*branches: feature, main"):
        source.resolve("hello", origin.url, "dev")
    assert source.resolve("hello", origin.url, "main").commit == old
    assert source.resolve("hello", origin.url, "v1").commit == new
    assert source.resolve("hello", origin.url, "feature").commit == new


def test_fetch_skips_the_transfer_when_nothing_is_new(origin: GitRepo,
                                                      source: GitSource) -> None:
    source.fetch("hello", origin.url)
    before = _pack_files(source, origin.url)
    source.fetch("hello", origin.url)
    assert _pack_files(source, origin.url) == before
    origin.delete_branch("dev")  # a ref-only change still reaches the mirror
    source.fetch("hello", origin.url)
    assert _pack_files(source, origin.url) == before
    with pytest.raises(RefNotFound):
        source.resolve("hello", origin.url, "dev")


def test_concurrent_fetches_into_one_mirror(origin: GitRepo, source: GitSource) -> None:
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            source.fetch("hello", origin.url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert source.resolve("hello", origin.url, "main").commit == origin.head
    assert source.mirror_path(origin.url).with_suffix(".lock").exists()


def test_fetch_waits_for_the_mirror_lock_then_gives_up(origin: GitRepo, tmp_path: Path) -> None:
    source = GitSource(tmp_path / "mirrors", timeout=0.2)
    source.fetch("hello", origin.url)
    lock_path = source.mirror_path(origin.url).with_suffix(".lock")
    with open(lock_path, "a+b") as handle:  # another process's fetch, as far as flock knows
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(FetchError, match=r"plugin 'hello': another fetch of file://.* into "
                           r".*\.git is still running\. Retry later\."):
            source.fetch("hello", origin.url)
    source.fetch("hello", origin.url)  # released: works again


def test_unreachable_repository(source: GitSource, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/hello.git"
    with pytest.raises(FetchError, match=rf"plugin 'hello': could not fetch {re.escape(url)}: "
                       r"could not connect .*Check that the repository exists and this host "
                       r"can reach it\.") as info:
        source.fetch("hello", url)
    assert isinstance(info.value, SourceError)
    assert (info.value.plugin, info.value.url) == ("hello", url)
    missing = tmp_path / "nowhere"
    with pytest.raises(FetchError, match=rf"could not fetch {re.escape(str(missing))}: no git "
                       "repository there"):
        source.fetch("hello", str(missing))
    with pytest.raises(FetchError, match="could not list the refs of .*no git repository"):
        source.remote_refs("hello", str(missing))


def test_missing_repository_over_http(origin: GitRepo, source: GitSource,
                                      tmp_path: Path) -> None:
    with serve_http(tmp_path / "srv") as base:
        with pytest.raises(FetchError, match=r"could not fetch http://127\.0\.0\.1:\d+/nope: "
                           "no git repository there"):
            source.fetch("hello", f"{base}/nope")


def test_http_timeout(origin: GitRepo, tmp_path: Path) -> None:
    source = GitSource(tmp_path / "mirrors", timeout=0.3)
    with serve_http(tmp_path / "srv", delay=1.0) as base:
        with pytest.raises(FetchError, match=r"could not fetch .*: timed out after 0\.3s"):
            source.fetch("hello", f"{base}/hello")


def test_refused_credentials_point_at_credentials(origin: GitRepo, source: GitSource,
                                                 tmp_path: Path) -> None:
    with serve_http(tmp_path / "srv", auth=("ada", "right")) as base:
        port = base.rsplit(":", 1)[1]
        for url, cause in ((f"{base}/hello", r"authentication required \(HTTP 401\)\. No "
                            r"`credentials:` entry matches this URL, so none was sent"),
                           (f"http://ada:wrong@127.0.0.1:{port}/hello",
                            r"access denied \(HTTP 403\)\. Check the credentials gitplug "
                            "sends for this URL")):
            with pytest.raises(FetchError) as info:
                source.fetch("hello", url)
            message = str(info.value)
            assert re.search(cause, message), message
            assert "Check that the repository exists" not in message and "wrong" not in message
        # The right ones fetch: the server is a real git server behind the check.
        source.fetch("hello", f"http://ada:right@127.0.0.1:{port}/hello")


def test_password_never_appears_in_messages(source: GitSource) -> None:
    url = f"http://ada:s3cret@127.0.0.1:{_free_port()}/hello.git"
    with pytest.raises(FetchError) as info:
        source.fetch("hello", url)
    assert "s3cret" not in str(info.value)
    assert "ada:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in str(source.mirror_path(url))


def test_empty_repository(tmp_path: Path, source: GitSource) -> None:
    empty = GitRepo(tmp_path / "empty")
    with pytest.raises(FetchError, match=r"plugin 'hello': the repository .*empty is empty "
                       r"\(no branches or tags\)"):
        source.fetch("hello", empty.url)
    with pytest.raises(RefNotFound, match="is empty"):
        source.resolve("hello", empty.url, "main")
    with pytest.raises(FetchError, match="is empty"):
        source.remote_refs("hello", empty.url)


# -- reading the mirror -----------------------------------------------------


def test_commit_info(origin: GitRepo, source: GitSource) -> None:
    source.fetch("hello", origin.url)
    head = origin.head
    assert head is not None
    info = source.commit_info(origin.url, head)
    assert isinstance(info, CommitInfo)
    assert info.sha == head
    assert info.author == "Ada <ada@example.com>"
    assert info.message == "first commit\n\nwith a body"
    assert info.summary == "first commit"
    assert info.committed_at == datetime.fromtimestamp(T0, tz=timezone.utc)
    with origin.open() as repo:
        assert info.tree == repo[head.encode()].tree.decode()
    with pytest.raises(RefNotFound, match="commit 'f{40}' is not in the mirror"):
        source.commit_info(origin.url, "f" * 40, plugin="hello")
    with pytest.raises(RefNotFound, match="plugin 'hello': commit 'main' is not in the mirror"):
        source.commit_info(origin.url, "main", plugin="hello")


def test_iter_tree_read_blob_and_has_commit(origin: GitRepo, source: GitSource) -> None:
    source.fetch("hello", origin.url)
    head = origin.head
    assert head is not None
    entries = list(source.iter_tree(origin.url, head))
    assert all(isinstance(e, TreeEntry) for e in entries)
    modes = {e.path: e.mode for e in entries}
    assert modes == {b"current": MODE_LINK, b"hello/__init__.py": MODE_FILE,
                     b"run.sh": MODE_EXEC}
    by_path = {e.path: e.sha for e in entries}
    assert source.read_blob(origin.url, by_path[b"current"]) == b"hello"
    assert source.read_blob(origin.url, by_path[b"run.sh"]).startswith(b"#!/bin/sh")
    assert source.has_commit(origin.url, head)
    assert not source.has_commit(origin.url, "0" * 40)
    assert not source.has_commit(origin.url, "not-a-sha")
    assert not source.has_commit("/nowhere/at/all", head)


def test_iter_tree_reports_gitlinks_and_duplicates_verbatim(origin: GitRepo,
                                                            source: GitSource) -> None:
    sha = origin.commit_tree_raw({
        b"vendor/lib": (MODE_GITLINK, b"a" * 40),
        b"a": (MODE_LINK, b"elsewhere"),
        b"a/b": (MODE_FILE, b"x"),
        b"../up": (MODE_FILE, b"y"),
    }, "hostile")
    source.fetch("hello", origin.url)
    paths = [(e.path, e.mode) for e in source.iter_tree(origin.url, sha)]
    assert (b"vendor/lib", MODE_GITLINK) in paths
    assert (b"a", MODE_LINK) in paths and (b"a/b", MODE_FILE) in paths
    assert (b"../up", MODE_FILE) in paths


def _nested_commit(origin: GitRepo, depth: int) -> tuple[str, bytes]:
    """A commit holding ``ok.txt`` and ``d/d/.../bottom.txt`` (``depth`` directories),
    built bottom up (the repository helper recurses per level); returns (sha, deep path)."""
    with origin.open() as repo:
        blob = Blob.from_string(b"y")
        repo.object_store.add_object(blob)
        tree = Tree()
        tree.add(b"bottom.txt", MODE_FILE, blob.id)
        repo.object_store.add_object(tree)
        for _ in range(depth):
            parent = Tree()
            parent.add(b"d", 0o040000, tree.id)
            repo.object_store.add_object(parent)
            tree = parent
        tree.add(b"ok.txt", MODE_FILE, blob.id)
        repo.object_store.add_object(tree)
        commit = Commit()
        commit.tree, commit.parents = tree.id, [repo.refs[b"HEAD"]]
        commit.author = commit.committer = b"Ada <ada@example.com>"
        commit.author_time = commit.commit_time = T0
        commit.author_timezone = commit.commit_timezone = 0
        commit.message = b"nested\n"
        repo.object_store.add_object(commit)
        repo.refs[b"refs/heads/nested"] = commit.id
    return commit.id.decode(), b"d/" * depth + b"bottom.txt"


def test_a_deep_nesting_is_refused_without_exhausting_the_stack(origin: GitRepo,
                                                                  source: GitSource) -> None:
    sha, _deep = _nested_commit(origin, gitsource.MAX_TREE_DEPTH + 50)
    source.fetch("hello", origin.url)
    with pytest.raises(StagingError, match=(
            rf"plugin 'hello': refusing to stage commit {sha}: directory '(d/){{{gitsource.MAX_TREE_DEPTH}}}'"
            rf" is nested more than {gitsource.MAX_TREE_DEPTH} levels deep\. Flatten it")):
        list(source.iter_tree(origin.url, sha, plugin="hello"))
    # Just under the limit walks to the bottom, in tree order.
    sha, deep = _nested_commit(origin, gitsource.MAX_TREE_DEPTH - 1)
    source.fetch("hello", origin.url)
    assert [e.path for e in source.iter_tree(origin.url, sha)] == [deep, b"ok.txt"]


def test_a_huge_directory_listing_is_refused_from_its_header(origin: GitRepo, source: GitSource,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"many/{'n' * 60}{i:03}.txt".encode(): (MODE_FILE, b"x") for i in range(200)}
    sha = origin.commit_tree_raw({b"top.txt": (MODE_FILE, b"t"), **files}, "a long listing")
    source.fetch("hello", origin.url)
    assert len(list(source.iter_tree(origin.url, sha))) == 201  # under the real limit
    read: list[bytes] = []
    real_raw = gitsource._raw
    monkeypatch.setattr(gitsource, "_raw", lambda repo, sha, kind: read.append(sha) or real_raw(repo, sha, kind))
    monkeypatch.setattr(gitsource, "MAX_TREE_OBJECT", 4096)  # the listing of many/ is ~15 KiB
    with pytest.raises(StagingError, match=(
            rf"refusing to stage commit {sha}: the listing of 'many/' \(tree [0-9a-f]{{40}}\) is \d+ bytes,"
            r" over the limit of 0 MiB for one directory\. Split that directory")) as refused:
        list(source.iter_tree(origin.url, sha, plugin="hello"))
    many = re.search(r"\(tree ([0-9a-f]{40})\)", str(refused.value)).group(1)  # type: ignore[union-attr]
    assert many.encode() not in read, "the refused listing was inflated"
    with pytest.raises(StagingError, match="the listing of 'many/'"):
        source.entries(origin.url, sha, "many", plugin="hello")


# -- URLs --------------------------------------------------------------------


@pytest.mark.parametrize(("url", "kind"), [
    ("/srv/git/hello", "local"),
    ("./hello", "local"),
    ("hello", "local"),
    ("file:///srv/git/hello", "local"),
    ("https://git.example.com/team/hello.git", "http"),
    ("ssh://git@git.example.com:2222/team/hello.git", "ssh"),
    ("git@git.example.com:team/hello.git", "ssh"),
    ("git.example.com:hello.git", "ssh"),
    ("git://git.example.com/hello.git", "git"),
])
def test_classify_url(url: str, kind: str) -> None:
    assert classify_url(url)[0] == kind


@pytest.mark.parametrize(("url", "host", "port", "user", "path"), [
    ("git@git.example.com:team/hello.git", "git.example.com", None, "git", "team/hello.git"),
    ("ssh://ada@git.example.com:2222/srv/hello.git", "git.example.com", 2222, "ada",
     "/srv/hello.git"),
])
def test_ssh_urls_go_to_dulwichs_ssh_client_in_batch_mode(
        source: GitSource, monkeypatch: pytest.MonkeyPatch, url: str, host: str,
        port: int | None, user: str, path: str) -> None:
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    with source._client(url) as (client, client_path):  # no connection is made here
        assert type(client).__name__ == "SSHGitClient"
        assert (client.host, client.port, client.username, client_path) == (host, port, user,
                                                                              path)
        assert "BatchMode=yes" in client.ssh_command
        assert "ConnectTimeout=5" in client.ssh_command


def test_classify_url_refuses_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        classify_url("ftp://example.com/x.git")


def test_unsupported_scheme_is_a_fetch_error(source: GitSource) -> None:
    with pytest.raises(FetchError, match="plugin 'hello': could not fetch ftp://x/y.*"
                       "unsupported URL scheme"):
        source.fetch("hello", "ftp://x/y")


def test_mirror_names_are_stable_safe_and_distinct(source: GitSource) -> None:
    a = source.mirror_path("https://Git.Example.com/team/hello.git/")
    assert a == source.mirror_path("https://git.example.com/team/hello.git")
    with_password = source.mirror_path("https://ada:pw@git.example.com/team/hello.git")
    assert with_password == source.mirror_path("https://ada@git.example.com/team/hello.git")
    assert "pw" not in with_password.name
    assert a != source.mirror_path("https://git.example.com/team/hello")
    assert a != source.mirror_path("ssh://git@git.example.com/team/hello.git")
    assert re.fullmatch(r"git\.example\.com-team-hello\.git-[0-9a-f]{12}\.git", a.name)
    scp = source.mirror_path("git@git.example.com:team/hello.git")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", scp.name)
    assert normalise_url("ssh://git@Host:22/x/") == "ssh://git@host:22/x"
    assert redact_url("https://u:p@h/x") == "https://u:***@h/x"



def test_tags_lists_lightweight_and_annotated_tags_newest_first(tmp_path: Path, source: GitSource) -> None:
    repo = GitRepo(tmp_path / "tagged")
    repo.write("a.txt", "a")
    first = repo.commit("first", timestamp=T0)
    repo.tag("light")
    repo.write("a.txt", "b")
    second = repo.commit("second", timestamp=T0 + 100)
    repo.tag("annotated", annotated=True, message="second release")
    with pytest.raises(FetchError, match="has not been fetched yet"):
        source.tags("hello", repo.url)
    source.fetch("hello", repo.url)
    assert source.tags("hello", repo.url) == [("annotated", second, T0 + 100), ("light", first, T0)]


# -- sizes from headers, streaming (bounded memory) ------------------------------


@pytest.mark.parametrize("use_git", [True, False], ids=["git", "dulwich"])
def test_blob_sizes_from_headers_loose_packed_and_deltas(tmp_path: Path, use_git: bool) -> None:
    import shutil
    import subprocess

    from dulwich.objects import Blob
    from dulwich.repo import Repo

    if use_git and shutil.which("git") is None:
        pytest.skip("the git command is not installed")
    origin = GitRepo(tmp_path / "origin")
    base = "".join(f"line {i}\n" for i in range(20000))
    origin.write("a.txt", base)
    origin.write("b.txt", base.replace("line 5\n", "LINE five\n"))  # a delta of a.txt, packed
    origin.write("empty", b"")
    head = origin.commit("similar files")
    source = GitSource(tmp_path / "mirrors", git_command=use_git)
    source.fetch("hello", origin.url)
    mirror = source.mirror_path(origin.url)
    if shutil.which("git"):  # deltas in the pack, as a real server sends them
        subprocess.run(["git", "--git-dir", str(mirror), "repack", "-adfq", "--window=50"],
                       check=True)
    loose = Blob.from_string(b"x" * 777)
    with Repo(str(mirror)) as repo:
        repo.object_store.add_object(loose)  # a loose object beside the pack
    entries = {e.path: e.sha for e in source.iter_tree(origin.url, head)}
    shas = [*entries.values(), loose.id]
    sizes = source.blob_sizes(origin.url, shas)
    assert sizes == {entries[b"a.txt"]: len(base), entries[b"b.txt"]: len(base) + 3,
                     entries[b"empty"]: 0, loose.id: 777}
    streamed = [b"".join(chunks) for chunks in source.stream_blobs(origin.url, shas)]
    assert [len(data) for data in streamed] == [sizes[sha] for sha in shas]
    assert streamed[-1] == b"x" * 777
    with pytest.raises(FetchError, match=r"blob [0-9a-f]{40} of .* holds 208890 bytes, over the "
                       r"limit of 1000"):
        for chunks in source.stream_blobs(origin.url, [entries[b"a.txt"]], max_size=1000):
            list(chunks)
    with Repo(str(origin.path)) as repo:
        tree_id = repo[head.encode()].tree
    with pytest.raises(FetchError, match="not a blob|expected 3"):
        source.blob_sizes(origin.url, [tree_id])
    with pytest.raises(FetchError):
        source.blob_sizes(origin.url, [b"f" * 40])


def test_a_damaged_object_is_a_fetch_error_that_says_what_to_do(tmp_path: Path) -> None:
    from dulwich.objects import Blob
    from dulwich.repo import Repo

    origin = GitRepo(tmp_path / "origin")
    origin.write("a.txt", "hello\n")
    head = origin.commit("one")
    source = GitSource(tmp_path / "mirrors", git_command=None)
    source.fetch("hello", origin.url)
    blob = Blob.from_string(b"damaged " * 100)
    mirror = source.mirror_path(origin.url)
    with Repo(str(mirror)) as repo:
        repo.object_store.add_object(blob)
    path = mirror / "objects" / blob.id[:2].decode() / blob.id[2:].decode()
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(data[:12] + b"\xff" * 20)  # a zlib stream that breaks after the header
    with pytest.raises(FetchError, match=r"plugin 'hello': object [0-9a-f]{40} in the mirror of "
                       r".* is damaged \(\d+ bytes where its header says 800\)\. Delete .* so "
                       "it is fetched afresh"):
        next(iter(next(source.stream_blobs(origin.url, [blob.id], plugin="hello"))))
    path.write_bytes(b"\x78\x9c" + b"\xff" * 30)  # not even a header: zlib.error inside dulwich
    with pytest.raises(FetchError, match=r"plugin 'hello': could not read the mirror of .*: "
                       r"error: Error -3 while decompressing"):
        source.blob_sizes(origin.url, [blob.id], plugin="hello")
    assert head
