"""The fault catalogue (issue 5): git and trees.

Each test breaks one thing on purpose and asserts that (a) the error names what
was wrong, where and what to do, and (b) the last good release still serves;
the harness and the catalogue's conventions are in :mod:`faults_site`.
"""

from __future__ import annotations

import re
import shutil
import textwrap
import typing as t
from pathlib import Path

import pytest

from faults_site import (
    Host,
    MiB,
    host_fixture,  # noqa: F401
    make_host_fixture,  # noqa: F401
    plugin_files,
    v1_repo,
)
from gitplug.deploy.releases import LEDGER_NAME
from gitplug.state import DeployRecord, DeployResult, Stage
from gitrepo import MODE_EXEC, MODE_FILE, MODE_GITLINK, MODE_LINK, GitRepo, serve_http

# =========================================================================== git


def test_unreachable_repository_moved_away(host: Host) -> None:
    shutil.move(str(host.repo.path), str(host.tmp / "moved"))
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': could not fetch {re.escape(host.repo.url)}: no git repository there\."
        r" Check that the repository exists and this host can reach it\.",
    )


def test_a_background_fetch_failure_is_recorded_once_with_a_count(host: Host) -> None:
    """README "Guarantees": a poll or webhook that fails at fetch leaves a record, not one per poll."""
    services = host.gp._state.services

    def background(kind: str) -> DeployRecord | None:
        future = services.trigger("hello", kind)  # what the poll scheduler and the webhook route call
        assert future is not None, "this process is the controller: the trigger runs here"
        return future.result(timeout=120)

    before = [r.id for r in host.gp.history("hello")]
    shutil.move(str(host.repo.path), str(host.tmp / "moved"))
    first = background("poll")
    assert first is not None and (first.result, first.stage, first.trigger) == (
        DeployResult.FAILED, Stage.FETCH, "poll"
    ), first
    assert re.fullmatch(
        rf"plugin 'hello': could not fetch {re.escape(host.repo.url)}: no git repository there\."
        r" Check that the repository exists and this host can reach it\.",
        first.error or "",
    ), first.error
    assert (first.repeats, first.last_seen_at) == (1, None)
    assert [r.id for r in host.gp.history("hello")] == [first.id, *before]
    assert [d.id for _, d, _ in host.failed] == [first.id]  # deploy_failed, as for any failed deploy
    said = [r.getMessage() for r in host.logged]
    assert any(f"deploy {first.id} failed at fetch: " in line for line in said), said
    assert host.gp.status()["plugins"][0]["last_deploy"]["id"] == first.id
    host.assert_good_serves()

    # Failing the same way again, by poll or webhook: the same record counts.
    for kind in ("poll", "poll", "webhook"):
        again = background(kind)
        assert again is not None and again.id == first.id
    record = host.gp.history("hello")[0]
    assert (record.id, record.repeats, record.trigger) == (first.id, 4, "poll")
    assert record.last_seen_at is not None and record.last_seen_at >= record.started_at
    assert record.to_json()["repeats"] == 4
    assert [r.id for r in host.gp.history("hello")] == [first.id, *before]
    assert [d.id for _, d, _ in host.failed] == [first.id]  # notified once
    said = [r.getMessage() for r in host.logged]
    assert any(f"failed again at fetch (4 times since {first.started_at}, deploy {first.id})" in line for line in said)

    # A different failure is a record of its own.
    shutil.move(str(host.tmp / "moved"), str(host.repo.path))
    host.repo.branch("other")
    host.repo.checkout("other")
    host.repo.delete_branch("main")
    other = background("poll")
    assert other is not None and other.id != first.id and other.stage == Stage.FETCH, other
    assert "ref 'main' names no branch, tag or commit" in (other.error or "")
    assert [r.id for r in host.gp.history("hello")] == [other.id, first.id, *before]
    host.assert_good_serves()


def test_unreachable_http_server(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    with serve_http(tmp_path) as base:  # serves tmp_path/repo, which make_host creates
        url = f"{base}/repo"
        host = make_host(repo_url=url)
    # The server is gone: connection refused on that port.
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': could not fetch {re.escape(url)}: could not connect \(.*\)\."
        r" Check that the repository exists and this host can reach it\.",
    )


def test_branch_deleted_after_deploy(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    repo, _v1 = v1_repo(tmp_path)
    repo.branch("feature")
    host = make_host(plugin={"ref": "feature"})
    host.repo.delete_branch("feature")
    host.deploy_fails(
        "fetch",
        r"plugin 'hello': ref 'feature' names no branch, tag or commit in .*repo\."
        r" Available branches: main\. Use a branch, a tag or a commit sha",
    )


@pytest.mark.parametrize(
    "ref",
    [
        "no-such-tag",
        "../../../etc/passwd",
        "refs/heads/../../config",
        "HEAD~1",
        "-rf",
        "main:hello",
        "a" * 300,
    ],
)
def test_unknown_or_hostile_ref(host: Host, ref: str) -> None:
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': ref {re.escape(repr(ref))} names no branch, tag or commit in .*"
        r"Available branches: main\. Use a branch, a tag or a commit sha \(at least 7 hex digits\)\.",
        ref=ref,
    )


