"""The fault catalogue (issue 5): bad inputs and faults, each with its error and its safety net.

This module is the catalogue's shared harness (:class:`Host`, the ``make_host``
and ``host`` fixtures, the plugin's files); the tests are in
``test_faults_config.py``, ``test_faults_git.py`` (git and trees),
``test_faults_code.py`` (plugin code and test gate) and ``test_faults_ops.py``
(disk, concurrency, webhooks). Each imports the fixtures it uses explicitly
(``from faults_site import host_fixture  # noqa: F401``); they are registered
under their short names with ``name=``, so a test's parameter does not shadow
the imported function.

Every test breaks one thing on purpose and asserts two facts:

(a) the error names what was wrong, where (plugin, file, line, key, url, ref,
    path) and what to do, matched on the message; and
(b) the last good release still serves: a GET through the host application's
    test client returns the stamp of the release that was live before.

Categories: configuration, git, trees, plugin code, test gate, disk,
concurrency, webhooks. The test gate is off (``test: false``) unless it is the
subject; then it is the default gate (pytest, skipped for a release without
``tests/``, so the good release never depends on the machine's load) with a
small timeout where the timeout is what is tested. Real git repositories
(dulwich), real subprocesses, real files; nothing of gitplug is mocked. The
poll scheduler is stopped (see :func:`start_without_polls`).

Bugs found are kept as ``xfail(strict=True)`` tests whose reason starts with "BUG:".
"""

from __future__ import annotations

import logging
import re
import textwrap
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug, signals
from gitplug.state import DeployRecord, DeployResult
from gitrepo import GitRepo

logger = logging.getLogger(__name__)


class _ListHandler(logging.Handler):
    """Keeps what gitplug logs, to check that a failed deploy is logged."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


MiB = 1024 * 1024
SECRET = "fault-catalogue-secret"
UNSET_VAR = "GITPLUG_FAULTS_NEVER_SET"

PLUGIN_INIT = """
from gitplug import Plugin, current_plugin

STAMP = "{stamp}"
plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return f"stamp={{STAMP}}@{{current_plugin.commit[:7]}}"
"""

PASSING_TEST = """
import hello

def test_stamp():
    assert hello.STAMP
