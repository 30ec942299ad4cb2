"""Crash safety (SPEC 4.3, 4.7): a deploy process killed with SIGKILL at each point.

Each test deploys v1 (the last good release), then runs ``gitplug deploy`` for
v2 in a child process and kills it with a real SIGKILL while it is

* fetching (the repository is served over slow HTTP),
* staging (as soon as its ``.tmp-*`` directory appears under ``releases/hello/``),
* testing (while the test gate's tests sleep),
* loading (while a plugin module sleeps at import, gate off),
* swapping (writing the new live commit to the state store) or
* writing history (recording the deploy's result).

The last two points are picked by a small harness that runs the CLI after
patching one state-store method to ``os.kill(os.getpid(), SIGKILL)``: the kill
is real, the harness only chooses the instant.

After each kill: a new ``GitPlug(app)`` host on the same data directory serves
the last good release; once it is the controller the killed deploy is recorded
``interrupted``; no half-written release exists under ``releases/`` (every
directory there has valid metadata, and the controller removed the temp
directories); and a new deploy of the same commit succeeds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import typing as t
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from flask import Flask

from gitplug import GitPlug
from gitplug.config import load_config
from gitplug.deploy.pipeline import Deployer
from gitplug.deploy.releases import LEDGER_NAME, ReleaseStore
from gitplug.state import (
    INTERRUPTED_ERROR,
    DeployRecord,
    DeployResult,
    StateStore,
    open_state_store,
)
from gitrepo import GitRepo, serve_http

PLUGIN_INIT = """
import os
from gitplug import Plugin, current_plugin

STAMP = "{stamp}"
plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return f"stamp={{STAMP}}@{{current_plugin.commit[:7]}}"
"""

#: Imported by the v2 package of the "load" scenario: marks that the import
#: started, then sleeps, only in the child the test kills (its environment).
SLOW_IMPORT = """
import os
import time

if os.environ.get("CRASH_MARK"):
    with open(os.environ["CRASH_MARK"], "w") as mark:
        mark.write("importing")
time.sleep(float(os.environ.get("CRASH_SLEEP", "0")))
"""

#: The v2 tests of the "test" scenario: they sleep only in the killed child.
SLOW_TEST = """
import os
import time

def test_slow():
    time.sleep(float(os.environ.get("CRASH_SLEEP", "0")))
"""

#: Runs ``gitplug deploy`` after arranging a SIGKILL at one instant.
HARNESS = """
import os, signal, sys
from gitplug.state import SQLiteStateStore

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

at = os.environ.get("CRASH_AT")
if at == "history":        # the deploy's result is being written
    SQLiteStateStore.finish_deploy = die
elif at == "swap":         # inside the transaction writing the live commit and the result
    update_in = SQLiteStateStore._update_plugin_in
    def patched(conn, name, fields):
        if "live_commit" in fields:
            die()
        return update_in(conn, name, fields)
    SQLiteStateStore._update_plugin_in = staticmethod(patched)
