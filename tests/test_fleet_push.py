"""The push remote in a fleet: a push reaches one host, every host serves it.

README, "Deploy with git push". Two real ``gitplug serve`` hosts share one
real PostgreSQL database; each announces its own URL (``host_url``) and
hosts its own copy of ``hello`` (``repo: push``). The real ``git`` client
pushes to one host or the other; the other host fetches the commit (or the
tag a rollback names) from the host that received it. Every wait polls the
hosts' answers with a deadline; no fixed sleeps.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dulwich.repo import Repo

from fleet import GATE, Host, stop_hosts
from gitwork import FAILING, GIT, Work
from pgserver import fresh_database
from serverproc import wait_for

pytestmark = pytest.mark.skipif(not os.path.exists(GIT), reason="needs the git client")

PUSH = "push-" + uuid.uuid4().hex
CONVERGE_S = 30.0


def hosted_ref(host: Host, ref: str = "refs/heads/main") -> str | None:
    """What ``ref`` of ``host``'s copy of hello's hosted repository names."""
    with Repo(str(host.data_dir / "hosted" / "hello.git")) as repo:
        value = repo.refs.as_dict().get(ref.encode())
        return value.decode() if value else None


def wait_both_in_status(host: Host) -> None:
    """Until ``host``'s status lists web-1 and web-2: both announced themselves (and their host_url)."""
    wait_for(lambda: {"web-1", "web-2"} <= set(host.status()["hosts"]), timeout=CONVERGE_S,
             what="both hosts in the fleet's status")


def remote(host: Host) -> str:
    return f"http://ci:{PUSH}@127.0.0.1:{host.port}/_gitplug/git/hello.git"


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database("gitplug_fleet_push") as url:
        yield url


def start_hosts(root: Path, url: str, started: list[Host], *, announce: bool = True) -> tuple[Host, Host]:
    """web-1 and web-2 (each ``host_url: ${GITPLUG_HOST_URL}`` unless not ``announce``), appended to ``started``."""
    for host_id in ("web-1", "web-2"):
        host = Host(root, host_id, url, "push", settings={"push_token": "${HELLO_PUSH_TOKEN}", "test": GATE},
                    top={"host_url": "${GITPLUG_HOST_URL}"} if announce else None,
                    extra_env={"HELLO_PUSH_TOKEN": PUSH})
        started.append(host)
        host.start()
    return started[0], started[1]


@pytest.fixture
def started() -> Iterator[list[Host]]:
    made: list[Host] = []
    try:
        yield made
    finally:
        stop_hosts(made)


@pytest.fixture
def hosts(tmp_path: Path, database: str, started: list[Host]) -> tuple[Host, Host]:
    return start_hosts(tmp_path, database, started)


