"""Hostile and huge trees against a real ``gitplug serve`` (README "Guarantees", "Security model").

What a pusher of one plugin's repository can try: a huge blob (as a file, a
symlink, a loose object on another branch), many files, failing pushes
filling the disk, tests that edit releases (their own, another plugin's),
tests that read the server's secrets, write to its state or leave processes
behind, and a local repository path holding a ``:``. Each ends in a clear
error or a contained test; the live release keeps serving.

Huge blobs are zeros built with ``git fast-import`` (or a hand-written loose
object), so the repositories stay a few MiB on disk and the tests fast.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import typing as t
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

import psutil
import pytest
from dulwich.objects import Commit, Tree

from gitplug.deploy.testgate import bwrap_path
from gitrepo import GitRepo
from serverproc import Server, clean_env, run_cli, wait_for, write_version

MiB = 1024 * 1024
TOKEN = "admin-" + uuid.uuid4().hex
SECRET = "hook-" + uuid.uuid4().hex
#: What the whole deploy may add to the server's peak memory (README "Guarantees").
BOUND = 200 * MiB

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="the git command is not installed")


def _bwrap_or_skip() -> str:
    found = bwrap_path()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("bubblewrap (bwrap) must be installed under CI: .ci/run installs it")
        pytest.skip("bubblewrap (bwrap) is not installed; apt-get install bubblewrap to run this")
    return found


# --------------------------------------------------------------------------- building repos


def _git(repo: GitRepo, *args: str, stdin: t.Any = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["git", "--git-dir", str(repo.path / ".git"), *args],
                            stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def commit_zeros(repo: GitRepo, size: int, commits: list[tuple[str, str, str]]) -> list[str]:
    """One blob of ``size`` zeros, streamed into git fast-import, and a commit per
    ``(ref, mode, path)`` holding it on top of main; returns the commits' shas."""
    parent = repo.refs()["refs/heads/main"]
    proc = _git(repo, "fast-import", "--quiet", "--force", stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"blob\nmark :1\ndata {size}\n".encode())
        block = bytes(MiB)
        left = size
        while left:
            proc.stdin.write(block[:min(left, MiB)])
            left -= min(left, MiB)
        proc.stdin.write(b"\n")
        for n, (ref, mode, path) in enumerate(commits):
            message = f"zeros at {path}"
            proc.stdin.write(
                f"commit {ref}\nmark :{n + 2}\n"
                f"committer Ada <ada@example.com> 1700000000 +0000\n"
                f"data {len(message)}\n{message}\nfrom {parent}\nM {mode} :1 {path}\n".encode())
        proc.stdin.close()
        assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    refs = repo.refs()
    return [refs[ref] for ref, _mode, _path in commits]


