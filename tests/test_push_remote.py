"""The push remote: the real ``git`` client pushing to a real ``gitplug serve`` over HTTP.

One server serves the module (tests run in file order and build on each
other): ``hello`` (``repo: push``, the test gate on) and ``loose``
(``repo: push`` with ``allow_force_push: true``, gate off). Every ``git``
runs with ``GIT_TERMINAL_PROMPT=0``, no system or global configuration, and
credentials in the URL: it never prompts.
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dulwich.repo import Repo

from gitwork import FAILING, GIT, SOURCE, Work
from serverproc import Server, clean_env, request, run_cli, wait_for

ADMIN = "admin-" + uuid.uuid4().hex
PUSH = "push-" + uuid.uuid4().hex
LOOSE = "loose-" + uuid.uuid4().hex

CONFIG = """\
data_dir: data
poll_interval: 3600
admin_token: ${GITPLUG_ADMIN_TOKEN}
plugins:
  hello:
    repo: push
    push_token: ${HELLO_PUSH_TOKEN}
    test_timeout: 60
  loose:
    repo: push
    push_token: ${LOOSE_PUSH_TOKEN}
    allow_force_push: true
    test: false
"""

pytestmark = pytest.mark.skipif(not os.path.exists(GIT), reason="needs the git client")


@dataclass
class Site:
    server: Server
    root: Path

    def url(self, plugin: str, password: str | None) -> str:
        auth = f"ci:{password}@" if password is not None else ""
        return f"http://{auth}127.0.0.1:{self.server.port}/_gitplug/git/{plugin}.git"

    def hosted_ref(self, plugin: str, ref: str = "refs/heads/main") -> str | None:
        with Repo(str(self.root / "data" / "hosted" / f"{plugin}.git")) as repo:
            value = repo.refs.as_dict().get(ref.encode())
            return value.decode() if value else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "-c", str(self.root / "deploy.yaml"), cwd=self.root, env=self.server.env)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("pushsite")
    (root / "deploy.yaml").write_text(CONFIG)
    env = clean_env(GITPLUG_ADMIN_TOKEN=ADMIN, HELLO_PUSH_TOKEN=PUSH, LOOSE_PUSH_TOKEN=LOOSE)
    with Server(root / "deploy.yaml", env=env) as server:
        yield Site(server, root)


@pytest.fixture(scope="module")
def work(site: Site) -> Work:
    work = Work(site.root / "work", site.root)
    work.git("remote", "add", "prod", site.url("hello", PUSH))
    return work


def test_hosted_repositories_exist_on_start(site: Site) -> None:
    for name in ("hello", "loose"):
        with Repo(str(site.root / "data" / "hosted" / f"{name}.git")) as repo:
            assert repo.refs.read_ref(b"HEAD") == b"ref: refs/heads/main"
    assert site.hosted_ref("hello") is None


def test_good_push_deploys_and_prints_the_stages(site: Site, work: Work) -> None:
    sha = work.commit("hello", "v1")
    proc = work.git("push", "prod", "main")
    out = proc.stderr
    for stage in ("fetch", "stage", "test", "load", "swap"):
        assert f"remote: gitplug: {stage}" in out, out
    assert f"remote: gitplug: live     {sha[:12]}" in out, out
    assert "* [new branch]      main -> main" in out
    assert site.server.get("/hello/") == f"200 hello v1 {sha[:12]}"
    assert site.hosted_ref("hello") == sha
    history = site.cli("history", "hello", "--json")
    assert history.returncode == 0, history.stderr
    import json

    last = json.loads(history.stdout)[0]
    assert (last["trigger"], last["ref"], last["commit"], last["result"]) == ("push", "main", sha, "live")


def test_push_whose_tests_fail_is_rejected_and_prints_the_failure(site: Site, work: Work) -> None:
    live = site.hosted_ref("hello")
    assert live is not None
    bad = work.commit("hello", "v2", test=FAILING)
    proc = work.git("push", "prod", "main", check=False)
    assert proc.returncode != 0
    out = proc.stderr
    assert "remote: gitplug: failed   test:" in out, out
    assert "broken on purpose v2" in out, out  # the gate's own output, in the terminal
    assert "! [remote rejected] main -> main (deploy failed at test: tests of" in out, out
    assert site.hosted_ref("hello") == live  # the branch never names a commit that is not live
    assert site.server.get("/hello/") == f"200 hello v1 {live[:12]}"
    history = site.cli("history", "hello")
    assert bad[:12] in history.stdout and "failed" in history.stdout
    # The fix goes through; the rejected commit stays in the history it pushes.
    fixed = work.commit("hello", "v3")
    proc = work.git("push", "prod", "main")
    assert f"remote: gitplug: live     {fixed[:12]}" in proc.stderr
    assert site.hosted_ref("hello") == fixed
    assert site.server.get("/hello/") == f"200 hello v3 {fixed[:12]}"


def _status(site: Site, path: str, password: str | None) -> tuple[int, str, dict[str, str]]:
    import http.client

    headers = {}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"ci:{password}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", site.server.port, timeout=10)
    try:
        conn.request("GET", "/_gitplug/git/" + path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace"), dict(response.getheaders())
    finally:
        conn.close()


def test_credentials(site: Site, work: Work) -> None:
    # Pushing: only the plugin's push token.
    for password in ("wrong-token-" + uuid.uuid4().hex, LOOSE, None):
        status, text, headers = _status(site, "hello.git/info/refs?service=git-receive-pack", password)
        assert status == 401, (password, status, text)
        assert headers.get("WWW-Authenticate") == 'Basic realm="gitplug"'
    status, text, _ = _status(site, "hello.git/info/refs?service=git-receive-pack", ADMIN)
    assert status == 403 and "may fetch but not push" in text
    before = site.hosted_ref("hello")
    work.commit("hello", "v4")
    proc = work.git("push", site.url("hello", "wrong-" + uuid.uuid4().hex), "main", check=False)
    assert proc.returncode != 0 and "Authentication failed" in proc.stderr, proc.stderr
    proc = work.git("push", site.url("hello", None), "main", check=False)
    assert proc.returncode != 0 and "could not read Username" in proc.stderr, proc.stderr
    assert site.hosted_ref("hello") == before
    # Fetching: the push token or the admin token.
    for password in (PUSH, ADMIN):
        listing = work.git("ls-remote", site.url("hello", password))
        assert f"{before}\trefs/heads/main" in listing.stdout
    proc = work.git("ls-remote", site.url("hello", "wrong-" + uuid.uuid4().hex), check=False)
    assert proc.returncode != 0
    # A clone with the admin token gets the live commit.
    clone = site.root / "clone"
    proc = work.git("clone", "-q", site.url("hello", ADMIN), str(clone))
    assert (clone / "hello" / "__init__.py").is_file()
    # Unknown plugins: 401 without a valid token, 404 with one.
    assert _status(site, "nope.git/info/refs?service=git-upload-pack", None)[0] == 401
    status, text, _ = _status(site, "nope.git/info/refs?service=git-upload-pack", ADMIN)
    assert status == 404 and "repo: push" in text


def test_tag_pushed_then_rollback_to_it(site: Site, work: Work) -> None:
    v3 = site.hosted_ref("hello")
    assert v3 is not None
    work.git("reset", "-q", "--hard", v3)
    work.git("tag", "v3")
    proc = work.git("push", "prod", "v3")
    assert "remote: gitplug: fetch" not in proc.stderr  # a tag is stored, not deployed
    assert site.hosted_ref("hello", "refs/tags/v3") == v3
    v5 = work.commit("hello", "v5")
    work.git("push", "prod", "main")
    assert site.server.get("/hello/") == f"200 hello v5 {v5[:12]}"
    rollback = site.cli("rollback", "hello", "v3")
    assert rollback.returncode == 0, rollback.stderr
    wait_for(lambda: site.server.get("/hello/") == f"200 hello v3 {v3[:12]}", timeout=30,
             what="the server serving the rolled-back tag")
    # Pinned by the rollback: a push of the branch is refused until resume.
    v6 = work.commit("hello", "v6")
    proc = work.git("push", "prod", "main", check=False)
    assert proc.returncode != 0 and "is pinned at v3" in proc.stderr, proc.stderr
    assert site.hosted_ref("hello") == v5
    assert site.cli("resume", "hello").returncode == 0
    proc = work.git("push", "prod", "main")
    assert f"live     {v6[:12]}" in proc.stderr
    # Moving a tag is a rewrite: refused without allow_force_push.
    work.git("tag", "-f", "v3", v6)
    proc = work.git("push", "--force", "prod", "v3", check=False)
    assert proc.returncode != 0 and "tags do not move" in proc.stderr, proc.stderr
    assert site.hosted_ref("hello", "refs/tags/v3") == v3


def test_force_push_refused_unless_allowed(site: Site, work: Work) -> None:
    live = site.hosted_ref("hello")
    assert live is not None
    work.git("reset", "-q", "--hard", "HEAD~1")
    rewritten = work.commit("hello", "rewritten")
    proc = work.git("push", "--force", "prod", "main", check=False)
    assert proc.returncode != 0
    assert "non-fast-forward: force pushes are refused" in proc.stderr, proc.stderr
    assert "remote: gitplug: fetch" not in proc.stderr  # refused before any deploy
    assert site.hosted_ref("hello") == live
    proc = work.git("push", "prod", ":main", check=False)
    assert proc.returncode != 0 and "cannot be deleted" in proc.stderr
    # loose: allow_force_push: true, so the rewrite deploys.
    loose = Work(site.root / "loose", site.root)
    first = loose.commit("loose", "one", test=None)
    loose.git("push", site.url("loose", LOOSE), "main")
    assert site.server.get("/loose/") == f"200 loose one {first[:12]}"
    loose.git("reset", "-q", "--hard", first)
    loose.git("commit", "-q", "--amend", "-m", "amended")
    (loose.path / "loose" / "__init__.py").write_text(SOURCE.format(name="loose", version="two"))
    loose.git("commit", "-q", "-a", "--amend", "-m", "two")
    second = loose.git("rev-parse", "HEAD").stdout.strip()
    proc = loose.git("push", "--force", site.url("loose", LOOSE), "main")
    assert "forced update" in proc.stderr
    assert site.server.get("/loose/") == f"200 loose two {second[:12]}"
    assert rewritten != live


def test_push_waits_for_a_running_deploy(site: Site, work: Work) -> None:
    """Another process holding the plugin's deploy lock (a CLI deploy): the push waits, then deploys."""
    import fcntl

    work.git("reset", "-q", "--hard", site.hosted_ref("hello") or "HEAD")
    sha = work.commit("hello", "v7")
    lock_path = site.root / "data" / "locks" / "deploy-hello.lock"
    with open(lock_path, "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([GIT, "-c", "credential.helper=", "push", "--progress", "prod", "main"],
                                cwd=work.path, env=work.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            lines: list[str] = []
            waiting = threading.Event()

            def read() -> None:
                assert proc.stderr is not None
                for line in proc.stderr:
                    lines.append(line)
                    if "is running; waiting for it" in line:
                        waiting.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert waiting.wait(60), "".join(lines)
            assert site.hosted_ref("hello") != sha
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
        try:
            assert proc.wait(timeout=120) == 0, "".join(lines)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    assert any(f"live     {sha[:12]}" in line for line in lines), "".join(lines)
    assert site.hosted_ref("hello") == sha
    assert site.server.get("/hello/") == f"200 hello v7 {sha[:12]}"


def test_only_branches_and_tags_are_stored(site: Site, work: Work) -> None:
    proc = work.git("push", "prod", "HEAD:refs/notes/sneaky", check=False)
    assert proc.returncode != 0 and "only branches and tags can be pushed here" in proc.stderr, proc.stderr
    assert site.hosted_ref("hello", "refs/notes/sneaky") is None
    proc = work.git("push", "prod", "HEAD:refs/heads/feature")  # another branch: stored, not deployed
    assert "remote: gitplug: fetch" not in proc.stderr
    assert site.hosted_ref("hello", "refs/heads/feature") == site.hosted_ref("hello")


def test_body_over_push_max_size_is_refused_from_the_headers(site: Site) -> None:
    auth = "Basic " + base64.b64encode(f"ci:{PUSH}".encode()).decode()
    status, text = request(
        "POST", f"{site.server.base}/_gitplug/git/hello.git/git-receive-pack",
        body=b"", headers={"Authorization": auth, "Content-Type": "application/x-git-receive-pack-request",
                           "Content-Length": str(200 << 20)})
    assert status == 413 and "push_max_size" in text




def test_deploy_lock_is_reentrant_and_waits_bounded(tmp_path: Path) -> None:
    """The push holds the plugin's lock around its deploy, which takes it again."""
    import fcntl
    import time

    from gitplug.deploy.layout import FileLock

    lock = FileLock(tmp_path / "deploy-x.lock")
    assert lock.acquire(timeout=1)
    assert lock.acquire(timeout=1)  # the same thread again: no deadlock
    lock.release()
    other = threading.Thread(target=lambda: results.append(lock.acquire(timeout=0.2)))
    results: list[bool] = []
    other.start()
    other.join()
    assert results == [False]  # still held once by this thread
    lock.release()
    # Another open file description (as another process would have) holds the flock.
    with open(tmp_path / "deploy-x.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        assert not lock.acquire(timeout=0.3)
        assert time.monotonic() - started >= 0.3
        assert not lock.acquire(blocking=False)
        fcntl.flock(held, fcntl.LOCK_UN)
    assert lock.acquire(timeout=1)
    lock.release()
