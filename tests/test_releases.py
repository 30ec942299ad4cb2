"""Tests of gitplug.deploy.releases: staging real commits, refusing unsafe trees, pruning."""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from gitplug.deploy.gitsource import GitSource
from gitplug.deploy.releases import LEDGER_NAME, Release, ReleaseStore, TestRecord
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
    """What is under the plugin's releases directory, but the ledger of shared files."""
    plugin_dir = store.releases_dir / "hello"
    return sorted(p.name for p in plugin_dir.iterdir() if p.name != LEDGER_NAME) \
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


# -- reusing the files of earlier releases (hard links) ---------------------------


def _files(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """``{path: (content, mode, inode)}`` of every file of a release but its metadata."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".gitplug") or path.is_symlink() or path.is_dir():
            continue
        info = path.lstat()
        found[rel] = (path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_ino)
    return found


@pytest.fixture()
def no_hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file the manifest check hashes (it should trust the ledger instead)."""
    from gitplug.runtime import manifest

    hashed: list[str] = []
    real = manifest.git_blob_id

    def spy(path: str | Path) -> str:
        hashed.append(str(path))
        return real(path)

    monkeypatch.setattr(manifest, "git_blob_id", spy)
    return hashed


def _overwrite(path: Path, content: bytes) -> None:
    """Write into a read-only file of a release as a careless root (or its owner) would."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.geteuid() != 0:
        path.chmod(0o644)
    with open(path, "r+b") as handle:  # in place: the inode every link shares
        handle.write(content)
        handle.truncate()
    path.chmod(mode)


def test_a_later_release_links_unchanged_files_and_changes_nothing_earlier(
        origin: GitRepo, source: GitSource, store: ReleaseStore, no_hashing: list[str]) -> None:
    from gitplug.runtime.manifest import verify_release

    first = _stage(store, source, origin, origin.head or "")
    before = _files(first.path)
    origin.write("hello/__init__.py", "plugin = 'hello, again'\n")
    origin.write("hello/new.py", "x = 1\n")
    origin.write("copy_of_run.sh", "#!/bin/sh\necho run\n", executable=True)
    origin.write("not_executable.sh", "#!/bin/sh\necho run\n")  # same blob, other mode
    origin.remove("hello/static/app.js")
    second = _stage(store, source, origin, origin.commit("second"))
    files = _files(second.path)
    # Unchanged files are the same inodes; changed and new ones are files of their own.
    for rel in ("hello/templates/index.html", "tests/test_hello.py", "bin/run.sh"):
        assert files[rel][2] == before[rel][2], rel
    assert files["hello/__init__.py"][2] != before["hello/__init__.py"][2]
    assert files["hello/__init__.py"][0] == b"plugin = 'hello, again'\n"
    # One blob in one mode is one inode, within a release too; another mode is another file.
    assert files["copy_of_run.sh"][2] == files["bin/run.sh"][2]
    assert files["not_executable.sh"][1:] != files["bin/run.sh"][1:]
    assert files["not_executable.sh"][1] == 0o444 and files["bin/run.sh"][1] == 0o555
    assert "hello/static/app.js" not in files
    # The earlier release is exactly as it was: same contents, modes and inodes.
    assert _files(first.path) == before
    # Both verify, and without hashing a file: the ledger vouches for the shared
    # inodes whose ctime the later links moved.
    verify_release(first.path, plugin="hello", release_id=first.commit)
    verify_release(second.path, plugin="hello", release_id=second.commit)
    assert no_hashing == []
    ledger = json.loads((store.releases_dir / "hello" / LEDGER_NAME).read_text())
    shared = ledger["inodes"][str(files["bin/run.sh"][2])]
    assert shared[0] == _blob_id(b"#!/bin/sh\necho run\n")
    assert shared[2:] == ["x", f"{second.commit}/bin/run.sh"]  # the newest holder


def _blob_id(content: bytes) -> str:
    from hashlib import sha1

    return sha1(b"blob %d\0" % len(content) + content).hexdigest()  # noqa: S324 - git's id


def test_a_file_changed_in_one_release_is_refused_in_all_and_never_linked_again(
        origin: GitRepo, source: GitSource, store: ReleaseStore) -> None:
    from gitplug.errors import ReleaseModified
    from gitplug.runtime.manifest import verify_release

    first = _stage(store, source, origin, origin.head or "")
    origin.write("hello/__init__.py", "plugin = 'second'\n")
    second = _stage(store, source, origin, origin.commit("second"))
    shared = first.path / "hello" / "templates" / "index.html"
    assert shared.stat().st_ino == (second.path / "hello/templates/index.html").stat().st_ino
    # Same size, new content, written in place through one release: both share it.
    _overwrite(shared, b"<p>{{ PWNED!!! }}</p>\n")
    assert len(b"<p>{{ PWNED!!! }}</p>\n") == len(b"<p>{{ greeting }}</p>\n")
    for release in (first, second):
        with pytest.raises(ReleaseModified, match=r"'hello/templates/index\.html' was modified"):
            verify_release(release.path, plugin="hello", release_id=release.commit)
    # A later release does not link it: it gets the commit's content in a file of its own.
    origin.write("hello/__init__.py", "plugin = 'third'\n")
    third = _stage(store, source, origin, origin.commit("third"))
    fresh = third.path / "hello" / "templates" / "index.html"
    assert fresh.read_bytes() == b"<p>{{ greeting }}</p>\n"
    assert fresh.stat().st_ino != shared.stat().st_ino
    verify_release(third.path, plugin="hello", release_id=third.commit)
    # ...and the one after links that good copy again, not the modified one.
    origin.write("hello/__init__.py", "plugin = 'fourth'\n")
    fourth = _stage(store, source, origin, origin.commit("fourth"))
    assert (fourth.path / "hello/templates/index.html").stat().st_ino == fresh.stat().st_ino
    with pytest.raises(ReleaseModified):
        verify_release(first.path, plugin="hello", release_id=first.commit)


def test_a_chmod_back_and_forth_costs_a_hash_not_the_release(
        origin: GitRepo, source: GitSource, store: ReleaseStore, no_hashing: list[str]) -> None:
    from gitplug.runtime.manifest import verify_release

    first = _stage(store, source, origin, origin.head or "")
    script = first.path / "bin" / "run.sh"
    script.chmod(0o755)
    script.chmod(0o555)  # content and mode as staged; its ctime moved
    verify_release(first.path, plugin="hello", release_id=first.commit)
    assert no_hashing == [str(script)]
    origin.write("hello/__init__.py", "plugin = 'second'\n")
    second = _stage(store, source, origin, origin.commit("second"))
    # Hashed once more by the stager, found intact, linked, and vouched for again.
    assert (second.path / "bin/run.sh").stat().st_ino == script.stat().st_ino
    no_hashing.clear()
    verify_release(first.path, plugin="hello", release_id=first.commit)
    verify_release(second.path, plugin="hello", release_id=second.commit)
    assert no_hashing == []


def test_without_a_ledger_files_are_hashed_then_linked(
        origin: GitRepo, source: GitSource, store: ReleaseStore, no_hashing: list[str]) -> None:
    from gitplug.runtime.manifest import verify_release

    first = _stage(store, source, origin, origin.head or "")
    ledger = store.releases_dir / "hello" / LEDGER_NAME
    assert ledger.is_file()
    ledger.unlink()  # a crash before it was written, or a data_dir copied without it
    origin.write("hello/__init__.py", "plugin = 'second'\n")
    second = _stage(store, source, origin, origin.commit("second"))
    assert ledger.is_file()
    index = "hello/templates/index.html"
    assert (second.path / index).stat().st_ino == (first.path / index).stat().st_ino
    no_hashing.clear()
    verify_release(first.path, plugin="hello", release_id=first.commit)
    assert no_hashing == []
    ledger.write_text("{not json")  # damaged: costs hashing, never safety
    verify_release(first.path, plugin="hello", release_id=first.commit)
    assert no_hashing  # the shared files were hashed, and matched


def test_pruning_keeps_the_files_of_the_releases_kept(
        origin: GitRepo, source: GitSource, store: ReleaseStore, no_hashing: list[str]) -> None:
    from gitplug.runtime.manifest import verify_release

    commits = [origin.head or ""]
    for n in range(3):
        origin.write("hello/__init__.py", f"plugin = {n}\n")
        commits.append(origin.commit(f"change {n}"))
    releases = [_stage(store, source, origin, commit) for commit in commits]
    kept = releases[-1]
    before = _files(kept.path)
    assert store.prune("hello", keep=1, protect=[]) == commits[-2::-1]
    assert _files(kept.path) == before
    verify_release(kept.path, plugin="hello", release_id=kept.commit)
    assert no_hashing == []
    # Removing the newest: the ledger finds the files in the release that is left.
    origin.write("hello/__init__.py", "plugin = 'after'\n")
    after = _stage(store, source, origin, origin.commit("after"))
    assert store.remove("hello", after.commit)
    origin.write("hello/__init__.py", "plugin = 'last'\n")
    last = _stage(store, source, origin, origin.commit("last"))
    index = "hello/templates/index.html"
    assert (last.path / index).stat().st_ino == before[index][2]
    ledger = json.loads((store.releases_dir / "hello" / LEDGER_NAME).read_text())
    in_last = {str(info[2]) for info in _files(last.path).values()}
    for ino, entry in ledger["inodes"].items():  # each where a release still holds it
        assert (store.releases_dir / "hello" / entry[3]).stat().st_ino == int(ino)
        assert entry[3].startswith(last.commit if ino in in_last else kept.commit)
    no_hashing.clear()
    verify_release(kept.path, plugin="hello", release_id=kept.commit)
    assert no_hashing == []
    store.prune("hello", keep=0, protect=[])
    assert _leftovers(store) == []
    assert json.loads((store.releases_dir / "hello" / LEDGER_NAME).read_text())["inodes"] == {}


def test_a_ledger_cannot_point_outside_the_releases(
        origin: GitRepo, source: GitSource, store: ReleaseStore, tmp_path: Path) -> None:
    first = _stage(store, source, origin, origin.head or "")
    ledger_path = store.releases_dir / "hello" / LEDGER_NAME
    ledger = json.loads(ledger_path.read_text())
    outside = tmp_path / "outside.html"
    outside.write_bytes(b"<p>{{ greeting }}</p>\n")  # the blob's content, elsewhere
    outside.chmod(0o444)
    info = outside.stat()
    blob = _blob_id(b"<p>{{ greeting }}</p>\n")
    ledger["inodes"] = {str(info.st_ino): [blob, info.st_ctime_ns, "f", "../../outside.html"]}
    ledger_path.write_text(json.dumps(ledger))
    origin.write("hello/__init__.py", "plugin = 'second'\n")
    second = _stage(store, source, origin, origin.commit("second"))
    index = second.path / "hello" / "templates" / "index.html"
    assert index.stat().st_ino not in (info.st_ino, (first.path / "hello/templates/index.html")
                                       .stat().st_ino)
    assert outside.stat().st_nlink == 1


@pytest.mark.parametrize("headroom", [0, 100], ids=["at-the-limit", "reaches-it-midway"])
def test_a_file_at_the_link_limit_is_copied_once_and_the_copy_is_shared_from_then_on(
        source: GitSource, store: ReleaseStore, tmp_path: Path, no_hashing: list[str],
        headroom: int) -> None:
    """An empty ``__init__.py`` shared by thousands of files fills its inode's links (EMLINK)."""
    from gitplug.runtime.manifest import verify_release

    repo = GitRepo(tmp_path / "empty")  # one blob: the empty file
    repo.write("pkg/__init__.py", "")
    first = _stage(store, source, repo, repo.commit("one empty file"))
    full = first.path / "pkg" / "__init__.py"
    # Real links on the real file system, up to its limit (65,000 on ext4), then
    # ``headroom`` of them removed again: that many more links fit.
    crowd = tmp_path / "crowd"
    crowd.mkdir()
    try:
        for n in range(70_000):
            try:
                os.link(full, crowd / str(n))
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                break
        else:
            pytest.skip(f"the file system of {tmp_path} linked one file 70,000 times without "
                        "EMLINK: it has no practical link limit to reach")
        for m in range(n - headroom, n):
            os.unlink(crowd / str(m))
        limit = full.stat().st_nlink + headroom
        # 601 files of the blob: three slices of links, made by the pool's threads at once.
        for n in range(600):
            repo.write(f"pkg/m{n:03}/__init__.py", "")
        second = _stage(store, source, repo, repo.commit("600 more"))
        inodes = collections.Counter(info[2] for info in _files(second.path).values())
        assert full.stat().st_nlink == limit
        # The origin takes what fits; ONE copy takes the rest, not one copy each.
        copy = next(ino for ino in inodes if ino != full.stat().st_ino)
        expected = {copy: 601 - headroom}
        if headroom:
            expected[full.stat().st_ino] = headroom
        assert inodes == expected
        assert os.stat(second.path / "pkg/m599/__init__.py").st_nlink == 601 - headroom
        no_hashing.clear()
        for release in (first, second):  # the ledger vouches for both inodes' new ctimes
            verify_release(release.path, plugin="hello", release_id=release.commit)
        assert no_hashing == []
        # A further release links that copy: no copy again, no failed link to the full inode.
        repo.write("pkg/later.py", "")
        third = _stage(store, source, repo, repo.commit("one more"))
        assert {info[2] for info in _files(third.path).values()} == {copy}
        assert os.stat(third.path / "pkg/later.py").st_nlink == 601 - headroom + 602
        assert full.stat().st_nlink == limit
        ledger = json.loads((store.releases_dir / "hello" / LEDGER_NAME).read_text())["inodes"]
        assert ledger[str(copy)][0] == _blob_id(b"")
        assert ledger[str(copy)][2:] == ["f", f"{third.commit}/pkg/__init__.py"]
        assert ledger[str(full.stat().st_ino)][0] == _blob_id(b"")  # still vouched for
        for release in (first, second, third):
            verify_release(release.path, plugin="hello", release_id=release.commit)
        assert no_hashing == []
    finally:
        shutil.rmtree(crowd)  # the links that filled the inode, whatever tmp_path keeps
    assert full.stat().st_nlink == 1 + headroom  # its releases' links only