from gitplug.cli import main
sys.argv[0] = "gitplug"
main()
"""

CONFIG = """\
data_dir: data
plugins:
  hello:
    repo: {repo}
    ref: main
{gate}
"""


def stamp_files(stamp: str) -> dict[str, str]:
    return {"hello/__init__.py": textwrap.dedent(PLUGIN_INIT.format(stamp=stamp))}


def wait_for(
    what: str, predicate: t.Callable[[], t.Any], timeout: float = 60.0, every: float = 0.005
) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class Scenario:
    """One data directory with v1 live and v2 committed, ready to be crashed."""

    tmp: Path
    repo: GitRepo
    config_file: Path
    v1: str
    v2: str

    @property
    def data(self) -> Path:
        return self.tmp / "data"

    @property
    def plugin_releases(self) -> Path:
        return self.data / "releases" / "hello"

    def store(self) -> StateStore:
        config = load_config(self.config_file)
        return open_state_store(config.state, base_dir=config.base_dir)

    def state_of_hello(self) -> t.Any:
        store = self.store()
        try:
            return store.get_plugin("hello")
        finally:
            store.close()

    @property
    def child_log(self) -> Path:
        return self.tmp / "child.log"

    def deploy_child(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """``gitplug deploy hello`` in a child process (output to :attr:`child_log`)."""
        with open(self.child_log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-c", HARNESS, "deploy", "hello", "-c", str(self.config_file)],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def killed(self, child: subprocess.Popen[bytes]) -> None:
        """Assert that ``child`` died of SIGKILL (not of an error of its own)."""
        assert child.returncode == -signal.SIGKILL, self.child_log.read_text(errors="replace")

    def running_deploy(self) -> DeployRecord | None:
        # One read-only connection per call: opening a store would write (schema check).
        with sqlite3.connect(
            f"file:{self.data / 'state.db'}?mode=ro", uri=True, timeout=10
        ) as conn:
            row = conn.execute(
                "SELECT id FROM deploys WHERE plugin = 'hello' AND result = 'running'"
                " ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        store = self.store()
        try:
            return store.get_deploy(int(row[0]))
        finally:
            store.close()

    def assert_no_half_written_release(self, *, temp_allowed: bool) -> None:
        """Every directory named as a release is complete; temp dirs only before cleanup."""
        store = ReleaseStore(self.data / "releases")
        for child in sorted(self.plugin_releases.iterdir()):
            if child.name.startswith(".tmp-"):
                assert temp_allowed, f"{child} was left behind after the controller's cleanup"
                continue
            if child.name == LEDGER_NAME:  # the files the releases share, not a release
                assert child.is_file()
                continue
            assert store.get("hello", child.name) is not None, f"{child} has no valid metadata"


def make_scenario(
    tmp_path: Path,
    *,
    repo_url: str | None = None,
    gate: bool = False,
    v2_files: dict[str, str | bytes] | None = None,
) -> Scenario:
    repo = GitRepo(tmp_path / "repo")
    for path, content in stamp_files("v1").items():
        repo.write(path, content)
    v1 = repo.commit("v1")
    config_file = tmp_path / "deploy.yaml"
    # Without `test:` the default gate runs pytest, skipped for a release without tests/ (v1).
    config_file.write_text(
        CONFIG.format(repo=repo_url or repo.path, gate="" if gate else "    test: false")
    )
    config = load_config(config_file)
    store = open_state_store(config.state, base_dir=config.base_dir)
    try:  # what `gitplug deploy` does, in this process
        record = Deployer(config, store).deploy("hello", trigger="cli")
        assert record is not None and record.result == DeployResult.LIVE, record
    finally:
        store.close()
    for path, content in {**stamp_files("v2"), **(v2_files or {})}.items():
        repo.write(path, content)
    v2 = repo.commit("v2")
    return Scenario(tmp_path, repo, config_file, v1, v2)


def kill(
    scenario: Scenario, child: subprocess.Popen[bytes], *, also: Sequence[psutil.Process] = ()
) -> None:
    """SIGKILL the deploy; then, by pid, the processes it had started (an orphaned test gate)."""
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    scenario.killed(child)
    for process in also:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def restart_and_check(scenario: Scenario, killed: DeployRecord, *, serves: str) -> None:
    """The four facts every crash must leave true, checked on a brand-new host."""
    scenario.assert_no_half_written_release(temp_allowed=True)

    app = Flask("restarted")
    app.config.update(TESTING=True, GITPLUG_CONFIG=str(scenario.config_file))
    gp = GitPlug(app)  # restores every plugin's live release from disk, no network
    try:
        expected = {"v1": scenario.v1, "v2": scenario.v2}[serves]
        with app.test_client() as client:  # the first request also starts the services
            body = client.get("/hello/", buffered=True).get_data(as_text=True)
        assert body == f"stamp={serves}@{expected[:7]}"

        services = gp._state.services
        gp.start_background()
        wait_for(
            "the election", lambda: services.is_controller and services.scheduler.jobs, timeout=30
        )
        # The startup poll (1 s after the election) would deploy v2 by itself;
        # stop it so the explicit deploy below is what proves v2 deploys.
        services.scheduler.shutdown()

        history = {r.id: r for r in gp.history("hello")}
        record = history[killed.id]
        assert (record.result, record.error) == (DeployResult.INTERRUPTED, INTERRUPTED_ERROR), (
            record
        )
        assert [r.id for r in history.values() if r.result == DeployResult.INTERRUPTED] == [
            killed.id
        ]
        assert not [r for r in history.values() if r.result == DeployResult.RUNNING]

        scenario.assert_no_half_written_release(temp_allowed=False)
        assert not [p for p in scenario.plugin_releases.iterdir() if p.name.startswith(".tmp-")]

        again = gp.deploy("hello")
        assert again is not None and again.commit == scenario.v2, again
        if serves == "v2":  # the swap was recorded before the kill: v2 is already live
            assert (again.result, again.error) == (
                DeployResult.SKIPPED,
                f"{scenario.v2[:12]} is already live",
            )
        else:
            assert again.result == DeployResult.LIVE, again
        with app.test_client() as client:
            assert (
                client.get("/hello/", buffered=True).get_data(as_text=True)
                == f"stamp=v2@{scenario.v2[:7]}"
            )
        state = gp._state.store.get_plugin("hello")
        assert (state.live_commit, state.state.value) == (scenario.v2, "live"), state
    finally:
        gp.shutdown()


# ----------------------------------------------------------------------------- the kill points


def test_killed_while_fetching(tmp_path: Path) -> None:
    # Every answer of the git server takes 0.5 s: the deploy spends seconds fetching.
    with serve_http(tmp_path, delay=0.5) as base:
        scenario = make_scenario(tmp_path, repo_url=f"{base}/repo")
        child = scenario.deploy_child({})
        wait_for("the deploy to start", scenario.running_deploy)
        kill(scenario, child)
        killed = scenario.running_deploy()
        assert killed is not None and killed.commit is None, (
            "killed after the fetch: the ref was resolved"
        )
        restart_and_check(scenario, killed, serves="v1")


def test_killed_while_staging(tmp_path: Path) -> None:
    # Big enough that writing and fsyncing it takes a while: a 40 MB file and 300 small ones.
    v2_files: dict[str, str | bytes] = {
        f"hello/data/f{i:03}.txt": f"{i}\n" * 50 for i in range(300)
    }
    v2_files["hello/data/big.bin"] = b"\0" * (40 * 1024 * 1024)
    scenario = make_scenario(tmp_path, v2_files=v2_files)
    child = scenario.deploy_child({})
    temp = wait_for(
        "the staging temp dir",
        lambda: [p for p in scenario.plugin_releases.glob(".tmp-*") if p.is_dir()],
        every=0.001,
    )
    kill(scenario, child)
    assert temp[0].exists(), "the kill came after staging: the scenario did not hit its point"
    assert not (scenario.plugin_releases / scenario.v2).exists()
    killed = scenario.running_deploy()
    assert killed is not None and killed.commit == scenario.v2
    restart_and_check(scenario, killed, serves="v1")


def test_killed_while_testing(tmp_path: Path) -> None:
    scenario = make_scenario(tmp_path, gate=True, v2_files={"tests/test_slow.py": SLOW_TEST})
    child = scenario.deploy_child({"CRASH_SLEEP": "60"})
    logs = scenario.data / "logs" / "hello"
    # v1's tests wrote 1.log; v2's gate has started once its log exists (git
    # children of the fetch and stage steps come and go before that).
    gate = wait_for(
        "the test gate to run",
        lambda: (
            (len(list(logs.glob("*.log"))) >= 2 if logs.is_dir() else False)
            and psutil.Process(child.pid).children(recursive=True)
        ),
    )
    kill(scenario, child, also=gate)
    killed = scenario.running_deploy()
    assert killed is not None and killed.log_path and Path(killed.log_path).is_file()
    assert "# exit code" not in Path(killed.log_path).read_text()  # killed mid-run
    restart_and_check(scenario, killed, serves="v1")


def test_killed_while_loading(tmp_path: Path) -> None:
    scenario = make_scenario(tmp_path, v2_files={"hello/slow.py": SLOW_IMPORT})
    mark = tmp_path / "importing"
    child = scenario.deploy_child({"CRASH_MARK": str(mark), "CRASH_SLEEP": "60"})
    wait_for("the plugin's import", mark.exists)
    kill(scenario, child)
    killed = scenario.running_deploy()
    assert killed is not None and killed.commit == scenario.v2
    restart_and_check(scenario, killed, serves="v1")


@pytest.mark.parametrize(("point", "serves"), [("swap", "v1"), ("history", "v1")])
def test_killed_while_recording(tmp_path: Path, point: str, serves: str) -> None:
    """``history``: before the result is written; ``swap``: in the middle of that write.

    The new live commit and the deploy's result are one transaction, so a
    kill at either point leaves the last good release recorded as live.
    """
    scenario = make_scenario(tmp_path)
    child = scenario.deploy_child({"CRASH_AT": point})
    child.wait(timeout=120)  # the harness kills the child itself
    scenario.killed(child)
    killed = scenario.running_deploy()
    assert killed is not None and killed.commit == scenario.v2
    state = scenario.state_of_hello()
    assert state is not None and state.live_commit == {"v1": scenario.v1, "v2": scenario.v2}[serves]
    restart_and_check(scenario, killed, serves=serves)
