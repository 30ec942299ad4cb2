"""Tests of gitplug.deploy.releases: staging real commits, refusing unsafe trees, pruning."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from gitplug.deploy.gitsource import GitSource
from gitplug.deploy.releases import OBJECTS_DIR, Release, ReleaseStore, TestRecord
from gitplug.errors import FetchError, RefNotFound, StagingError, UnsafeTree
from gitrepo import MODE_EXEC, MODE_FILE, MODE_GITLINK, MODE_LINK, GitRepo


@pytest.fixture()
def origin(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "origin")
    repo.write("hello/__init__.py", "plugin = 'hello'\n")
    repo.write("hello/templates/index.html", "<p>{{ greeting }}</p>\n")
    repo.write("hello/static/app.js", "console.log('hi');\n")
    repo.write("tests/test_hello.py", "def test_ok():\n    assert True\n")
    repo.write("bin/run.sh", "#!/bin/sh\necho run\n", executable=True)
    repo.symlink("current", "hello")                      # a directory link, inside
    repo.symlink("hello/templates/run", "../../bin/run.sh")  # climbs, but stays inside
    repo.commit("First release\n\nWith details.", author="Bob <bob@example.com>")
    return repo


@pytest.fixture()
def source(tmp_path: Path) -> GitSource:
    return GitSource(tmp_path / "mirrors")


@pytest.fixture()
def store(tmp_path: Path) -> ReleaseStore:
    return ReleaseStore(tmp_path / "releases")


def _stage(store: ReleaseStore, source: GitSource, repo: GitRepo, commit: str,
           ref: str = "main", **limits: int) -> Release:
    source.fetch("hello", repo.url)
    return store.stage("hello", source, repo.url, commit, ref, **limits)


def _leftovers(store: ReleaseStore) -> list[str]:
    """What is under the plugin's releases directory, but its object store."""
    plugin_dir = store.releases_dir / "hello"
    return sorted(p.name for p in plugin_dir.iterdir() if p.name != OBJECTS_DIR) \
        if plugin_dir.exists() else []


