"""``host_lost``: a fleet's host went silent; reported once per fleet per loss (README, "Notifications").

The end-to-end test runs two real ``gitplug serve`` hosts on one real
PostgreSQL database (:mod:`fleet`'s harness), both with ``notify`` entries
for ``host_lost`` pointing at a recording HTTP server on 127.0.0.1, and
SIGKILLs one. The others drive :class:`~gitplug.deploy.hostwatch.LostHostWatch`
(two controllers racing, a restart, a return, the guards) on a real database
with clocks of their own, and the :class:`~gitplug.deploy.notify.Notifier`'s
formats and ``plugins`` filter. Every wait is on an event or a polled
condition with a deadline; no fixed sleeps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fleet import Host, leader_of
from gitplug import signals
from gitplug.config import load_config
from gitplug.deploy.hostwatch import LostHostWatch, loss_key
from gitplug.deploy.notify import Notifier
from gitplug.state import HOST_LOST_AFTER_S, HostInfo, HostPlugin, StateStore, open_state_store, parse_iso
from gitrepo import GitRepo
from pgserver import fresh_database
from serverproc import wait_for, write_config, write_version

SECRET = "host-lost-secret-0123456789"
PUBLIC = "https://deploy.example.com"
STATUS_URL = PUBLIC + "/_gitplug/"
#: The end-to-end bound: lost after 10 s of silence, noticed within a control round, sent at once.
LOST_DEADLINE_S = 40.0


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> t.Any:
        return json.loads(self.body)


class Recorder:
    """A threaded HTTP server on 127.0.0.1 that answers 200 and records every POST."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._changed = threading.Condition()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                # Recorded before the answer: a sender that saw its 200 finds the hit here
                # (recording after it raced the test's assertion on a loaded machine).
                with recorder._changed:
                    recorder.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    recorder._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: t.Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def under(self, path: str) -> list[Hit]:
        with self._changed:
            return [hit for hit in self.hits if hit.path == path]

    def wait(self, path: str, count: int, timeout: float) -> list[Hit]:
        """Block until ``path`` has at least ``count`` hits (woken by each request); fail at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(hits := [hit for hit in self.hits if hit.path == path]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"{path}: {len(hits)} request(s) within {timeout} s, expected {count}; "
                                f"all: {[(h.path, h.body[:200]) for h in self.hits]}")
                self._changed.wait(remaining)
            return hits

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    made = Recorder()
    try:
        yield made
    finally:
        made.close()


def signed(hit: Hit) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(hit.headers.get("x-gitplug-signature", ""), expected)


# --------------------------------------------------------------------------- two real hosts


def _with_notify(host: Host, base: str) -> None:
    """Add the ``notify`` entries (and ``public_url``) to the host's deploy.yaml."""
    data = yaml.safe_load(host.config.read_text())
    data["public_url"] = PUBLIC
    data["notify"] = [
        {"url": base + "/json", "events": ["host_lost", "deploy_failed"], "secret": SECRET},
        {"url": base + "/hello", "events": ["host_lost"], "plugins": ["hello"]},
        {"url": base + "/slack", "format": "slack", "events": ["host_lost"]},
    ]
    host.config.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_killed_host_is_reported_once_by_the_fleet(tmp_path: Path, recorder: Recorder) -> None:
    started = time.monotonic()
    with fresh_database("gitplug_hostlost") as db_url:
        repo = GitRepo(tmp_path / "hello-repo")
        v1 = write_version(repo, "hello", "v1")
        a = Host(tmp_path, "web-1", db_url, repo.url, gate=False)
        b = Host(tmp_path, "web-2", db_url, repo.url, gate=False)
        for host in (a, b):
            _with_notify(host, recorder.base)
        store = open_state_store(db_url)
        try:
            a.start()
            wait_for(lambda: leader_of(a) == "web-1", timeout=30, what="web-1 leading hello")
            b.start()
            # web-1's heartbeat says what the payload will: it serves v1 and leads hello.
            wait_for(lambda: {h: (e["state"], e["live_commit"], e["leader"]) for h, e in b.status()["hosts"].items()}
                     == {"web-1": ("live", v1, True), "web-2": ("live", v1, False)},
                     timeout=30, what="both hosts live on v1 in web-2's status, web-1 leading")

            a.kill()  # SIGKILL: the leader's machine dies
            killed_at = time.time()
            [hit] = recorder.wait("/json", 1, LOST_DEADLINE_S)
            noticed_s = time.time() - killed_at
            body = hit.json
            assert signed(hit), hit.headers
            assert hit.headers["x-gitplug-event"] == "host_lost"
            assert hit.headers["content-type"] == "application/json"
            assert (body["event"], body["host"], body["reported_by"], body["plugin"]) == (
                "host_lost", "web-1", "web-2", None)
            assert body["plugins"] == {"hello": {"live_commit": v1, "leader": True, "error": None}}
            assert body["status_url"] == STATUS_URL
            last = parse_iso(body["last_heartbeat_at"]).timestamp()
            assert killed_at - HOST_LOST_AFTER_S <= last <= killed_at
            assert all(body[k] is None for k in ("commit", "ref", "result", "stage", "deploy_id"))
            # The plugins filter matched (web-1 served hello); slack has its one line.
            [filtered] = recorder.wait("/hello", 1, 10)
            assert filtered.json == {**body, "at": filtered.json["at"]}
            [slack] = recorder.wait("/slack", 1, 10)
            assert set(slack.json) == {"text"}
            assert slack.json["text"].startswith("gitplug: host web-1 is lost: no heartbeat since ")
            assert f"hello {v1[:12]} (leader)" in slack.json["text"] and "reported by web-2" in slack.json["text"]

            # No second report: web-2 goes on beating (and checking, every round) twice more.
            def beat() -> float:
                return next(h.heartbeat_at for h in store.hosts() if h.host_id == "web-2")

            seen = [beat()]

            def advanced_twice() -> bool:
                now = beat()
                if now > seen[-1]:
                    seen.append(now)
                return len(seen) >= 3

            wait_for(advanced_twice, timeout=20, interval=0.1, what="web-2 beating twice more")
            assert [len(recorder.under(p)) for p in ("/json", "/hello", "/slack")] == [1, 1, 1]
            said = [line for line in b.log().splitlines() if "host web-1 is lost" in line]
            assert len(said) == 1 and "host web-2 reports it" in said[0], said
            print(f"host_lost {noticed_s:.1f} s after the SIGKILL; test {time.monotonic() - started:.1f} s")
        finally:
            store.close()
            for host in (a, b):
                host.stop()


