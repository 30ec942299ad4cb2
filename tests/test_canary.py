"""Canary releases inside the process (SPEC 6, 7, 10; README "Canary releases").

A host app with gitplug, configured from a deploy.yaml (so that the CLI reads
the same configuration and store), serves a plugin through a real threaded
server on 127.0.0.1. The host sits behind werkzeug's ``ProxyFix`` as it
would behind a load balancer, so a test speaks for many distinct clients by
their ``X-Forwarded-For`` address. Every response says which release served
each of its parts (module, template, static URL, commit): a request must
never mix the two sides of a canary.

Stated tolerance of the split test: over 800 distinct client addresses, a
30 % canary gets between 24 % and 36 % of them (the side of an address is a
CRC-32 bucket of the canary's commit and the address: 6 points is more than
4 standard deviations of a fair 30 % draw).
"""

from __future__ import annotations

import http.client
import json
import textwrap
import time
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from conftest import serve_wsgi
from gitplug import GitPlug, signals
from gitplug.cli import cli
from gitplug.state import DeployResult, PluginStateValue, Stage
from gitrepo import GitRepo

TOKEN = "canary-admin-token-0123456789"

PLUGIN_INIT = '''
import os
from flask import render_template, url_for
from gitplug import Plugin, current_plugin
from hello.stamp import STAMP

plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return render_template("page.html", module=STAMP, commit=current_plugin.commit,
                           static=url_for("hello.static", filename="s.txt"))

@plugin.route("/work")
def work():
{work}

@plugin.on_unload
def unloaded():
    with open(os.environ["CANARY_TEST_UNLOADS"], "a") as log:
        log.write(STAMP + "\\n")
'''

WORK = {
    "healthy": '    return "done"',
    "500": '    return "cannot work", 500',
    "raise": '    raise RuntimeError("broken release")',
}


def plugin_files(stamp: str, work: str = "healthy") -> dict[str, str]:
    return {
        "hello/__init__.py": textwrap.dedent(PLUGIN_INIT).format(work=WORK[work]),
        "hello/stamp.py": f'STAMP = "{stamp}"\n',
        "hello/templates/page.html": (
            "module={{ module }};template=" + stamp + ";static={{ static }};commit={{ commit }}"
        ),
        "hello/static/s.txt": stamp,
    }


@dataclass
class Answer:
    status: int
    body: str
    cookie: str | None

    @property
    def stamps(self) -> dict[str, str]:
        return dict(part.partition("=")[::2] for part in self.body.split(";"))


def fetch(base: str, path: str, *, client: str = "10.0.0.1", cookie: str | None = None) -> Answer:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"X-Forwarded-For": client}
    if cookie:
        headers["Cookie"] = cookie
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        set_cookie = response.getheader("Set-Cookie")
        return Answer(response.status, response.read().decode(), set_cookie.split(";")[0] if set_cookie else None)
    finally:
        conn.close()