def test_tag_moved_to_a_tree(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    repo, v1 = v1_repo(tmp_path)
    repo.tag("stable", commit=v1)
    host = make_host(plugin={"ref": "stable"})
    with host.repo.open() as raw:
        tree = raw[host.good.encode()].tree.decode()
    host.repo.set_ref("refs/tags/stable", tree)
    host.deploy_fails(
        "fetch",
        r"plugin 'hello': ref 'stable' of .*repo names a tree, not a commit\. Use a branch, a tag of a"
        r" commit or a commit sha\.",
    )


def test_force_push_deploys_the_new_commit(host: Host) -> None:
    v2 = host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    # Rewrite history: main now points at a commit that does not descend from v2.
    host.repo.set_ref("refs/heads/main", host.good)
    rewritten = host.commit(plugin_files("rewritten"), "rewritten")
    assert rewritten != v2
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, rewritten)
    assert host.served() == f"200 stamp=rewritten@{rewritten[:7]}"
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.previous_commit) == (rewritten, v2)


def test_moved_tag_deploys_where_it_points_now(
    make_host: t.Callable[..., Host], tmp_path: Path
) -> None:
    repo, v1 = v1_repo(tmp_path)
    repo.tag("stable", annotated=True, message="stable", commit=v1)
    host = make_host(plugin={"ref": "stable"})
    moved = host.commit(plugin_files("v2"), "v2")
    host.repo.tag("stable", annotated=True, message="stable again", commit=moved)
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, moved), (
        record
    )
    assert host.served() == f"200 stamp=v2@{moved[:7]}"


def test_repository_emptied(host: Host) -> None:
    shutil.rmtree(host.repo.path)
    GitRepo(host.repo.path)  # a fresh repository without any commit
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': .*the repository {re.escape(host.repo.url)} is empty \(no branches or"
        r" tags\)\. Push a commit to it\.",
    )


def test_file_over_the_staging_limit(host: Host) -> None:
    # 100 MiB is the default per-file limit; zeros compress well, so the repo stays small.
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files["hello/static/huge.bin"] = b"\0" * (100 * MiB + 1)
    bad = host.commit(files, "a huge file")
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': commit {bad} is too large to stage: file size limit of {100 * MiB} bytes"
        r" exceeded at 'hello/static/huge\.bin' \(104857601 bytes.*Remove large files from the repository",
    )
    assert not (host.tmp / "data" / "releases" / "hello" / bad).exists()
    assert [p.name for p in (host.tmp / "data" / "releases" / "hello").iterdir()
            if p.name != LEDGER_NAME] == [host.good]


#: A Git LFS pointer as git-lfs writes it (spec v1): what git holds for an LFS file.
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:" + b"4d7a2146" * 8 + b"\nsize 48213\n")
LFS_ATTRIBUTES = "*.png filter=lfs diff=lfs merge=lfs -text\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def test_git_lfs_pointer_is_refused_at_stage(host: Host) -> None:
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files[".gitattributes"] = LFS_ATTRIBUTES
    files["hello/static/logo.png"] = LFS_POINTER
    bad = host.commit(files, "logo through LFS")
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': commit {bad} holds 'hello/static/logo\.png' as a Git LFS pointer, and"
        r" gitplug does not fetch LFS objects, so it would serve the pointer text instead of the"
        r" file\. Keep it in git itself \(`git lfs untrack 'hello/static/logo\.png'`",
    )
    assert not (host.tmp / "data" / "releases" / "hello" / bad).exists()


def test_file_under_an_lfs_pattern_committed_whole_stages(host: Host) -> None:
    # The attributes alone prove nothing: a file committed without git-lfs installed is
    # the file itself, and serving it is right. Only pointer content is refused.
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files[".gitattributes"] = LFS_ATTRIBUTES
    files["hello/static/logo.png"] = PNG
    files["hello/notes.txt"] = "version https://git-lfs.github.com/spec/v1 is a URL in a note\n"
    good = host.commit(files, "logo committed whole")
    record = host.gp.deploy("hello")
    assert record is not None and record.result == DeployResult.LIVE, record
    staged = host.tmp / "data" / "releases" / "hello" / good / "hello" / "static" / "logo.png"
    assert staged.read_bytes() == PNG


# =========================================================================== trees


def _raw(host: Host, extra: dict[bytes, tuple[int, bytes]]) -> str:
    entries = {
        path.encode(): (MODE_FILE, text.encode()) for path, text in plugin_files("v2").items()
    }
    entries.update(extra)
    return host.repo.commit_tree_raw(entries, "a hostile tree")