"""

#: Leave ``test:`` out of the plugin's settings: the default gate (pytest), which is
#: skipped for a release without ``tests/``. Good releases here have none, so the
#: machine's load (pytest's start-up time) never fails the release a fault is measured against.
DEFAULT_GATE: t.Any = object()


def plugin_files(stamp: str, **extra: str) -> dict[str, str]:
    """The files of a good plugin release stamped ``stamp``, plus ``extra``."""
    files = {"hello/__init__.py": textwrap.dedent(PLUGIN_INIT.format(stamp=stamp))}
    files.update({path: textwrap.dedent(text) for path, text in extra.items()})
    return files


def v1_repo(tmp_path: Path) -> tuple[GitRepo, str]:
    """The repository make_host would create, for tests that add refs before the first deploy."""
    repo = GitRepo(tmp_path / "repo")
    for path, content in plugin_files("v1").items():
        repo.write(path, content)
    return repo, repo.commit("v1")


@dataclass
class Host:
    """A host application serving plugin ``hello`` from a real git repository."""

    tmp: Path
    app: Flask
    gp: GitPlug
    repo: GitRepo
    good: str  #: the commit of the last good release
    good_stamp: str
    failed: list[tuple[str, DeployRecord, BaseException]] = field(default_factory=list)
    logged: list[logging.LogRecord] = field(default_factory=list)

    def served(self, path: str = "/hello/") -> str:
        with self.app.test_client() as client:
            response = client.get(path, buffered=True)
            return f"{response.status_code} {response.get_data(as_text=True)}"

    def assert_good_serves(self) -> None:
        """Fact (b): the release that was live before the fault still answers."""
        assert self.served() == f"200 {self.good_stamp}"
        live = self.gp.live_release("hello")
        assert live is not None and live.commit == self.good
        status = self.gp.status()["plugins"][0]
        # "behind" once a deploy of the tracked ref failed (deploy_fails checks which).
        assert status["state"] in ("live", "behind") and status["live_commit"] == self.good, status

    def commit(self, files: dict[str, str | bytes], message: str, *, replace: bool = True) -> str:
        """Commit ``files`` as the whole work tree (``replace``) or on top of it."""
        if replace:
            for child in self.repo.path.iterdir():
                if child.name != ".git":
                    self.repo.remove(child.name)
        for path, content in files.items():
            self.repo.write(path, content)
        return self.repo.commit(message)

    def deploy_fails(self, stage: str, match: str, *, ref: str | None = None) -> DeployRecord:
        """Deploy, expect a failure at ``stage`` whose error matches, and the good release live."""
        record = self.gp.deploy("hello", ref=ref)
        assert record is not None, "an explicit deploy always leaves a record"
        assert record.result == DeployResult.FAILED, record
        assert record.stage is not None and record.stage.value == stage, record
        assert re.search(match, record.error or "", re.DOTALL), f"{match!r} not in {record.error!r}"
        # Signalled with the same record, logged, and kept on the plugin for `gitplug status`.
        assert [d.id for _, d, _ in self.failed] == [record.id]
        said = [r.getMessage() for r in self.logged if r.levelno >= logging.WARNING]
        assert any(f"deploy {record.id} failed at {stage}: " in line for line in said), said
        status = self.gp.status()["plugins"][0]
        assert status["last_error"] == record.error
        assert status["last_deploy"]["result"] == "failed"
        if ref is None:  # the tracked ref failed: the plugin is behind it, and says why
            assert status["state"] == "behind", status
            assert f", not the head of {status['ref']}: deploy #{record.id} (" in status["state_reason"], status
        self.assert_good_serves()
        return record


def _new_host(
    tmp_path: Path,
    *,
    files: dict[str, str] | None = None,
    plugin: dict[str, t.Any] | None = None,
    top: dict[str, t.Any] | None = None,
    others: dict[str, dict[str, t.Any]] | None = None,
    repo_url: str | None = None,
    app: Flask | None = None,
) -> Host:
    repo = GitRepo(tmp_path / "repo")
    if repo.head is None:  # else the test prepared the repository (branches, tags) itself
        for path, content in (files or plugin_files("v1")).items():
            repo.write(path, content)
        repo.commit("v1")
    good = repo.head
    assert good is not None
    if app is None:
        app = Flask("host")
        app.config["TESTING"] = True
    settings: dict[str, t.Any] = {"repo": repo_url or repo.url, "ref": "main", "test": False}
    settings.update(plugin or {})
    settings = {key: value for key, value in settings.items() if value is not DEFAULT_GATE}
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        **(top or {}),
        "plugins": {
            "hello": settings,
            **{
                name: {k: (repo.url if v == "{repo}" else v) for k, v in other.items()}
                for name, other in (others or {}).items()
            },
        },
    }
    gp = GitPlug(app)
    start_without_polls(gp)
    record = gp.deploy("hello")
    assert record is not None and record.result == DeployResult.LIVE, record
    host = Host(tmp_path, app, gp, repo, good, f"stamp=v1@{good[:7]}")

    def on_failed(
        sender: object, *, plugin: str, deploy: DeployRecord, error: BaseException
    ) -> None:
        host.failed.append((plugin, deploy, error))

    signals.deploy_failed.connect(on_failed, weak=False)
    host._receiver = on_failed  # type: ignore[attr-defined]
    host._handler = _ListHandler(host.logged)  # type: ignore[attr-defined]
    logging.getLogger("gitplug").addHandler(host._handler)  # type: ignore[attr-defined]
    host.assert_good_serves()
    return host


def start_without_polls(gp: GitPlug, timeout: float = 30.0) -> None:
    """Start the background services as the first request would, minus the poll scheduler.

    Polls are a trigger of their own; here the explicit deploy is the subject,
    and the startup poll (one second after the election) would race it, deploy
    the faulty commit first and leave two records. Convergence, the deploy
    queue (webhooks) and the controller's other duties keep running.
    """
    gp.start_background()
    services = gp._state.services
    deadline = time.monotonic() + timeout
    while not (services.is_controller and services.scheduler.jobs):
        assert time.monotonic() < deadline, "this process never became the controller"
        time.sleep(0.01)
    services.scheduler.shutdown()


@pytest.fixture(name="make_host")
def make_host_fixture(tmp_path: Path) -> t.Iterator[t.Callable[..., Host]]:
    hosts: list[Host] = []

    def make(**kwargs: t.Any) -> Host:
        host = _new_host(tmp_path, **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        signals.deploy_failed.disconnect(host._receiver)  # type: ignore[attr-defined]
        logging.getLogger("gitplug").removeHandler(host._handler)  # type: ignore[attr-defined]
        host.gp.shutdown()


@pytest.fixture(name="host")
def host_fixture(make_host: t.Callable[..., Host]) -> Host:
    return make_host()
