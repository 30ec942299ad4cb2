"""gitplug as a separate process: the CLI run to completion and ``gitplug serve``.

Shared by ``test_cli.py`` and ``test_api.py``: :func:`run_cli` runs one command
in a real subprocess (``python -c "from gitplug.cli import main; main()"`` or a
console script) with gitplug's variables scrubbed from the environment;
:class:`Server` runs ``gitplug serve`` on a free port of 127.0.0.1 and stops it
on exit; :func:`request` and :func:`get` talk to it over real HTTP;
:func:`wait_for` and :func:`within` poll for what it serves; :func:`write_version`
and :func:`write_config` write the plugin commits and deploy.yaml they use.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as t
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml

from gitrepo import GitRepo

#: The keys SPEC 10 gives a deploy record.
RECORD_KEYS = frozenset(
    ("id", "trigger", "ref", "commit", "result", "stage", "error", "started_at", "duration_s")
)
#: The keys SPEC 10 gives each plugin of ``status --json``.
STATUS_KEYS = {"name", "repo", "ref", "pin", "state", "live_commit", "workers", "last_deploy"}
CLI = [sys.executable, "-c", "from gitplug.cli import main; main()"]
#: Variables of the caller's shell that would change what a command reads.
_SCRUBBED = ("GITPLUG_CONFIG", "GITPLUG_ADMIN_TOKEN", "GITPLUG_WEBHOOK_SECRET", "FLASK_APP")


def script(name: str) -> str:
    """A console script: the one beside this interpreter (pyenv's shims are slow), else PATH's."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"the {name!r} console script is not installed; run pip install -e '.[test]'"
    return found


PLUGIN_SOURCE = """\
from gitplug import Plugin, current_plugin

plugin = Plugin("{name}", __name__)


@plugin.route("/")
def index():
    return "{name} {version} " + current_plugin.commit[:12]
"""

GATE_TEST = """\
def test_gate():
    print("GATE-OUTPUT {version}")
"""


# --------------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without gitplug's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(extra)
    return env


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    argv0: list[str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run one gitplug command to completion; never raises for its exit status."""
    return subprocess.run(
        [*(argv0 or CLI), *map(str, args)],
        check=False,  # callers assert on the exit status
        cwd=cwd,
        env=dict(env) if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(*args: str | Path, **kwargs: t.Any) -> t.Any:
    """Run a command with ``--json``; assert it succeeded and printed one JSON value."""
    proc = run_cli(*args, "--json", **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(
    method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """One request to 127.0.0.1 (no proxies); ``(status, body text)``."""
    assert url.startswith("http://127.0.0.1:"), url
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, "/" + path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def get(url: str) -> str:
    """``"<status> <body>"`` of a GET, or ``"down"`` when nothing answers."""
    try:
        status, text = request("GET", url)
    except OSError:
        return "down"
    return f"{status} {text}"


def wait_for(
    check: Callable[[], t.Any], *, timeout: float, interval: float = 0.05, what: str = ""
) -> float:
    """Call ``check`` every ``interval`` s until it is truthy; return the seconds it took."""
    start = time.monotonic()
    last: t.Any = None
    while True:
        last = check()
        elapsed = time.monotonic() - start
        if last:
            return elapsed
        if elapsed > timeout:
            pytest.fail(f"waited {timeout} s for {what or check}; last result: {last!r}")
        time.sleep(interval)


def within(limit: float, check: Callable[[], t.Any], *, what: str) -> float:
    """Wait until ``check`` turns truthy; fail only if it never does (a hang).

    ``limit`` is what the product promises (README); whether it keeps that
    promise is measured by ``python -m bench``, not here: a loaded machine is
    slow, not wrong. The guard deadline is ``max(10, 4 * limit)`` seconds.
    Returns the seconds it took; over the promise, that is printed.
    """
    took = wait_for(check, timeout=max(10.0, 4 * limit), what=what)
    if took >= limit:
        print(f"{what}: took {took:.2f} s, over the {limit} s promised (see python -m bench)")
    return took


def promptly(took: float, limit: float, *, what: str) -> None:
    """Check a time already measured as :func:`within` checks a wait: fail only on a hang.

    ``limit`` is the promise; only over ``max(10, 4 * limit)`` seconds does
    the test fail (something waited that must not); over the promise it
    prints, and ``python -m bench`` is where speed is judged.
    """
    assert took < max(10.0, 4 * limit), f"{what}: took {took:.2f} s (promised {limit} s): it hung"
    if took >= limit:
        print(f"{what}: took {took:.2f} s, over the {limit} s promised (see python -m bench)")


def write_version(
    repo: GitRepo, name: str, version: str, *, gate_test: bool = False, broken: bool = False
) -> str:
    """Commit a plugin ``name`` answering ``"<name> <version> <sha12>"``; return the sha."""
    source = PLUGIN_SOURCE.format(name=name, version=version)
    repo.write(f"{name}/__init__.py", source)
    if broken:
        repo.write(f"{name}/views.py", "def broken(:\n    pass\n")
        repo.write(f"{name}/__init__.py", source + "from . import views\n")
    elif (repo.path / name / "views.py").exists():
        repo.remove(f"{name}/views.py")
    if gate_test:
        repo.write("tests/test_gate.py", GATE_TEST.format(version=version))
    return repo.commit(f"{name} {version}")


def expected(name: str, version: str, sha: str) -> str:
    """What the plugin's index answers."""
    return f"200 {name} {version} {sha[:12]}"


def write_config(path: Path, plugins: Mapping[str, Mapping[str, t.Any]], **top: t.Any) -> Path:
    """Write a deploy.yaml; plugins default to a quick, gate-less setup."""
    data: dict[str, t.Any] = {"data_dir": "data", "poll_interval": 3600, **top}
    data["plugins"] = {
        name: {"ref": "main", "test": False, "test_timeout": 20, **settings}
        for name, settings in plugins.items()
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Server:
    """``gitplug serve`` in a subprocess on a free port; stopped on exit.

    Its output goes to a log file (:meth:`log`), so a chatty server never
    blocks on a full pipe.
    """

    def __init__(
        self, config: Path, *, env: Mapping[str, str] | None = None, extra: t.Sequence[str] = ()
    ) -> None:
        self.config = config
        self.extra = list(extra)
        self.env = dict(env) if env is not None else clean_env()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> t.Self:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "-c", str(self.config), "--port", str(self.port), *self.extra],
                cwd=self.config.parent,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._ready, timeout=60, interval=0.05, what=f"gitplug serve on {self.base}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"gitplug serve exited with {self.proc.returncode}:\n{self.log()}")
        return get(self.base + "/").startswith("200 ")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl+C: shuts down cleanly
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> str:
        return get(self.base + path)