def wait_for(what: str, predicate: t.Callable[[], t.Any], timeout: float = 30.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def side_of(answer: Answer, commits: dict[str, str]) -> str:
    """The one release that served ``answer``; fails when its parts disagree."""
    assert answer.status == 200, answer
    stamps = answer.stamps
    module, template = stamps["module"], stamps["template"]
    assert module == template, f"response mixes releases: {answer.body}"
    assert stamps["commit"] == commits[module], answer.body
    assert f"/static/{commits[module][:12]}/" in stamps["static"], answer.body
    return module


@dataclass
class Host:
    app: Flask
    gp: GitPlug
    repo: GitRepo
    config: Path
    unloads: Path
    v1: str
    base: str = ""
    events: list[tuple[str, dict[str, t.Any]]] = field(default_factory=list)

    @property
    def store(self) -> t.Any:
        return self.gp._state.store

    def state(self) -> t.Any:
        return self.store.get_plugin("hello")

    def commit(self, stamp: str, work: str = "healthy") -> str:
        for path, text in plugin_files(stamp, work).items():
            self.repo.write(path, text)
        return self.repo.commit(stamp)

    def cli(self, *args: str) -> t.Any:
        return CliRunner().invoke(cli, [*args, "-c", str(self.config)], catch_exceptions=False)

    def record(self, deploy_id: int) -> t.Any:
        return self.store.get_deploy(deploy_id)

    def watch_looked_again(self) -> None:
        """Two more whole checks of the canary watch: what reached the store before is judged."""
        watch = self.gp._state.services.canary_watch
        seen = watch.checks
        wait_for("two more checks of the canary watch", lambda: watch.checks >= seen + 2)

    def unloaded(self) -> list[str]:
        return self.unloads.read_text().split() if self.unloads.exists() else []


CONFIG = """\
data_dir: data
poll_interval: 3600
admin_token: {token}
canary: {canary}
plugins:
  hello:
    repo: {repo}
    test: false
"""


@pytest.fixture
def make_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[t.Callable[..., Host]]:
    made: list[tuple[Host, t.Any, list[t.Any]]] = []
    unloads = tmp_path / "unloads.txt"
    monkeypatch.setenv("CANARY_TEST_UNLOADS", str(unloads))

    def make(canary: dict[str, t.Any]) -> Host:
        repo = GitRepo(tmp_path / "repo")
        for path, text in plugin_files("v1").items():
            repo.write(path, text)
        v1 = repo.commit("v1")
        config = tmp_path / "deploy.yaml"
        config.write_text(CONFIG.format(token=TOKEN, canary=json.dumps(canary), repo=repo.url))
        app = Flask("host")  # not TESTING: an unhandled exception is a 500, as in production
        app.config["GITPLUG_CONFIG"] = str(config)
        gp = GitPlug(app)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
        record = gp.deploy("hello")
        assert record is not None and record.result == DeployResult.LIVE, record
        host = Host(app, gp, repo, config, unloads, v1)
        receivers = []
        for name in ("canary_started", "canary_promoted", "canary_aborted"):
            def receiver(sender: object, _name: str = name, **kwargs: t.Any) -> None:
                host.events.append((_name, kwargs))

            getattr(signals, name).connect(receiver, weak=False)
            receivers.append((getattr(signals, name), receiver))
        server = serve_wsgi(app)
        host.base = server.__enter__()
        made.append((host, server, receivers))
        return host

    yield make
    for host, server, receivers in made:
        for signal, receiver in receivers:
            signal.disconnect(receiver)
        server.__exit__(None, None, None)
        host.gp.shutdown()


SLOW = {"percent": 30, "min_requests": 100000, "duration": 3600, "max_error_rate": 0.05}


def test_a_30_percent_canary_splits_clients_sticks_and_never_mixes(make_host: t.Callable[..., Host]) -> None:
    host = make_host(SLOW)
    v2 = host.commit("v2")
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.stage, record.commit) == (
        DeployResult.RUNNING, Stage.CANARY, v2), record
    assert host.gp.runtime.live("hello").commit == host.v1
    assert host.gp.runtime.canary("hello").commit == v2
    commits = {"v1": host.v1, "v2": v2}

    sides: dict[str, str] = {}
    cookies: dict[str, str] = {}
    for i in range(800):
        client = f"10.{i // 200}.{i % 200}.{7 + i % 3}"
        answer = fetch(host.base, "/hello/", client=client)
        sides[client] = side_of(answer, commits)
        assert answer.cookie is not None and answer.cookie.startswith("gitplug_canary_hello="), answer
        cookies[client] = answer.cookie
    share = sum(1 for side in sides.values() if side == "v2") / len(sides)
    assert 0.24 <= share <= 0.36, share

    # Sticky: by address alone, and by cookie from any address.
    for client in list(sides)[:60]:
        again = fetch(host.base, "/hello/", client=client)
        assert side_of(again, commits) == sides[client]
        moved = fetch(host.base, "/hello/", client="192.0.2.1", cookie=cookies[client])
        assert side_of(moved, commits) == sides[client]
        assert moved.cookie is None  # it has its side already
    # Each side's versioned static URL resolves, whatever side the client is on.
    for client in list(sides)[:10]:
        for stamp, commit in commits.items():
            static = fetch(host.base, f"/hello/static/{commit[:12]}/s.txt", client=client)
            assert (static.status, static.body) == (200, stamp)

    status = host.gp.status()["plugins"][0]
    assert status["state"] == "canary"
    canary = status["canary"]
    assert (canary["commit"], canary["stable_commit"], canary["percent"]) == (v2, host.v1, 30)
    wait_for("the counts in the store", lambda: host.gp.status()["plugins"][0]["canary"]["canary"]["requests"]
             + host.gp.status()["plugins"][0]["canary"]["stable"]["requests"] >= 800 + 120)
    assert [name for name, _ in host.events] == ["canary_started"]
    assert host.events[0][1]["percent"] == 30