# --------------------------------------------------------------------------- the watch, on a real database


class Clocks:
    """Wall and monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = 1000.0

    def watch(self, store: StateStore, sender: object, host_id: str, *, settle_s: float = 0.0) -> LostHostWatch:
        return LostHostWatch(store, sender, host_id, settle_s=settle_s,
                             clock=lambda: self.wall, monotonic=lambda: self.mono)


@pytest.fixture
def pg_store() -> Iterator[StateStore]:
    with fresh_database("gitplug_hostlost") as url:
        store = open_state_store(url)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def heard() -> Iterator[tuple[object, list[dict[str, t.Any]]]]:
    """A sender and the ``host_lost`` signals sent with it."""
    sender, got = object(), []

    def receiver(_: object, **kwargs: t.Any) -> None:
        got.append(kwargs)

    signals.host_lost.connect(receiver, sender=sender, weak=False)
    try:
        yield sender, got
    finally:
        signals.host_lost.disconnect(receiver, sender=sender)


def test_two_controllers_report_a_loss_once_and_a_return_resets_it(
        pg_store: StateStore, heard: tuple[object, list[dict[str, t.Any]]],
        caplog: pytest.LogCaptureFixture) -> None:
    sender, got = heard
    clocks = Clocks()
    plugins = {"hello": HostPlugin("a" * 40, leads=True)}
    for host_id in ("web-1", "web-3"):
        pg_store.host_heartbeat(HostInfo(host_id, clocks.wall, {}))
    pg_store.host_heartbeat(HostInfo("web-2", clocks.wall - HOST_LOST_AFTER_S - 5, plugins, leader=True))
    one, three = clocks.watch(pg_store, sender, "web-1"), clocks.watch(pg_store, sender, "web-3")

    # Both controllers see the loss in the same instant: the store lets one report it.
    start = threading.Barrier(2)
    results: dict[str, list[HostInfo]] = {}

    def check(watch: LostHostWatch) -> None:
        hosts = pg_store.hosts()
        start.wait(10)
        results[watch.host_id] = watch.check(hosts)

    caplog.set_level(logging.INFO, logger="gitplug.deploy.hostwatch")
    threads = [threading.Thread(target=check, args=(w,)) for w in (one, three)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(len(r) for r in results.values()) == [0, 1], results
    [kwargs] = got
    reporter = next(h for h, r in results.items() if r)
    assert (kwargs["host"], kwargs["reported_by"]) == ("web-2", reporter)
    assert kwargs["info"].plugins == plugins and kwargs["info"].leader
    said = [r.getMessage() for r in caplog.records]
    assert sum("host web-2 is lost: no heartbeat since" in m for m in said) == 1, said
    assert sum("host web-2 is lost (no heartbeat since" in m and "another host reported it" in m
               for m in said) == 1, said

    # Every later round, and a restarted controller (a new watch), finds it decided.
    assert one.check(pg_store.hosts()) == [] and three.check(pg_store.hosts()) == []
    assert clocks.watch(pg_store, sender, "web-1").check(pg_store.hosts()) == []
    assert not pg_store.remember_delivery(loss_key(kwargs["info"]))
    assert len(got) == 1

    # web-2 comes back, then goes silent again: a new loss, reported once more.
    clocks.wall += 1
    pg_store.host_heartbeat(HostInfo("web-2", clocks.wall, plugins))
    assert one.check(pg_store.hosts()) == [] and three.check(pg_store.hosts()) == []
    clocks.wall += HOST_LOST_AFTER_S + 1
    for host_id in ("web-1", "web-3"):  # the two controllers beat on
        pg_store.host_heartbeat(HostInfo(host_id, clocks.wall, {}))
    reported = [*one.check(pg_store.hosts()), *three.check(pg_store.hosts())]
    assert [h.host_id for h in reported] == ["web-2"] and len(got) == 2
    assert got[1]["info"].heartbeat_at == clocks.wall - HOST_LOST_AFTER_S - 1


def test_the_watch_judges_after_settling_and_skips_long_lost_hosts(
        pg_store: StateStore, heard: tuple[object, list[dict[str, t.Any]]]) -> None:
    sender, got = heard
    clocks = Clocks()
    pg_store.host_heartbeat(HostInfo("web-1", clocks.wall, {}))
    pg_store.host_heartbeat(HostInfo("web-2", clocks.wall - 60, {}))
    pg_store.host_heartbeat(HostInfo("retired", clocks.wall - LostHostWatch.window_s - 60, {}))
    watch = clocks.watch(pg_store, sender, "web-1", settle_s=HOST_LOST_AFTER_S)

    # Just started (or the store just answered again): every live host may still be about to beat.
    assert watch.check(pg_store.hosts()) == [] and watch.checks == 0
    clocks.mono += HOST_LOST_AFTER_S - 1
    assert watch.check(pg_store.hosts()) == []
    watch.interrupted()  # the store failed: settle again from the next answer
    clocks.mono += 2
    assert watch.check(pg_store.hosts()) == [] and not got
    clocks.mono += HOST_LOST_AFTER_S
    # web-2 is reported; the host silent for over a week is not (it would be again once its claim expired).
    assert [h.host_id for h in watch.check(pg_store.hosts())] == ["web-2"] and watch.checks == 1
    assert [g["host"] for g in got] == ["web-2"]
    assert pg_store.remember_delivery(loss_key(next(h for h in pg_store.hosts() if h.host_id == "retired")))


# --------------------------------------------------------------------------- the notifier's formats


def test_the_notifier_formats_and_filters_host_lost(tmp_path: Path, recorder: Recorder) -> None:
    base = recorder.base
    config = load_config(write_config(tmp_path / "deploy.yaml", {
        "hello": {"repo": "https://git.example.com/hello.git"},
        "other": {"repo": "https://git.example.com/other.git", "url_prefix": "/other"},
    }, public_url=PUBLIC, notify=[
        {"url": base + "/all", "events": ["host_lost"], "secret": SECRET},
        {"url": base + "/hello", "events": ["host_lost"], "plugins": ["hello"]},
        {"url": base + "/other", "events": ["host_lost"], "plugins": ["other"]},
        {"url": base + "/deploys", "events": ["deploy_failed"]},
        {"url": base + "/slack", "format": "slack", "events": ["host_lost"]},
        {"url": base + "/api/v3/repos/team/hello", "format": "github", "token": "t" * 20,
         "events": ["deploy_succeeded", "host_lost"]},
    ]))
    sender = object()
    notifier = Notifier(lambda: config, sender=sender).connect()
    try:
        info = HostInfo("web-2", 1_790_000_000.25, {
            "hello": HostPlugin("b" * 40, leads=True), "other": HostPlugin(None, "cannot fetch"),
        })
        signals.host_lost.send(sender, host="web-2", info=info, reported_by="web-1")
        assert notifier.flush(30)
    finally:
        assert notifier.close(timeout=30)
    assert sorted(hit.path for hit in recorder.hits) == ["/all", "/hello", "/slack"]
    [hit] = recorder.under("/all")
    assert signed(hit) and hit.headers["x-gitplug-event"] == "host_lost"
    body = hit.json
    assert body == {
        "event": "host_lost", "plugin": None, "commit": None, "ref": None, "result": None, "stage": None,
        "error": None, "trigger": None, "deploy_id": None, "host": "web-2",
        "plugins": {"hello": {"live_commit": "b" * 40, "leader": True, "error": None},
                    "other": {"live_commit": None, "leader": False, "error": "cannot fetch"}},
        "last_heartbeat_at": "2026-09-21T14:13:20.250Z", "reported_by": "web-1",
        "status_url": STATUS_URL, "at": body["at"],
    }
    [slack] = recorder.under("/slack")
    assert slack.json == {"text": "gitplug: host web-2 is lost: no heartbeat since 2026-09-21T14:13:20.250Z; "
                                  f"it served hello {'b' * 12} (leader) (reported by web-1) <{STATUS_URL}|status>"}
