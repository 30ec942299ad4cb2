"""The harness of the fleet tests and bench: several hosts sharing one PostgreSQL database.

Each :class:`Host` is a real server in its own directory (own ``data_dir``,
``host_id`` and port): ``gitplug serve``, or gunicorn with several workers.
Every host's configuration reads the database URL from ``${GITPLUG_STATE}``,
so one host can be pointed through a :class:`~tcpproxy.TcpProxy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
import urllib.parse
import uuid
from pathlib import Path

import yaml

from serverproc import CLI, clean_env, free_port, get, request

SECRET = "fleet-webhook-secret"
TOKEN = "fleet-admin-token"
GATE = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def write_host_config(
    path: Path, host_id: str, repo_url: str, *, gate: bool = True, more: t.Mapping[str, str] | None = None,
    settings: t.Mapping[str, t.Any] | None = None, top: t.Mapping[str, t.Any] | None = None,
) -> Path:
    """A host's deploy.yaml: plugin ``hello`` from ``repo_url`` (plus ``settings``), and ``more`` ({name: url}).

    ``top``: more top-level settings (``host_url: ${GITPLUG_HOST_URL}`` reads the host's own URL).
    """
    data = {
        "data_dir": "data",
        "host_id": host_id,
        "state": "${GITPLUG_STATE}",
        "poll_interval": 3600,
        "admin_token": "${GITPLUG_ADMIN_TOKEN}",
        "webhook": {"secret": "${GITPLUG_WEBHOOK_SECRET}"},
        **(top or {}),
        "plugins": {
            "hello": {"repo": repo_url, "ref": "main", "test": GATE if gate else False, "test_timeout": 60,
                      **(settings or {})},
            **{
                name: {"repo": url, "ref": "main", "test": GATE if gate else False, "test_timeout": 60}
                for name, url in (more or {}).items()
            },
        },
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Host:
    """One host of the fleet: a server process (or gunicorn) on its own port and data_dir."""

    def __init__(
        self, root: Path, host_id: str, state_url: str, repo_url: str, *, workers: int = 0, gate: bool = True,
        more: t.Mapping[str, str] | None = None, settings: t.Mapping[str, t.Any] | None = None,
        top: t.Mapping[str, t.Any] | None = None, extra_env: t.Mapping[str, str] | None = None,
    ) -> None:
        self.host_id = host_id
        self.dir = root / host_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = write_host_config(self.dir / "deploy.yaml", host_id, repo_url, gate=gate, more=more,
                                        settings=settings, top=top)
        self.extra_env = dict(extra_env or {})
        self.workers = workers  # 0: `gitplug serve`, else gunicorn -w workers
        self.state_url = state_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "server.log"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def env(self) -> dict[str, str]:
        return clean_env(
            GITPLUG_STATE=self.state_url,
            GITPLUG_CONFIG=str(self.config),
            GITPLUG_ADMIN_TOKEN=TOKEN,
            GITPLUG_WEBHOOK_SECRET=SECRET,
            GITPLUG_HOST_URL=self.base,
            **self.extra_env,
        )

    def start(self, *, timeout: float = 60.0) -> Host:
        if self.workers:
            command = [
                sys.executable, "-m", "gunicorn", "-w", str(self.workers), "-k", "gthread", "--threads", "4",
                "-b", f"127.0.0.1:{self.port}", "-c", "python:gitplug.gunicorn_conf",
                "--graceful-timeout", "5", *_gunicorn_isolation(), "gitplug.wsgi:app",
            ]
        else:
            command = [*CLI, "serve", "-c", str(self.config), "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            # A session of its own: the whole server (gunicorn's workers too)
            # is one process group this host can stop or SIGKILL.
            self.proc = subprocess.Popen(
                command, cwd=self.dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not get(self.base + "/").startswith("200 "):
            if self.proc.poll() is not None:
                raise AssertionError(f"host {self.host_id} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"host {self.host_id} did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM (gunicorn) or SIGINT (serve), then SIGKILL of the group if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM if self.workers else signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (workers)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole server at once (a machine dying)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def answer(self, plugin: str = "hello") -> str:
        return get(f"{self.base}/{plugin}/")

    def serves(self, sha: str, *, tries: int = 1) -> bool:
        """Whether every one of ``tries`` answers is the release of ``sha``
        (several tries reach every gunicorn worker with high probability)."""
        tries = max(tries, 6 if self.workers else 1)
        return all(sha[:12] in self.answer() for _ in range(tries))

    def api(self, method: str, path: str, body: t.Any = None) -> tuple[int, t.Any]:
        status, text = request(
            method, f"{self.base}/_gitplug/api{path}",
            body=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        return status, json.loads(text) if text else None

    def status(self, plugin: str = "hello") -> dict[str, t.Any]:
        status, data = self.api("GET", f"/plugins/{plugin}")
        assert status == 200, data
        return t.cast(dict[str, t.Any], data)

    def hook(self, repo_url: str, after: str, ref: str = "refs/heads/main") -> tuple[int, dict[str, t.Any]]:
        """A signed GitHub push webhook for ``ref`` at ``after``."""
        body = json.dumps({
            "ref": ref, "after": after,
            "repository": {"clone_url": repo_url, "default_branch": "main"},
        }).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        status, text = request("POST", f"{self.base}/_gitplug/webhook", body=body, headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={signature}",
        })
        return status, json.loads(text)

    def status_page(self) -> str:
        """The status page's HTML, logged in with the admin token."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/_gitplug/login", body=urllib.parse.urlencode({"token": TOKEN}),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            response = response_ = conn.getresponse()
            response_.read()
            cookie = "; ".join(
                value.split(";", 1)[0] for name, value in response.getheaders() if name.lower() == "set-cookie"
            )
            conn.request("GET", "/_gitplug/", headers={"Cookie": cookie})
            page = conn.getresponse()
            assert page.status == 200, page.status
            return page.read().decode()
        finally:
            conn.close()

    def test_logs(self) -> list[Path]:
        """The test-gate logs this host wrote (one per test run)."""
        return sorted((self.data_dir / "logs").glob("hello/*.log"))


def stop_hosts(hosts: t.Iterable[Host]) -> None:
    """Stop every host, then print each one's log tail (pytest shows it for a failing test)."""
    hosts = list(hosts)
    for host in hosts:
        host.stop()
    for host in hosts:
        print(f"---- {host.host_id} ----\n{host.log()[-6000:]}")


def _gunicorn_isolation() -> list[str]:
    """gunicorn >= 24 opens a control socket in ~/.gunicorn: keep parallel ones apart."""
    from gunicorn.config import KNOWN_SETTINGS

    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


def leader_of(host: Host, plugin: str = "hello") -> str | None:
    """The id of the host that leads ``plugin``, as ``host``'s status shows it."""
    try:
        hosts = host.status(plugin)["hosts"]
    except (OSError, AssertionError, ValueError):
        return None
    leaders = [h for h, entry in hosts.items() if entry.get("leader") and entry["state"] != "lost"]
    return leaders[0] if len(leaders) == 1 else None
