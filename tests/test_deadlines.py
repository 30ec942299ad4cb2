"""Every network step has a deadline; a hung git server starves nothing and stops nothing.

Against a real TCP listener that accepts and never answers (:mod:`silent`):
a fetch over ``git://`` and over HTTP fails at its deadline, with that
deadline in the message and without a retry; four plugins stuck on it leave
a fifth free to deploy; ``gitplug serve`` stops on SIGTERM or SIGINT within
its grace period while its deploy is blocked on the silent server.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from flask import Flask

from faults_site import start_without_polls
from gitplug import GitPlug
from gitplug.deploy.gitsource import GitSource
from gitplug.errors import FetchError
from gitplug.state import DeployResult, Stage
from gitrepo import GitRepo
from serverproc import Server, wait_for, write_config, write_version
from silent import SilentServer

#: Seconds `gitplug serve` may take to exit after SIGTERM/SIGINT (README "Production").
GRACE_S = 10.0


@pytest.fixture
def silent() -> SilentServer:
    server = SilentServer()
    yield server
    server.close()


@pytest.mark.parametrize("scheme", ["git", "http"])
def test_a_server_that_never_answers_fails_the_fetch_at_its_deadline(
    tmp_path: Path, silent: SilentServer, scheme: str
) -> None:
    source = GitSource(tmp_path / "mirrors", timeout=1.5)
    url = silent.url(scheme)
    with pytest.raises(FetchError) as caught:
        source.fetch("hello", url)
    message = str(caught.value)
    assert message.startswith(f"plugin 'hello': could not fetch {url}: timed out after 1.5s."), message
    # One connection: no silent retry doubles the deadline the message states.
    assert silent.accepted == 1
    with pytest.raises(FetchError, match="timed out after 1.5s"):
        source.remote_refs("hello", url)
    assert silent.accepted == 2


def test_plugins_stuck_on_a_silent_server_do_not_starve_a_healthy_one(
    tmp_path: Path, silent: SilentServer
) -> None:
    repo = GitRepo(tmp_path / "repo")
    good = write_version(repo, "hello", "v1")
    stuck = [f"stuck{i}" for i in range(4)]  # as many as the deploy queue has workers
    app = Flask("host")
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "plugins": {
            **{name: {"repo": silent.url("git", f"{name}.git"), "test": False} for name in stuck},
            "hello": {"repo": repo.url, "test": False},
        },
    }
    gp = GitPlug(app)
    try:
        start_without_polls(gp)
        gp.deployer.git.timeout = 3.0
        for name in stuck:
            gp.deploy(name, wait=False)  # an API deploy: it leaves a record, also when it fails
        silent.wait_accepted(len(stuck))  # every worker is now blocked on the silent server
        assert all(gp.store.last_deploy(name).result == DeployResult.RUNNING for name in stuck)
        record = gp.deploy("hello")
        assert record is not None and record.result == DeployResult.LIVE, record
        assert record.commit == good
        # The stuck ones fail at their deadline, at stage fetch, which frees their workers
        # (the first to fail made room for hello; the others may still be timing out).
        for name in stuck:
            wait_for(lambda name=name: gp.store.last_deploy(name).result != DeployResult.RUNNING,
                     timeout=60, what=f"{name}'s deploy to end")
            last = gp.store.last_deploy(name)
            assert last is not None and last.result == DeployResult.FAILED, last
            assert last.stage == Stage.FETCH and "timed out after 3s" in (last.error or ""), last
    finally:
        gp.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_within_its_grace_period_while_a_fetch_hangs(
    tmp_path: Path, silent: SilentServer, signum: int
) -> None:
    config = write_config(
        tmp_path / "deploy.yaml", {"hello": {"repo": silent.url("git", "hello.git")}}
    )
    with Server(config) as server:
        # The controller polls its plugins once, a second after it starts: that
        # fetch connects to the silent server and blocks there.
        silent.wait_accepted(1)
        assert server.proc is not None
        server.proc.send_signal(signum)
        started = time.monotonic()
        try:
            code = server.proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"gitplug serve ignored {signal.Signals(signum).name} for {GRACE_S} s "
                        f"while a fetch hung:\n{server.log()}")
        assert code == 0, server.log()
        assert time.monotonic() - started < GRACE_S