def test_a_healthy_canary_is_promoted_and_the_old_release_unloads(make_host: t.Callable[..., Host]) -> None:
    host = make_host({"percent": 50, "min_requests": 20, "duration": 0.5, "max_error_rate": 0.05})
    v2 = host.commit("v2")
    record = host.gp.deploy("hello")
    assert record is not None and record.stage == Stage.CANARY
    host.gp.start_background()
    for i in range(120):
        assert fetch(host.base, "/hello/work", client=f"10.1.{i}.1").status == 200
    wait_for("the promotion", lambda: host.state().live_commit == v2)
    state = host.state()
    assert (state.canary, state.previous_commit, state.pin) == (None, host.v1, None)
    done = host.record(record.id)
    assert (done.result, done.stage, done.error) == (DeployResult.LIVE, None, None), done
    figures = done.canary_figures
    assert figures["canary"]["errors"] == 0 and figures["canary"]["requests"] >= 20, figures
    assert figures["canary"]["requests"] + figures["stable"]["requests"] == 120, figures
    assert figures["decision"].startswith("promoted: canary 0 errors in"), figures
    # Every client is on v2 now, and v1 unloaded after its last request.
    for i in range(20):
        assert fetch(host.base, "/hello/", client=f"10.2.{i}.1").stamps["module"] == "v2"
    wait_for("v1's on_unload", lambda: host.unloaded() == ["v1"])
    assert [name for name, _ in host.events] == ["canary_started", "canary_promoted"]
    history = host.cli("history", "hello")
    assert history.exit_code == 0, history.output
    assert "canary 50%: 0 errors /" in history.output and "promoted: canary 0 errors in" in history.output


@pytest.mark.parametrize("work", ["500", "raise"])
def test_an_erring_canary_is_rolled_back_by_itself(make_host: t.Callable[..., Host], work: str) -> None:
    host = make_host({"percent": 10, "min_requests": 10, "duration": 0.5, "max_error_rate": 0.05})
    v2 = host.commit("v2", work)
    record = host.gp.deploy("hello")
    assert record is not None and record.stage == Stage.CANARY
    host.gp.start_background()
    commits = {"v1": host.v1, "v2": v2}
    statuses = []
    for i in range(400):
        client = f"10.3.{i // 100}.{i % 100}"
        if host.state().canary is None:
            break
        statuses.append(fetch(host.base, "/hello/work", client=client).status)
    wait_for("the rollback", lambda: host.record(record.id).result != DeployResult.RUNNING)
    done = host.record(record.id)
    assert (done.result, done.stage) == (DeployResult.FAILED, Stage.CANARY), done
    assert "above max_error_rate 5.0%" in (done.error or ""), done.error
    figures = done.canary_figures
    assert figures["canary"]["errors"] == figures["canary"]["requests"] >= 10, figures
    assert figures["stable"]["errors"] == 0 and figures["stable"]["requests"] > 0, figures
    # The canary had about its 10 % of the clients.
    assert 0.03 <= statuses.count(500) / len(statuses) <= 0.2, (statuses.count(500), len(statuses))
    state = host.state()
    assert (state.live_commit, state.canary, state.state) == (host.v1, None, PluginStateValue.LIVE)
    assert "rolled back" in (state.last_error or "")
    for i in range(30):
        assert side_of(fetch(host.base, "/hello/", client=f"10.3.0.{i}"), commits) == "v1"
    wait_for("v2's on_unload", lambda: host.unloaded() == ["v2"])
    assert [name for name, _ in host.events] == ["canary_started", "canary_aborted"]
    # A poll of the branch (still at v2) does not try v2 again.
    assert host.gp._state.deployer.deploy("hello", trigger="poll") is None
    history = host.cli("history", "hello")
    assert history.exit_code == 0, history.output
    assert "failed" in history.output and "canary" in history.output
    assert f"canary 10%: {figures['canary']['errors']} errors / {figures['canary']['requests']} requests" in history.output


