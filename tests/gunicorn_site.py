"""The harness of the gunicorn tests: a plugin repository, gitplug's CLI and gunicorn.

Real things only: a dulwich repository in ``tmp_path``, ``gunicorn`` started
as a subprocess on ``127.0.0.1`` with ``gitplug.wsgi:app`` and
``gitplug.gunicorn_conf`` (killed in a ``finally``; its log printed when a test
fails), deploys through the ``gitplug`` CLI (its own process) and the admin
API, and client threads from :mod:`loadgen`.

The plugin answers JSON carrying its release label from four modules (one
imported lazily by the view) and a template, the worker's pid, the snapshot
generation the request was pinned to and ``time.time()`` taken in the view,
so every response says which release, in which process, served it and when.
:mod:`gunicorn_served` decodes and checks those responses; the pytest fixtures
are in :mod:`gunicorn_fixtures`; the tests in ``test_gunicorn_load.py`` and
``test_gunicorn_workers.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from gitrepo import GitRepo

ADMIN_TOKEN = "gunicorn-test-admin-token"

#: The seconds SPEC 4.8 allows between a swap and every worker serving it.
CONVERGENCE_S = 2.0

PLUGIN_INIT = """
import os
import time

from flask import jsonify, render_template, request
from gitplug import Plugin, current_plugin

from hello import alpha, beta
from hello.gamma import STAMP as GAMMA

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    now = time.time()
    from hello.lazy import STAMP as LAZY
    snapshot = request.environ.get("gitplug.snapshot")
    return jsonify(
        stamps=[alpha.STAMP, beta.STAMP, GAMMA, LAZY, render_template("stamp.txt").strip()],
        seq=alpha.SEQ,
        commit=current_plugin.commit,
        pid=os.getpid(),
        generation=getattr(snapshot, "generation", None),
        t=now,
    )
