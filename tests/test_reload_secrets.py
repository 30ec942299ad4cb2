"""Rotating the webhook secret and the admin token takes effect in every worker within 2 s.

The edit changes no plugin, which is the case that used to be lost: the old
secret and token kept working. Each rotation goes through one of the ways a
running server hears of an edit (``gitplug reload-config``, SIGHUP, the file
watcher), on a real ``gitplug serve`` and on ``gunicorn -w 2``, where each
worker is reached on a keep-alive connection of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitrepo import GitRepo
from gunicorn_site import gunicorn, make_site
from serverproc import Server, run_cli, within, write_config, write_version

#: The promise (README "Configuration"): a reload reaches every reader within 2 s.
RELOAD_S = 2.0

#: (admin token, webhook secret) generations, each of the same length, so that a
#: rewritten file can keep its size (see test_sighup_alone_rotates).
GENERATIONS = [(f"admin-token-generation-{n}", f"webhook-secret-generation-{n}") for n in range(4)]

PING = json.dumps({"zen": "Design for failure.", "hook_id": 1,
                   "hook": {"type": "Repository", "events": ["push"]}}).encode()


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:``port`` (one worker holds it)."""

    def __init__(self, port: int) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method: str, path: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        self.http.request(method, path, body=body, headers=headers or {})
        response = self.http.getresponse()
        return response.status, response.read()

    def api_status(self, token: str) -> int:
        return self.call("GET", "/_gitplug/api/plugins",
                         headers={"Authorization": f"Bearer {token}"})[0]

    def ping_status(self, secret: str) -> int:
        signature = "sha256=" + hmac.new(secret.encode(), PING, hashlib.sha256).hexdigest()
        return self.call("POST", "/_gitplug/webhook", body=PING, headers={
            "Content-Type": "application/json", "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": f"ping-{secret}", "X-Hub-Signature-256": signature})[0]

    def accepts(self, generation: int) -> bool:
        """Only this generation's token and secret are accepted, the one before refused."""
        token, secret = GENERATIONS[generation]
        old_token, old_secret = GENERATIONS[generation - 1]
        return (self.api_status(token), self.api_status(old_token),
                self.ping_status(secret), self.ping_status(old_secret)) == (200, 401, 200, 401)

    def close(self) -> None:
        self.http.close()


def write_secrets(config: Path, generation: int) -> None:
    """Rewrite the literal admin_token and webhook secret in place; nothing else changes."""
    token, secret = GENERATIONS[generation]
    text = config.read_text()
    text = re.sub(r"(?m)^admin_token: .*$", f"admin_token: {token}", text)
    text = re.sub(r"(?m)^  secret: .*$", f"  secret: {secret}", text)
    with open(config, "r+") as handle:  # in place: same inode
        handle.write(text)
        handle.truncate()


@pytest.fixture
def served_config(tmp_path: Path) -> Path:
    repo = GitRepo(tmp_path / "hello-repo")
    write_version(repo, "hello", "v1")
    token, secret = GENERATIONS[0]
    return write_config(tmp_path / "deploy.yaml", {"hello": {"repo": repo.url}},
                        admin_token=token, webhook={"secret": secret})


@pytest.fixture
def serve(served_config: Path) -> Iterator[tuple[Server, Conn]]:
    with Server(served_config) as server:
        conn = Conn(server.port)
        try:
            yield server, conn
        finally:
            conn.close()


def test_reload_config_rotates_the_secret_and_the_token(
    served_config: Path, serve: tuple[Server, Conn]
) -> None:
    _, conn = serve
    token, secret = GENERATIONS[0]
    assert (conn.api_status(token), conn.ping_status(secret)) == (200, 200)
    assert (conn.api_status(GENERATIONS[1][0]), conn.ping_status(GENERATIONS[1][1])) == (401, 401)

    write_secrets(served_config, 1)
    done = run_cli("reload-config", "-c", served_config)
    assert done.returncode == 0, done.stderr
    within(RELOAD_S, lambda: conn.accepts(1), what="rotation by reload-config")

    # The file watcher alone (an editor saving the file), with no command at all.
    write_secrets(served_config, 2)
    within(RELOAD_S, lambda: conn.accepts(2), what="rotation seen by the file watcher")


def test_sighup_alone_rotates(served_config: Path, serve: tuple[Server, Conn]) -> None:
    server, conn = serve
    before = os.stat(served_config)
    write_secrets(served_config, 1)
    # Same size, same inode, and the old mtime: the file watcher cannot see this edit...
    os.utime(served_config, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(served_config).st_size == before.st_size
    # ...as the old generation, still the only one accepted for as long as the watcher
    # takes to apply an edit it sees (test_reload_config_rotates_the_secret_and_the_token), shows.
    token, secret = GENERATIONS[0]
    deadline = time.monotonic() + RELOAD_S
    while time.monotonic() < deadline:
        assert (conn.api_status(token), conn.ping_status(secret)) == (200, 200)
    os.kill(server.pid, signal.SIGHUP)
    within(RELOAD_S, lambda: conn.accepts(1), what="rotation by SIGHUP")


def test_every_gunicorn_worker_rotates(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    token, secret = GENERATIONS[0]
    text = site.config.read_text().replace("admin_token: ${GITPLUG_ADMIN_TOKEN}",
                                           f"admin_token: {token}")
    site.config.write_text(text + f"webhook:\n  secret: {secret}\n")
    with gunicorn(site, "-k", "gthread", "--threads", "4", "--keep-alive", "120",
                  workers=2) as server:
        # One keep-alive connection per worker: each request on it is that worker's.
        by_worker: dict[int, Conn] = {}
        # New connections until both workers have taken one: on a loaded machine the
        # second worker may still be importing while the first takes hundreds. A
        # connection the first worker already holds one of is closed at once.
        deadline = time.monotonic() + 60
        while len(by_worker) < 2 and time.monotonic() < deadline:
            conn = Conn(server.port)
            status, body = conn.call("GET", "/hello/")
            assert status == 200, body
            pid = json.loads(body)["pid"]
            if pid in by_worker:
                conn.close()
                time.sleep(0.02)  # a poll's pause, not a wait for something
            else:
                by_worker[pid] = conn
        assert len(by_worker) == 2, f"connections reached only workers {list(by_worker)}"
        try:
            for conn in by_worker.values():
                assert conn.api_status(token) == 200 and conn.ping_status(secret) == 200
            write_secrets(site.config, 1)
            done = run_cli("reload-config", "-c", site.config, env=dict(site.env))
            assert done.returncode == 0, done.stderr
            for pid, conn in by_worker.items():
                within(RELOAD_S, lambda conn=conn: conn.accepts(1),
                       what=f"rotation in worker {pid}")
            # Still the same two workers: none was restarted to get there.
            assert sorted(by_worker) == server.worker_pids(), sys.stderr
        finally:
            for conn in by_worker.values():
                conn.close()