UNSAFE_TREES = [
    pytest.param(
        {b"../evil.py": (MODE_FILE, b"x")},
        "../evil.py",
        r"has a '\.' or '\.\.' component and could write outside the release",
        id="dotdot",
    ),
    pytest.param(
        {b"hello/../../evil.py": (MODE_FILE, b"x")},
        "hello/../../evil.py",
        r"has a '\.' or '\.\.' component and could write outside the release",
        id="dotdot-nested",
    ),
    pytest.param(
        {b".git/hooks/post-checkout": (MODE_EXEC, b"#!/bin/sh\n")},
        ".git/hooks/post-checkout",
        r"has a \.git component",
        id="dot-git",
    ),
    pytest.param(
        {b"hello/.GIT/config": (MODE_FILE, b"x")},
        "hello/.GIT/config",
        r"has a \.git component",
        id="dot-git-case",
    ),
    pytest.param(
        {b"hello/passwd": (MODE_LINK, b"/etc/passwd")},
        "hello/passwd",
        r"is a symlink to '/etc/passwd', which is an absolute path",
        id="symlink-absolute",
    ),
    pytest.param(
        {b"hello/up": (MODE_LINK, b"../../..")},
        "hello/up",
        r"is a symlink to '\.\./\.\./\.\.', which resolves outside the release",
        id="symlink-up",
    ),
    pytest.param(
        {b"hello/s": (MODE_LINK, b"."), b"hello/t": (MODE_LINK, b"s/../..")},
        "hello/t",
        r"is a symlink to 's/\.\./\.\.', which resolves outside the release",
        id="symlink-chain",
    ),
    pytest.param(
        {b"vendor": (MODE_GITLINK, b"1" * 40)},
        "vendor",
        r"is a submodule; submodules cannot be staged",
        id="submodule",
    ),
    pytest.param(
        {b".gitplug/release.json": (MODE_FILE, b"{}")},
        ".gitplug/release.json",
        r"is inside \.gitplug/, which is reserved for gitplug",
        id="metadata-dir",
    ),
]


@pytest.mark.parametrize(("extra", "path", "why"), UNSAFE_TREES)
def test_unsafe_tree_is_refused_before_anything_is_written(
    host: Host, extra: dict[bytes, tuple[int, bytes]], path: str, why: str
) -> None:
    bad = _raw(host, extra)
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': refusing to stage commit {bad}: tree entry {re.escape(repr(path))} {why}\."
        r" Remove it from the repository and push a new commit\.",
    )
    releases = host.tmp / "data" / "releases" / "hello"
    assert sorted(p.name for p in releases.iterdir() if p.name != LEDGER_NAME) == [host.good]
    assert not (host.tmp / "evil.py").exists() and not (host.tmp / "data" / "evil.py").exists()


def test_native_extension_in_the_package(host: Host) -> None:
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files["hello/_speedups.so"] = b"\x7fELF not really"
    host.commit(files, "native code")
    host.deploy_fails(
        "load",
        r"plugin 'hello': hello/_speedups\.so is a native extension module; native code cannot be"
        r" unloaded, so gitplug refuses it\. Install native dependencies in the host environment",
    )


def test_package_shadowing_a_host_module(host: Host) -> None:
    host.commit(
        {
            "flask/__init__.py": textwrap.dedent("""
        from flask import Blueprint
        from gitplug import Plugin
        plugin = Plugin("hello", __name__)
        """)
        },
        "a package named flask",
    )
    host.deploy_fails("load", r"package 'flask'.*(shadow|same name|hides).*[Rr]ename")


ENTRY_FAULTS = [
    pytest.param(
        {"README.md": "no package here\n"},
        r"plugin 'hello': cannot tell which package to load from .*: expected exactly one"
        r" top-level package, found none\. Set `entry: package\.module:attribute`",
        id="no-package",
    ),
    pytest.param(
        {**plugin_files("v2"), "other/__init__.py": "x = 1\n"},
        r"expected exactly one top-level package, found hello, other\. Set `entry:",
        id="two-packages",
    ),
    pytest.param(
        {"hello/__init__.py": "from gitplug import Plugin\nplug = Plugin('hello', __name__)\n"},
        r"plugin 'hello': hello has no attribute 'plugin'\. Create it \(`plugin ="
        r" Plugin\('hello', __name__\)`\) or fix `entry` in the configuration\.",
        id="wrong-attribute",
    ),
    pytest.param(
        {
            "hello/__init__.py": "from flask import Blueprint\nplugin = Blueprint('hello', __name__)\n"
        },
        r"plugin 'hello': hello:plugin is a Blueprint, not a gitplug\.Plugin\. Create it with"
        r" `Plugin\(name, __name__\)`\.",
        id="not-a-plugin",
    ),
]


@pytest.mark.parametrize(("files", "match"), ENTRY_FAULTS)
def test_entry_point_faults(host: Host, files: dict[str, str], match: str) -> None:
    host.commit(dict(files), "bad entry")
    host.deploy_fails("load", match)


def test_entry_naming_a_missing_package(make_host: t.Callable[..., Host]) -> None:
    host = make_host(others={"typo": {"repo": "{repo}", "entry": "helo:plugin", "test": False}})
    record = host.gp.deploy("typo")
    assert record is not None and (record.result, record.stage.value) == (
        DeployResult.FAILED,
        "load",
    )
    assert re.search(
        r"plugin 'typo': entry 'helo:plugin' names package 'helo', but the release has no"
        r" helo/__init__\.py\. Fix `entry` in the configuration",
        record.error or "",
    ), record.error
    host.assert_good_serves()
