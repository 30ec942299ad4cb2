"""Automatic rollback (SPEC 6): a newly live release that errs is swapped back and pinned.

A plugin's v2 answers 500 (or raises) on a route. With ``auto_rollback:
{max_error_rate: 0.2, min_requests: 20, window: 60}`` and the host's services
running, requests through a real threaded server (127.0.0.1) make the
controller swap v1 back within seconds, pin it, record a deploy with trigger
``auto-rollback`` whose error states the observed rate, and send
``rolled_back``. A healthy v2 is kept; fewer than ``min_requests`` requests
in the window judge nothing.
"""

from __future__ import annotations

import re
import textwrap
import time
import typing as t
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask import Flask

from conftest import serve_wsgi
from gitplug import GitPlug, signals
from gitplug.deploy.triggers import Trigger
from gitplug.state import DeployResult
from gitrepo import GitRepo

PLUGIN_INIT = """
from gitplug import Plugin, current_plugin

STAMP = "{stamp}"
plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return f"stamp={{STAMP}}@{{current_plugin.commit[:7]}}"

@plugin.route("/work")
def work():
{work}

@plugin.route("/boom")
def boom():
    return "always broken", 500
"""

WORK = {
    "healthy": '    return "done"',
    "500": '    return "v2 cannot work", 500',
    "raise": '    raise RuntimeError("v2 is broken")',
}

POLICY = {"max_error_rate": 0.2, "min_requests": 20, "window": 60}


def plugin_files(stamp: str, work: str) -> dict[str, str]:
    return {"hello/__init__.py": textwrap.dedent(PLUGIN_INIT).format(stamp=stamp, work=WORK[work])}