def test_stage_writes_an_immutable_checkout_with_metadata(
        origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    head = origin.head
    assert head is not None
    release = _stage(store, source, origin, head)
    root = store.path_for("hello", head)
    assert release.path == root == store.releases_dir / "hello" / head
    assert (root / "hello/__init__.py").read_text() == "plugin = 'hello'\n"
    assert (root / "hello/templates/index.html").read_text() == "<p>{{ greeting }}</p>\n"
    assert stat.S_IMODE((root / "bin/run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((root / "hello/__init__.py").stat().st_mode) == 0o444
    # Directories are not writable once in place; only .gitplug/ (the verdict) is.
    assert stat.S_IMODE((root / "hello/templates").stat().st_mode) == 0o555
    assert stat.S_IMODE(root.stat().st_mode) == 0o555
    assert stat.S_IMODE((root / ".gitplug").stat().st_mode) == 0o755
    assert os.readlink(root / "current") == "hello"
    assert (root / "current" / "__init__.py").is_file()
    assert (root / "hello/templates/run").read_text().startswith("#!/bin/sh")
    assert release.plugin == "hello" and release.commit == head and release.ref == "main"
    assert release.author == "Bob <bob@example.com>"
    assert release.message == "First release\n\nWith details."
    with origin.open() as repo:
        assert release.tree == repo[head.encode()].tree.decode()
    assert datetime.fromisoformat(release.staged_at).utcoffset().total_seconds() == 0
    assert release.test is None
    meta = json.loads((root / ".gitplug/release.json").read_text())
    assert meta["commit"] == head and meta["plugin"] == "hello" and meta["url"] == origin.url
    assert meta["files"] == 7
    assert _leftovers(store) == [head]  # no temp dir, no lock file
    assert store.get("hello", head) == release
    assert store.list("hello") == [release]


def test_stage_is_idempotent(origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    head = origin.head
    assert head is not None
    first = _stage(store, source, origin, head, ref="main")
    marker = (first.path / "hello/__init__.py").stat().st_mtime_ns
    again = store.stage("hello", source, origin.url, head, "v1")
    assert again == first  # same metadata, original ref kept
    assert (first.path / "hello/__init__.py").stat().st_mtime_ns == marker


def test_concurrent_stagers_of_one_commit_agree(
        origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    head = origin.head
    assert head is not None
    source.fetch("hello", origin.url)
    results: list[Release | BaseException] = []

    def stage() -> None:
        try:
            results.append(store.stage("hello", source, origin.url, head, "main"))
        except BaseException as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=stage) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(r, Release) for r in results), results
    assert len({r.staged_at for r in results if isinstance(r, Release)}) == 1
    assert _leftovers(store) == [head]


def test_stage_unknown_commit(origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    with pytest.raises(RefNotFound, match="commit 'f{40}' is not in the mirror"):
        _stage(store, source, origin, "f" * 40)
    assert _leftovers(store) == []


UNSAFE_TREES = [
    pytest.param({b"../evil": (MODE_FILE, b"x")}, False, "../evil", "'.' or '..' component",
                 id="dotdot"),
    pytest.param({b"a/../../evil": (MODE_FILE, b"x")}, True, "a/../../evil", "'..' component",
                 id="dotdot-inside-one-name"),
    pytest.param({b"/etc/evil": (MODE_FILE, b"x")}, False, "/etc/evil", "absolute path",
                 id="absolute"),
    pytest.param({b"a//b": (MODE_FILE, b"x")}, False, "a//b", "empty path component",
                 id="empty-component"),
    pytest.param({b".git/config": (MODE_FILE, b"x")}, False, ".git/config", ".git component",
                 id="dot-git"),
    pytest.param({b"sub/.GIT/hooks/post-checkout": (MODE_EXEC, b"x")}, False,
                 "sub/.GIT/hooks/post-checkout", ".git component", id="dot-git-uppercase"),
    pytest.param({b".git. /config": (MODE_FILE, b"x")}, False, ".git. /config",
                 ".git component", id="dot-git-trailing-dot-space"),
    pytest.param({b"GIT~1/config": (MODE_FILE, b"x")}, False, "GIT~1/config",
                 ".git component", id="dot-git-short-name"),
    pytest.param({".g\u200cit/config".encode(): (MODE_FILE, b"x")}, False,
                 ".g\u200cit/config", ".git component", id="dot-git-hfs-ignorable"),
    pytest.param({b".gitplug/release.json": (MODE_FILE, b"{}")}, False,
                 ".gitplug/release.json", "reserved for gitplug", id="metadata-dir"),
    pytest.param({b"link": (MODE_LINK, b"/etc/passwd")}, False, "link",
                 "symlink to '/etc/passwd', which is an absolute path", id="link-absolute"),
    pytest.param({b"d/link": (MODE_LINK, b"../../outside")}, False, "d/link",
                 "resolves outside the release", id="link-escapes"),
    pytest.param({b"s": (MODE_LINK, b"."), b"t": (MODE_LINK, b"s/..")}, False, "t",
                 "symlink to 's/..', which resolves outside", id="link-chain-escapes"),
    pytest.param({b"l1": (MODE_LINK, b"l2"), b"l2": (MODE_LINK, b"l1")}, False, "l1",
                 "symlink loop", id="link-loop"),
    pytest.param({b"a": (MODE_LINK, b"elsewhere"), b"a/b": (MODE_FILE, b"x")}, True, "a/b",
                 "written through the symlink 'a'", id="through-link-slash-in-name"),
    pytest.param({b"a": (MODE_LINK, b"elsewhere"), b"a/b": (MODE_FILE, b"x")}, False, "a/b",
                 "written through the symlink 'a'", id="through-link-duplicate-names"),
    pytest.param({b"f": (MODE_FILE, b"x"), b"f/g": (MODE_FILE, b"y")}, True, "f/g",
                 "written through the file 'f'", id="through-file"),
    pytest.param({b"vendor/lib": (MODE_GITLINK, b"a" * 40)}, False, "vendor/lib",
                 "is a submodule", id="submodule"),
]


@pytest.mark.parametrize(("entries", "literal", "path", "why"), UNSAFE_TREES)
def test_unsafe_trees_are_refused_before_anything_is_written(
        origin: GitRepo, store: ReleaseStore, tmp_path: Path,
        entries: dict[bytes, tuple[int, bytes]], literal: bool, path: str, why: str) -> None:
    # Through dulwich: the git command refuses some of these trees at fetch already
    # (see the next test); the stager must refuse them whatever fetched them.
    source = GitSource(tmp_path / "mirrors", git_command=None)
    entries = {b"ok.txt": (MODE_FILE, b"fine"), **entries}
    commit = origin.commit_tree_raw(entries, "hostile", literal_names=literal)
    expected = f"plugin 'hello': refusing to stage commit {commit}: tree entry {path!r}"
    with pytest.raises(UnsafeTree, match=re.escape(expected) + ".*" + re.escape(why)) as info:
        _stage(store, source, origin, commit)
    assert info.value.path == path
    assert (info.value.plugin, info.value.commit) == ("hello", commit)
    assert _leftovers(store) == []


def test_git_fetch_refuses_a_malformed_tree_clearly(
        origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    assert source.git_command, "the git command is installed here"
    commit = origin.commit_tree_raw({b"a//b": (MODE_FILE, b"x")}, "hostile")
    with pytest.raises(FetchError, match=r"plugin 'hello': could not fetch .*: git fetch exited "
                       r"with status 128 \(remote: empty filename in tree entry\)\. git refuses "
                       r"an object of that repository"):
        _stage(store, source, origin, commit)
    assert _leftovers(store) == []


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_file_bytes": 1000}, r"file size limit of 1000 bytes exceeded at 'big\.bin' "
     r"\(2000 bytes"),
    ({"max_total_bytes": 2500}, r"release size limit of 2500 bytes exceeded at '.*' "),
])
def test_size_limits(origin: GitRepo, source: GitSource, store: ReleaseStore,
                     limits: dict[str, int], message: str) -> None:
    origin.write("big.bin", b"\0" * 2000)
    origin.write("zz.bin", b"\1" * 900)
    commit = origin.commit("big files")
    with pytest.raises(StagingError, match=rf"plugin 'hello': commit {commit} is too large to "
                       rf"stage: {message}"):
        _stage(store, source, origin, commit, **limits)
    assert _leftovers(store) == []


def test_releases_dir_that_is_a_file(origin: GitRepo, source: GitSource, tmp_path: Path) -> None:
    blocker = tmp_path / "releases"
    blocker.write_text("not a directory")
    store = ReleaseStore(blocker)
    head = origin.head
    assert head is not None
    with pytest.raises(StagingError, match=rf"could not write the release of {head} under "
                       rf"{blocker}/hello: .*Check that .* is a directory writable by this user "
                       r"\(fix its permissions"):
        _stage(store, source, origin, head)


def test_releases_dir_not_writable(origin: GitRepo, source: GitSource, tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    locked = releases / "hello"
    locked.mkdir(parents=True)
    locked.chmod(0o500)
    # Root ignores permission bits (and CI runs as root); the immutable attribute
    # stops root too. Without chattr, or on a file system without it, this fails
    # loudly rather than skip: the test must run where CI runs.
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(locked)], check=True, capture_output=True)
    head = origin.head
    assert head is not None
    try:
        with pytest.raises(
            StagingError, match="(Permission denied|Operation not permitted).*fix its permissions"
        ):
            _stage(ReleaseStore(releases), source, origin, head)
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(locked)], check=True, capture_output=True)
        locked.chmod(0o755)