def loose_zeros_on_branch(repo: GitRepo, size: int, branch: str) -> str:
    """A loose blob of ``size`` zeros (written by hand, streamed) on a new branch ``branch``."""
    header = f"blob {size}\0".encode()
    digest = sha1(header)
    block = bytes(MiB)
    for _ in range(size // MiB):
        digest.update(block)
    digest.update(bytes(size % MiB))
    blob_id = digest.hexdigest()
    target = repo.path / ".git" / "objects" / blob_id[:2] / blob_id[2:]
    target.parent.mkdir(exist_ok=True)
    deflater = zlib.compressobj(1)
    with target.open("wb") as handle:
        handle.write(deflater.compress(header))
        for _ in range(size // MiB):
            handle.write(deflater.compress(block))
        handle.write(deflater.compress(bytes(size % MiB)))
        handle.write(deflater.flush())
    with repo.open() as dul:
        tree = Tree()
        tree.add(b"huge.bin", 0o100644, blob_id.encode())
        commit = Commit()
        commit.tree, commit.parents = tree.id, []
        commit.author = commit.committer = b"Ada <ada@example.com>"
        commit.author_time = commit.commit_time = 1_700_000_000
        commit.author_timezone = commit.commit_timezone = 0
        commit.message = b"a loose giant\n"
        dul.object_store.add_object(tree)
        dul.object_store.add_object(commit)
        dul.refs[f"refs/heads/{branch}".encode()] = commit.id
    return blob_id


# --------------------------------------------------------------------------- the server


@dataclass
class Site:
    server: Server
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def api(self, method: str, path: str, payload: t.Any = None) -> tuple[int, t.Any]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        body = None if payload is None else json.dumps(payload).encode()
        # A deploy with wait may take a while (hundreds of MiB to fetch): a long timeout.
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=300)
        try:
            conn.request(method, f"/_gitplug{path}", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def deploy(self, name: str) -> dict[str, t.Any]:
        status, record = self.api("POST", f"/api/plugins/{name}/deploy", {"wait": True})
        assert status in (200, 202, 409, 422, 500), (status, record)
        return t.cast(dict[str, t.Any], record)

    def releases(self, name: str) -> list[str]:
        plugin_dir = self.data / "releases" / name
        return sorted(p.name for p in plugin_dir.iterdir() if not p.name.startswith(".")) \
            if plugin_dir.is_dir() else []


def write_site_config(root: Path, plugins: dict[str, dict[str, t.Any]], **top: t.Any) -> Path:
    lines = ["data_dir: data", "poll_interval: 3600", "admin_token: ${GITPLUG_ADMIN_TOKEN}",
             "webhook:", "  secret: ${GITPLUG_WEBHOOK_SECRET}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in top.items()]
    lines.append("plugins:")
    for name, settings in plugins.items():
        merged = {"ref": "main", "test": False, "test_timeout": 60, **settings}
        lines.append(f"  {name}: {json.dumps(merged)}")
    config = root / "deploy.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


def server_env(**extra: str) -> dict[str, str]:
    return clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET, **extra)


@pytest.fixture()
def site_factory(tmp_path: Path) -> Iterator[t.Callable[..., Site]]:
    servers: list[Server] = []

    def start(plugins: dict[str, dict[str, t.Any]], *, env: dict[str, str] | None = None,
              **top: t.Any) -> Site:
        config = write_site_config(tmp_path, plugins, **top)
        server = Server(config, env=env or server_env())
        servers.append(server)
        server.__enter__()
        return Site(server, tmp_path)

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.__exit__(None, None, None)


def served(site: Site, name: str) -> str:
    return site.server.get(f"/{name}/")


def wait_serving(site: Site, name: str, sha: str) -> None:
    wait_for(lambda: sha[:12] in served(site, name), timeout=60, what=f"{name} serving {sha[:12]}")


# --------------------------------------------------------------------------- memory


def _reset_peak(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) of ``pid``: writing 5 to clear_refs (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@needs_git
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux procfs")
def test_huge_blobs_keep_the_servers_memory_bounded(tmp_path: Path,
                                                    site_factory: t.Callable[..., Site]) -> None:
    repo = GitRepo(tmp_path / "big-repo")
    v1 = write_version(repo, "big", "v1")
    site = site_factory({"big": {"repo": str(repo.path)}})
    wait_serving(site, "big", v1)
    pid = site.server.pid
    rss_before = _status_kib(pid, "VmRSS") * 1024
    reset = _reset_peak(pid)
    peak_before = _status_kib(pid, "VmHWM") * 1024
    baseline = rss_before if reset else peak_before

    # 150 MiB of zeros: over the default max_file_size (100 MiB); inflated whole
    # twice, as staging used to, it would take the server over the bound.
    as_file, as_link = commit_zeros(repo, 150 * MiB, [
        ("refs/heads/main", "100644", "big/zeros.bin"), ("refs/heads/link", "120000", "biglink")])
    # 1. As a file: refused from its header, never inflated.
    record = site.deploy("big")
    assert record["result"] == "failed" and record["stage"] == "stage", record
    assert re.search(r"commit [0-9a-f]{40} is too large to stage: file size limit of 104857600 "
                     r"bytes exceeded at 'big/zeros\.bin' \(157286400 bytes", record["error"])
    assert "raise `limits:` in deploy.yaml" in record["error"]
    assert record["commit"] == as_file
    # 2. As a symlink's target: refused before the target is read.
    repo.set_ref("refs/heads/main", as_link)
    record = site.deploy("big")
    assert record["result"] == "failed" and record["stage"] == "stage", record
    assert "tree entry 'biglink' is a symlink with an empty or invalid target" in record["error"]
    assert record["commit"] == as_link
    # 3. A loose object over 512 MiB on another branch (dulwich's zlib limit):
    #    the fetch works, and a good commit on main deploys.
    loose_zeros_on_branch(repo, 520 * MiB, "giant")
    repo.set_ref("refs/heads/main", v1)
    v2 = write_version(repo, "big", "v2")  # from the work tree: no zeros in it
    record = site.deploy("big")
    assert record["result"] == "live", record
    wait_serving(site, "big", v2)

    peak = _status_kib(pid, "VmHWM") * 1024
    growth = peak - baseline
    print(f"server {pid}: RSS before {rss_before / MiB:.1f} MiB, peak after "
          f"{peak / MiB:.1f} MiB (reset={reset}), growth {growth / MiB:.1f} MiB")
    assert growth < BOUND, f"the server's peak memory grew by {growth / MiB:.0f} MiB"
    # Nothing of the refused commits was left on disk.
    assert site.releases("big") == sorted({v1, v2})


@contextlib.contextmanager
def git_daemon(base: Path) -> Iterator[str]:
    """``git daemon`` serving every repository under ``base`` on 127.0.0.1; yields
    its ``git://127.0.0.1:<port>`` URL once it says it is ready; killed on the way out."""
    with socket.socket() as probe:  # a free port (git daemon cannot take port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}", "--verbose",
         "--export-all", f"--base-path={base}", str(base)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        assert proc.stderr is not None
        said = []
        for line in iter(proc.stderr.readline, b""):  # ends if the daemon dies
            said.append(line.decode(errors="replace"))
            if b"Ready to rumble" in line:
                break
        else:
            raise AssertionError(f"git daemon did not start: {''.join(said)}")
        # Drain its log, so a verbose daemon never blocks on a full pipe.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield f"git://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the daemon and its forked servers
        proc.wait()


@needs_git
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux procfs")
def test_a_huge_blob_fetched_from_a_git_server_keeps_the_servers_memory_bounded(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    """Over git:// (dulwich's transport), the pack goes to ``git index-pack``
    as it arrives: a 300 MiB blob cost the server ~340 MiB when dulwich indexed it."""
    base = tmp_path / "served"
    repo = GitRepo(base / "big-repo")
    v1 = write_version(repo, "big", "v1")
    with git_daemon(base) as server_url:
        site = site_factory({"big": {"repo": f"{server_url}/big-repo"}})
        wait_serving(site, "big", v1)
        pid = site.server.pid
        rss_before = _status_kib(pid, "VmRSS") * 1024
        reset = _reset_peak(pid)
        baseline = rss_before if reset else _status_kib(pid, "VmHWM") * 1024

        (as_file,) = commit_zeros(repo, 300 * MiB, [("refs/heads/main", "100644", "big/zeros.bin")])
        record = site.deploy("big")
        # Fetched whole (the stage step sees the blob), then refused from its size.
        assert record["result"] == "failed" and record["stage"] == "stage", record
        assert record["commit"] == as_file
        assert "file size limit of 104857600 bytes exceeded at 'big/zeros.bin'" in record["error"]
        peak = _status_kib(pid, "VmHWM") * 1024
        # The mirror holds it: one pack, no unfinished pack left behind.
        packs = list((site.data / "mirrors").rglob("objects/pack/*"))
        assert not [p for p in packs if p.name.startswith("tmp_pack_")], packs
        assert sum(p.stat().st_size for p in packs if p.suffix == ".pack") > 100 * 1024
        # And the next good commit deploys over the same transport.
        repo.set_ref("refs/heads/main", v1)
        v2 = write_version(repo, "big", "v2")
        assert site.deploy("big")["result"] == "live"
        wait_serving(site, "big", v2)
    growth = peak - baseline
    print(f"server {pid}: RSS before {rss_before / MiB:.1f} MiB, peak after the fetch "
          f"{peak / MiB:.1f} MiB (reset={reset}), growth {growth / MiB:.1f} MiB")
    assert growth < BOUND, f"the server's peak memory grew by {growth / MiB:.0f} MiB"


# --------------------------------------------------------------------------- disk


def test_failed_releases_are_pruned_beyond_keep_releases(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    repo = GitRepo(tmp_path / "flaky-repo")
    v1 = write_version(repo, "flaky", "v1", gate_test=True)
    site = site_factory({"flaky": {"repo": str(repo.path), "test": "python -m pytest -q -p "
                                   "no:cacheprovider"}}, keep_releases=2)
    wait_serving(site, "flaky", v1)
    failed = []
    for n in range(4):
        repo.write("tests/test_gate.py", f"def test_no():\n    assert {n} < 0\n")
        repo.write("flaky/blob.bin", bytes([n]) * 4096)
        failed.append(repo.commit(f"failing {n}"))
        record = site.deploy("flaky")
        assert record["result"] == "failed" and record["stage"] == "test", record
    assert "v1" in served(site, "flaky")
    # keep_releases 2: the two newest failures, plus the live one (never pruned).
    assert site.releases("flaky") == sorted([v1, failed[-1], failed[-2]])
    status, history = site.api("GET", "/api/plugins/flaky/history")
    assert status == 200
    assert [r["commit"] for r in history if r["result"] == "failed"][:4] == failed[::-1]
    logs = sorted((site.data / "logs" / "flaky").glob("*.log"))
    assert len(logs) >= 4  # the logs of pruned releases stay


@needs_git
def test_too_many_files_are_refused_before_writing(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    repo = GitRepo(tmp_path / "many-repo")
    v1 = write_version(repo, "many", "v1")
    site = site_factory({"many": {"repo": str(repo.path)}},
                        limits={"max_files": 500, "max_file_size": "1MiB"})
    wait_serving(site, "many", v1)
    for n in range(600):
        repo.write(f"many/data/f{n:04}.txt", f"{n}\n")
    repo.commit("600 files")
    record = site.deploy("many")
    assert record["result"] == "failed" and record["stage"] == "stage", record
    assert "has more than 500 files (limits.max_files); nothing was written" in record["error"]
    assert site.releases("many") == [v1]
    assert not [p for p in (site.data / "releases" / "many").iterdir() if p.name.startswith(".tmp")]
    assert "v1" in served(site, "many")


# --------------------------------------------------------------------------- immutable releases

EDIT_OWN = """\
import os, pathlib

def test_edit():
    # The working copy the gate runs in: a scratch copy, never the release.
    init = pathlib.Path("{name}/__init__.py")
    os.chmod(init, 0o644)
    with open(init, "a") as handle:
        handle.write("\\n@plugin.route('/backdoor')\\ndef backdoor():\\n    return 'pwned'\\n")
"""

EDIT_RELEASE = """\
import os, pathlib

def test_edit_the_staged_release():
    # As root, permissions do not stop it: the loader's manifest check must.
    for release in pathlib.Path({releases!r}).glob("{name}/*"):
        if release.name.startswith("."):
            continue
        init = release / "{name}" / "__init__.py"
        os.chmod(release / "{name}", 0o755)
        os.chmod(init, 0o644)
        with open(init, "a") as handle:
            handle.write("\\n@plugin.route('/backdoor')\\ndef backdoor():\\n    return 'pwned'\\n")
    {end}
"""


def test_a_passing_test_cannot_change_what_is_loaded(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    repo = GitRepo(tmp_path / "own-repo")
    v1 = write_version(repo, "own", "v1", gate_test=True)
    site = site_factory({"own": {"repo": str(repo.path), "test": "python -m pytest -q -p "
                                 "no:cacheprovider"}})
    wait_serving(site, "own", v1)
    # 1. It edits the directory it runs in: the scratch copy. The commit's code goes live.
    write_version(repo, "own", "v2")
    repo.write("tests/test_edit.py", EDIT_OWN.format(name="own"))
    v2 = repo.commit("v2 with a test that edits its working copy")
    record = site.deploy("own")
    assert record["result"] == "live", record
    wait_serving(site, "own", v2)
    assert site.server.get("/own/backdoor").startswith("404")
    # 2. It finds and edits its staged release: the loader refuses it, v2 keeps serving.
    write_version(repo, "own", "v3")
    repo.write("tests/test_edit.py", EDIT_RELEASE.format(
        releases=str(site.data / "releases"), name="own", end="pass"))
    v3 = repo.commit("v3 with a test that edits its staged release")
    record = site.deploy("own")
    assert record["result"] == "failed" and record["stage"] == "load", record
    assert re.search(rf"release {v3[:12]} at .* differs from what was staged: "
                     r"'own/__init__\.py' was modified.*\. Something changed it on disk after "
                     r"staging; it is not loaded\.", record["error"])
    assert v2[:12] in served(site, "own")
    assert site.server.get("/own/backdoor").startswith("404")


def test_a_failing_test_of_one_plugin_cannot_backdoor_another(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    good = GitRepo(tmp_path / "good-repo")
    good_v1 = write_version(good, "good", "v1")
    evil = GitRepo(tmp_path / "evil-repo")
    evil_v1 = write_version(evil, "evil", "v1", gate_test=True)
    config_plugins = {
        "good": {"repo": str(good.path)},
        "evil": {"repo": str(evil.path), "test": "python -m pytest -q -p no:cacheprovider"},
    }
    site = site_factory(config_plugins)
    wait_serving(site, "good", good_v1)
    wait_serving(site, "evil", evil_v1)
    write_version(evil, "evil", "v2")
    evil.write("tests/test_evil.py", EDIT_RELEASE.format(
        releases=str(site.data / "releases"), name="good", end="assert False"))
    evil.commit("a failing test that appends a route to good's live release")
    record = site.deploy("evil")
    assert record["result"] == "failed" and record["stage"] == "test", record
    release_init = site.data / "releases" / "good" / good_v1 / "good" / "__init__.py"
    assert "backdoor" in release_init.read_text()  # as root it could write (README "Security model")
    assert site.server.get("/good/backdoor").startswith("404")  # the live code is in memory
    # Restart: the modified release is refused, staged afresh from the mirror, and served.
    site.server.__exit__(None, None, None)
    with Server(site.server.config, env=server_env()) as again:
        wait_for(lambda: good_v1[:12] in again.get("/good/"), timeout=60, what="good back")
        assert again.get("/good/backdoor").startswith("404")
        assert "backdoor" not in release_init.read_text()
        assert "differs from what was staged" in again.log()


EDIT_SHARED = """\
import pathlib

def test_edit_a_shared_file():
    # As root, read-only bits do not stop it; the file is a hard link every
    # release of the plugin shares, so this writes into all of them at once.
    for release in pathlib.Path({releases!r}).glob("good/*"):
        shared = release / "good" / "shared.txt"
        if not release.name.startswith(".") and shared.exists():
            with open(shared, "r+b") as handle:
                handle.write(b"dirty\\n")
            break
    assert False
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="writing a read-only file in place needs root")
def test_a_write_to_a_shared_file_is_refused_everywhere_and_never_linked_again(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    good = GitRepo(tmp_path / "good-repo")
    good.write("good/shared.txt", "clean\n")
    good_v1 = write_version(good, "good", "v1")
    evil = GitRepo(tmp_path / "evil-repo")
    evil_v1 = write_version(evil, "evil", "v1", gate_test=True)
    site = site_factory({
        "good": {"repo": str(good.path)},
        "evil": {"repo": str(evil.path), "test": "python -m pytest -q -p no:cacheprovider"},
    })
    wait_serving(site, "good", good_v1)
    wait_serving(site, "evil", evil_v1)
    good_v2 = write_version(good, "good", "v2")
    assert site.deploy("good")["result"] == "live"
    releases = site.data / "releases" / "good"
    shared_v1 = releases / good_v1 / "good" / "shared.txt"
    shared_v2 = releases / good_v2 / "good" / "shared.txt"
    assert shared_v1.stat().st_ino == shared_v2.stat().st_ino  # linked, not written again
    # A failing test of another plugin writes the shared file in place.
    write_version(evil, "evil", "v2")
    evil.write("tests/test_evil.py", EDIT_SHARED.format(releases=str(site.data / "releases")))
    evil.commit("a failing test that writes a file good's releases share")
    record = site.deploy("evil")
    assert record["result"] == "failed" and record["stage"] == "test", record
    assert shared_v2.read_bytes() == b"dirty\n"  # in both releases: one inode
    # The next release of good does not link it: the commit's content, a file of its own.
    good_v3 = write_version(good, "good", "v3")
    assert site.deploy("good")["result"] == "live"
    wait_serving(site, "good", good_v3)
    shared_v3 = releases / good_v3 / "good" / "shared.txt"
    assert shared_v3.read_bytes() == b"clean\n"
    assert shared_v3.stat().st_ino != shared_v1.stat().st_ino
    # Rolling back to either earlier release: refused at load, v3 keeps serving.
    for commit in (good_v2, good_v1):
        status, record = site.api("POST", "/api/plugins/good/rollback", {"ref": commit})
        assert record["result"] == "failed" and record["stage"] == "load", (status, record)
        assert re.search(rf"release {commit[:12]} at .* differs from what was staged: "
                         r"'good/shared\.txt' was modified", record["error"]), record["error"]
        assert good_v3[:12] in served(site, "good")
    # Asked again, each is staged afresh from the mirror, clean, and served.
    status, record = site.api("POST", "/api/plugins/good/rollback", {"ref": good_v1})
    assert record["result"] == "live", (status, record)
    wait_serving(site, "good", good_v1)
    assert shared_v1.read_bytes() == b"clean\n"


# --------------------------------------------------------------------------- the test gate

LEAKER = """\
import os, pathlib, subprocess, sys

def test_leak():
    # Its own environment: the scrub removes variables that merely hold a secret.
    own = [name for name in ("MY_HEADER", "OTHER", "GITPLUG_ADMIN_TOKEN") if name in os.environ]
    print("OWN-ENV-LEAKS" if own else "OWN-ENV-CLEAN", own)
    # Up the parent chain: the supervisor, then the server.
    pid, server_read = os.getpid(), False
    for _ in range(4):
        try:
            pid = int(pathlib.Path(f"/proc/{{pid}}/stat").read_text().rsplit(")", 1)[1].split()[1])
            server_read |= b"GITPLUG_ADMIN_TOKEN=" in pathlib.Path(f"/proc/{{pid}}/environ").read_bytes()
        except (OSError, ValueError, IndexError) as exc:
            print("environ of", pid, "unreadable:", exc)
    print("SERVER-ENV-READ" if server_read else "SERVER-ENV-UNREADABLE")
    try:
        with open({state!r}, "ab") as handle:
            handle.write(b"")
        print("STATE-WRITABLE")
    except OSError as exc:
        print("STATE-READONLY", exc.strerror)
    escaper = subprocess.Popen(["env", "-u", "PLUGIN_TEST_RUN_ID", "setsid", "sleep", {nap!r}])
    print("ESCAPER", escaper.pid, flush=True)
    print("UID", os.getuid())
    assert False, "this commit must fail"
"""


def _gate_log(site: Site, record: dict[str, t.Any]) -> str:
    status, history = site.api("GET", "/api/plugins/leaky/history")
    assert status == 200
    logs = sorted((site.data / "logs" / "leaky").glob("*.log"), key=os.path.getmtime)
    return logs[-1].read_text()


def _gate_site(tmp_path: Path, site_factory: t.Callable[..., Site], *,
               leaker: str | None = None, **top: t.Any) -> tuple[Site, dict[str, t.Any], str]:
    """Serve plugin ``leaky`` (v1 passes its tests), then deploy a v2 whose test tries to leak."""
    repo = GitRepo(tmp_path / "leaky-repo")
    repo.write("tests/leak.sh", "exit 0\n")
    v1 = write_version(repo, "leaky", "v1", gate_test=True)
    test = top.pop("test", "python -m pytest -q -s -p no:cacheprovider")
    env = server_env(MY_HEADER=f"Bearer {TOKEN}", OTHER=f"x{SECRET}y")
    site = site_factory({"leaky": {"repo": str(repo.path), "test": test}}, env=env, **top)
    wait_serving(site, "leaky", v1)
    write_version(repo, "leaky", "v2")
    state = str(site.data / "state.db")
    repo.write("tests/test_leak.py", LEAKER.format(state=state, nap=NAP))
    repo.write("tests/leak.sh", (leaker or "exit 1\n").format(token=TOKEN, secret=SECRET,
                                                              state=state, nap=NAP))
    repo.commit("a test that tries to leak")
    record = site.deploy("leaky")
    assert record["result"] == "failed" and record["stage"] == "test", record
    return site, record, _gate_log(site, record)


#: How long the escaping process sleeps: unique, so it is found by its command line
#: (in a pid namespace the pid it prints means nothing outside).
NAP = f"{uuid.uuid4().int % 10**6 + 10**6}.{uuid.uuid4().int % 1000:03}"


def _escaper_dead(log: str) -> None:
    assert re.search(r"ESCAPER \d+", log), log

    def alive() -> list[int]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if proc.info["cmdline"] and proc.info["cmdline"][-1:] == [NAP] \
                    and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        return found

    assert alive() == [], "a process the tests started with setsid survived the test gate"


def test_gate_scrubs_by_value_and_kills_escapees(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    site, _record, log = _gate_site(tmp_path, site_factory)
    # Its own environment holds no secret, even inside another value.
    assert "OWN-ENV-CLEAN" in log, log
    assert TOKEN not in log and SECRET not in log
    if os.geteuid() != 0:  # non-dumpable: unreadable to the same user; root reads it anyway
        assert "SERVER-ENV-UNREADABLE" in log, log
    _escaper_dead(log)
    assert "v1" in served(site, "leaky")


LEAK_SH = """\
for pid in $PPID $(awk '{{print $4}}' /proc/$PPID/stat); do
  if grep -qa -e {token} -e {secret} /proc/$pid/environ 2>/dev/null; then echo LEAKED; fi
done
env | grep -q -e {token} -e {secret} && echo LEAKED
(: >> {state}) 2>/dev/null && echo STATE-WRITABLE || echo STATE-READONLY
touch written-here && echo SCRATCH-WRITABLE
env -u PLUGIN_TEST_RUN_ID setsid sleep {nap} &
echo ESCAPER $!
echo UID $(id -u)
exit 1
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running tests as another user needs root")
def test_gate_as_test_user(tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    # /bin/sh as the test command: the server's interpreter may live where
    # nobody cannot run it (see the next test).
    site, _record, log = _gate_site(tmp_path, site_factory, test_user="nobody",
                                    test="/bin/sh tests/leak.sh", leaker=LEAK_SH)
    assert "UID 65534" in log
    assert "LEAKED" not in log
    assert "STATE-READONLY" in log and "SCRATCH-WRITABLE" in log
    _escaper_dead(log)
    assert "v1" in served(site, "leaky")


@pytest.mark.skipif(os.geteuid() != 0, reason="running tests as another user needs root")
def test_test_user_that_cannot_run_the_command_fails_clearly(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "sh").symlink_to("/bin/sh")
    repo = GitRepo(tmp_path / "hid-repo")
    repo.write("tests/ok.sh", "exit 0\n")
    write_version(repo, "hid", "v1")
    site = site_factory({"hid": {"repo": str(repo.path), "test": f"{hidden}/sh tests/ok.sh"}},
                        test_user="nobody")
    record = site.deploy("hid")
    assert record["result"] == "failed" and record["stage"] == "test", record
    # (pytest's own tmp dirs are 0700 too: whichever directory comes first is named.)
    assert re.search(rf"test_user 'nobody' cannot use {hidden}/sh \(the test command\): the "
                     r"directory /\S+ is not searchable by it\. Install the server where "
                     "that user can read and run it", record["error"]), record["error"]


def test_gate_in_bwrap(tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    _bwrap_or_skip()
    site, _record, log = _gate_site(tmp_path, site_factory, test_sandbox="bwrap")
    # A pid namespace of its own: the server's environ is not even visible.
    assert "OWN-ENV-CLEAN" in log and "SERVER-ENV-UNREADABLE" in log, log
    assert "STATE-READONLY" in log
    _escaper_dead(log)
    assert "v1" in served(site, "leaky")


NETWORK_AND_TMP = """\
import os, socket, pathlib

def test_sandbox():
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        print("NETWORK-OPEN")
    except OSError as exc:
        print("NETWORK-CLOSED", exc.strerror)
    print("TMP", sorted(os.listdir("/tmp")))
    pathlib.Path("scratch-file").write_text("ok")
    try:
        pathlib.Path({releases!r}, "x").write_text("no")
        print("RELEASES-WRITABLE")
    except OSError as exc:
        print("RELEASES-READONLY", exc.strerror)
"""


def test_bwrap_has_no_network_private_tmp_and_only_scratch_writable(
        tmp_path: Path, site_factory: t.Callable[..., Site]) -> None:
    _bwrap_or_skip()
    marker = Path("/tmp") / f"gitplug-visible-{uuid.uuid4().hex}"
    marker.write_text("host tmp")
    try:
        repo = GitRepo(tmp_path / "boxed-repo")
        v1 = write_version(repo, "boxed", "v1", gate_test=True)
        site = site_factory({"boxed": {"repo": str(repo.path),
                                       "test": "python -m pytest -q -s -p no:cacheprovider"}},
                            test_sandbox="bwrap")
        wait_serving(site, "boxed", v1)
        write_version(repo, "boxed", "v2")
        repo.write("tests/test_box.py", NETWORK_AND_TMP.format(
            port=site.server.port, releases=str(site.data / "releases")))
        v2 = repo.commit("v2, tested in the box")
        record = site.deploy("boxed")
        assert record["result"] == "live", record
        wait_serving(site, "boxed", v2)
        log = sorted((site.data / "logs" / "boxed").glob("*.log"), key=os.path.getmtime)[-1]
        text = log.read_text()
        assert "NETWORK-CLOSED" in text and "NETWORK-OPEN" not in text
        assert marker.name not in text
        assert "RELEASES-READONLY" in text
        assert "# sandbox: bwrap" in text
    finally:
        marker.unlink()


# --------------------------------------------------------------------------- local paths


@needs_git
def test_a_local_path_with_a_colon_is_local(tmp_path: Path,
                                            site_factory: t.Callable[..., Site]) -> None:
    repo = GitRepo(tmp_path / "odd:name")
    v1 = write_version(repo, "odd", "v1")
    config = write_site_config(tmp_path, {"odd": {"repo": "odd:name"}})
    checked = run_cli("check-config", "-c", config, env=server_env())
    assert checked.returncode == 0, checked.stderr
    site = site_factory({"odd": {"repo": "odd:name"}})
    wait_serving(site, "odd", v1)
    assert "ssh" not in site.server.log().lower()