def get(base: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def hammer(base: str, path: str, count: int) -> list[int]:
    return [get(base, path)[0] for _ in range(count)]


def wait_for(what: str, predicate: t.Callable[[], t.Any], timeout: float = 20.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Host:
    app: Flask
    gp: GitPlug
    repo: GitRepo
    v1: str
    rolled_back: list[dict[str, t.Any]] = field(default_factory=list)

    @property
    def store(self) -> t.Any:
        return self.gp._state.store

    def state(self) -> t.Any:
        return self.store.get_plugin("hello")

    def deploy_v2(self, work: str) -> str:
        for path, text in plugin_files("v2", work).items():
            self.repo.write(path, text)
        v2 = self.repo.commit(f"v2 {work}")
        record = self.gp.deploy("hello")
        assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, v2), (
            record
        )
        return v2

    def watch_looked_again(self) -> None:
        """Wait for two whole checks of the auto-rollback watch from now on.

        The second one started after this call: it read every count that
        reached the store before, so a rollback it was going to make is made.
        """
        watch = self.gp._state.services.auto_rollback
        seen = watch.checks
        wait_for("two more checks of the auto-rollback watch", lambda: watch.checks >= seen + 2)

    def judged(self) -> bool:
        """Whether the controller has judged the live release (internal; only waited on)."""
        watched = self.gp._state.services.auto_rollback._watched.get("hello")
        return bool(watched and watched.commit == self.state().live_commit and watched.judged)


@pytest.fixture
def make_host(tmp_path: Path) -> t.Iterator[t.Callable[..., Host]]:
    made: list[tuple[Host, t.Callable[..., None]]] = []

    def make(policy: dict[str, t.Any] = POLICY) -> Host:
        repo = GitRepo(tmp_path / "repo")
        for path, text in plugin_files("v1", "healthy").items():
            repo.write(path, text)
        v1 = repo.commit("v1")
        app = Flask("host")  # not TESTING: an unhandled exception becomes a 500, as in production
        app.config["GITPLUG"] = {
            "data_dir": str(tmp_path / "data"),
            "plugins": {
                "hello": {
                    "repo": repo.url,
                    "test": False,
                    "poll_interval": 3600,
                    "auto_rollback": dict(policy),
                }
            },
        }
        gp = GitPlug(app)
        record = gp.deploy("hello")
        assert record is not None and record.result == DeployResult.LIVE, record
        host = Host(app, gp, repo, v1)

        def on_rolled_back(sender: object, **kwargs: t.Any) -> None:
            host.rolled_back.append(kwargs)

        signals.rolled_back.connect(on_rolled_back, weak=False)
        made.append((host, on_rolled_back))
        return host

    yield make
    for host, receiver in made:
        signals.rolled_back.disconnect(receiver)
        host.gp.shutdown()


@pytest.mark.parametrize("work", ["500", "raise"])
def test_erring_release_is_rolled_back_and_pinned(
    make_host: t.Callable[..., Host], work: str
) -> None:
    host = make_host()
    v2 = host.deploy_v2(work)
    with serve_wsgi(host.app) as base:
        host.gp.start_background()
        assert get(base, "/hello/") == (200, f"stamp=v2@{v2[:7]}")
        assert hammer(base, "/hello/work", 25) == [500] * 25
        sent = time.monotonic()
        wait_for("the auto-rollback", lambda: host.state().live_commit == host.v1)
        assert time.monotonic() - sent < 10
        wait_for("this worker to serve v1", lambda: get(base, "/hello/")[1].startswith("stamp=v1"))
        assert get(base, "/hello/") == (200, f"stamp=v1@{host.v1[:7]}")

    state = host.state()
    assert (state.live_commit, state.pin, state.previous_commit) == (host.v1, host.v1, v2), state
    assert host.gp.status()["plugins"][0]["pin"] == host.v1

    record = host.gp.history("hello")[0]
    assert (record.trigger, record.result, record.commit) == (
        "auto-rollback",
        DeployResult.LIVE,
        host.v1,
    )
    # The observed rate: 25 errors, and the one stamp check made before them.
    match = re.fullmatch(
        rf"error rate (\d+)% \((\d+) of (\d+) requests\) exceeded max_error_rate 20%"
        rf" for {v2[:12]}",
        record.error or "",
    )
    assert match, record.error
    percent, errors, requests = map(int, match.groups())
    assert 20 <= requests <= 26 and requests - 1 <= errors <= requests, record.error
    assert percent == round(100 * errors / requests), record.error

    assert len(host.rolled_back) == 1, host.rolled_back
    fired = host.rolled_back[0]
    assert (fired["plugin"], fired["from_commit"], fired["to_commit"]) == ("hello", v2, host.v1)
    assert fired["reason"] == record.error and fired["deploy"].id == record.id

    # Pinned: the poll of the tracked ref (still v2's branch) does nothing.
    assert host.gp._state.services._run_trigger(Trigger("hello", "poll")) is None
    assert host.state().live_commit == host.v1


def test_healthy_release_is_kept_and_judged_on_its_first_requests(
    make_host: t.Callable[..., Host],
) -> None:
    host = make_host()
    v2 = host.deploy_v2("healthy")
    with serve_wsgi(host.app) as base:
        host.gp.start_background()
        assert hammer(base, "/hello/work", 25) == [200] * 25
        wait_for("the judgement of v2", host.judged)
        # Judged over its first min_requests requests: later errors do not roll it back.
        assert hammer(base, "/hello/boom", 25) == [500] * 25
        wait_for(
            "the errors to reach the store",
            lambda: host.store.release_stats("hello", v2) == (50, 25),
        )
        host.watch_looked_again()
        assert get(base, "/hello/") == (200, f"stamp=v2@{v2[:7]}")
    state = host.state()
    assert (state.live_commit, state.pin) == (v2, None), state
    assert [r.trigger for r in host.gp.history("hello")] == ["api", "api"]
    assert host.rolled_back == []


def test_fewer_than_min_requests_judge_nothing(make_host: t.Callable[..., Host]) -> None:
    host = make_host()
    v2 = host.deploy_v2("500")
    with serve_wsgi(host.app) as base:
        host.gp.start_background()
        assert hammer(base, "/hello/work", 10) == [500] * 10
        wait_for(
            "the errors to reach the store",
            lambda: host.store.release_stats("hello", v2) == (10, 10),
        )
        host.watch_looked_again()
        assert not host.judged()
        assert get(base, "/hello/") == (200, f"stamp=v2@{v2[:7]}")
    state = host.state()
    assert (state.live_commit, state.pin) == (v2, None), state
    assert host.rolled_back == []


def test_requests_after_the_window_do_not_count(make_host: t.Callable[..., Host]) -> None:
    host = make_host({**POLICY, "window": 1.5})
    v2 = host.deploy_v2("500")
    with serve_wsgi(host.app) as base:
        host.gp.start_background()
        assert hammer(base, "/hello/work", 10) == [500] * 10
        wait_for("the window to close", host.judged)  # accepted: too few requests in time
        assert hammer(base, "/hello/work", 25) == [500] * 25
        wait_for(
            "the errors to reach the store",
            lambda: host.store.release_stats("hello", v2) == (35, 35),
        )
        host.watch_looked_again()
        assert get(base, "/hello/") == (200, f"stamp=v2@{v2[:7]}")
    assert (host.state().live_commit, host.state().pin) == (v2, None)
    assert host.rolled_back == []