def test_a_push_to_one_host_goes_live_on_every_host(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    # Both hosts have announced where they are before the first push.
    wait_both_in_status(a)
    work = Work(tmp_path / "work", tmp_path)
    work.git("remote", "add", "web-1", remote(a))
    work.git("remote", "add", "web-2", remote(b))

    # A push to web-1 deploys there; web-2 fetches the commit from web-1.
    v1 = work.commit("hello", "v1")
    pushed = work.git("push", "web-1", "main")
    assert f"live     {v1[:12]}" in pushed.stderr, pushed.stderr
    wait_for(lambda: a.serves(v1) and b.serves(v1), timeout=CONVERGE_S,
             what=f"both hosts serving v1 {v1[:12]} (now {a.answer()!r}, {b.answer()!r})")
    assert hosted_ref(b) == v1, "web-2's copy of the branch follows the fleet's live commit"

    # A push whose tests fail, to the other host: rejected there, no host moves.
    v2 = work.commit("hello", "v2", test=FAILING)
    refused = work.git("push", "web-2", "main", check=False)
    assert refused.returncode != 0 and "deploy failed at test" in refused.stderr, refused.stderr
    assert hosted_ref(a) == v1 and hosted_ref(b) == v1
    assert a.serves(v1) and b.serves(v1)

    # The fix, pushed to web-2: web-1 fetches it from web-2.
    v3 = work.commit("hello", "v3")
    fixed = work.git("push", "web-2", "main")
    assert f"live     {v3[:12]}" in fixed.stderr, fixed.stderr
    wait_for(lambda: a.serves(v3) and b.serves(v3), timeout=CONVERGE_S,
             what=f"both hosts serving v3 {v3[:12]} (now {a.answer()!r}, {b.answer()!r})")
    assert hosted_ref(a) == v3
    assert v2 != v3

    # A tag pushed to web-2 only (stored, not deployed); a rollback asked on
    # web-1 finds it there and takes the fleet back to v1.
    work.git("tag", "v1.0", v1)
    work.git("push", "web-2", "v1.0")
    assert hosted_ref(b, "refs/tags/v1.0") == v1 and hosted_ref(a, "refs/tags/v1.0") is None
    status, body = a.api("POST", "/plugins/hello/rollback", {"ref": "v1.0"})
    assert status == 200, body
    wait_for(lambda: a.serves(v1) and b.serves(v1), timeout=CONVERGE_S,
             what=f"both hosts back on v1 {v1[:12]} (now {a.answer()!r}, {b.answer()!r})")
    assert hosted_ref(a, "refs/tags/v1.0") == v1
    assert a.status()["pin"] == "v1.0"


def test_a_push_that_would_drop_the_fleets_commit_is_refused_by_any_host(
    hosts: tuple[Host, Host], tmp_path: Path,
) -> None:
    """Every host's copy of the branch follows the fleet, so a push built on an older commit is refused."""
    a, b = hosts
    wait_both_in_status(a)
    ours = Work(tmp_path / "ours", tmp_path)
    ours.git("remote", "add", "web-1", remote(a))
    v1 = ours.commit("hello", "v1")
    ours.git("push", "web-1", "main")
    wait_for(lambda: a.serves(v1) and b.serves(v1), timeout=CONVERGE_S, what="both hosts serving v1")

    # Someone else builds on v1 and pushes v2 to web-1.
    theirs = Work(tmp_path / "theirs", tmp_path)
    theirs.git("remote", "add", "web-1", remote(a))
    theirs.git("fetch", "-q", "web-1")
    theirs.git("reset", "-q", "--hard", "web-1/main")
    v2 = theirs.commit("hello", "v2")
    theirs.git("push", "web-1", "main")
    wait_for(lambda: a.serves(v2) and b.serves(v2), timeout=CONVERGE_S, what="both hosts serving v2")

    # We push a sibling of v2 (built on v1) to web-2. web-2 fetched v2's
    # objects to serve it; its branch must not let a commit that drops v2 in.
    ours.git("remote", "add", "web-2", remote(b))
    sibling = ours.commit("hello", "v2-sibling")
    refused = ours.git("push", "web-2", "main", check=False)
    assert refused.returncode != 0, refused.stderr
    assert hosted_ref(b) == v2 and a.serves(v2) and b.serves(v2)
    assert sibling != v2


def test_a_host_without_host_url_is_named_in_the_followers_error(
    tmp_path: Path, database: str, started: list[Host],
) -> None:
    """No host announces its URL: the follower cannot fetch the push and says what to set."""
    a, b = start_hosts(tmp_path, database, started, announce=False)
    wait_both_in_status(a)
    work = Work(tmp_path / "work", tmp_path)
    work.git("remote", "add", "web-1", remote(a))
    v1 = work.commit("hello", "v1")
    work.git("push", "web-1", "main")
    assert a.serves(v1)

    def error_of_web_2() -> str | None:
        entry = a.status()["hosts"].get("web-2") or {}
        return entry.get("error") if entry.get("state") == "diverged" else None

    wait_for(error_of_web_2, timeout=CONVERGE_S, what="web-2 shown diverged with its error")
    error = error_of_web_2() or ""
    assert "web-1: announces no host_url" in error and "set host_url on every host" in error, error
    assert not b.serves(v1)