def test_record_test_result(origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    head = origin.head
    assert head is not None
    _stage(store, source, origin, head)
    failed = TestRecord(passed=False, returncode=1, timed_out=False, duration_s=0.5,
                        log_path="/logs/1.log", ran_at="2024-01-01T00:00:00+00:00")
    assert store.record_test_result("hello", head, failed).test == failed
    passed = TestRecord(passed=True, returncode=0, timed_out=False, duration_s=1.25,
                        log_path=None, ran_at="2024-01-01T00:01:00+00:00")
    release = store.record_test_result("hello", head, passed)
    assert release.test == passed
    assert store.get("hello", head) == release
    assert sorted(p.name for p in (release.path / ".gitplug").iterdir()) == [
        "manifest.json", "release.json", "test.json"]
    with pytest.raises(StagingError, match=r"cannot record a test result: no complete release "
                       r"of a{40}"):
        store.record_test_result("hello", "a" * 40, passed)


def test_prune_keeps_newest_and_protected(origin: GitRepo, source: GitSource,
                                          store: ReleaseStore) -> None:
    commits = [origin.head]
    for n in range(3):
        origin.write("hello/__init__.py", f"plugin = {n}\n")
        commits.append(origin.commit(f"change {n}"))
    source.fetch("hello", origin.url)
    for commit in commits:
        store.stage("hello", source, origin.url, commit, "main")  # type: ignore[arg-type]
    assert [r.commit for r in store.list("hello")] == commits[::-1]
    oldest, second, third, newest = commits
    removed = store.prune("hello", keep=1, protect={oldest})
    assert removed == [third, second]
    assert [r.commit for r in store.list("hello")] == [newest, oldest]
    assert _leftovers(store) == sorted([newest, oldest])  # type: ignore[type-var]
    assert store.prune("hello", keep=0, protect=[newest, oldest]) == []
    assert store.prune("nobody", keep=1, protect=[]) == []


def test_cleanup_incomplete_after_a_crash(origin: GitRepo, source: GitSource,
                                          store: ReleaseStore) -> None:
    head = origin.head
    assert head is not None
    good = _stage(store, source, origin, head)
    plugin_dir = store.releases_dir / "hello"
    crashed = plugin_dir / f".tmp-{'b' * 40}-dead"  # a stager died mid-write
    (crashed / "pkg").mkdir(parents=True)
    (crashed / "pkg/mod.py").write_text("x = 1\n")
    (crashed / "pkg/mod.py").chmod(0o444)
    no_meta = plugin_dir / ("c" * 40)  # a release dir without metadata
    (no_meta / "pkg").mkdir(parents=True)
    orphan_lock = plugin_dir / f".tmp-{'d' * 40}-gone.lock"
    orphan_lock.touch()
    live = plugin_dir / f".tmp-{'e' * 40}-live"  # a stager still running: lock held
    live.mkdir()
    with open(live.with_name(live.name + ".lock"), "wb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert store.get("hello", "c" * 40) is None
        assert store.list("hello") == [good]
        removed = store.cleanup_incomplete()
    assert sorted(removed) == sorted([crashed, no_meta])
    assert _leftovers(store) == sorted([head, live.name, live.name + ".lock"])
    assert store.get("hello", head) == good
    assert ReleaseStore(store.releases_dir / "missing").cleanup_incomplete() == []


def test_invalid_names_are_refused(store: ReleaseStore) -> None:
    with pytest.raises(ValueError, match="invalid plugin name '../x'"):
        store.path_for("../x", "a" * 40)
    with pytest.raises(ValueError, match="invalid commit sha 'main'"):
        store.get("hello", "main")


# -- the manifest the loader checks ------------------------------------------------


def test_manifest_refuses_every_kind_of_change(origin: GitRepo, source: GitSource,
                                               store: ReleaseStore) -> None:
    from gitplug.errors import ReleaseModified
    from gitplug.runtime.manifest import verify_release

    head = origin.head
    assert head is not None
    root = _stage(store, source, origin, head).path
    verify_release(root, plugin="hello", release_id=head)  # as staged: fine

    def refused(match: str) -> None:
        with pytest.raises(ReleaseModified, match=rf"plugin 'hello': release {head[:12]} at "
                           rf"{root} differs from what was staged: {match}\. .*Delete {root} and "
                           "deploy again"):
            verify_release(root, plugin="hello", release_id=head)

    init = root / "hello" / "__init__.py"
    (root / "hello").chmod(0o755)
    # Same size, same mode, new content: the ctime moved, so it is hashed.
    init.chmod(0o644)
    init.write_text("plugin = 'HELLO'\n")
    init.chmod(0o444)
    refused(r"'hello/__init__\.py' was modified")
    init.chmod(0o644)
    init.write_text("plugin = 'hello'\n")  # restored: its hash matches again
    init.chmod(0o444)
    verify_release(root, plugin="hello", release_id=head)
    (root / "hello" / "backdoor.py").write_text("x = 1\n")
    refused(r"'hello/backdoor\.py' was added")
    (root / "hello" / "backdoor.py").unlink()
    (root / "hello" / "static" / "app.js").chmod(0o644)
    (root / "hello" / "static").chmod(0o755)
    (root / "hello" / "static" / "app.js").unlink()
    refused(r"'hello/static/app\.js' was removed")
    (root / "hello" / "static" / "app.js").write_text("console.log('hi');\n")
    (root / "hello" / "static" / "app.js").chmod(0o444)
    verify_release(root, plugin="hello", release_id=head)
    root.chmod(0o755)
    (root / "current").unlink()
    (root / "current").symlink_to("bin")
    refused(r"'current' was replaced by a different symlink")
    (root / "current").unlink()
    (root / "current").symlink_to("hello")
    verify_release(root, plugin="hello", release_id=head)
    (root / ".gitplug" / "manifest.json").chmod(0o644)
    (root / ".gitplug" / "manifest.json").write_text("{")
    refused(r"its manifest .*manifest\.json is unreadable \(.*\)")
    (root / ".gitplug" / "manifest.json").unlink()
    refused(r"its manifest .*manifest\.json is missing")


def test_stage_limits_are_checked_before_anything_is_read(
        origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    for n in range(30):
        origin.write(f"data/f{n:02}.txt", f"{n}\n")
    commit = origin.commit("thirty more files")
    with pytest.raises(StagingError, match=rf"plugin 'hello': commit {commit} has more than 20 "
                       r"files \(limits\.max_files\); nothing was written\."):
        _stage(store, source, origin, commit, max_files=20)
    assert _leftovers(store) == []
    release = _stage(store, source, origin, commit, max_files=37)  # exactly at the limit
    assert release.path.joinpath("data", "f29.txt").read_text() == "29\n"