def test_promote_and_abort_by_hand(make_host: t.Callable[..., Host]) -> None:
    host = make_host(SLOW)
    host.gp.start_background()
    v2 = host.commit("v2")
    first = host.gp.deploy("hello")
    assert first is not None and first.stage == Stage.CANARY
    # Abort over the HTTP API.
    conn = http.client.HTTPConnection(*urlsplit(host.base).netloc.split(":"), timeout=30)
    conn.request("POST", "/_gitplug/api/plugins/hello/abort", headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 200, body
    assert (body["result"], body["stage"], body["commit"]) == ("failed", "canary", v2)
    assert body["error"].startswith("canary rolled back: aborted by hand (api)")
    assert host.gp.runtime.canary("hello") is None and host.state().canary is None
    wait_for("v2's on_unload", lambda: host.unloaded() == ["v2"])
    # Nothing to abort or promote now: a clear error, exit status 2.
    none = host.cli("abort", "hello")
    assert none.exit_code == 2 and "runs no canary" in none.output, none.output

    # A new commit starts a canary; the CLI promotes it and this server follows.
    v3 = host.commit("v3")
    second = host.gp.deploy("hello")
    assert second is not None and (second.stage, second.commit) == (Stage.CANARY, v3)
    promoted = host.cli("promote", "hello")
    assert promoted.exit_code == 0, promoted.output
    assert f"canary {v3[:12]} promoted" in promoted.output
    wait_for("this server to serve v3 to everyone", lambda: host.gp.runtime.live("hello").commit == v3
             and host.gp.runtime.canary("hello") is None)
    record = host.record(second.id)
    assert (record.result, record.commit) == (DeployResult.LIVE, v3)
    assert record.canary_figures["decision"] == "promoted by hand (cli)"
    wait_for("v1's on_unload", lambda: host.unloaded() == ["v2", "v1"])
    assert host.state().previous_commit == host.v1


def test_a_new_commit_supersedes_a_canary_and_a_rollback_skips_it(make_host: t.Callable[..., Host]) -> None:
    host = make_host(SLOW)
    v2 = host.commit("v2")
    first = host.gp.deploy("hello")
    assert first is not None and (first.stage, first.commit) == (Stage.CANARY, v2)
    # The same commit again: nothing to do, its canary decides.
    again = host.gp.deploy("hello")
    assert again is not None and again.result == DeployResult.SKIPPED and "in its canary" in (again.error or "")
    v3 = host.commit("v3")
    second = host.gp.deploy("hello")
    assert second is not None and (second.stage, second.commit) == (Stage.CANARY, v3)
    superseded = host.record(first.id)
    assert (superseded.result, superseded.stage) == (DeployResult.SUPERSEDED, Stage.CANARY)
    assert f"superseded by deploy {second.id}" in (superseded.error or "")
    assert host.gp.runtime.canary("hello").commit == v3
    wait_for("v2's on_unload", lambda: host.unloaded() == ["v2"])
    # A rollback never goes through a canary: it ends the running one and swaps at once.
    pinned = host.gp.rollback("hello", host.v1)
    assert pinned is not None and pinned.result == DeployResult.SKIPPED  # v1 is live already
    assert host.state().canary is None and host.gp.runtime.canary("hello") is None
    assert (host.record(second.id).result, host.state().pin) == (DeployResult.SUPERSEDED, host.v1)
    # Resumed, the tracked ref (v3) goes through a canary again.
    resumed = host.gp.resume("hello")
    assert resumed is not None and (resumed.stage, resumed.commit) == (Stage.CANARY, v3)