"""

#: Ways a release is broken so that it fails at load (SPEC 4.2).
BROKEN_KINDS = ("lazy_syntax", "import_error")


def label(seq: int) -> str:
    return f"r{seq:03d}"


def write_release(
    repo: GitRepo, seq: int, *, broken: str | None = None, gate_s: float = 0.0
) -> str:
    """Commit release ``seq`` of the ``hello`` plugin; return its sha.

    ``gate.py`` is the release's own test gate (used by :func:`make_site` with
    ``gate=True``): it passes after sleeping ``gate_s`` seconds, so a test can hold
    a real deploy in its test stage.
    """
    repo.write("gate.py", f"import time\ntime.sleep({gate_s})\n")
    stamp = label(seq) if broken is None else f"broken{seq:03d}"
    repo.write("hello/__init__.py", textwrap.dedent(PLUGIN_INIT).lstrip())
    repo.write("hello/alpha.py", f'STAMP = "{stamp}"\nSEQ = {seq}\n')
    repo.write("hello/beta.py", f'STAMP = "{stamp}"\n')
    gamma = f'STAMP = "{stamp}"\n'
    lazy = f'STAMP = "{stamp}"\n'
    if broken == "lazy_syntax":
        lazy += "def oops(:\n"
    elif broken == "import_error":
        gamma += 'raise RuntimeError("gamma cannot start")\n'
    elif broken is not None:
        raise ValueError(f"unknown broken kind {broken!r}; expected one of {BROKEN_KINDS}")
    repo.write("hello/gamma.py", gamma)
    repo.write("hello/lazy.py", lazy)
    repo.write("hello/templates/stamp.txt", f"{stamp}\n")
    return repo.commit(f"hello {stamp}")


@dataclass(frozen=True)
class DeployDone:
    """One deploy as the operator saw it.

    ``done_at`` is ``time.time()`` when the CLI exited or the API answered; when the
    controller's poll deployed the commit first (the deploy answered "already live"),
    it is when that poll's deploy finished, and ``via`` is ``poll``.
    """

    seq: int
    commit: str
    via: str  # cli | api | poll
    broken: str | None
    result: str
    stage: str | None
    exit: int  # the CLI's exit status or the API's HTTP status
    done_at: float
    took_s: float


def finished_at(record: dict[str, Any]) -> float:
    """``time.time()`` when a deploy record (``history --json``) finished."""
    started = datetime.fromisoformat(record["started_at"]).timestamp()  # "...Z": UTC
    return started + record["duration_s"]


# -- the site: repository, configuration, CLI ---------------------------------------


@dataclass
class Site:
    """A plugin repository and a deploy.yaml in ``root``; the CLI bound to them."""

    root: Path
    repo: GitRepo
    config: Path
    data_dir: Path
    commits: dict[int, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GITPLUG_CONFIG=str(self.config),
            GITPLUG_ADMIN_TOKEN=ADMIN_TOKEN,
            PYTHONUNBUFFERED="1",
        )
        return env

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``gitplug ARGS`` in its own process (as an operator would)."""
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from gitplug.cli import main; sys.argv[0] = 'gitplug'; main()",
                *args,
            ],
            check=False,  # the caller asserts on the exit status
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, (
            f"gitplug {' '.join(args)} exited {done.returncode}: {done.stderr}"
        )
        return json.loads(done.stdout)

    def release(self, seq: int, *, broken: str | None = None, gate_s: float = 0.0) -> str:
        sha = write_release(self.repo, seq, broken=broken, gate_s=gate_s)
        if broken is None:
            self.commits[seq] = sha
        return sha

    def deploy_cli(self) -> tuple[dict[str, Any], int]:
        """``gitplug deploy hello --json``: the record and the exit status."""
        done = self.cli("deploy", "hello", "--json")
        try:
            record = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"gitplug deploy printed no JSON (exit {done.returncode}): {done.stderr}"
            ) from None
        return record, done.returncode

    def deploy(
        self,
        seq: int,
        *,
        via: str,
        server: Gunicorn | None = None,
        broken: str | None = None,
        gate_s: float = 0.0,
    ) -> DeployDone:
        """Commit release ``seq`` and deploy it through the CLI or the admin API (waiting)."""
        sha = self.release(seq, broken=broken, gate_s=gate_s)
        started = time.monotonic()
        if via == "cli":
            record, code = self.deploy_cli()
        else:
            assert server is not None
            code, record = server.api("POST", "/plugins/hello/deploy", {"wait": True})
        done_at, took = time.time(), time.monotonic() - started
        assert record.get("commit") == sha, (via, code, record)
        if record["result"] == "skipped":
            # The controller polls its tracked ref once on election: it may have
            # deployed the commit first. Its own history record says when.
            live = [
                r
                for r in self.cli_json("history", "hello")
                if r["commit"] == sha and r["result"] == "live"
            ]
            assert live and live[0]["trigger"] in ("startup", "poll"), (record, live)
            return DeployDone(
                seq, sha, live[0]["trigger"], broken, "live", None, code, finished_at(live[0]), took
            )
        return DeployDone(
            seq, sha, via, broken, record["result"], record["stage"], code, done_at, took
        )

    @property
    def controller_lock(self) -> Path:
        return self.data_dir / "locks" / "controller.lock"

    @property
    def deploy_lock(self) -> Path:
        return self.data_dir / "locks" / "deploy-hello.lock"

    def history(self) -> list[dict[str, Any]]:
        return self.cli_json("history", "hello")


def make_site(root: Path, *, gate: bool = False) -> Site:
    """A repository and deploy.yaml in ``root``; release r000 deployed by the CLI.

    The test gate is off (``test: false``) unless ``gate``: then each release's
    ``gate.py`` is its test command. Polls are hourly: only the controller's poll on
    election runs during a test.
    """
    repo = GitRepo(root / "hello-repo")
    config = root / "deploy.yaml"
    test = json.dumps([sys.executable, "gate.py"]) if gate else "false"
    config.write_text(
        textwrap.dedent(
            f"""\
            data_dir: data
            poll_interval: 3600
            admin_token: ${{GITPLUG_ADMIN_TOKEN}}
            plugins:
              hello:
                repo: {repo.path}
                ref: main
                test: {test}
            """
        )
    )
    site = Site(root=root, repo=repo, config=config, data_dir=root / "data")
    site.release(0)
    record, code = site.deploy_cli()
    assert code == 0 and record["result"] == "live", (record, code)
    return site



# -- gunicorn ------------------------------------------------------------------------


class Gunicorn:
    """``gunicorn ARGS gitplug.wsgi:app`` on 127.0.0.1, its log in a file.

    Always stopped by :meth:`close` (SIGTERM, then SIGKILL of the master and
    of every worker it ever had). A thread records each worker's pid and
    creation time as it appears.
    """

    def __init__(self, site: Site, *args: str, workers: int) -> None:
        self.site = site
        self.workers = workers
        self.log_path = site.root / f"gunicorn-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "-b",
            "127.0.0.1:0",
            "-c",
            "python:gitplug.gunicorn_conf",
            "--graceful-timeout",
            "5",
            "--log-level",
            "info",
            *_isolation_args(),
            *args,
            "gitplug.wsgi:app",
        ]
        self.proc = subprocess.Popen(
            command, env=site.env, cwd=site.root, stdout=self._log, stderr=subprocess.STDOUT
        )
        #: ``{pid: creation time (time.time())}`` of every worker seen.
        self.births: dict[int, float] = {}
        self._watching = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_workers, name="gunicorn-workers", daemon=True
        )
        self._watcher.start()
        self.port = self._wait_port()

    def _watch_workers(self) -> None:
        try:
            master = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._watching.is_set():
            try:
                for child in master.children():
                    if child.pid not in self.births:
                        with contextlib.suppress(psutil.Error):
                            self.births[child.pid] = child.create_time()
            except psutil.Error:
                return
            self._watching.wait(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise AssertionError(f"gunicorn did not start listening within {timeout} s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.Error:
            return []

    def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}{path}", timeout=timeout
        ) as response:
            return response.status, response.read()

    def api(
        self, method: str, path: str, body: Any = None, *, timeout: float = 60.0
    ) -> tuple[int, Any]:
        """Call the admin API with the admin token; return status and decoded JSON."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_gitplug/api{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def controller_polled(self, plugin: str = "hello") -> bool:
        """True once a scrape of /metrics shows the controller's first successful poll.

        Only the controller polls, so a scrape that another worker answers says
        False; callers retry (each retry is a new connection, any worker).
        """
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_gitplug/metrics",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return f'gitplug_last_successful_poll_timestamp_seconds{{plugin="{plugin}"}}' in text

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for every worker to be up and the plugin to answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            if (
                len(self.worker_pids()) == self.workers
                and self.log().count("Booting worker") >= self.workers
            ):
                with contextlib.suppress(OSError):
                    if self.get("/hello/")[0] == 200:
                        return
            time.sleep(0.1)
        raise AssertionError(f"gunicorn was not ready within {timeout} s:\n{self.log()}")

    def close(self) -> None:
        self._watching.set()
        pids = set(self.births) | set(self.worker_pids())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in pids:
            # Only workers this master had, checked by creation time (pids are reused).
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if pid in self.births and abs(proc.create_time() - self.births[pid]) < 0.05:
                    proc.kill()
        self._log.close()


def _isolation_args() -> list[str]:
    """Keep parallel gunicorns apart: gunicorn >= 24 opens a control socket in ~/.gunicorn."""
    from gunicorn.config import KNOWN_SETTINGS

    return (
        ["--no-control-socket"]
        if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
        else []
    )


def machine_load() -> str:
    """The load averages, to tell a slow product from a machine busy with other work."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


@contextlib.contextmanager
def gunicorn(site: Site, *args: str, workers: int) -> Iterator[Gunicorn]:
    """A running gunicorn; its log is printed when the block fails."""
    server = Gunicorn(site, *args, workers=workers)
    try:
        server.wait_ready()
        yield server
    except BaseException:
        print(
            f"---- gunicorn log ({server.log_path}; {machine_load()}) ----\n{server.log()[-20000:]}"
        )
        raise
    finally:
        server.close()



# -- probing the site -------------------------------------------------------------------


def wait_for(what: str, check: Any, *, timeout: float, interval: float = 0.1) -> Any:
    """Call ``check()`` until it returns a true value; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lock_holder(path: Path) -> int | None:
    """The pid written in an fcntl lock file, if the lock is held right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody held it
        return None
    finally:
        os.close(fd)


def status_is(site: Site, expected: dict[int, str]) -> dict[int, str | None] | None:
    """``gitplug status`` workers when they are exactly ``expected``, else None."""
    workers = status_workers(site)
    return workers if workers == expected else None


def status_workers(site: Site) -> dict[int, str | None]:
    """``gitplug status --json``: ``{pid: commit}`` of the hello plugin's workers."""
    plugin = site.cli_json("status")["plugins"][0]
    return {int(worker_id.split(":")[1]): commit for worker_id, commit in plugin["workers"].items()}
